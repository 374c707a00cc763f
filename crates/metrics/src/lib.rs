//! Metrics for generative models.
//!
//! * [`Rate`], [`infraction_rate`], [`parallel_samples_needed`]: how often an oracle
//!   rejects samples, and what that costs in rejection sampling.
//! * [`negative_log_likelihood`]: held-out NLL through the probability-flow ODE.
//! * [`mmd2_gaussian`]: unbiased MMD² with a Gaussian kernel; [`kid`] with the cubic
//!   polynomial kernel.
//! * [`fid`]: Fréchet distance of fitted Gaussians ([`frechet_distance`],
//!   [`symmetric_eigen`]).
//! * [`prdc`], [`prdc_classwise`]: precision, recall, density, coverage.
//! * [`inception_score`]: IS of any classifier's class probabilities.
//! * [`score_errors`]: DLSM's D_P and D_L between estimated and true scores.
//! * [`read_npy`], [`read_npy_vector`]: 2-D and 1-D `.npy` arrays (f32 / f64);
//!   [`read_feature_rows`]: `[N, D]` rows from `.npy` or a one-tensor safetensors file.
//! * [`roc_auc`]: area under the ROC curve of a scorer (a classifier's check).
//!
//! The set metrics take row-major `f64` slices with the row width `d`, and reject NaN,
//! ragged or too-small inputs with an error naming the input.
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

mod auc;
mod features;
mod fid;
mod inception_score;
mod infraction;
mod likelihood;
mod mmd;
mod npy;
mod prdc;
mod rows;
mod score_error;

pub use auc::roc_auc;
pub use fid::{fid, frechet_distance, mean_and_covariance, symmetric_eigen, symmetric_eigenvalues};

pub use features::{parse_feature_rows, read_feature_rows};
pub use inception_score::inception_score;
pub use infraction::{infraction_rate, parallel_samples_needed, wilson_interval, Rate};
pub use likelihood::{negative_log_likelihood, Divergence, NllConfig};
pub use mmd::{kid, mmd2_gaussian};
pub use npy::{read_npy, read_npy_vector, Array2};
pub use prdc::{prdc, prdc_classwise, Prdc};
pub use score_error::score_errors;
