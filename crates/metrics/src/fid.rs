//! Fréchet distance between Gaussians fitted to two feature sets (FID when the features
//! are Inception's).

use crate::rows::check_rows;
use candle_core::{bail, Result};

/// Mean and covariance (ddof = 1, as `np.cov`) of `x: [n, d]`.
pub fn mean_and_covariance(x: &[f64], d: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let n = check_rows(x, d, "features")?;
    if n < 2 {
        bail!("covariance: need at least 2 rows, got {n}");
    }
    let mut mu = vec![0.0; d];
    for r in x.chunks_exact(d) {
        for (m, v) in mu.iter_mut().zip(r) {
            *m += v;
        }
    }
    mu.iter_mut().for_each(|m| *m /= n as f64);
    let mut cov = vec![0.0; d * d];
    for r in x.chunks_exact(d) {
        for i in 0..d {
            let ci = r[i] - mu[i];
            for j in i..d {
                cov[i * d + j] += ci * (r[j] - mu[j]);
            }
        }
    }
    for i in 0..d {
        for j in i..d {
            let v = cov[i * d + j] / (n - 1) as f64;
            cov[i * d + j] = v;
            cov[j * d + i] = v;
        }
    }
    Ok((mu, cov))
}

/// Eigenvalues and eigenvectors (columns of the row-major `d × d` result) of a symmetric
/// matrix, by cyclic Jacobi rotations: slow for large d (O(d³) per sweep) but accurate to
/// the last bits, which the reference comparisons need.
pub fn symmetric_eigen(a: &[f64], d: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    if a.len() != d * d {
        bail!(
            "eigendecomposition: {} values for a {d}x{d} matrix",
            a.len()
        );
    }
    let mut a = a.to_vec();
    let mut v = vec![0.0; d * d];
    for i in 0..d {
        v[i * d + i] = 1.0;
    }
    for _sweep in 0..100 {
        let off: f64 = (0..d)
            .flat_map(|i| (0..d).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * d + j] * a[i * d + j])
            .sum();
        let scale: f64 = a.iter().map(|x| x * x).sum();
        if off <= 1e-30 * scale.max(f64::MIN_POSITIVE) {
            break;
        }
        for p in 0..d {
            for q in (p + 1)..d {
                let apq = a[p * d + q];
                if apq == 0.0 {
                    continue;
                }
                let (app, aqq) = (a[p * d + p], a[q * d + q]);
                let theta = (aqq - app) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..d {
                    let (akp, akq) = (a[k * d + p], a[k * d + q]);
                    a[k * d + p] = c * akp - s * akq;
                    a[k * d + q] = s * akp + c * akq;
                }
                for k in 0..d {
                    let (apk, aqk) = (a[p * d + k], a[q * d + k]);
                    a[p * d + k] = c * apk - s * aqk;
                    a[q * d + k] = s * apk + c * aqk;
                }
                for k in 0..d {
                    let (vkp, vkq) = (v[k * d + p], v[k * d + q]);
                    v[k * d + p] = c * vkp - s * vkq;
                    v[k * d + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    Ok(((0..d).map(|i| a[i * d + i]).collect(), v))
}

fn matmul(a: &[f64], b: &[f64], d: usize) -> Vec<f64> {
    let mut c = vec![0.0; d * d];
    for i in 0..d {
        for k in 0..d {
            let aik = a[i * d + k];
            for j in 0..d {
                c[i * d + j] += aik * b[k * d + j];
            }
        }
    }
    c
}

/// Fréchet distance ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^{1/2}) between two Gaussians.
/// Tr (Σ₁Σ₂)^{1/2} is the sum of square roots of the eigenvalues of the symmetric
/// Σ₁^{1/2} Σ₂ Σ₁^{1/2}, which has the same spectrum as Σ₁Σ₂.
pub fn frechet_distance(mu1: &[f64], cov1: &[f64], mu2: &[f64], cov2: &[f64]) -> Result<f64> {
    let d = mu1.len();
    if mu2.len() != d || cov1.len() != d * d || cov2.len() != d * d {
        bail!("Fréchet distance: mismatched dimensions");
    }
    let (l1, v1) = symmetric_eigen(cov1, d)?;
    // Σ₁^{1/2} = V diag(√λ) Vᵀ, negative round-off eigenvalues clamped to 0.
    let mut s1 = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..d {
            s1[i * d + j] = (0..d)
                .map(|k| v1[i * d + k] * l1[k].max(0.0).sqrt() * v1[j * d + k])
                .sum();
        }
    }
    let mut m = matmul(&matmul(&s1, cov2, d), &s1, d);
    for i in 0..d {
        for j in (i + 1)..d {
            let avg = 0.5 * (m[i * d + j] + m[j * d + i]);
            m[i * d + j] = avg;
            m[j * d + i] = avg;
        }
    }
    let (lm, _) = symmetric_eigen(&m, d)?;
    let tr_sqrt: f64 = lm.iter().map(|l| l.max(0.0).sqrt()).sum();
    let dmu: f64 = mu1.iter().zip(mu2).map(|(a, b)| (a - b) * (a - b)).sum();
    let tr = |c: &[f64]| (0..d).map(|i| c[i * d + i]).sum::<f64>();
    Ok(dmu + tr(cov1) + tr(cov2) - 2.0 * tr_sqrt)
}

/// FID between feature sets `x: [m, d]` and `y: [n, d]` (row-major): the Fréchet distance
/// of their fitted Gaussians, covariance with ddof = 1 (as pytorch-fid).
pub fn fid(x: &[f64], y: &[f64], d: usize) -> Result<f64> {
    let (mu1, c1) = mean_and_covariance(x, d)?;
    let (mu2, c2) = mean_and_covariance(y, d)?;
    frechet_distance(&mu1, &c1, &mu2, &c2)
}
