//! The `genneg_traffic` run: its configuration (quick and full presets), the checks of
//! reused models (scene generator, Gen-neG seed, noise levels, distillation teacher), and
//! the table and diagnostics it prints.

use super::{ClassifierCheck, OffroadPull, TrafficConfig};
use crate::config::Preset;
use candle_core::{bail, Result};
use scoreguide_data::{MapLayers, SceneConfig, Split};
use scoreguide_samplers::{HeunOptions, Sampler};
use scoreguide_sde::SigmaDistribution;
use scoreguide_train::Checkpoint;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Everything a `genneg_traffic` run does, by stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrafficRunConfig {
    pub data: DataSection,
    pub baseline: BaselineSection,
    pub sampler: SamplerSection,
    pub genneg: GennegSection,
    /// The distillation of the last iteration into the baseline's network (none: skip).
    pub distill: Option<DistillSection>,
    /// Also train the baseline this many more steps on the data from its own weights
    /// (the distillation's warm start, DSM instead of the teacher's targets) and
    /// evaluate it as `baseline_more`: the control for the distilled model's extra steps.
    pub control_iters: Option<u64>,
    pub eval: EvalSection,
    /// Save the baseline's and the distillation's whole training state every this many
    /// steps (0: never); with `--reuse` a run continues exactly where it stopped.
    pub save_every: u64,
}

/// The scenes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataSection {
    pub train_scenes: usize,
    /// Maps the training scenes are spread over.
    pub maps: usize,
    /// Smallest distance between two generated vehicles, metres (the data, not a limit
    /// on samples: the oracle counts only overlaps).
    pub gap: f64,
    /// Drivable shoulder beyond the outer lanes, metres.
    pub shoulder: f64,
}

/// The baseline trained here (a reused one brings its own architecture, which every
/// classifier and the distilled model take).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaselineSection {
    pub iters: u64,
    pub batch: usize,
    /// How the networks see the maps: the road alone at 2 m per cell, or rendered road
    /// images at 1 m (lanes and direction of travel; and the distance to the road).
    pub map_layers: MapLayers,
    /// Networks read the road raster around each vehicle besides attending to the map
    /// tokens (`nets::MapProbe`).
    pub map_probe: bool,
    /// A sinusoidal embedding of each vehicle's position in the networks.
    pub position_embedding: bool,
    /// Train at ln σ uniform from this σ to the process's largest instead of DDPM's
    /// uniform t (which rarely shows the networks small σ).
    pub log_uniform_sigma: Option<f64>,
}

/// The sampler of every draw: Gen-neG's on training maps, the checks' and the
/// evaluation's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplerSection {
    pub kind: SamplerKind,
    pub steps: usize,
    /// EDM's S_churn for Heun: noise added back at every step (0: the ODE).
    pub churn: f64,
    /// Smallest σ of the Karras grid (standardised units; the last step denoises from
    /// here).
    pub sigma_min: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplerKind {
    /// EDM's Heun (deterministic unless `churn`).
    Heun,
    /// The paper's DDPM ancestral sampler (DDIM with η = 1).
    Ddpm,
}

/// Gen-neG's iterations on training maps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GennegSection {
    /// Iterations (the paper's Table 1 has 2).
    pub iterations: usize,
    /// Scenes drawn per iteration to train its classifier.
    pub draws: usize,
    pub classifier_iters: u64,
    /// Seed of the draws, classifier training and checks (none: the run's seed); another
    /// value repeats the iterations independently on the same data and baseline.
    pub seed: Option<u64>,
    /// Scenes drawn per iteration, apart from the classifier's, to check each classifier
    /// on (0: no check).
    pub check_draws: usize,
    /// The w/o IS, imbalanced and time-independent ablations on iteration 1's draws.
    pub ablations: bool,
    /// Train the classifiers at ln σ uniform from this σ instead of at the baseline's
    /// noise levels (DDPM's uniform t draws σ < 0.1 in under 3% of steps).
    pub classifier_log_uniform_sigma: Option<f64>,
    /// Switch every classifier off above this σ.
    pub guidance_sigma_max: Option<f64>,
}

/// The distillation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillSection {
    pub iters: u64,
    /// Distil at ln σ uniform from this σ instead of at the baseline's noise levels.
    pub log_uniform_sigma: Option<f64>,
    /// Adam's learning rate (none: the baseline's).
    pub lr: Option<f64>,
    /// Also distil on this many scenes drawn on training maps (repeated to about half of
    /// the batches; 0: the data alone, as the paper's Eq. 12).
    pub draws: usize,
    /// Whose scenes those are.
    pub draws_from: DrawSource,
}

