//! Human motion (Gen-neG paper §4.3, Table 2) on our procedural stand-in for HumanML3D:
//! what is motion's own — the data with each motion's action label and frame mask as
//! its condition, the ground-penetration oracle as a Gen-neG
//! [`Task`](scoreguide_genneg::Task) ([`MotionTask`], one component per motion), the
//! MDM-style baseline trained as a DDPM with x0 (or ε) prediction, the motion encoder
//! behind FID / KID / diversity, the metrics of Table 2 and stick-figure strips.
//! Drawing, labelled sets, classifier training, stacking and distillation are
//! [`scoreguide_genneg`]'s, shared with every experiment.
mod config;
mod data;
mod eval;
mod model;
mod render;
pub mod stages;

pub use config::{
    EncoderConfig, EvalConfig, GennegConfig, MotionDataConfig, MotionModelConfig, MotionRunConfig,
    MotionSampler, Prediction,
};
pub use data::{MotionData, MotionTask};
pub use eval::{
    diversity, features_of, r_elbo, sample_motions, score_draws, table, ModelRow, SeedScores,
};
pub use model::{
    actions_of, check_trained_on, encoder_config, train_baseline, train_encoder, MotionEncoder,
};
pub use render::motion_strip;
