//! Element-wise passes written so that LLVM vectorises them, compiled three times
//! (AVX-512, AVX2 + FMA, baseline) and picked at run time: the binaries are built for
//! generic x86-64, where a scalar `expf` per element made SiLU cost half a matmul.

/// exp(x) to about 2 ulp for x in [−87, 88] (Cephes' `expf`: 2ⁿ by the exponent bits,
/// a degree-6 polynomial on |r| ≤ ln2/2); clamps outside, so exp(−∞) = 2⁻¹²⁶ ≈ 0.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5·2²³ rounds to the nearest integer in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    // n as an integer from t's mantissa bits: a float-to-int cast would not vectorise
    // (Rust's saturating conversion).
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((ni + 127) as u32) << 23)
}

/// (sin x, cos x) to about 1e-7 absolute for |x| up to a few thousand: x reduced by
/// the nearest multiple of π/2 (π/2 in three parts, Cody–Waite), Cephes' polynomials on
/// [−π/4, π/4], and the quadrant picked by selects rather than branches.
#[inline(always)]
fn sin_cos(x: f32) -> (f32, f32) {
    const TWO_OVER_PI: f32 = std::f32::consts::FRAC_2_PI;
    const P1: f32 = 1.570_312_5;
    const P2: f32 = 4.837_513e-4;
    const P3: f32 = 7.549_79e-8;
    const ROUND: f32 = 12_582_912.0;
    let t = x * TWO_OVER_PI + ROUND;
    let q = t - ROUND;
    let qi = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = ((x - q * P1) - q * P2) - q * P3;
    let r2 = r * r;
    let s = r + r * r2 * (-1.666_665_5e-1 + r2 * (8.332_161e-3 + r2 * -1.951_529_6e-4));
    let c =
        1.0 - 0.5 * r2 + r2 * r2 * (4.166_664_6e-2 + r2 * (-1.388_731_6e-3 + r2 * 2.443_315_7e-5));
    let swap = qi & 1 != 0;
    let (sin, cos) = if swap { (c, s) } else { (s, c) };
    let sin = if qi & 2 != 0 { -sin } else { sin };
    let cos = if (qi + 1) & 2 != 0 { -cos } else { cos };
    (sin, cos)
}

#[inline(always)]
fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + exp(-z))
}

