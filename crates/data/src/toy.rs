use candle_core::{bail, Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

/// `n` points uniform on the white squares of the Gen-neG checkerboard (paper §4.1): a
/// 4×4 board on [−4, 4]², white iff ⌊x/2⌋ + ⌊y/2⌋ is even.
pub fn checkerboard(n: usize, seed: u64) -> Result<Tensor> {
    checkerboard_with(n, 4, 4.0, seed)
}

/// [`checkerboard`] on a `squares × squares` board over `[−half_width, half_width]²`.
pub fn checkerboard_with(n: usize, squares: usize, half_width: f64, seed: u64) -> Result<Tensor> {
    if squares == 0 || !(half_width > 0.0) {
        bail!("checkerboard: need squares > 0 and half_width > 0, got {squares}, {half_width}");
    }
    let side = 2.0 * half_width / squares as f64;
    // White cells (i, j) counted from the board's corner; colour is decided relative to
    // the origin so that the default board matches ⌊x/2⌋ + ⌊y/2⌋ even.
    let first = (-half_width / side).floor() as i64;
    let white: Vec<(f64, f64)> = (0..squares as i64)
        .flat_map(|i| (0..squares as i64).map(move |j| (i, j)))
        .filter(|(i, j)| (first + i + first + j).rem_euclid(2) == 0)
        .map(|(i, j)| (-half_width + i as f64 * side, -half_width + j as f64 * side))
        .collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v = Vec::with_capacity(2 * n);
    for _ in 0..n {
        let (x0, y0) = white[rng.random_range(0..white.len())];
        v.push((x0 + side * rng.random::<f64>()) as f32);
        v.push((y0 + side * rng.random::<f64>()) as f32);
    }
    Tensor::from_vec(v, (n, 2), &Device::Cpu)
}

/// scikit-learn's `make_moons`: `n/2` (rounded down) points on the outer moon (label 0),
/// the rest on the inner one (label 1), Gaussian noise of std `noise` added; rows are in
/// class order (shuffle with [`crate::Dataset::epoch_batches`]).
pub fn two_moons(n: usize, noise: f64, seed: u64) -> Result<(Tensor, Vec<u32>)> {
    if n < 2 {
        bail!("two moons: need at least 2 points, got {n}");
    }
    if !(noise >= 0.0 && noise.is_finite()) {
        bail!("two moons: noise must be a finite non-negative std, got {noise}");
    }
    let n_out = n / 2;
    let n_in = n - n_out;
    let lin = |k: usize, m: usize| {
        if m > 1 {
            std::f64::consts::PI * k as f64 / (m - 1) as f64
        } else {
            0.0
        }
    };
    let mut pts: Vec<(f64, f64)> = (0..n_out)
        .map(|k| (lin(k, n_out).cos(), lin(k, n_out).sin()))
        .collect();
    pts.extend((0..n_in).map(|k| (1.0 - lin(k, n_in).cos(), 1.0 - lin(k, n_in).sin() - 0.5)));
    let mut rng = StdRng::seed_from_u64(seed);
    let normal = Normal::new(0.0, noise.max(f64::MIN_POSITIVE)).expect("std checked above");
    let mut v = Vec::with_capacity(2 * n);
    for (x, y) in pts {
        let (ex, ey) = if noise > 0.0 {
            (normal.sample(&mut rng), normal.sample(&mut rng))
        } else {
            (0.0, 0.0)
        };
        v.push((x + ex) as f32);
        v.push((y + ey) as f32);
    }
    let labels = (0..n).map(|i| u32::from(i >= n_out)).collect();
    Ok((Tensor::from_vec(v, (n, 2), &Device::Cpu)?, labels))
}

#[cfg(test)]
mod tests {
    use super::*;
    use scoreguide_oracles::{Checkerboard, Oracle};

    #[test]
    fn checkerboard_points_are_all_valid_and_cover_every_white_square() {
        let x = checkerboard(4000, 1).unwrap().to_vec2::<f32>().unwrap();
        let board = Checkerboard::default();
        let mut seen = std::collections::HashSet::new();
        for p in &x {
            assert!(board.check(p).valid, "{p:?}");
            seen.insert(((p[0] / 2.0).floor() as i32, (p[1] / 2.0).floor() as i32));
        }
        assert_eq!(seen.len(), 8);
    }

    #[test]
    fn moons_match_sklearn_layout() {
        let (x, y) = two_moons(10, 0.0, 0).unwrap();
        let x = x.to_vec2::<f32>().unwrap();
        // make_moons(10, shuffle=False, noise=0): outer starts at (1, 0), inner at (0, 0.5).
        assert_eq!(x[0], vec![1.0, 0.0]);
        assert!((x[5][0] - 0.0).abs() < 1e-6 && (x[5][1] - 0.5).abs() < 1e-6);
        assert_eq!(y.iter().filter(|&&l| l == 1).count(), 5);
    }
}
