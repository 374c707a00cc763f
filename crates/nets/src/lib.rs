//! Score networks, classifiers and their preconditioning.
//!
//! * [`ResMlp`]: the residual MLP of Gen-neG App. B.1 (sinusoidal noise embedding,
//!   hidden 256, 2 residual blocks, SiLU); with `out_dim = 1` it is the time-dependent
//!   classifier of the same paper.
//! * [`Precond`]: how a raw network `F(x_in, c_noise)` becomes a denoiser: EDM
//!   preconditioning, or ε / x0 / score prediction in any process's own form
//!   (VP, sub-VP, DDPM networks enter σ-space here).
//! * [`ScoreNet`]: a network plus its preconditioning, implementing
//!   [`scoreguide_guidance::Score`].
//! * [`Classifier`]: a noise-conditioned classifier; binary ones are guidance terms
//!   ([`scoreguide_guidance::LogProb`]), and [`OnDenoised`] guides with a classifier of
//!   clean data through the one-step denoised estimate.
//! * [`ToyMlp`]: DLSM's two-branch toy MLP, as a score model ([`ToyScore`]) or a K-class
//!   classifier ([`ToyClassifier`]) whose ∇x log p(y | x) can be trained through.
//! * [`SceneTransformer`]: the traffic-scene transformer of Gen-neG App. B.2 — agents
//!   with relative-position self-attention and cross-attention to map tokens from a
//!   [`MapEncoder`], the maps coming in as each row's condition
//!   ([`scoreguide_guidance::Cond`]); a score network or a per-agent classifier.
//! * [`MotionTransformer`]: an MDM-style transformer over motion frames (a token of the
//!   noise level and action label, padding frames masked), a score network or a
//!   classifier of whole motions.
//! * [`UNet`]: a DDPM++-style image U-Net (residual blocks with the noise embedding,
//!   attention at low resolutions) on the fused convolutions of `scoreguide_kernels`; its
//!   pooled variant is a classifier of the same architecture.
//! * [`ResNet`]: ResNet-18/34 image classifiers with a noise-level branch in every block
//!   (DLSM's classifier), or without it (CAS's classifier of clean images).
//! * [`NetConfig`] / [`AnyNet`]: every architecture as one serialisable config and one
//!   type, so a checkpoint's metadata rebuilds any of them; [`NoiseNet`] is the
//!   interface they share.
//! * [`ParamStore`]: named parameters with seeded, order-independent initialisation
//!   (candle's CPU generator cannot be seeded).
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use scoreguide_guidance::Score;
//! use scoreguide_nets::{ParamStore, ScoreModelConfig};
//!
//! let cfg = ScoreModelConfig::checkerboard();
//! let store = ParamStore::new(0);
//! let model = cfg.build(&store.var_builder(DType::F32, &Device::Cpu))?;
//! assert_eq!(store.num_params(), 297_474); // Gen-neG reports "around 330k"
//! let x = Tensor::zeros((4, 2), DType::F32, &Device::Cpu)?;
//! let sigma = Tensor::new(&[0.5f32, 1.0, 2.0, 80.0], &Device::Cpu)?;
//! assert_eq!(model.score(&x, &sigma)?.dims(), &[4, 2]);
//! # Ok::<(), candle_core::Error>(())
//! ```

mod classifier;
mod config;
mod embedding;
mod layers;
mod maps;
mod mlp;
mod motion;
mod net;
mod params;
mod precond;
mod resnet;
mod toy;
mod transformer;
mod unet;

pub use classifier::{Classifier, ClassifierConfig, ClassifierHead, OnDenoised};
pub use config::{AnyNet, NetConfig, ScoreModelConfig};
pub use embedding::SinusoidalEmbedding;
pub use maps::{MapEncoder, MapProbe, SceneMaps};
pub use mlp::{ResMlp, ResMlpConfig};
pub use motion::{MotionOutput, MotionTransformer, MotionTransformerConfig};
pub use net::NoiseNet;
pub use params::ParamStore;
pub use precond::{Precond, ScoreNet};
pub use resnet::{ResNet, ResNetConfig};
pub use toy::{ClassTerm, ToyClassifier, ToyMlp, ToyMlpConfig, ToyScore};
pub use transformer::{SceneTransformer, SceneTransformerConfig};
pub use unet::{UNet, UNetConfig, UNetOutput};
