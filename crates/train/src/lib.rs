//! Training: optimizer, EMA, clipping, warm-up, progress and checkpoints.
//!
//! [`Trainer`] owns a [`ParamStore`](scoreguide_nets::ParamStore)'s optimisation state
//! (Adam moments, EMA weights, step). Each step draws its randomness from a generator
//! seeded by (seed, step), so a run resumed from a [`Checkpoint`] continues exactly as
//! the uninterrupted run would have. Checkpoints are safetensors files whose header
//! metadata describes the model, written atomically (temp file, fsync, rename).
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use scoreguide_nets::ParamStore;
//! use scoreguide_train::{TrainConfig, Trainer};
//!
//! // Fit w to minimise (w − 3)² with Adam.
//! let store = ParamStore::new(0);
//! let w = store.var_builder(DType::F32, &Device::Cpu).get_with_hints(1, "w", candle_nn::Init::Const(0.0))?;
//! let cfg = TrainConfig { lr: 0.1, ema_decay: 0.0, ..TrainConfig::default() };
//! let mut trainer = Trainer::new(store, cfg)?;
//! for _ in 0..300 {
//!     let loss = (&w - 3.0)?.sqr()?.sum_all()?;
//!     trainer.step(&loss)?;
//! }
//! assert!((w.to_vec1::<f32>()?[0] - 3.0).abs() < 1e-2);
//! # Ok::<(), candle_core::Error>(())
//! ```

mod checkpoint;
mod optim;
#[cfg(feature = "nccl")]
mod parallel;
mod progress;
mod trainer;

pub use checkpoint::{load_frozen, load_score_model, Weights};
pub use optim::{clip_grad_norm, grad_norm, Adam, AdamConfig, Ema};
#[cfg(feature = "nccl")]
pub use parallel::DataParallel;
pub use progress::Progress;
pub use scoreguide_checkpoint::{write_atomic, Checkpoint, FORMAT};
pub use trainer::{train_resumable, GradientSync, Staged, StepStats, TrainConfig, Trainer};
