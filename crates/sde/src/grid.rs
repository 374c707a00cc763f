//! σ grids for sampling: descending from σ_max to σ_min.

use crate::Process;
use candle_core::{bail, Result};

fn check(n: usize, sigma_min: f64, sigma_max: f64) -> Result<()> {
    if n < 2 {
        bail!("σ grid: need at least 2 points, got {n}");
    }
    if !(sigma_min > 0.0 && sigma_min < sigma_max && sigma_max.is_finite()) {
        bail!("σ grid: need 0 < sigma_min < sigma_max < inf, got [{sigma_min}, {sigma_max}]");
    }
    Ok(())
}

/// Karras et al. 2022 (Eq. 5): σ_i = (σ_max^{1/ρ} + i/(n−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ.
pub fn karras(n: usize, sigma_min: f64, sigma_max: f64, rho: f64) -> Result<Vec<f64>> {
    check(n, sigma_min, sigma_max)?;
    if !(rho > 0.0) {
        bail!("σ grid: rho must be positive, got {rho}");
    }
    let (a, b) = (sigma_max.powf(1.0 / rho), sigma_min.powf(1.0 / rho));
    let mut g: Vec<f64> = (0..n)
        .map(|i| (a + i as f64 / (n - 1) as f64 * (b - a)).powf(rho))
        .collect();
    // Exact ends, whatever rounding did.
    g[0] = sigma_max;
    g[n - 1] = sigma_min;
    Ok(g)
}

/// Geometric (log-linear) grid from σ_max to σ_min.
pub fn log_linear(n: usize, sigma_min: f64, sigma_max: f64) -> Result<Vec<f64>> {
    check(n, sigma_min, sigma_max)?;
    let (a, b) = (sigma_max.ln(), sigma_min.ln());
    let mut g: Vec<f64> = (0..n)
        .map(|i| (a + i as f64 / (n - 1) as f64 * (b - a)).exp())
        .collect();
    g[0] = sigma_max;
    g[n - 1] = sigma_min;
    Ok(g)
}

/// σ(t) of a process at times uniform in t, from `t_max` down to `t_min`.
pub fn uniform_t(process: &Process, n: usize, t_min: f64, t_max: f64) -> Result<Vec<f64>> {
    process.validate()?;
    if n < 2 || !(t_min < t_max) {
        bail!(
            "σ grid uniform in t: need n >= 2 and t_min < t_max, got n = {n}, [{t_min}, {t_max}]"
        );
    }
    Ok((0..n)
        .map(|i| process.sigma(t_max + i as f64 / (n - 1) as f64 * (t_min - t_max)))
        .collect())
}

/// The grid with a final σ = 0 (samplers take their last step to the clean data).
pub fn append_zero(mut grid: Vec<f64>) -> Vec<f64> {
    grid.push(0.0);
    grid
}