/// Compiles `$body` (a function over slices) once per instruction set and dispatches.
macro_rules! multiversion {
    ($(#[$m:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$m])*
        pub fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) { body($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the features were detected on this CPU.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

multiversion! {
    /// In place over rows of width `bias.len()`: z = v + bias, then v = SiLU(z) with
    /// sigmoid(z) into `saved` where given, or v = z without `silu`.
    pub fn bias_rows(v: &mut [f32], bias: &[f32], silu: bool, saved: Option<&mut [f32]>) {
        let n = bias.len();
        match (silu, saved) {
            (true, Some(saved)) => {
                for (row, srow) in v.chunks_exact_mut(n).zip(saved.chunks_exact_mut(n)) {
                    for ((y, s), b) in row.iter_mut().zip(srow.iter_mut()).zip(bias) {
                        let z = *y + b;
                        let sg = sigmoid(z);
                        *s = sg;
                        *y = z * sg;
                    }
                }
            }
            (true, None) => {
                for row in v.chunks_exact_mut(n) {
                    for (y, b) in row.iter_mut().zip(bias) {
                        let z = *y + b;
                        *y = z * sigmoid(z);
                    }
                }
            }
            (false, _) => {
                for row in v.chunks_exact_mut(n) {
                    for (y, b) in row.iter_mut().zip(bias) {
                        *y += b;
                    }
                }
            }
        }
    }
}

multiversion! {
    /// As [`bias_rows`] with a bias per element (`bias.len() == v.len()`).
    pub fn bias_elems(v: &mut [f32], bias: &[f32], silu: bool, saved: Option<&mut [f32]>) {
        match (silu, saved) {
            (true, Some(saved)) => {
                for ((y, s), b) in v.iter_mut().zip(saved.iter_mut()).zip(bias) {
                    let z = *y + b;
                    let sg = sigmoid(z);
                    *s = sg;
                    *y = z * sg;
                }
            }
            (true, None) => {
                for (y, b) in v.iter_mut().zip(bias) {
                    let z = *y + b;
                    *y = z * sigmoid(z);
                }
            }
            (false, _) => {
                for (y, b) in v.iter_mut().zip(bias) {
                    *y += b;
                }
            }
        }
    }
}

multiversion! {
    /// y = SiLU(z) with s = sigmoid(z) kept in `saved`.
    pub fn silu(z: &[f32], y: &mut [f32], saved: &mut [f32]) {
        for ((zi, yi), si) in z.iter().zip(y.iter_mut()).zip(saved.iter_mut()) {
            let s = sigmoid(*zi);
            *si = s;
            *yi = zi * s;
        }
    }
}

multiversion! {
    /// g_z = g · SiLU'(z) = g (s + y (1 − s)), from the output y = z s and s = sigmoid(z).
    pub fn silu_backward(g: &[f32], y: &[f32], s: &[f32], out: &mut [f32]) {
        for (((o, gi), yi), si) in out.iter_mut().zip(g).zip(y).zip(s) {
            *o = gi * (si + yi * (1.0 - si));
        }
    }
}

multiversion! {
    /// `acc[j] += Σ_rows m[row, j]` over rows of width `acc.len()`.
    pub fn add_column_sums(m: &[f32], acc: &mut [f32]) {
        let n = acc.len();
        for row in m.chunks_exact(n) {
            for (a, v) in acc.iter_mut().zip(row) {
                *a += v;
            }
        }
    }
}

multiversion! {
    /// `acc[i mod C] += Σ plane_i` over consecutive planes of `plane` values, C =
    /// `acc.len()`: the per-channel sums of an `[N, C, plane]` tensor.
    pub fn add_plane_sums(x: &[f32], plane: usize, acc: &mut [f32]) {
        let c = acc.len();
        for (i, p) in x.chunks_exact(plane).enumerate() {
            acc[i % c] += lane_sum_by(plane, |j| p[j]);
        }
    }
}

multiversion! {
    /// Rows `[cos(f c_i) for f in freqs, sin(f c_i) for f in freqs]` of width
    /// `2 · freqs.len()`, one per c_i.
    pub fn sinusoidal(c: &[f32], freqs: &[f32], out: &mut [f32]) {
        let k = freqs.len();
        for (row, ci) in out.chunks_exact_mut(2 * k).zip(c) {
            let (cos, sin) = row.split_at_mut(k);
            for ((co, si), f) in cos.iter_mut().zip(sin.iter_mut()).zip(freqs) {
                let (s, c) = sin_cos(ci * f);
                *co = c;
                *si = s;
            }
        }
    }
}

multiversion! {
    /// The gradient of [`sinusoidal`] with respect to c from its output y and the
    /// output gradient g: Σ_k f_k (g_sin cos − g_cos sin).
    pub fn sinusoidal_backward(g: &[f32], y: &[f32], freqs: &[f32], out: &mut [f32]) {
        let k = freqs.len();
        for ((o, gr), yr) in out.iter_mut().zip(g.chunks_exact(2 * k)).zip(y.chunks_exact(2 * k)) {
            let (gc, gs) = gr.split_at(k);
            let (yc, ys) = yr.split_at(k);
            let mut acc = 0.0f32;
            for i in 0..k {
                acc += freqs[i] * (gs[i] * yc[i] - gc[i] * ys[i]);
            }
            *o = acc;
        }
    }
}

multiversion! {
    /// Softmax of each row of width `n`: the exponentials in a loop of their own (which
    /// vectorises), the sum and the scaling after.
    pub fn softmax_rows(x: &[f32], out: &mut [f32], n: usize) {
        for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            let m = lane_max(xr);
            for (o, v) in or.iter_mut().zip(xr) {
                *o = exp(v - m);
            }
            let inv = 1.0 / or.iter().sum::<f32>();
            for o in or.iter_mut() {
                *o *= inv;
            }
        }
    }
}

/// Independent partial sums: an f32 sum written as one running total stays scalar (the
/// compiler may not reorder float additions), 16 running totals vectorise.
const LANES: usize = 16;

/// Σ f(i) over `0..len` in [`LANES`] running totals.
#[inline(always)]
fn lane_sum_by(len: usize, f: impl Fn(usize) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let whole = len / LANES * LANES;
    for base in (0..whole).step_by(LANES) {
        for (i, a) in acc.iter_mut().enumerate() {
            *a += f(base + i);
        }
    }
    acc.iter().sum::<f32>() + (whole..len).map(f).sum::<f32>()
}

/// The largest element (−∞ for none) in [`LANES`] running maxima, which vectorise as
/// a single running maximum does not.
#[inline(always)]
fn lane_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = if *v > *a { *v } else { *a };
        }
    }
    let rest = chunks.remainder().iter();
    acc.iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, v| if *v > m { *v } else { m })
}

