//! Gen-neG: oracle-assisted guidance (Algorithm 1 of "Don't be so Negative!").
//!
//! One iteration: draw from the current model until N valid and N invalid samples are
//! in hand ([`collect`], under a sample budget), estimate the model's valid rate α from
//! everything drawn, train a time-dependent classifier C(x; σ) on the balanced set with
//! importance weights α / 1 − α ([`train_classifier`], Eq. 11), and add log C as a
//! guidance term ([`Stack`]). Any stack can be distilled into one network of the base
//! architecture on the true data ([`distill`], Eq. 12).
//!
//! ```
//! use scoreguide_genneg::CollectConfig;
//! let cfg = CollectConfig { per_class: 100, budget: 10_000, min_negatives: 50, ..CollectConfig::default() };
//! assert!(cfg.validate().is_ok());
//! assert!(CollectConfig { min_negatives: 0, ..cfg }.validate().is_err());
//! ```

mod classify;
mod collect;
mod distill;
mod stack;

pub use classify::{train_classifier, ClassifierKind, ClassifierTrainConfig, LabelledSet};
pub use collect::{collect, CollectConfig, Collected};
pub use distill::{distill, DistillConfig};
pub use stack::{Stack, StackedClassifier};
