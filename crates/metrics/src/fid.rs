//! Fréchet distance between Gaussians fitted to two feature sets (FID when the features
//! are Inception's).

use crate::rows::{check_rows, matmul_strided};
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
    let centred: Vec<f64> = x
        .chunks_exact(d)
        .flat_map(|r| r.iter().zip(&mu).map(|(v, m)| v - m))
        .collect();
    // Xcᵀ Xc / (n − 1): Xcᵀ is Xc read with swapped strides.
    let mut cov = matmul_strided((d, d, n), (&centred, 1, d), (&centred, d, 1));
    cov.iter_mut().for_each(|c| *c /= (n - 1) as f64);
    // Exactly symmetric, as the eigensolver assumes.
    for i in 0..d {
        for j in i + 1..d {
            let avg = 0.5 * (cov[i * d + j] + cov[j * d + i]);
            cov[i * d + j] = avg;
            cov[j * d + i] = avg;
        }
    }
    Ok((mu, cov))
}

/// Eigenvalues (ascending) and eigenvectors (columns of the row-major `d × d` result)
/// of a symmetric matrix: Householder reduction to tridiagonal form and the implicit QL
/// algorithm (EISPACK's `tred2` and `tql2`, as JAMA writes them), O(d³) in all, so the
/// 2048 × 2048 covariances of Inception features take seconds.
pub fn symmetric_eigen(a: &[f64], d: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    if a.len() != d * d {
        bail!(
            "eigendecomposition: {} values for a {d}x{d} matrix",
            a.len()
        );
    }
    if let Some(i) = a.iter().position(|v| !v.is_finite()) {
        bail!(
            "eigendecomposition: entry ({}, {}) is {}",
            i / d,
            i % d,
            a[i]
        );
    }
    if d == 0 {
        return Ok((vec![], vec![]));
    }
    // `w` holds Vᵀ (w[j·d + k] = V[k][j]) so that every O(d³) loop runs along memory.
    let mut w = a.to_vec();
    let (mut diag, mut off) = tred2(&mut w, d);
    tql2(&mut diag, &mut off, Some(&mut w), d)?;
    let mut order: Vec<usize> = (0..d).collect();
    order.sort_by(|&i, &j| diag[i].total_cmp(&diag[j]));
    let values = order.iter().map(|&i| diag[i]).collect();
    let mut vectors = vec![0.0; d * d];
    for (col, &src) in order.iter().enumerate() {
        for row in 0..d {
            vectors[row * d + col] = w[src * d + row];
        }
    }
    Ok((values, vectors))
}

