//! The `Score` trait and its composition.
//!
//! [`Guided`] adds weighted log-probability terms ([`LogProb`]: a classifier's
//! log C(x; σ), or log p(y | x; σ)) to a base score through autograd on an input `Var`:
//! s_guided = s + Σ_k w_k ∇x log p_k. It is itself a `Score`.
//!
//! A model input that varies per row — class labels, a context tensor such as a map, a
//! mask — is a [`Cond`], passed through every score, term, sampler and loss
//! (k-diffusion's `extra_args`); [`Gated`] hands a term only its gated rows of it.
//!
//! Everything in scoreguide that can be sampled is a [`Score`]: ∇x log p_σ(x) for a batch
//! `x: [B, ...]` at per-sample noise levels `sigma: [B]`, in σ-space (`x = x0 + σ z`).
//! The denoiser view `D(x; σ) = x + σ² s(x; σ)` is a provided method, so models that
//! predict the clean data natively (EDM preconditioning) override it and avoid the round
//! trip through `s` at tiny σ.
//!
//! ```
//! use candle_core::{Device, Tensor, Result};
//! use scoreguide_guidance::{Cond, Score, per_sample};
//!
//! /// Standard normal data: p_σ = N(0, (1 + σ²) I).
//! struct StdNormal;
//! impl Score for StdNormal {
//!     fn score_with(&self, x: &Tensor, sigma: &Tensor, _cond: &Cond) -> Result<Tensor> {
//!         let var = (per_sample(sigma, x)?.sqr()? + 1.0)?;
//!         x.neg()?.broadcast_div(&var)
//!     }
//! }
//! let x = Tensor::new(&[[2f32, 0.0]], &Device::Cpu)?;
//! let sigma = Tensor::new(&[1f32], &Device::Cpu)?;
//! // D = x + σ² s = x − x/2.
//! let d = StdNormal.denoise(&x, &sigma)?.to_vec2::<f32>()?;
//! assert_eq!(d, vec![vec![1.0, 0.0]]);
//! # Ok::<(), candle_core::Error>(())
//! ```

mod cond;
mod guided;
mod score;

pub use cond::{nonzero_rows, Cond, NO_COND};
pub use guided::{grad_log_prob, log_sigmoid, log_softmax, one_hot, Gated, Guided, LogProb};
pub use score::{check_batch, per_sample, Score};