/// Whose scenes `distill.draws` adds to the distillation's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrawSource {
    /// The teacher's: where its sampler ends up.
    Teacher,
    /// The baseline's: the infracting scenes the teacher's guidance has to correct.
    Baseline,
}

/// Where and how the models are evaluated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalSection {
    /// The held-out split (its own maps): test for the numbers to report, validation for
    /// choosing settings.
    pub split: EvalSplit,
    /// Seed of the evaluation split (none: the run's seed); another value draws a split
    /// no earlier run has looked at.
    pub seed: Option<u64>,
    /// Generated scenes per model.
    pub samples: usize,
    /// Only these rows of the table (none: all).
    pub models: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalSplit {
    Test,
    Validation,
}

impl EvalSplit {
    pub fn split(self) -> Split {
        match self {
            Self::Test => Split::Test,
            Self::Validation => Split::Validation,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Test => "test",
            Self::Validation => "validation",
        }
    }
}

/// Rows the table can have besides `genneg_1` … `genneg_K`.
pub const MODEL_ROWS: [&str; 6] = [
    "baseline",
    "baseline_more",
    "distilled",
    "wo_is",
    "imbalanced",
    "time_independent",
];

impl Preset for TrafficRunConfig {
    fn quick() -> Self {
        let full = Self::full();
        Self {
            data: DataSection {
                train_scenes: 4_000,
                maps: 32,
                ..full.data
            },
            baseline: BaselineSection {
                iters: 1_500,
                ..full.baseline
            },
            sampler: SamplerSection {
                steps: 32,
                ..full.sampler
            },
            genneg: GennegSection {
                draws: 400,
                classifier_iters: 300,
                check_draws: 100,
                ..full.genneg
            },
            distill: Some(DistillSection {
                iters: 300,
                ..full.distill.expect("the full preset distils")
            }),
            eval: EvalSection {
                samples: 200,
                ..full.eval
            },
            ..full
        }
    }

    fn full() -> Self {
        let scenes = SceneConfig::default();
        Self {
            data: DataSection {
                train_scenes: 32_000,
                maps: 128,
                gap: scenes.gap,
                shoulder: scenes.shoulder,
            },
            baseline: BaselineSection {
                iters: 20_000,
                batch: 256,
                map_layers: MapLayers::Road,
                map_probe: false,
                position_embedding: false,
                log_uniform_sigma: None,
            },
            sampler: SamplerSection {
                kind: SamplerKind::Heun,
                steps: 64,
                churn: 0.0,
                sigma_min: 0.01,
            },
            genneg: GennegSection {
                iterations: 2,
                draws: 4_000,
                classifier_iters: 3_000,
                seed: None,
                check_draws: 500,
                ablations: true,
                classifier_log_uniform_sigma: None,
                guidance_sigma_max: None,
            },
            distill: Some(DistillSection {
                iters: 4_000,
                log_uniform_sigma: None,
                lr: None,
                draws: 0,
                draws_from: DrawSource::Teacher,
            }),
            control_iters: None,
            eval: EvalSection {
                split: EvalSplit::Test,
                seed: None,
                samples: 2_000,
                models: None,
            },
            save_every: 1_000,
        }
    }

    /// Checked before any data or training, so a bad setting costs nothing.
    fn validate(&self) -> Result<()> {
        if self.data.train_scenes == 0 || self.data.maps == 0 || self.eval.samples == 0 {
            bail!("genneg_traffic config: data.train_scenes, data.maps and eval.samples must be positive");
        }
        if self.baseline.batch == 0 || self.sampler.steps == 0 {
            bail!("genneg_traffic config: baseline.batch and sampler.steps must be positive");
        }
        let s = &self.sampler;
        if !(s.churn.is_finite() && s.churn >= 0.0) {
            bail!(
                "genneg_traffic config: sampler.churn {} must be finite and non-negative",
                s.churn
            );
        }
        if s.kind == SamplerKind::Ddpm && s.churn > 0.0 {
            bail!("genneg_traffic config: sampler.churn applies to the heun sampler only");
        }
        if let Some(d) = &self.distill {
            if let Some(lr) = d.lr {
                if !(lr > 0.0 && lr.is_finite()) {
                    bail!("genneg_traffic config: distill.lr {lr} must be a positive number");
                }
            }
            if d.draws == 0 && d.draws_from == DrawSource::Baseline {
                bail!("genneg_traffic config: distill.draws_from = \"baseline\" needs distill.draws > 0");
            }
        }
        for name in self.eval.models.iter().flatten() {
            let iteration = name
                .strip_prefix("genneg_")
                .and_then(|k| k.parse::<usize>().ok());
            if !MODEL_ROWS.contains(&name.as_str())
                && !iteration.is_some_and(|k| (1..=self.genneg.iterations).contains(&k))
            {
                bail!(
                    "genneg_traffic config: eval.models: {name:?} is not a row of the table ({}, or genneg_1 to genneg_{})",
                    MODEL_ROWS.join(", "),
                    self.genneg.iterations
                );
            }
        }
        Ok(())
    }
}

