//! Noise processes and their σ-space view.

use candle_core::{bail, Result};
use serde::{Deserialize, Serialize};

/// β schedule of a discrete DDPM process.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BetaSchedule {
    /// β_i evenly spaced from `beta_start` to `beta_end` (Ho et al. 2020: 1e-4 → 0.02).
    Linear { beta_start: f64, beta_end: f64 },
    /// Nichol & Dhariwal 2021: ᾱ(t) = cos²((t + s)/(1 + s) · π/2),
    /// β_i = min(1 − ᾱ(t_{i+1})/ᾱ(t_i), 0.999) with true (floating-point) division.
    Cosine { s: f64 },
}

/// A discrete DDPM process with `steps` noise levels; `t` is the (continuous) step index
/// in `[0, steps − 1]`, interpolated log-linearly in σ between integer steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "DdpmConfig", into = "DdpmConfig")]
pub struct Ddpm {
    steps: usize,
    schedule: BetaSchedule,
    betas: Vec<f64>,
    /// σ-space noise level of each step, increasing.
    sigmas: Vec<f64>,
}

#[derive(Serialize, Deserialize)]
struct DdpmConfig {
    steps: usize,
    schedule: BetaSchedule,
}

impl TryFrom<DdpmConfig> for Ddpm {
    type Error = candle_core::Error;
    fn try_from(c: DdpmConfig) -> Result<Self> {
        Ddpm::new(c.steps, c.schedule)
    }
}

impl From<Ddpm> for DdpmConfig {
    fn from(d: Ddpm) -> Self {
        DdpmConfig {
            steps: d.steps,
            schedule: d.schedule,
        }
    }
}

impl Ddpm {
    pub fn new(steps: usize, schedule: BetaSchedule) -> Result<Self> {
        if steps < 2 {
            bail!("DDPM process: steps must be at least 2, got {steps}");
        }
        let betas: Vec<f64> = match schedule {
            BetaSchedule::Linear {
                beta_start,
                beta_end,
            } => {
                if !(0.0 < beta_start && beta_start <= beta_end && beta_end < 1.0) {
                    bail!("DDPM linear schedule: need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}");
                }
                (0..steps)
                    .map(|i| beta_start + (beta_end - beta_start) * i as f64 / (steps - 1) as f64)
                    .collect()
            }
            BetaSchedule::Cosine { s } => {
                if !(s.is_finite() && s > 0.0) {
                    bail!("DDPM cosine schedule: offset s must be positive, got {s}");
                }
                let abar = |t: f64| {
                    ((t + s) / (1.0 + s) * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                (0..steps)
                    .map(|i| {
                        let t1 = i as f64 / steps as f64;
                        let t2 = (i + 1) as f64 / steps as f64;
                        (1.0 - abar(t2) / abar(t1)).min(0.999)
                    })
                    .collect()
            }
        };
        let mut abar = 1.0;
        let sigmas = betas
            .iter()
            .map(|b| {
                abar *= 1.0 - b;
                ((1.0 - abar) / abar).sqrt()
            })
            .collect();
        Ok(Self {
            steps,
            schedule,
            betas,
            sigmas,
        })
    }

    pub fn steps(&self) -> usize {
        self.steps
    }
    pub fn schedule(&self) -> BetaSchedule {
        self.schedule
    }
    pub fn betas(&self) -> &[f64] {
        &self.betas
    }
    /// σ-space noise level of every integer step, increasing with the step.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    fn sigma(&self, t: f64) -> f64 {
        let t = t.clamp(0.0, (self.steps - 1) as f64);
        let lo = (t.floor() as usize).min(self.steps - 2);
        let w = t - lo as f64;
        ((1.0 - w) * self.sigmas[lo].ln() + w * self.sigmas[lo + 1].ln()).exp()
    }

    fn t_of_sigma(&self, sigma: f64) -> f64 {
        let ls = sigma.ln();
        let logs: Vec<f64> = self.sigmas.iter().map(|s| s.ln()).collect();
        if ls <= logs[0] {
            return 0.0;
        }
        if ls >= logs[self.steps - 1] {
            return (self.steps - 1) as f64;
        }
        // First index whose log σ exceeds ls; logs is strictly increasing.
        let hi = logs.partition_point(|&l| l < ls);
        let lo = hi - 1;
        lo as f64 + (ls - logs[lo]) / (logs[hi] - logs[lo])
    }
}

/// A diffusion process `x_t = α(t) (x0 + σ(t) z)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Process {
    /// Variance exploding: α = 1, σ(t) = σ_min (σ_max/σ_min)^t, t ∈ [0, 1].
    Ve { sigma_min: f64, sigma_max: f64 },
    /// Variance preserving: α(t) = exp(−¼ t² (β_max − β_min) − ½ t β_min), std = sqrt(1 − α²).
    Vp { beta_min: f64, beta_max: f64 },
    /// Song et al. 2021 sub-VP: same mean as VP, std = 1 − α².
    SubVp { beta_min: f64, beta_max: f64 },
    /// Karras et al. 2022: α = 1, σ(t) = t.
    Edm { sigma_min: f64, sigma_max: f64 },
    /// Discrete DDPM with a β schedule.
    Ddpm(Ddpm),
}

