//! Traffic scenes (Gen-neG paper §4.2, on our procedural stand-in data): what is
//! traffic's own — feature scaling, the configuration of the scene transformer under a VP
//! process, scenes and their maps as each row's condition, the baseline's training,
//! scene-level infraction rates and r-ELBO, the per-vehicle oracle as a Gen-neG
//! [`Task`](scoreguide_genneg::Task) ([`TrafficTask`]), diagnostics of a classifier, and
//! rendering like the paper's Fig. 1. Drawing, labelled sets, classifier training,
//! stacking, gating and distillation are [`scoreguide_genneg`]'s, shared with every
//! experiment.
mod config;
mod data;
mod eval;
mod genneg;
mod model;
mod render;
pub mod run;
pub mod stages;

pub use config::{FeatureScaler, TrafficConfig};
pub use data::TrafficData;
pub use eval::{
    check_agent_classifier, label_scenes, nearest_road_cell, offroad_pull, r_elbo, sample_scenes,
    ClassifierCheck, OffroadPull, SceneRates,
};
pub use genneg::{draw_scenes, train_agent_classifier, JudgedScenes, TrafficTask};
pub use model::{
    distill, distill_resumable, load_agent_classifier, train_more, train_score,
    train_score_resumable, TrafficModel,
};
pub use render::scene_panel;
