//! Row-major f64 feature sets: validation and distances shared by the set metrics.

use candle_core::{bail, Result};

/// Number of rows of `x` as `[n, d]`, after checking the shape and that every value is
/// finite; `what` names the input in errors.
pub(crate) fn check_rows(x: &[f64], d: usize, what: &str) -> Result<usize> {
    if d == 0 || x.len() % d != 0 {
        bail!(
            "{what}: {} values are not whole rows of dimension {d}",
            x.len()
        );
    }
    if x.is_empty() {
        bail!("{what}: no rows");
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        bail!("{what}: row {} holds a NaN or infinite value", i / d);
    }
    Ok(x.len() / d)
}

pub(crate) fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(p, q)| p * q).sum()
}

/// Squared norms of the rows of `x: [n, d]`.
pub(crate) fn sq_norms(x: &[f64], d: usize) -> Vec<f64> {
    x.chunks_exact(d).map(|r| dot(r, r)).collect()
}

/// Rows of `x` per block of [`for_gram_blocks`]: a block's Gram rows against 10k
/// others stay under 100 MB.
const BLOCK: usize = 1024;

/// Calls `f(i0, g)` for consecutive blocks of `x`'s rows, `g[(i − i0)·ny + j] = x_i · y_j`
/// for every row j of `y` (both `[·, d]` row-major): the pairwise terms of the set
/// metrics as one GEMM per block instead of a scalar loop per pair.
pub(crate) fn for_gram_blocks(
    x: &[f64],
    y: &[f64],
    d: usize,
    mut f: impl FnMut(usize, &[f64]) -> Result<()>,
) -> Result<()> {
    let (nx, ny) = (x.len() / d, y.len() / d);
    let mut g = vec![0.0; BLOCK.min(nx) * ny];
    for i0 in (0..nx).step_by(BLOCK) {
        let rows = BLOCK.min(nx - i0);
        let out = &mut g[..rows * ny];
        // Rows i0.. of x times yᵀ (y read with swapped strides).
        matmul_into(out, (rows, ny, d), (&x[i0 * d..], d, 1), (y, 1, d));
        f(i0, out)?;
    }
    Ok(())
}

/// `C = A B` for `A: [m, k]` and `B: [k, n]` given by their row and column strides
/// (so either may be read transposed), `C` row-major, on every thread of the pool.
pub(crate) fn matmul_strided(
    dims: (usize, usize, usize),
    a: (&[f64], usize, usize),
    b: (&[f64], usize, usize),
) -> Vec<f64> {
    let mut c = vec![0.0; dims.0 * dims.1];
    matmul_into(&mut c, dims, a, b);
    c
}

/// [`matmul_strided`] into `c` (`m × n` values, overwritten).
fn matmul_into(
    c: &mut [f64],
    (m, n, k): (usize, usize, usize),
    (a, a_rs, a_cs): (&[f64], usize, usize),
    (b, b_rs, b_cs): (&[f64], usize, usize),
) {
    assert!(c.len() == m * n && m * n * k > 0);
    assert!(a.len() > (m - 1) * a_rs + (k - 1) * a_cs && b.len() > (k - 1) * b_rs + (n - 1) * b_cs);
    // SAFETY: the asserts above bound every index the strides reach; `c` is exclusive.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
}
