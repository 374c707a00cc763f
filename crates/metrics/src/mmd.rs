//! Maximum mean discrepancy: Gaussian-kernel MMD² and KID (polynomial kernel).

use crate::rows::{check_rows, dot, sq_dist};
use candle_core::{bail, Result};

/// Unbiased MMD² between row sets `x: [m, d]` and `y: [n, d]` for kernel `k`: the
/// within-set means exclude the diagonal, the cross term is the mean over all m·n pairs.
fn row(s: &[f64], d: usize, i: usize) -> &[f64] {
    &s[i * d..(i + 1) * d]
}

fn mmd2_unbiased(x: &[f64], y: &[f64], d: usize, k: impl Fn(&[f64], &[f64]) -> f64) -> Result<f64> {
    let (m, n) = (
        check_rows(x, d, "first set")?,
        check_rows(y, d, "second set")?,
    );
    if m < 2 || n < 2 {
        bail!("MMD: need at least 2 rows in each set, got {m} and {n}");
    }
    let within = |s: &[f64], r: usize| -> f64 {
        let mut t = 0.0;
        for i in 0..r {
            for j in (i + 1)..r {
                t += k(row(s, d, i), row(s, d, j));
            }
        }
        2.0 * t / (r * (r - 1)) as f64
    };
    let mut cross = 0.0;
    for i in 0..m {
        for j in 0..n {
            cross += k(row(x, d, i), row(y, d, j));
        }
    }
    Ok(within(x, m) + within(y, n) - 2.0 * cross / (m * n) as f64)
}

/// Unbiased MMD² with the Gaussian kernel k(x, y) = exp(−‖x − y‖² / (2 σ²)) between row
/// sets `x: [m, d]` and `y: [n, d]` (row-major).
///
/// ```
/// let x = [0.0, 0.0, 1.0, 0.0, 0.0, 1.0];
/// let same = scoreguide_metrics::mmd2_gaussian(&x, &x, 2, 1.0).unwrap();
/// assert!(same < 0.0); // unbiased: identical sets give a small negative value
/// ```
pub fn mmd2_gaussian(x: &[f64], y: &[f64], d: usize, sigma: f64) -> Result<f64> {
    if !(sigma > 0.0 && sigma.is_finite()) {
        bail!("MMD: bandwidth must be positive, got {sigma}");
    }
    let g = -0.5 / (sigma * sigma);
    mmd2_unbiased(x, y, d, |a, b| (sq_dist(a, b) * g).exp())
}

/// Kernel inception distance (Bińkowski et al. 2018) of whole feature sets: unbiased
/// MMD² with the cubic polynomial kernel (x·y / d + 1)³, as clean-fid's
/// `kernel_distance` computes it with one subset holding every row.
pub fn kid(x: &[f64], y: &[f64], d: usize) -> Result<f64> {
    let inv_d = 1.0 / d.max(1) as f64;
    mmd2_unbiased(x, y, d, |a, b| (dot(a, b) * inv_d + 1.0).powi(3))
}