impl Process {
    pub fn ve(sigma_min: f64, sigma_max: f64) -> Self {
        Self::Ve {
            sigma_min,
            sigma_max,
        }
    }
    pub fn vp(beta_min: f64, beta_max: f64) -> Self {
        Self::Vp { beta_min, beta_max }
    }
    pub fn sub_vp(beta_min: f64, beta_max: f64) -> Self {
        Self::SubVp { beta_min, beta_max }
    }
    pub fn edm(sigma_min: f64, sigma_max: f64) -> Self {
        Self::Edm {
            sigma_min,
            sigma_max,
        }
    }
    pub fn ddpm_linear(steps: usize) -> Result<Self> {
        Ok(Self::Ddpm(Ddpm::new(
            steps,
            BetaSchedule::Linear {
                beta_start: 1e-4,
                beta_end: 0.02,
            },
        )?))
    }
    pub fn ddpm_cosine(steps: usize) -> Result<Self> {
        Ok(Self::Ddpm(Ddpm::new(
            steps,
            BetaSchedule::Cosine { s: 0.008 },
        )?))
    }

    /// Rejects parameters that make σ(t) non-monotone or undefined.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Self::Ve {
                sigma_min,
                sigma_max,
            }
            | Self::Edm {
                sigma_min,
                sigma_max,
            } => {
                if !(sigma_min > 0.0 && sigma_min < sigma_max && sigma_max.is_finite()) {
                    bail!("process {self:?}: need 0 < sigma_min < sigma_max < inf");
                }
            }
            Self::Vp { beta_min, beta_max } | Self::SubVp { beta_min, beta_max } => {
                if !(beta_min > 0.0 && beta_min <= beta_max && beta_max.is_finite()) {
                    bail!("process {self:?}: need 0 < beta_min <= beta_max < inf");
                }
            }
            Self::Ddpm(_) => {}
        }
        Ok(())
    }

    /// The time interval over which the process is defined.
    pub fn t_range(&self) -> (f64, f64) {
        match self {
            Self::Ve { .. } => (0.0, 1.0),
            Self::Vp { .. } | Self::SubVp { .. } => (1e-5, 1.0),
            Self::Edm {
                sigma_min,
                sigma_max,
            } => (*sigma_min, *sigma_max),
            Self::Ddpm(d) => (0.0, (d.steps - 1) as f64),
        }
    }

    /// Signal scale α(t).
    pub fn alpha(&self, t: f64) -> f64 {
        match self {
            Self::Ve { .. } | Self::Edm { .. } => 1.0,
            Self::Vp { beta_min, beta_max } | Self::SubVp { beta_min, beta_max } => {
                (-0.25 * t * t * (beta_max - beta_min) - 0.5 * t * beta_min).exp()
            }
            Self::Ddpm(d) => {
                let s = d.sigma(t);
                1.0 / (1.0 + s * s).sqrt()
            }
        }
    }

    /// Noise level in σ-space at time t (noise std divided by α).
    pub fn sigma(&self, t: f64) -> f64 {
        match self {
            Self::Ve {
                sigma_min,
                sigma_max,
            } => sigma_min * (sigma_max / sigma_min).powf(t),
            Self::Edm { .. } => t,
            Self::Vp { .. } => {
                // σ² = 1/α² − 1 = expm1(−2 ln α), without cancellation at small t.
                (-2.0 * self.log_alpha(t)).exp_m1().sqrt()
            }
            Self::SubVp { .. } => {
                let a = self.alpha(t);
                -(2.0 * self.log_alpha(t)).exp_m1() / a
            }
            Self::Ddpm(d) => d.sigma(t),
        }
    }

    /// Noise std of the process in its own form, α(t) σ(t).
    pub fn std(&self, t: f64) -> f64 {
        self.alpha(t) * self.sigma(t)
    }

    fn log_alpha(&self, t: f64) -> f64 {
        match self {
            Self::Vp { beta_min, beta_max } | Self::SubVp { beta_min, beta_max } => {
                -0.25 * t * t * (beta_max - beta_min) - 0.5 * t * beta_min
            }
            _ => self.alpha(t).ln(),
        }
    }

    /// Inverse of [`Process::sigma`].
    pub fn t_of_sigma(&self, sigma: f64) -> f64 {
        match self {
            Self::Ve {
                sigma_min,
                sigma_max,
            } => (sigma / sigma_min).ln() / (sigma_max / sigma_min).ln(),
            Self::Edm { .. } => sigma,
            Self::Vp { beta_min, beta_max } | Self::SubVp { beta_min, beta_max } => {
                // −2 ln α = ½ Δβ t² + β_min t =: L, solved for t ≥ 0.
                let l = match self {
                    Self::Vp { .. } => (sigma * sigma).ln_1p(),
                    _ => {
                        let a = 2.0 / (sigma + (sigma * sigma + 4.0).sqrt());
                        -2.0 * a.ln()
                    }
                };
                let d = beta_max - beta_min;
                if d.abs() < 1e-12 {
                    l / beta_min
                } else {
                    2.0 * l / (beta_min + (beta_min * beta_min + 2.0 * d * l).sqrt())
                }
            }
            Self::Ddpm(d) => d.t_of_sigma(sigma),
        }
    }

    /// σ at the ends of [`Process::t_range`]: (σ_min, σ_max).
    pub fn sigma_range(&self) -> (f64, f64) {
        let (a, b) = self.t_range();
        (self.sigma(a), self.sigma(b))
    }

    /// The scalar a network trained in this process's own form is conditioned on:
    /// ¼ ln σ for VE and EDM (as EDM's preconditioning), 999·t for VP and sub-VP
    /// (score_sde's DDPM++ convention), the step index for discrete DDPM.
    pub fn noise_condition(&self, sigma: f64) -> f64 {
        match self {
            Self::Ve { .. } | Self::Edm { .. } => 0.25 * sigma.ln(),
            Self::Vp { .. } | Self::SubVp { .. } => 999.0 * self.t_of_sigma(sigma),
            Self::Ddpm(d) => d.t_of_sigma(sigma),
        }
    }

    /// α at the time where the process reaches σ: the factor from σ-space back to the
    /// process's own `x_t = α x_σ`.
    pub fn alpha_at_sigma(&self, sigma: f64) -> f64 {
        match self {
            Self::Ve { .. } | Self::Edm { .. } => 1.0,
            Self::Vp { .. } | Self::Ddpm(_) => 1.0 / (1.0 + sigma * sigma).sqrt(),
            Self::SubVp { .. } => 2.0 / (sigma + (sigma * sigma + 4.0).sqrt()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_relative_eq;

    #[test]
    fn cosine_schedule_uses_true_division() {
        // With integer division every t1 = i/steps would be 0 and β would collapse.
        let d = Ddpm::new(1000, BetaSchedule::Cosine { s: 0.008 }).unwrap();
        let b = d.betas();
        assert!(b[0] > 0.0 && b[0] < 1e-3, "first beta {}", b[0]);
        assert!(b[500] > b[0]);
        assert_relative_eq!(b[999], 0.999);
    }

    #[test]
    fn linear_ddpm_matches_closed_form() {
        // ᾱ_0 = 1 − 1e-4 → σ_0 = sqrt(1e-4 / (1 − 1e-4)).
        let d = Ddpm::new(
            1000,
            BetaSchedule::Linear {
                beta_start: 1e-4,
                beta_end: 0.02,
            },
        )
        .unwrap();
        assert_relative_eq!(
            d.sigmas()[0],
            (1e-4f64 / (1.0 - 1e-4)).sqrt(),
            max_relative = 1e-12
        );
        // Ho et al.: ᾱ_T ≈ 4.0e-5 for T = 1000, i.e. σ_T ≈ 157.
        let s = d.sigmas()[999];
        assert!(s > 150.0 && s < 165.0, "{s}");
    }

    #[test]
    fn sub_vp_std_is_one_minus_alpha_sq() {
        let p = Process::sub_vp(0.1, 20.0);
        for t in [0.01, 0.3, 1.0] {
            let a = p.alpha(t);
            assert_relative_eq!(p.std(t), 1.0 - a * a, max_relative = 1e-10);
            assert_relative_eq!(p.alpha_at_sigma(p.sigma(t)), a, max_relative = 1e-10);
        }
    }
}
