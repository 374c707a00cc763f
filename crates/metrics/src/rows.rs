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

pub(crate) fn sq_dist(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(p, q)| (p - q) * (p - q)).sum()
}

pub(crate) fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(p, q)| p * q).sum()
}
