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
        // SAFETY: the pointers cover `rows × d`, `ny × d` and `rows × ny` values with the
        // strides given, and `out` is not aliased.
        unsafe {
            gemm::gemm(
                rows,
                ny,
                d,
                out.as_mut_ptr(),
                1,
                ny as isize,
                false,
                x[i0 * d..].as_ptr(),
                1,
                d as isize,
                y.as_ptr(),
                d as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(rayon::current_num_threads()),
            );
        }
        f(i0, out)?;
    }
    Ok(())
}

/// `C = A B` for `A: [m, k]` and `B: [k, n]` given by their row and column strides
/// (so either may be read transposed), `C` row-major, on every thread of the pool.
pub(crate) fn matmul_strided(
    (m, n, k): (usize, usize, usize),
    (a, a_rs, a_cs): (&[f64], usize, usize),
    (b, b_rs, b_cs): (&[f64], usize, usize),
) -> Vec<f64> {
    assert!(a.len() > (m - 1) * a_rs + (k - 1) * a_cs && b.len() > (k - 1) * b_rs + (n - 1) * b_cs);
    let mut c = vec![0.0; m * n];
    // SAFETY: the asserts above bound every index the strides reach; `c` is fresh.
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
    c
}
