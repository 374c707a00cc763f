//! Gen-neG: oracle-assisted guidance (Algorithm 1 of "Don't be so Negative!").
//!
//! One iteration: draw from the current model until N valid and N invalid samples are
//! in hand ([`collect`], under a sample budget), estimate the model's valid rate α from
//! everything drawn, train a time-dependent classifier C(x; σ) on the balanced set with
//! importance weights α / 1 − α ([`LabelledSet`], [`train_classifier`], Eq. 11), and add
//! log C as a guidance term ([`Stack`], optionally [gated](scoreguide_guidance::Gated)
//! to small σ). Any stack can be distilled into one network of the base architecture on
//! the true data ([`distill`], Eq. 12).
//!
//! Written once for every experiment: a [`Task`] says where each drawn row's condition
//! comes from (a scene's map; nothing for the checkerboard) and which of its K
//! components are valid (K = 1 for a point, K = agents for a traffic scene). Labels and
//! importance weights are `[N, K]`, and the classifier has one logit per component.
//!
//! At scale: a synthetic set can be drawn from an earlier, more often invalid model and
//! weighted for the current one by sequential importance sampling ([`Source::Sis`],
//! App. D.2), or in shards by row ranges merged into the single process's set
//! ([`collect_shard`], [`merge_shards`]); [`sample_valid`] returns k valid samples in
//! few draws.

//!
//! ```
//! use candle_core::Tensor;
//! use scoreguide_genneg::{ClassifierKind, Draws, LabelledSet};
//! // Four drawn rows of two components: 5 valid, 3 invalid (α = 5/8).
//! let x = Tensor::zeros((4, 2), candle_core::DType::F32, &candle_core::Device::Cpu)?;
//! let valid = vec![true, true, false, true, true, false, false, true];
//! let draws = Draws::from_rows(x, vec![0; 4], valid, 2)?;
//! let set = LabelledSet::new(&draws, ClassifierKind::IsBalanced)?;
//! // The first 3 valid and 3 invalid components are kept, weighted α and 1 − α.
//! assert_eq!(set.kept, (3, 3));
//! assert_eq!(set.weights.to_vec2::<f32>()?[1], vec![0.375, 0.625]);
//! # Ok::<(), candle_core::Error>(())
//! ```

mod classify;
mod collect;
mod distill;
mod stack;
mod task;
mod valid;

pub use classify::{
    train_classifier, ClassifierKind, ClassifierTrainConfig, LabelledSet, TrainedClassifier,
};
pub use collect::{
    collect, collect_from, collect_shard, merge_shards, CollectConfig, Draws, Shard, ShardDraws,
    SisWeights, Source,
};
pub use distill::{distill, DistillConfig, RowCond};
pub use scoreguide_train::Staged;
pub use stack::{Stack, StackedClassifier};
pub use task::{Task, Unconditioned};
pub use valid::{sample_valid, valid_draws, ValidConfig, ValidReport, ValidSamples};