impl TrafficRunConfig {
    /// The scene generator.
    pub fn scenes(&self) -> SceneConfig {
        SceneConfig {
            gap: self.data.gap,
            shoulder: self.data.shoulder,
            ..SceneConfig::default()
        }
    }

    /// The sampler every draw uses.
    pub fn sampler(&self) -> Sampler {
        match self.sampler.kind {
            SamplerKind::Heun => Sampler::Heun(HeunOptions {
                churn: self.sampler.churn,
                ..HeunOptions::default()
            }),
            SamplerKind::Ddpm => Sampler::DdpmAncestral,
        }
    }

    /// The baseline's network and training, from the scaler of the training scenes
    /// (which places the map probe) and the run's seed.
    pub fn baseline_config(&self, scaler: &super::FeatureScaler, seed: u64) -> TrafficConfig {
        let b = &self.baseline;
        let cfg = TrafficConfig {
            iters: b.iters,
            batch: b.batch,
            seed,
            ..TrafficConfig::default()
        };
        let cfg = match b.map_layers {
            MapLayers::Road => cfg,
            MapLayers::RoadAndLanes => cfg.with_lane_maps(),
            MapLayers::RoadLanesAndDistance => cfg.with_distance_maps(),
        };
        let cfg = match b.map_probe {
            true => cfg.with_map_probe(scaler, self.scenes().half_size),
            false => cfg,
        };
        let cfg = match b.position_embedding {
            true => cfg.with_position_embedding(),
            false => cfg,
        };
        match b.log_uniform_sigma {
            Some(s) => cfg.with_log_uniform_sigma(s),
            None => cfg,
        }
    }
}

/// Noise level at which the time-independent ablation's classifier is trained (on
/// nearly clean scenes) and evaluated (on the base model's one-step estimate).
pub const SIGMA_CLEAN: f64 = 0.01;

/// Noise levels (standardised units) at which classifiers are checked.
pub const CHECK_SIGMAS: [f64; 6] = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0];

/// Metadata key under which the run's models (baseline, classifiers, distilled model)
/// record the run that made them ([`RunRecord`]): what reuse checks read.
pub const RUN_KEY: &str = "genneg_traffic.run";

/// Older files' keys for what [`RUN_KEY`] records: the baseline's scene generator, a
/// classifier's Gen-neG seed.
pub const SCENE_CONFIG_KEY: &str = "genneg_traffic.scene_config";
pub const GENNEG_SEED_KEY: &str = "genneg_traffic.genneg_seed";

/// The resolved configuration and seeds of the run that made a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub config: TrafficRunConfig,
    pub seed: u64,
    pub genneg_seed: u64,
    pub eval_seed: u64,
}

/// The scene generator a checkpoint's data came from, if it records one.
fn recorded_scenes(c: &Checkpoint) -> Result<Option<SceneConfig>> {
    if c.metadata.contains_key(RUN_KEY) {
        return Ok(Some(c.meta::<RunRecord>(RUN_KEY)?.config.scenes()));
    }
    if c.metadata.contains_key(SCENE_CONFIG_KEY) {
        return Ok(Some(c.meta(SCENE_CONFIG_KEY)?));
    }
    Ok(None)
}

/// The Gen-neG seed a classifier checkpoint was drawn and trained with, if it records
/// one.
pub fn recorded_genneg_seed(c: &Checkpoint) -> Result<Option<u64>> {
    if c.metadata.contains_key(RUN_KEY) {
        return Ok(Some(c.meta::<RunRecord>(RUN_KEY)?.genneg_seed));
    }
    if c.metadata.contains_key(GENNEG_SEED_KEY) {
        return Ok(Some(c.meta(GENNEG_SEED_KEY)?));
    }
    Ok(None)
}

/// Metadata key under which a distilled model records its teacher.
pub const DISTILL_TEACHER_KEY: &str = "genneg_traffic.distill_teacher";

