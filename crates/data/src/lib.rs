//! Datasets for score models.
//!
//! * [`Dataset`]: an `[N, D]` tensor checked once where it enters (non-empty, finite,
//!   two-dimensional), with seeded shuffled batching.
//! * [`checkerboard`] and [`two_moons`]: the toy sets of the Gen-neG and DLSM papers.
//! * [`GaussianMixture`]: a diagonal Gaussian mixture whose score is known at every σ —
//!   the analytic reference the samplers and losses are tested against.
//! * [`Parzen`]: the exact score of a point set smoothed at σ (DLSM's oracle scores).
//!
//! ```
//! use scoreguide_data::{checkerboard, Dataset};
//! let x = checkerboard(1000, 0)?;
//! let data = Dataset::new(x, "checkerboard")?;
//! assert_eq!((data.len(), data.dim()), (1000, 2));
//! # Ok::<(), candle_core::Error>(())
//! ```

mod dataset;
mod mixture;
mod parzen;
mod toy;

pub use dataset::Dataset;
pub use mixture::GaussianMixture;
pub use parzen::Parzen;
pub use toy::{checkerboard, checkerboard_with, two_moons};