/// Mean and 1/sqrt(variance + eps) of one row.
#[inline(always)]
pub(crate) fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = lane_sum_by(x.len(), |i| x[i]) / n;
    let var = lane_sum_by(x.len(), |i| (x[i] - mean) * (x[i] - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

multiversion! {
    /// Layer norm of each row of width `g.len()`: (x − mean) / sqrt(var + eps) · g + b.
    pub fn layer_norm_rows(x: &[f32], g: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
        let n = g.len();
        for (or, xr) in out.chunks_exact_mut(n).zip(x.chunks_exact(n)) {
            let (mean, rstd) = moments(xr, eps);
            for (((o, v), g), b) in or.iter_mut().zip(xr).zip(g).zip(b) {
                *o = (v - mean) * rstd * g + b;
            }
        }
    }
}

multiversion! {
    /// The input gradient of [`layer_norm_rows`]: rstd (d − mean(d) − x̂ mean(d x̂)) with
    /// d = gy · g.
    pub fn layer_norm_backward_rows(x: &[f32], g: &[f32], gy: &[f32], eps: f32, out: &mut [f32]) {
        let n = g.len();
        for ((or, xr), gr) in out.chunks_exact_mut(n).zip(x.chunks_exact(n)).zip(gy.chunks_exact(n)) {
            let (mean, rstd) = moments(xr, eps);
            let (mut m1, mut m2) = (0f32, 0f32);
            for ((v, gy), g) in xr.iter().zip(gr).zip(g) {
                let d = gy * g;
                m1 += d;
                m2 += d * (v - mean) * rstd;
            }
            let (m1, m2) = (m1 / n as f32, m2 / n as f32);
            for (((o, v), gy), g) in or.iter_mut().zip(xr).zip(gr).zip(g) {
                *o = rstd * (gy * g - m1 - (v - mean) * rstd * m2);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp_of_std() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.001_3;
        }
        assert!(worst < 3.0 * f32::EPSILON as f64, "relative error {worst}");
        assert!(exp(-1e30) < 1e-37 && exp(1e30) > 1e38);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn sin_cos_are_accurate_over_the_embedding_range() {
        let mut worst = 0.0f64;
        let mut x = -2500.0f32;
        while x < 2500.0 {
            let (s, c) = sin_cos(x);
            let (es, ec) = ((x as f64).sin(), (x as f64).cos());
            worst = worst.max((s as f64 - es).abs()).max((c as f64 - ec).abs());
            x += 0.0137;
        }
        assert!(worst < 1e-6, "absolute error {worst}");
    }

    #[test]
    fn sigmoid_saturates_without_nan() {
        for z in [-1e30f32, -200.0, -88.0, 0.0, 88.0, 200.0, 1e30] {
            let s = sigmoid(z);
            assert!((0.0..=1.0).contains(&s), "sigmoid({z}) = {s}");
        }
        assert_eq!(sigmoid(0.0), 0.5);
    }
}

multiversion! {
    /// Group norm of one group's slab (`g.len()` channels of equal planes), optionally
    /// followed by SiLU: z = (x − mean)·rstd·g_c + b_c over the slab's moments.
    pub fn group_norm_slab(x: &[f32], g: &[f32], b: &[f32], eps: f32, silu: bool, out: &mut [f32]) {
        let plane = x.len() / g.len();
        let (mean, rstd) = moments(x, eps);
        for ((or, xr), (gc, bc)) in out.chunks_exact_mut(plane).zip(x.chunks_exact(plane)).zip(g.iter().zip(b)) {
            let (scale, shift) = (rstd * gc, bc - mean * rstd * gc);
            if silu {
                for (o, v) in or.iter_mut().zip(xr) {
                    let z = v * scale + shift;
                    *o = z * sigmoid(z);
                }
            } else {
                for (o, v) in or.iter_mut().zip(xr) {
                    *o = v * scale + shift;
                }
            }
        }
    }
}

multiversion! {
    /// The backward pass of [`group_norm_slab`] for one slab (gain and bias in
    /// `affine`): the input gradient into `gx`, the slab's share of the gain and bias
    /// gradients into `channel_grads` (one per channel, overwritten).
    pub fn group_norm_backward_slab(
        x: &[f32], affine: (&[f32], &[f32]), gy: &[f32], eps: f32, silu: bool,
        gx: &mut [f32], channel_grads: (&mut [f32], &mut [f32])
    ) {
        let ((g, b), (gg, gb)) = (affine, channel_grads);
        let plane = x.len() / g.len();
        let (mean, rstd) = moments(x, eps);
        // First pass: dz (the gradient before the gain) into gx, and the channel sums
        // Σ dz and Σ dz x̂; the slab's means of d = dz g_c follow from them.
        let (mut m1, mut m2) = (0f32, 0f32);
        for (c, ((dr, xr), gyr)) in gx.chunks_exact_mut(plane).zip(x.chunks_exact(plane)).zip(gy.chunks_exact(plane)).enumerate() {
            let (gc, bc) = (g[c], b[c]);
            if silu {
                let (scale, shift) = (rstd * gc, bc - mean * rstd * gc);
                for ((d, v), gy) in dr.iter_mut().zip(xr).zip(gyr) {
                    let z = v * scale + shift;
                    let s = sigmoid(z);
                    *d = gy * (s + z * s * (1.0 - s));
                }
            } else {
                dr.copy_from_slice(gyr);
            }
            let sb = lane_sum_by(plane, |i| dr[i]);
            let sg = lane_sum_by(plane, |i| dr[i] * (xr[i] - mean)) * rstd;
            gg[c] = sg;
            gb[c] = sb;
            m1 += gc * sb;
            m2 += gc * sg;
        }
        let n = x.len() as f32;
        let (m1, m2) = (m1 / n, m2 / n);
        for (c, (dr, xr)) in gx.chunks_exact_mut(plane).zip(x.chunks_exact(plane)).enumerate() {
            let gc = g[c];
            for (d, v) in dr.iter_mut().zip(xr) {
                let xh = (v - mean) * rstd;
                *d = rstd * (*d * gc - m1 - xh * m2);
            }
        }
    }
}

multiversion! {
    /// Attention weights in place: each row of width `n` becomes
    /// softmax(scale · row + bias) (bias `[n]`, added to every row).
    pub fn softmax_rows_biased(x: &mut [f32], bias: &[f32], scale: f32, n: usize) {
        for row in x.chunks_exact_mut(n) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v = *v * scale + b;
            }
            let m = lane_max(row);
            for v in row.iter_mut() {
                *v = exp(*v - m);
            }
            let inv = 1.0 / lane_sum_by(n, |j| row[j]);
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }
}

multiversion! {
    /// The backward pass of [`softmax_rows_biased`] in place: `g` (the gradient of the
    /// weights `w`, rows of width `n`) becomes scale · w ⊙ (g − Σ_j w_j g_j).
    pub fn softmax_rows_backward(w: &[f32], g: &mut [f32], scale: f32, n: usize) {
        for (wr, gr) in w.chunks_exact(n).zip(g.chunks_exact_mut(n)) {
            let dot = lane_sum_by(n, |j| wr[j] * gr[j]);
            for (gv, wv) in gr.iter_mut().zip(wr) {
                *gv = scale * wv * (*gv - dot);
            }
        }
    }
}
