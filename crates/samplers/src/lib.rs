//! Samplers for score models in σ-space.
//!
//! Every sampler has one signature (k-diffusion's): a [`Score`], the initial `x` at the
//! first σ of the grid, the grid `sigmas` (descending; a final 0 takes the last step to
//! clean data), the rows' condition ([`Cond`], k-diffusion's `extra_args`; `Cond::none()`
//! for an unconditioned model), a [`SampleNoise`] with one seeded generator per sample, and a per-step
//! [`Callback`] that may stop the run early. [`Sampler`] names each with its options, so
//! swapping one for another is a one-word change. [`sample_sis`] runs a stochastic sampler
//! with one model's transitions and weights each chain for another's (Gen-neG App. D.2).
//!
//! ```
//! use candle_core::{DType, Device};
//! use scoreguide_data::GaussianMixture;
//! use scoreguide_sde::{append_zero, log_linear, SampleNoise};
//! use scoreguide_samplers::{initial_noise, Sampler, HeunOptions};
//!
//! let gm = GaussianMixture::new(vec![1.0], vec![vec![3.0]], vec![vec![0.5]])?;
//! let sigmas = append_zero(log_linear(40, 0.002, 40.0)?);
//! let mut noise = SampleNoise::new(0, 0, 2000);
//! let x = initial_noise(&mut noise, &[2000, 1], sigmas[0], DType::F32, &Device::Cpu)?;
//! let out = Sampler::Heun(HeunOptions::default()).sample(&gm, x, &sigmas, &mut noise, None)?;
//! let mean = out.mean_all()?.to_scalar::<f32>()?;
//! assert!((mean - 3.0).abs() < 0.1);
//! # Ok::<(), candle_core::Error>(())
//! ```

mod samplers;
mod sis;

pub use samplers::*;
pub use scoreguide_guidance::{Cond, Score};
pub use scoreguide_sde::SampleNoise;
pub use sis::sample_sis;
