//! scoreguide: score-based generative modelling with guidance, on Candle.
//!
//! This umbrella crate re-exports the workspace's small crates under short names and
//! adds what the examples and the `scoreguide` command share: PNG plots ([`plot`]), run
//! set-up ([`runtime`]) and the experiments' shared parts ([`checkerboard`], [`moons`],
//! [`traffic`]). Depend on the individual `scoreguide-*` crates to pick and
//! choose.
//!
//! | module | crate | what for |
//! |---|---|---|
//! | [`sde`] | scoreguide-sde | noise processes, σ grids, training σ, seeded noise |
//! | [`guidance`] | scoreguide-guidance | the `Score` trait |
//! | [`nets`] | scoreguide-nets | residual MLP, DLSM toy MLP, preconditioning, parameter stores |
//! | [`losses`] | scoreguide-losses | DSM, IS-balanced BCE, distillation, CE, DLSM |
//! | [`samplers`] | scoreguide-samplers | Heun, Euler, EM, PC, DDPM, DDIM, PF-ODE |
//! | [`oracles`] | scoreguide-oracles | the `Oracle` trait, checkerboard, traffic scenes (collision, offroad) |
//! | [`metrics`] | scoreguide-metrics | infraction rate, NLL, MMD², FID, KID, PRDC, score errors |
//! | [`data`] | scoreguide-data | toy data, Gaussian mixtures, batching, procedural traffic scenes |
//! | [`train`] | scoreguide-train | Adam, EMA, checkpoints |
//!
//! ```
//! use scoreguide::oracles::{Checkerboard, Oracle};
//! let x = scoreguide::data::checkerboard(100, 7)?.to_vec2::<f32>()?;
//! assert!(x.iter().all(|p| Checkerboard::default().check(p).valid));
//! # Ok::<(), candle_core::Error>(())
//! ```

pub mod checkerboard;
pub mod moons;
pub mod plot;
pub mod runtime;
pub mod traffic;

pub use scoreguide_data as data;
pub use scoreguide_genneg as genneg;
pub use scoreguide_guidance as guidance;
pub use scoreguide_losses as losses;
pub use scoreguide_metrics as metrics;
pub use scoreguide_nets as nets;
pub use scoreguide_oracles as oracles;
pub use scoreguide_samplers as samplers;
pub use scoreguide_sde as sde;
pub use scoreguide_train as train;
