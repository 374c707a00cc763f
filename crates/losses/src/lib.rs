//! Training losses for score models.
//!
//! [`dsm`] is denoising score matching, E[λ(σ) ‖s(x0 + σz; σ) + z/σ‖²], computed through
//! the model's denoiser view (‖s + z/σ‖² = ‖D − x0‖²/σ⁴) so that no network output is
//! divided by a tiny σ². The weighting is a parameter ([`DsmWeighting`]).
//!
//! ```
//! use candle_core::{Device, Tensor, Result};
//! use scoreguide_guidance::{Score, per_sample};
//! use scoreguide_losses::{dsm, DsmWeighting};
//!
//! /// The exact score of data concentrated at 0: s = −x/σ².
//! struct Origin;
//! impl Score for Origin {
//!     fn score(&self, x: &Tensor, sigma: &Tensor) -> Result<Tensor> {
//!         x.neg()?.broadcast_div(&per_sample(sigma, x)?.sqr()?)
//!     }
//! }
//! let dev = Device::Cpu;
//! let x0 = Tensor::zeros((3, 2), candle_core::DType::F32, &dev)?;
//! let z = Tensor::new(&[[1f32, -2.0], [0.5, 0.5], [3.0, 0.0]], &dev)?;
//! let sigma = Tensor::new(&[0.1f32, 1.0, 10.0], &dev)?;
//! let loss = dsm(&Origin, &x0, &sigma, &z, DsmWeighting::SigmaSquared)?;
//! assert!(loss.to_scalar::<f32>()?.abs() < 1e-6); // the exact score has zero DSM loss here
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{bail, Result, Tensor};
use scoreguide_guidance::{check_batch, per_sample, Score};
use serde::{Deserialize, Serialize};

/// λ(σ) of denoising score matching, stated on the score error ‖s + z/σ‖².
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DsmWeighting {
    /// EDM: λ_D(σ) = (σ² + σd²)/(σ σd)² on the denoiser error ‖D − x0‖², i.e. λ_D σ⁴ on the score error.
    Edm { sigma_data: f64 },
    /// λ = σ² (score_sde image models: ‖σ s + z‖²).
    SigmaSquared,
    /// λ = σ⁴ (the DLSM toy code: ‖σ² s + σ z‖²).
    SigmaFourth,
    /// λ = 1.
    Unit,
}

impl DsmWeighting {
    /// The weight on the denoiser error ‖D − x0‖² at noise level σ.
    pub fn denoiser_weight(&self, sigma: f64) -> f64 {
        match *self {
            Self::Edm { sigma_data: sd } => (sigma * sigma + sd * sd) / (sigma * sd).powi(2),
            Self::SigmaSquared => 1.0 / (sigma * sigma),
            Self::SigmaFourth => 1.0,
            Self::Unit => 1.0 / sigma.powi(4),
        }
    }
}

/// Denoising score matching: the batch mean over samples of
/// λ(σ) ‖s(x0 + σ z; σ) + z/σ‖², summed over data dimensions.
///
/// `x0` and `noise` are `[B, ...]` of the same shape, `sigma` is `[B]`.
pub fn dsm(
    model: &dyn Score,
    x0: &Tensor,
    sigma: &Tensor,
    noise: &Tensor,
    weighting: DsmWeighting,
) -> Result<Tensor> {
    check_batch(x0, sigma)?;
    if noise.dims() != x0.dims() {
        bail!(
            "DSM loss: noise has shape {:?}, data has {:?}",
            noise.dims(),
            x0.dims()
        );
    }
    let s = per_sample(sigma, x0)?;
    let x = (x0 + noise.broadcast_mul(&s)?)?;
    let d = model.denoise(&x, sigma)?;
    let w: Vec<f64> = sigma
        .to_dtype(candle_core::DType::F64)?
        .to_vec1::<f64>()?
        .into_iter()
        .map(|s| weighting.denoiser_weight(s))
        .collect();
    let w = Tensor::from_vec(w, sigma.dims(), sigma.device())?.to_dtype(x0.dtype())?;
    let per = (d - x0)?.sqr()?.flatten_from(1)?.sum(1)?;
    (per * w)?.mean_all()
}