/// Householder tridiagonalisation of the symmetric `w` (Vᵀ layout, see
/// [`symmetric_eigen`]); leaves the accumulated transformation in `w` and returns the
/// diagonal and the sub-diagonal (in `off[1..]`).
#[allow(clippy::needless_range_loop)]
fn tred2(w: &mut [f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let at = |r: usize, c: usize| c * n + r; // V[r][c]
    let mut d: Vec<f64> = (0..n).map(|j| w[at(n - 1, j)]).collect();
    let mut e = vec![0.0; n];
    for i in (1..n).rev() {
        let scale: f64 = d[..i].iter().map(|v| v.abs()).sum();
        let mut h = 0.0;
        if scale == 0.0 {
            e[i] = d[i - 1];
            for j in 0..i {
                d[j] = w[at(i - 1, j)];
                w[at(i, j)] = 0.0;
                w[at(j, i)] = 0.0;
            }
        } else {
            for k in 0..i {
                d[k] /= scale;
                h += d[k] * d[k];
            }
            let f = d[i - 1];
            let g = if f > 0.0 { -h.sqrt() } else { h.sqrt() };
            e[i] = scale * g;
            h -= f * g;
            d[i - 1] = f - g;
            e[..i].iter_mut().for_each(|v| *v = 0.0);
            for j in 0..i {
                let f = d[j];
                w[at(j, i)] = f;
                let col = &w[j * n..j * n + i];
                let mut g = e[j] + col[j] * f;
                for k in j + 1..i {
                    g += col[k] * d[k];
                    e[k] += col[k] * f;
                }
                e[j] = g;
            }
            let mut f = 0.0;
            for j in 0..i {
                e[j] /= h;
                f += e[j] * d[j];
            }
            let hh = f / (h + h);
            for j in 0..i {
                e[j] -= hh * d[j];
            }
            for j in 0..i {
                let (f, g) = (d[j], e[j]);
                let col = &mut w[j * n..j * n + i];
                for k in j..i {
                    col[k] -= f * e[k] + g * d[k];
                }
                d[j] = w[at(i - 1, j)];
                w[at(i, j)] = 0.0;
            }
        }
        d[i] = h;
    }
    for i in 0..n - 1 {
        w[at(n - 1, i)] = w[at(i, i)];
        w[at(i, i)] = 1.0;
        let h = d[i + 1];
        if h != 0.0 {
            for k in 0..=i {
                d[k] = w[at(k, i + 1)] / h;
            }
            let (left, right) = w.split_at_mut((i + 1) * n);
            let next = &right[..=i];
            for j in 0..=i {
                let col = &mut left[j * n..j * n + i + 1];
                let g: f64 = next.iter().zip(col.iter()).map(|(a, b)| a * b).sum();
                col.iter_mut()
                    .zip(&d[..=i])
                    .for_each(|(c, dk)| *c -= g * dk);
            }
        }
        for k in 0..=i {
            w[at(k, i + 1)] = 0.0;
        }
    }
    for j in 0..n {
        d[j] = w[at(n - 1, j)];
        w[at(n - 1, j)] = 0.0;
    }
    w[at(n - 1, n - 1)] = 1.0;
    e[0] = 0.0;
    (d, e)
}

/// Implicit QL iterations on the tridiagonal (`d`, `e` from [`tred2`]): eigenvalues in
/// `d` (unsorted), and the eigenvectors as rows of `w` when given.
fn tql2(d: &mut [f64], e: &mut [f64], mut w: Option<&mut [f64]>, n: usize) -> Result<()> {
    for i in 1..n {
        e[i - 1] = e[i];
    }
    e[n - 1] = 0.0;
    let (mut f, mut tst1) = (0.0f64, 0.0f64);
    let eps = f64::EPSILON;
    for l in 0..n {
        tst1 = tst1.max(d[l].abs() + e[l].abs());
        let mut m = l;
        while m < n - 1 && e[m].abs() > eps * tst1 {
            m += 1;
        }
        if m > l {
            let mut iterations = 0;
            loop {
                iterations += 1;
                if iterations > 60 {
                    bail!("eigendecomposition: QL iterations did not converge");
                }
                let g = d[l];
                let mut p = (d[l + 1] - g) / (2.0 * e[l]);
                let mut r = p.hypot(1.0);
                if p < 0.0 {
                    r = -r;
                }
                d[l] = e[l] / (p + r);
                d[l + 1] = e[l] * (p + r);
                let dl1 = d[l + 1];
                let h = g - d[l];
                for v in d[l + 2..n].iter_mut() {
                    *v -= h;
                }
                f += h;
                p = d[m];
                let (mut c, mut c2, mut c3) = (1.0, 1.0, 1.0);
                let el1 = e[l + 1];
                let (mut s, mut s2) = (0.0, 0.0);
                for i in (l..m).rev() {
                    c3 = c2;
                    c2 = c;
                    s2 = s;
                    let g = c * e[i];
                    let h = c * p;
                    r = p.hypot(e[i]);
                    e[i + 1] = s * r;
                    s = e[i] / r;
                    c = p / r;
                    p = c * d[i] - s * g;
                    d[i + 1] = h + s * (c * g + s * d[i]);
                    if let Some(w) = w.as_deref_mut() {
                        let (lo, hi) = w.split_at_mut((i + 1) * n);
                        let (vi, vi1) = (&mut lo[i * n..], &mut hi[..n]);
                        for (a, b) in vi.iter_mut().zip(vi1.iter_mut()) {
                            let h = *b;
                            *b = s * *a + c * h;
                            *a = c * *a - s * h;
                        }
                    }
                }
                p = -s * s2 * c3 * el1 * e[l] / dl1;
                e[l] = s * p;
                d[l] = c * p;
                if e[l].abs() <= eps * tst1 {
                    break;
                }
            }
        }
        d[l] += f;
        e[l] = 0.0;
    }
    Ok(())
}

/// Eigenvalues (ascending) of a symmetric matrix, without the eigenvectors' cost.
pub fn symmetric_eigenvalues(a: &[f64], d: usize) -> Result<Vec<f64>> {
    if a.len() != d * d {
        bail!("eigenvalues: {} values for a {d}x{d} matrix", a.len());
    }
    if d == 0 {
        return Ok(vec![]);
    }
    let mut w = a.to_vec();
    let (mut diag, mut off) = tred2(&mut w, d);
    tql2(&mut diag, &mut off, None, d)?;
    diag.sort_by(f64::total_cmp);
    Ok(diag)
}

fn matmul(a: &[f64], b: &[f64], d: usize) -> Vec<f64> {
    matmul_strided((d, d, d), (a, d, 1), (b, d, 1))
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
    let scaled: Vec<f64> = (0..d * d)
        .map(|i| v1[i] * l1[i % d].max(0.0).sqrt())
        .collect();
    let s1 = matmul_strided((d, d, d), (&scaled, d, 1), (&v1, 1, d));
    let mut m = matmul(&matmul(&s1, cov2, d), &s1, d);
    for i in 0..d {
        for j in (i + 1)..d {
            let avg = 0.5 * (m[i * d + j] + m[j * d + i]);
            m[i * d + j] = avg;
            m[j * d + i] = avg;
        }
    }
    let lm = symmetric_eigenvalues(&m, d)?;
    let tr_sqrt: f64 = lm.iter().map(|l| l.max(0.0).sqrt()).sum();
    let dmu: f64 = mu1.iter().zip(mu2).map(|(a, b)| (a - b) * (a - b)).sum();
    let tr = |c: &[f64]| (0..d).map(|i| c[i * d + i]).sum::<f64>();
    Ok(dmu + tr(cov1) + tr(cov2) - 2.0 * tr_sqrt)
}

/// FID between feature sets `x: [m, d]` and `y: [n, d]` (row-major): the Fréchet distance
/// of their fitted Gaussians, covariance with ddof = 1 (as pytorch-fid).
pub fn fid(x: &[f64], y: &[f64], d: usize) -> Result<f64> {
    let (n1, n2) = (
        check_rows(x, d, "first set")?,
        check_rows(y, d, "second set")?,
    );
    if n1.min(n2) >= d {
        let (mu1, c1) = mean_and_covariance(x, d)?;
        let (mu2, c2) = mean_and_covariance(y, d)?;
        return frechet_distance(&mu1, &c1, &mu2, &c2);
    }
    // Fewer rows than features: with Σ₁ = AᵀA and Σ₂ = BᵀB (A, B the centred rows over
    // √(n − 1)), Σ₁Σ₂ has the non-zero spectrum of (ABᵀ)(ABᵀ)ᵀ, a min(n₁, n₂)-square
    // matrix, so Tr (Σ₁Σ₂)^{1/2} is the sum of ABᵀ's singular values.
    let centred = |s: &[f64], n: usize| -> (Vec<f64>, Vec<f64>) {
        let mut mu = vec![0.0; d];
        s.chunks_exact(d)
            .for_each(|r| mu.iter_mut().zip(r).for_each(|(m, v)| *m += v / n as f64));
        let scale = 1.0 / ((n - 1) as f64).sqrt();
        let a = s
            .chunks_exact(d)
            .flat_map(|r| r.iter().zip(&mu).map(move |(v, m)| (v - m) * scale))
            .collect();
        (mu, a)
    };
    if n1 < 2 || n2 < 2 {
        bail!("FID: need at least 2 rows in each set, got {n1} and {n2}");
    }
    let (mu1, a) = centred(x, n1);
    let (mu2, b) = centred(y, n2);
    let dot = |p: &[f64], q: &[f64]| p.iter().zip(q).map(|(u, v)| u * v).sum::<f64>();
    let ab = matmul_strided((n1, n2, d), (&a, d, 1), (&b, 1, d));
    let (m, g) = match n1 <= n2 {
        true => (n1, matmul_strided((n1, n1, n2), (&ab, n2, 1), (&ab, 1, n2))),
        false => (n2, matmul_strided((n2, n2, n1), (&ab, 1, n2), (&ab, n2, 1))),
    };
    let g: Vec<f64> = (0..m * m)
        .map(|i| 0.5 * (g[i] + g[(i % m) * m + i / m]))
        .collect();
    let tr_sqrt: f64 = symmetric_eigenvalues(&g, m)?
        .iter()
        .map(|l| l.max(0.0).sqrt())
        .sum();
    let dmu: f64 = mu1.iter().zip(&mu2).map(|(p, q)| (p - q) * (p - q)).sum();
    Ok(dmu + dot(&a, &a) + dot(&b, &b) - 2.0 * tr_sqrt)
}
