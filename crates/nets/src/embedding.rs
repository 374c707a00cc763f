//! Sinusoidal embedding of a scalar noise condition.

use candle_core::{bail, Result, Tensor};
use serde::{Deserialize, Serialize};

/// `[cos(f_k c), sin(f_k c)]` for `dim/2` frequencies geometric from 1 to `max_freq`.
///
/// With EDM's `c_noise = ¼ ln σ` spanning about [−1.6, 1.1] for σ ∈ [2e-3, 80], a
/// maximum frequency of 1000 resolves σ finely without aliasing across the range
/// (our choice; the Gen-neG paper says only "sinusoidal").
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SinusoidalEmbedding {
    pub dim: usize,
    pub max_freq: f64,
}

impl Default for SinusoidalEmbedding {
    fn default() -> Self {
        Self {
            dim: 128,
            max_freq: 1000.0,
        }
    }
}

impl SinusoidalEmbedding {
    pub fn validate(&self) -> Result<()> {
        if self.dim < 2 || self.dim % 2 != 0 {
            bail!(
                "sinusoidal embedding: dim must be even and >= 2, got {}",
                self.dim
            );
        }
        if !(self.max_freq >= 1.0 && self.max_freq.is_finite()) {
            bail!(
                "sinusoidal embedding: max_freq must be >= 1, got {}",
                self.max_freq
            );
        }
        Ok(())
    }

    /// `c: [B]` → `[B, dim]`.
    pub fn forward(&self, c: &Tensor) -> Result<Tensor> {
        let half = self.dim / 2;
        let freqs: Vec<f32> = (0..half)
            .map(|k| {
                let e = if half > 1 {
                    k as f64 / (half - 1) as f64
                } else {
                    0.0
                };
                self.max_freq.powf(e) as f32
            })
            .collect();
        scoreguide_kernels::sinusoidal(c, &freqs)
    }
}
