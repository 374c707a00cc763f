//! Datasets for score models.
//!
//! * [`Dataset`]: an `[N, D]` tensor checked once where it enters (non-empty, finite,
//!   two-dimensional), with seeded shuffled batching.
//! * [`checkerboard`] and [`two_moons`]: the toy sets of the Gen-neG and DLSM papers.
//! * [`GaussianMixture`]: a diagonal Gaussian mixture whose score is known at every σ —
//!   the analytic reference the samplers and losses are tested against.
//! * [`Parzen`]: the exact score of a point set smoothed at σ (DLSM's oracle scores).
//! * [`images`]: labelled image sets (Fashion-MNIST and MNIST from IDX files, CIFAR-10/100
//!   binary batches) scaled to [−1, 1], with seeded flipped batches.
//! * [`motion`]: procedural human motions (six actions on HumanML3D's skeleton, feet
//!   planted on the ground), HumanML3D's own files, feature standardisation.
//! * [`scenes`]: procedural traffic scenes (road maps, vehicles on lanes) with seeded
//!   train/validation/test splits, saved as safetensors.
//!
//! ```
//! use scoreguide_data::{checkerboard, Dataset};
//! let x = checkerboard(1000, 0)?;
//! let data = Dataset::new(x, "checkerboard")?;
//! assert_eq!((data.len(), data.dim()), (1000, 2));
//! # Ok::<(), candle_core::Error>(())
//! ```

mod dataset;
pub mod images;
mod mixture;
pub mod motion;
mod parzen;
pub mod scenes;
mod toy;

pub use dataset::Dataset;
pub use images::{
    cifar, fashion_mnist, mnist_format, parse_cifar, parse_idx, read_idx, ImageSet, ImageSplit,
};
pub use mixture::GaussianMixture;
pub use parzen::Parzen;
pub use scenes::{MapLayers, SceneConfig, SceneSet, Split, DISTANCE_LAYER_REACH_M};
pub use toy::{checkerboard, checkerboard_with, two_moons};
