//! Maximum mean discrepancy.

use candle_core::{bail, Result};

/// Unbiased MMD² with the Gaussian kernel k(x, y) = exp(−‖x − y‖² / (2 σ²)) between row
/// sets `x: [m, d]` and `y: [n, d]` (row-major): the within-set means exclude the
/// diagonal, the cross term is the mean over all m·n pairs.
pub fn mmd2_gaussian(x: &[f64], y: &[f64], d: usize, sigma: f64) -> Result<f64> {
    if d == 0 || x.len() % d != 0 || y.len() % d != 0 {
        bail!("MMD: inputs are not whole rows of dimension {d}");
    }
    let (m, n) = (x.len() / d, y.len() / d);
    if m < 2 || n < 2 {
        bail!("MMD: need at least 2 rows in each set, got {m} and {n}");
    }
    if !(sigma > 0.0 && sigma.is_finite()) {
        bail!("MMD: bandwidth must be positive, got {sigma}");
    }
    if x.iter().chain(y).any(|v| !v.is_finite()) {
        bail!("MMD: inputs hold NaN or infinite values");
    }
    let g = -0.5 / (sigma * sigma);
    let k = |a: &[f64], b: &[f64]| {
        (a.iter().zip(b).map(|(p, q)| (p - q) * (p - q)).sum::<f64>() * g).exp()
    };
    let within = |s: &[f64], r: usize| -> f64 {
        let mut t = 0.0;
        for i in 0..r {
            for j in (i + 1)..r {
                t += k(&s[i * d..(i + 1) * d], &s[j * d..(j + 1) * d]);
            }
        }
        2.0 * t / (r * (r - 1)) as f64
    };
    let mut cross = 0.0;
    for i in 0..m {
        for j in 0..n {
            cross += k(&x[i * d..(i + 1) * d], &y[j * d..(j + 1) * d]);
        }
    }
    Ok(within(x, m) + within(y, n) - 2.0 * cross / (m * n) as f64)
}