/// A baseline checkpoint, refused if it records a scene generator other than this run's
/// (its feature scaler and what it learnt belong to that data).
pub fn load_baseline(path: &Path, scene_cfg: &SceneConfig) -> Result<Checkpoint> {
    let c = Checkpoint::load(path)?;
    if let Some(trained_on) = recorded_scenes(&c)? {
        if trained_on != *scene_cfg {
            bail!(
                "baseline {} was trained on scenes {trained_on:?}, this run generates {scene_cfg:?}; set data.gap / data.shoulder to match",
                path.display()
            );
        }
    } else {
        eprintln!(
            "note: baseline {} does not record its scene generator (an older run's: gap 0.5, no shoulder); assuming it matches this run's",
            path.display()
        );
    }
    Ok(c)
}

/// What a distillation was fitted to: continuing it is refused for another teacher or
/// other data.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct DistillTeacher {
    /// Gen-neG iterations stacked.
    pub iterations: usize,
    pub guidance_sigma_max: Option<f64>,
    /// FNV-1a hashes of the classifiers' checkpoint files, iteration 1 first.
    pub classifiers_fnv1a: Vec<u64>,
    /// `distill.draws` and whose they were.
    pub draws: usize,
    pub draws_from: String,
}

/// 64-bit FNV-1a: a stable fingerprint of a file's bytes.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Refuses a distilled checkpoint `c` (from `path`) made for a teacher other than `now`.
pub fn check_teacher(c: &Checkpoint, path: &Path, now: &DistillTeacher) -> Result<()> {
    if c.metadata.contains_key(DISTILL_TEACHER_KEY) {
        let then: DistillTeacher = c.meta(DISTILL_TEACHER_KEY)?;
        if then != *now {
            bail!(
                "distilled model {} was distilled from {then:?}, this run's teacher is {now:?}; use another --out or drop --reuse",
                path.display()
            );
        }
    } else {
        eprintln!(
            "note: distilled model {} does not record its teacher (an older run's); assuming it is this run's {now:?}",
            path.display()
        );
    }
    Ok(())
}

/// One row of Table 1 (and of the JSON).
#[derive(Debug, Serialize)]
pub struct Row {
    pub name: String,
    pub collision_rate: f64,
    pub offroad_rate: f64,
    pub infraction_rate: f64,
    /// Fraction of vehicles infracting.
    pub vehicle_infraction_rate: f64,
    pub r_elbo: f64,
    pub step_ms: f64,
    pub params: usize,
}

/// A classifier's check on scenes held out from its training.
#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub name: String,
    pub scenes: usize,
    pub rows: Vec<ClassifierCheck>,
    pub offroad_pull: Vec<OffroadPull>,
}

/// Training noise levels as a person would name them.
pub fn describe_sigma(d: &Option<SigmaDistribution>) -> String {
    match d {
        None => "DDPM t uniform".to_string(),
        Some(SigmaDistribution::LogUniform { min, max }) => {
            format!("ln σ uniform from {min} to {max:.4}")
        }
        Some(other) => format!("{other:?}"),
    }
}

/// A figure to 3 decimals, or a dash where there is none (an empty group).
pub fn or_dash(v: Option<f64>) -> String {
    v.map_or("–".to_string(), |v| format!("{v:.3}"))
}

/// A classifier check as a table on stderr.
pub fn print_check(name: &str, scenes: usize, rows: &[ClassifierCheck]) {
    let f = or_dash;
    eprintln!("{name} classifier on {scenes} held-out draws: mean P(valid) for valid / colliding / offroad vehicles, ROC AUC valid vs colliding / offroad");
    eprintln!("| σ | P valid | P colliding | P offroad | AUC collision | AUC offroad |");
    eprintln!("|---|---|---|---|---|---|");
    for r in rows {
        eprintln!(
            "| {} | {} | {} | {} | {} | {} |",
            r.sigma,
            f(r.p_valid[0]),
            f(r.p_valid[1]),
            f(r.p_valid[2]),
            f(r.auc_collision),
            f(r.auc_offroad)
        );
    }
}

/// Table 1 on stdout.
pub fn print_table(rows: &[Row]) {
    println!(
        "| model | collision % | offroad % | infraction % | vehicles infracting % | r-ELBO | step ms (batch 500) | params |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.3} | {:.1} | {} |",
            r.name,
            100.0 * r.collision_rate,
            100.0 * r.offroad_rate,
            100.0 * r.infraction_rate,
            100.0 * r.vehicle_infraction_rate,
            r.r_elbo,
            r.step_ms,
            r.params
        );
    }
}

/// Per-feature mean ± std of scenes, in metres.
pub fn feature_summary(agents: &[f32]) -> Result<String> {
    let s = super::FeatureScaler::fit(agents)?;
    Ok(s.mean
        .iter()
        .zip(&s.std)
        .map(|(m, d)| format!("{m:.2}±{d:.2}"))
        .collect::<Vec<_>>()
        .join(" "))
}
