//! Noise processes in σ-space, σ grids, training noise distributions and seeded noise.
//!
//! Every process of this crate writes its marginal as `x_t = α(t) (x0 + σ(t) z)`
//! (the EDM form). Dividing by `α` moves any process to σ-space, `x_σ = x0 + σ z`, where
//! one sampler drives them all: VE and EDM have `α = 1`; VP, sub-VP and discrete DDPM are
//! converted with `σ = std/α` (k-diffusion's wrappers do the same).
//!
//! ```
//! use scoreguide_sde::{Process, grid};
//! let vp = Process::vp(0.1, 20.0);
//! let t = 0.5;
//! let (a, s) = (vp.alpha(t), vp.sigma(t));
//! // VP in its own form: α² + (α σ)² = 1.
//! assert!((a * a + (a * s).powi(2) - 1.0).abs() < 1e-12);
//! // σ(t) is invertible.
//! assert!((vp.t_of_sigma(s) - t).abs() < 1e-9);
//! // A Karras grid starts at σ_max and ends at σ_min.
//! let g = grid::karras(18, 0.002, 80.0, 7.0).unwrap();
//! assert_eq!((g[0], g[17]), (80.0, 0.002));
//! ```

pub mod grid;
pub mod noise;
pub mod process;
pub mod training;

pub use grid::{append_zero, karras, log_linear, uniform_t};
pub use noise::{derive_seed, randn, SampleNoise};
pub use process::{BetaSchedule, Ddpm, Process};
pub use training::SigmaDistribution;
