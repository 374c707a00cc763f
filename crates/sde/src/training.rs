//! Distributions of σ for denoising score matching.

use crate::Process;
use candle_core::{bail, Device, Result, Tensor};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

/// How training draws the noise level of each example.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SigmaDistribution {
    /// ln σ uniform on [ln min, ln max].
    LogUniform { min: f64, max: f64 },
    /// ln σ ~ N(mean, std²); EDM uses mean −1.2, std 1.2.
    LogNormal { mean: f64, std: f64 },
    /// t uniform on [t_min, t_max], σ = σ(t) of the process.
    UniformT {
        process: Process,
        t_min: f64,
        t_max: f64,
    },
}

impl SigmaDistribution {
    pub fn edm_log_normal() -> Self {
        Self::LogNormal {
            mean: -1.2,
            std: 1.2,
        }
    }

    pub fn validate(&self) -> Result<()> {
        match self {
            Self::LogUniform { min, max } => {
                if !(*min > 0.0 && min < max && max.is_finite()) {
                    bail!(
                        "σ distribution log-uniform: need 0 < min < max < inf, got [{min}, {max}]"
                    );
                }
            }
            Self::LogNormal { mean, std } => {
                if !(mean.is_finite() && *std > 0.0 && std.is_finite()) {
                    bail!("σ distribution log-normal: need finite mean and std > 0, got ({mean}, {std})");
                }
            }
            Self::UniformT {
                process,
                t_min,
                t_max,
            } => {
                process.validate()?;
                if !(t_min < t_max) {
                    bail!("σ distribution uniform-t: need t_min < t_max, got [{t_min}, {t_max}]");
                }
            }
        }
        Ok(())
    }

    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> f64 {
        match self {
            Self::LogUniform { min, max } => {
                let u: f64 = rng.random();
                (min.ln() + u * (max.ln() - min.ln())).exp()
            }
            Self::LogNormal { mean, std } => {
                let z: f64 = StandardNormal.sample(rng);
                (mean + std * z).exp()
            }
            Self::UniformT {
                process,
                t_min,
                t_max,
            } => {
                let u: f64 = rng.random();
                process.sigma(t_min + u * (t_max - t_min))
            }
        }
    }

    pub fn sample_n<R: Rng + ?Sized>(&self, n: usize, rng: &mut R) -> Vec<f64> {
        (0..n).map(|_| self.sample(rng)).collect()
    }

    /// `n` draws as an f32 tensor `[n]` on `device`: one noise level per example.
    pub fn sample_tensor<R: Rng + ?Sized>(
        &self,
        n: usize,
        rng: &mut R,
        device: &Device,
    ) -> Result<Tensor> {
        let v: Vec<f32> = (0..n).map(|_| self.sample(rng) as f32).collect();
        Tensor::from_vec(v, n, &Device::Cpu)?.to_device(device)
    }
}
