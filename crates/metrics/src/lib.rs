//! Metrics for generative models.
//!
//! * [`Rate`], [`infraction_rate`], [`parallel_samples_needed`]: how often an oracle
//!   rejects samples, and what that costs in rejection sampling.
//! * [`negative_log_likelihood`]: held-out NLL through the probability-flow ODE.
//! * [`mmd2_gaussian`]: unbiased MMD² with a Gaussian kernel.
//! * [`read_npy`]: 2-D `.npy` arrays (f32 / f64).
//!
//! [`Rate`] is a proportion with its Wilson 95% interval, used for infraction rates:
//! the fraction of samples an oracle rejects ([`infraction_rate`]).
//!
//! ```
//! use scoreguide_metrics::Rate;
//! let r = Rate::new(50, 1000).unwrap();
//! assert_eq!(r.rate, 0.05);
//! // Wilson interval for 50/1000, by hand from Wilson (1927): centre ± half-width.
//! assert!((r.ci95.0 - 0.038130).abs() < 1e-5 && (r.ci95.1 - 0.065314).abs() < 1e-5);
//! ```

mod infraction;
mod likelihood;
mod mmd;
mod npy;

pub use infraction::{infraction_rate, parallel_samples_needed, Rate};
pub use likelihood::{negative_log_likelihood, Divergence, NllConfig};
pub use mmd::mmd2_gaussian;
pub use npy::{read_npy, Array2};
