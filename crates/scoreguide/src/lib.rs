//! scoreguide: score-based generative modelling with guidance, on Candle.
//!
//! This umbrella crate only re-exports: the workspace's small crates under short names,
//! and the experiments ([`experiments`]: [`checkerboard`], [`moons`], [`traffic`], with
//! PNG plots in [`plot`] and run set-up in [`runtime`]) that the examples and the
//! `scoreguide` command compose. Depend on the individual `scoreguide-*` crates to pick
//! and choose.
//!
//! | module | crate | what for |
//! |---|---|---|
//! | [`sde`] | scoreguide-sde | noise processes, σ grids, training σ, seeded noise |
//! | [`guidance`] | scoreguide-guidance | the `Score` trait |
//! | [`nets`] | scoreguide-nets | residual MLP, DLSM toy MLP, preconditioning, parameter stores |
//! | [`losses`] | scoreguide-losses | DSM, IS-balanced BCE, distillation, CE, DLSM |
//! | [`samplers`] | scoreguide-samplers | Heun, Euler, EM, PC, DDPM, DDIM, PF-ODE |
//! | [`oracles`] | scoreguide-oracles | the `Oracle` trait, checkerboard, traffic scenes (collision, offroad) |
//! | [`metrics`] | scoreguide-metrics | infraction rate, NLL, MMD², FID, KID, IS, PRDC, score errors |
//! | [`inception`] | scoreguide-inception | the FID Inception-v3: pool features, reference resize, weights into the HF cache |
//! | [`data`] | scoreguide-data | toy data, Gaussian mixtures, batching, procedural traffic scenes |
//! | [`train`] | scoreguide-train | Adam, EMA, staged training, checkpoints |
//! | [`genneg`] | scoreguide-genneg | Gen-neG once for every experiment: draws, labelled sets, classifiers, stacks, distillation |
//! | [`experiments`] | scoreguide-experiments | checkerboard, two moons, traffic scenes; plots, run set-up |
//!
//! ```
//! use scoreguide::oracles::{Checkerboard, Oracle};
//! let x = scoreguide::data::checkerboard(100, 7)?.to_vec2::<f32>()?;
//! assert!(x.iter().all(|p| Checkerboard::default().check(p).valid));
//! # Ok::<(), candle_core::Error>(())
//! ```

pub use scoreguide_data as data;
pub use scoreguide_experiments as experiments;
pub use scoreguide_experiments::{
    checkerboard, config, dlsm_images, image_metrics, images, moons, motion, plot, runtime, traffic,
};
pub use scoreguide_genneg as genneg;
pub use scoreguide_guidance as guidance;
pub use scoreguide_inception as inception;
pub use scoreguide_kernels as kernels;
pub use scoreguide_losses as losses;
pub use scoreguide_metrics as metrics;
pub use scoreguide_nets as nets;
pub use scoreguide_oracles as oracles;
pub use scoreguide_samplers as samplers;
pub use scoreguide_sde as sde;
pub use scoreguide_train as train;
