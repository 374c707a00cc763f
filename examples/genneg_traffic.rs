//! Traffic scenes (Gen-neG paper §4.2, Table 1) on our procedural stand-in data:
//! scene generation and labelling, the baseline scene-transformer diffusion model,
//! Gen-neG iterations with per-vehicle IS-balanced classifiers (scenes drawn on training
//! maps), the ablations, distillation of the last iteration into
//! the baseline's architecture, and for each model the collision / offroad / infraction
//! rates and r-ELBO on held-out maps.
//!
//! The ablations (on iteration 1's draws): without IS weights, imbalanced, and a
//! time-independent classifier (trained on clean scenes, guiding through the base
//! model's one-step estimate x̂0).
//!
//! ```text
//! cargo run --release --example genneg_traffic -- --quick
//! cargo run --release --example genneg_traffic -- --json out/genneg_traffic/result.json
//! ```

use candle_core::{DType, Result};
use clap::Parser;
use scoreguide::data::{SceneConfig, SceneSet, Split};
use scoreguide::genneg::{ClassifierKind, LabelledSet, Stack, StackedClassifier};
use scoreguide::guidance::Score;
use scoreguide::plot::save_grid;
use scoreguide::runtime::{sampler_step_ms, write_json, CommonArgs};
use scoreguide::samplers::{HeunOptions, Sampler};
use scoreguide::sde::{append_zero, karras, SigmaDistribution};
use scoreguide::traffic::{
    check_agent_classifier, distill, distill_resumable, draw_scenes, label_scenes,
    load_agent_classifier, offroad_pull, r_elbo, sample_scenes, scene_panel,
    train_agent_classifier, train_more, train_score, train_score_resumable, ClassifierCheck,
    FeatureScaler, JudgedScenes, OffroadPull, TrafficConfig, TrafficData, TrafficModel,
};
use scoreguide::train::{Checkpoint, Progress};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SamplerKind {
    Heun,
    Ddpm,
}

/// The held-out split the models are evaluated on.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum EvalSplit {
    /// The test split: the numbers to report.
    Test,
    /// The validation split (maps of its own): for choosing settings such as
    /// `--guidance-sigma-max` without looking at the test split.
    Validation,
}

/// Whose scenes `--distill-draws` adds to the distillation's data.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DrawSource {
    /// The teacher's: where its sampler ends up.
    Teacher,
    /// The baseline's: the infracting scenes the teacher's guidance has to correct.
    Baseline,
}

impl EvalSplit {
    fn split(self) -> Split {
        match self {
            EvalSplit::Test => Split::Test,
            EvalSplit::Validation => Split::Validation,
        }
    }

    fn name(self) -> &'static str {
        match self {
            EvalSplit::Test => "test",
            EvalSplit::Validation => "validation",
        }
    }
}

#[derive(Parser)]
#[command(
    about = "Traffic scenes: baseline diffusion model, collision / offroad / infraction rates"
)]
struct Args {
    /// Reduced sizes everywhere: a check in minutes.
    #[arg(long)]
    quick: bool,
    /// Training scenes (default 32,000; 4,000 with --quick).
    #[arg(long)]
    train_scenes: Option<usize>,
    /// Maps the training scenes are spread over (default 128; 32 with --quick).
    #[arg(long)]
    maps: Option<usize>,
    /// Baseline training iterations (default 20,000; 1,500 with --quick).
    #[arg(long)]
    iters: Option<u64>,
    /// Training batch.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Generated scenes per model, on the evaluation split's maps (default 2,000; 200
    /// with --quick).
    #[arg(long)]
    samples: Option<usize>,
    /// The split the models are evaluated on (its own maps, a quarter as many as the
    /// training split's).
    #[arg(long, value_enum, default_value_t = EvalSplit::Test)]
    eval_split: EvalSplit,
    /// Seed of the evaluation split's maps and scenes (default: --seed). Another value
    /// draws a split no earlier run has looked at, for a result chosen on validation.
    #[arg(long)]
    eval_seed: Option<u64>,
    /// Sampling steps (default 64; 32 with --quick).
    #[arg(long)]
    steps: Option<usize>,
    /// The sampler for every draw: Gen-neG's on training maps, the classifier checks'
    /// and the evaluation's. `heun` is EDM's deterministic Heun (stochastic with
    /// `--churn`), `ddpm` the ancestral sampler of the paper's DDPM (DDIM with η = 1).
    #[arg(long, value_enum, default_value_t = SamplerKind::Heun)]
    sampler: SamplerKind,
    /// EDM's S_churn for `--sampler heun`: noise added back at every step (0: the ODE).
    #[arg(long, default_value_t = 0.0)]
    churn: f64,
    /// Smallest σ of the sampling grid (standardised units; the last step denoises from
    /// here). At 0.01 the noise left is 0.2 m RMS in position, enough to put a vehicle
    /// that the data parks 0.1 m from the road's edge off the road.
    #[arg(long, default_value_t = 0.01)]
    sigma_min: f64,
    /// Gen-neG iterations (the paper's Table 1 has 2).
    #[arg(long, default_value_t = 2)]
    iterations: usize,
    /// Scenes drawn per iteration to train its classifier (default 4,000; 400 with --quick).
    #[arg(long)]
    draws: Option<usize>,
    /// Classifier training iterations (default 3,000; 300 with --quick).
    #[arg(long)]
    classifier_iters: Option<u64>,
    /// Seed of Gen-neG's draws, classifier training and checks (default: --seed).
    /// Another value repeats the iterations independently on the same data and baseline.
    #[arg(long)]
    genneg_seed: Option<u64>,
    /// Scenes drawn per iteration, apart from the classifier's, to check each classifier
    /// on (mean P(valid) and ROC AUC by noise level; default 500, 100 with --quick; 0
    /// skips the check).
    #[arg(long)]
    check_draws: Option<usize>,
    /// Skip the ablations (w/o IS, imbalanced, time-independent).
    #[arg(long)]
    no_ablations: bool,
    /// Distillation iterations (default 4,000; 300 with --quick).
    #[arg(long)]
    distill_iters: Option<u64>,
    /// Also train the baseline this many more steps on the data from its own weights
    /// (the distillation's warm start, DSM instead of the teacher's targets) and
    /// evaluate it as `baseline_more`: the control for the distilled model's extra steps.
    #[arg(long)]
    control_iters: Option<u64>,
    /// Distil at ln σ uniform from this σ to the process's largest instead of at the
    /// baseline's training noise levels: DDPM's uniform t puts under 3% of the steps at
    /// σ ≤ 0.1, where a gated teacher (`--guidance-sigma-max`) differs from the baseline.
    #[arg(long)]
    distill_log_uniform_sigma: Option<f64>,
    /// The distillation's Adam learning rate (default: the baseline's). The student
    /// starts at the baseline, which is already close to the teacher wherever the
    /// teacher's guidance is switched off; a large rate drifts it away from there.
    #[arg(long)]
    distill_lr: Option<f64>,
    /// Distil on this many scenes drawn on training maps (by the teacher, or as
    /// `--distill-draws-from` says) as well as on the data (repeated so that they make
    /// up about half of the batches; 0: the data alone, as in the paper's Eq. 12).
    /// Noised data seldom looks like the near-misses the teacher corrects at small σ;
    /// the teacher's own samples are where its sampler goes.
    #[arg(long, default_value_t = 0)]
    distill_draws: usize,
    /// Which model draws the `--distill-draws` scenes. The baseline's scenes, noised
    /// to small σ, are the states the teacher's guidance acts on (most infract); the
    /// teacher's are mostly already corrected or left uncorrected.
    #[arg(long, value_enum, default_value_t = DrawSource::Teacher)]
    distill_draws_from: DrawSource,
    /// Skip the distillation.
    #[arg(long)]
    no_distill: bool,
    /// Evaluate only these models (comma-separated names of the table's rows, e.g.
    /// `baseline,distilled`; default: all), to skip rows already measured.
    #[arg(long, value_delimiter = ',')]
    eval_models: Option<Vec<String>>,
    /// Switch every classifier off above this σ (guidance at large σ can throw samples
    /// off when a classifier is not flat there).
    #[arg(long)]
    guidance_sigma_max: Option<f64>,
    /// Reuse the baseline, classifiers and distilled model found in the output directory
    /// (whatever sampler drew their training scenes).
    #[arg(long)]
    reuse: bool,
    /// Networks read the road raster around each vehicle (`nets::MapProbe`) besides
    /// attending to the map tokens. Applies to a baseline trained here; classifiers and
    /// the distilled model take the baseline's architecture.
    #[arg(long)]
    map_probe: bool,
    /// Networks see the maps as rendered road images (road, lane centres, direction of
    /// travel; `data::MapLayers::RoadAndLanes`) at 1 m per cell instead of the road
    /// alone at 2 m. Applies like `--map-probe` (with which the probe reads all layers).
    #[arg(long)]
    lane_maps: bool,
    /// `--lane-maps` with a fifth layer: the distance to the road, clipped at 16 m
    /// (`data::MapLayers::RoadLanesAndDistance`), so that the networks' gradient points
    /// back to the road from vehicles far off it. Applies like `--map-probe`.
    #[arg(long, conflicts_with = "lane_maps")]
    distance_maps: bool,
    /// Networks see a sinusoidal embedding of each vehicle's position (`nets::
    /// SceneTransformerConfig::position_embedding`). Applies like `--map-probe`.
    #[arg(long)]
    position_embedding: bool,
    /// Train the networks (and classifiers) at ln σ uniform from this σ to the process's
    /// largest, instead of DDPM's uniform t (which rarely shows them small σ).
    #[arg(long)]
    log_uniform_sigma: Option<f64>,
    /// Train the classifiers at ln σ uniform from this σ to the process's largest instead
    /// of at the baseline's training noise levels (DDPM's uniform t draws σ < 0.1, where
    /// a vehicle's place within its lane is decided, in under 3% of steps).
    #[arg(long)]
    classifier_log_uniform_sigma: Option<f64>,
    /// Save the baseline's and the distillation's whole training state every this many
    /// steps to `baseline.partial.safetensors` / `distilled.partial.safetensors` in the
    /// output directory (0: never); with `--reuse`, a run finds it and continues exactly
    /// where it stopped. A finished distillation of fewer than `--distill-iters` steps is
    /// continued likewise; one further along, or of another teacher, is refused.
    #[arg(long, default_value_t = 1000)]
    save_every: u64,
    /// Reuse this baseline checkpoint instead of training one.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Smallest distance between two generated vehicles, metres (the data, not a limit
    /// on samples: the oracle counts only overlaps). Runs before 2026-11-24 used 0.5.
    #[arg(long, default_value_t = SceneConfig::default().gap)]
    gap: f64,
    /// Drivable shoulder beyond the outer lanes, metres. Runs before 2026-11-24 used 0.
    #[arg(long, default_value_t = SceneConfig::default().shoulder)]
    shoulder: f64,
    #[command(flatten)]
    common: CommonArgs,
}

/// Noise level at which the time-independent ablation's classifier is trained (on
/// nearly clean scenes) and evaluated (on the base model's one-step estimate).
const SIGMA_CLEAN: f64 = 0.01;

/// Metadata key under which a baseline records the scene generator it was trained on.
const SCENE_CONFIG_KEY: &str = "genneg_traffic.scene_config";

/// A baseline checkpoint, refused if it records a scene generator other than this run's
/// (its feature scaler and what it learnt belong to that data).
fn load_baseline(path: &Path, scene_cfg: &SceneConfig) -> Result<Checkpoint> {
    let c = Checkpoint::load(path)?;
    if c.metadata.contains_key(SCENE_CONFIG_KEY) {
        let trained_on: SceneConfig = c.meta(SCENE_CONFIG_KEY)?;
        if trained_on != *scene_cfg {
            candle_core::bail!(
                "baseline {} was trained on scenes {trained_on:?}, this run generates {scene_cfg:?}; pass the matching --gap / --shoulder",
                path.display()
            );
        }
    } else {
        eprintln!(
            "note: baseline {} does not record its scene generator (saved before 2026-11-24: gap 0.5, no shoulder); assuming it matches this run's",
            path.display()
        );
    }
    Ok(c)
}

/// Metadata key under which a classifier records the seed of its draws and training.
const GENNEG_SEED_KEY: &str = "genneg_traffic.genneg_seed";

/// Metadata key under which a distilled model records its teacher.
const DISTILL_TEACHER_KEY: &str = "genneg_traffic.distill_teacher";

/// What a distillation was fitted to: continuing it is refused for another teacher or
/// other data.
#[derive(Debug, PartialEq, Serialize, serde::Deserialize)]
struct DistillTeacher {
    /// Gen-neG iterations stacked.
    iterations: usize,
    guidance_sigma_max: Option<f64>,
    /// FNV-1a hashes of the classifiers' checkpoint files, iteration 1 first.
    classifiers_fnv1a: Vec<u64>,
    /// `--distill-draws` and whose they were.
    draws: usize,
    draws_from: String,
}

/// 64-bit FNV-1a: a stable fingerprint of a file's bytes.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Refuses a distilled checkpoint `c` (from `path`) made for a teacher other than `now`.
fn check_teacher(c: &Checkpoint, path: &Path, now: &DistillTeacher) -> Result<()> {
    if c.metadata.contains_key(DISTILL_TEACHER_KEY) {
        let then: DistillTeacher = c.meta(DISTILL_TEACHER_KEY)?;
        if then != *now {
            candle_core::bail!(
                "distilled model {} was distilled from {then:?}, this run's teacher is {now:?}; use another --out or drop --reuse",
                path.display()
            );
        }
    } else {
        eprintln!(
            "note: distilled model {} does not record its teacher (saved before 2026-12-04); assuming it is this run's {now:?}",
            path.display()
        );
    }
    Ok(())
}

/// One row of Table 1 (and of the JSON).
#[derive(Serialize)]
struct Row {
    name: String,
    collision_rate: f64,
    offroad_rate: f64,
    infraction_rate: f64,
    /// Fraction of vehicles infracting.
    vehicle_infraction_rate: f64,
    r_elbo: f64,
    step_ms: f64,
    params: usize,
}

#[derive(Serialize)]
struct Report {
    models: Vec<Row>,
    train_scenes: usize,
    /// Scenes the models were evaluated on (from `eval_split`).
    eval_scenes: usize,
    /// The split `models` were evaluated on: "test" or "validation".
    eval_split: &'static str,
    /// `--seed` (data, baseline), `--genneg-seed` and `--eval-seed` as this run used them.
    seed: u64,
    genneg_seed: u64,
    eval_seed: u64,
    labelled_per_second: f64,
    /// Each classifier's check on scenes held out from its training.
    classifier_checks: Vec<CheckReport>,
}

#[derive(Serialize)]
struct CheckReport {
    name: String,
    scenes: usize,
    rows: Vec<ClassifierCheck>,
    offroad_pull: Vec<OffroadPull>,
}

/// Noise levels (standardised units) at which classifiers are checked.
const CHECK_SIGMAS: [f64; 6] = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0];

/// Training noise levels as a person would name them on the command line.
fn describe_sigma(d: &Option<SigmaDistribution>) -> String {
    match d {
        None => "DDPM t uniform (no flag)".to_string(),
        Some(SigmaDistribution::LogUniform { min, max }) => {
            format!("ln σ uniform from {min} to {max:.4}")
        }
        Some(other) => format!("{other:?}"),
    }
}

/// A figure to 3 decimals, or a dash where there is none (an empty group).
fn or_dash(v: Option<f64>) -> String {
    v.map_or("–".to_string(), |v| format!("{v:.3}"))
}

fn print_check(name: &str, scenes: usize, rows: &[ClassifierCheck]) {
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

/// Per-feature mean ± std of scenes, in metres.
fn feature_summary(agents: &[f32]) -> candle_core::Result<String> {
    let s = FeatureScaler::fit(agents)?;
    Ok(s.mean
        .iter()
        .zip(&s.std)
        .map(|(m, d)| format!("{m:.2}±{d:.2}"))
        .collect::<Vec<_>>()
        .join(" "))
}

fn main() -> candle_core::Result<()> {
    let args = Args::parse();
    let dev = args.common.setup()?;
    let out = args.common.out_dir("genneg_traffic");
    let q = args.quick;
    let n_train = args.train_scenes.unwrap_or(if q { 4_000 } else { 32_000 });
    let n_maps = args.maps.unwrap_or(if q { 32 } else { 128 });
    let n_samples = args.samples.unwrap_or(if q { 200 } else { 2_000 });
    let steps = args.steps.unwrap_or(if q { 32 } else { 64 });
    let seed = args.common.seed;
    let genneg_seed = args.genneg_seed.unwrap_or(seed);
    let eval_seed = args.eval_seed.unwrap_or(seed);
    // Checked before any data or training, so a bad flag costs nothing.
    if let Some(lr) = args.distill_lr {
        if !(lr > 0.0 && lr.is_finite()) {
            candle_core::bail!("--distill-lr {lr} must be a positive number");
        }
    }
    if args.distill_draws == 0 && args.distill_draws_from == DrawSource::Baseline {
        candle_core::bail!("--distill-draws-from baseline needs --distill-draws N (N > 0)");
    }
    let sampler = match args.sampler {
        _ if !(args.churn.is_finite() && args.churn >= 0.0) => {
            candle_core::bail!("--churn {} must be finite and non-negative", args.churn)
        }
        SamplerKind::Ddpm if args.churn > 0.0 => {
            candle_core::bail!("--churn applies to --sampler heun only")
        }
        SamplerKind::Heun => Sampler::Heun(HeunOptions {
            churn: args.churn,
            ..HeunOptions::default()
        }),
        SamplerKind::Ddpm => Sampler::DdpmAncestral,
    };
    let scene_cfg = SceneConfig {
        gap: args.gap,
        shoulder: args.shoulder,
        ..SceneConfig::default()
    };

    // Data: train and test splits on their own maps.
    let t0 = Instant::now();
    let train_set = SceneSet::generate(&scene_cfg, Split::Train, n_maps, n_train, seed)?;
    let test_set = SceneSet::generate(
        &scene_cfg,
        args.eval_split.split(),
        (n_maps / 4).max(1),
        n_samples,
        eval_seed,
    )?;
    eprintln!(
        "generated {} training scenes on {n_maps} maps and {} {} scenes in {:.1}s",
        train_set.len(),
        test_set.len(),
        args.eval_split.name(),
        t0.elapsed().as_secs_f64()
    );
    scoreguide::runtime::ensure_parent(&out.join("x"))?;
    train_set.save(out.join("scenes_train.safetensors"))?;
    test_set.save(out.join(format!("scenes_{}.safetensors", args.eval_split.name())))?;

    // The baseline's configuration: from the arguments, or a reused baseline's own
    // (which decides how the maps are drawn for every network of the run).
    let scaler = FeatureScaler::fit(&train_set.agents)?;
    let cfg = TrafficConfig {
        iters: args.iters.unwrap_or(if q { 1_500 } else { 20_000 }),
        batch: args.batch,
        seed,
        ..TrafficConfig::default()
    };
    let cfg = if args.distance_maps {
        cfg.with_distance_maps()
    } else if args.lane_maps {
        cfg.with_lane_maps()
    } else {
        cfg
    };
    let cfg = if args.map_probe {
        cfg.with_map_probe(&scaler, scene_cfg.half_size)
    } else {
        cfg
    };
    let cfg = if args.position_embedding {
        cfg.with_position_embedding()
    } else {
        cfg
    };
    let cfg = match args.log_uniform_sigma {
        Some(s) => cfg.with_log_uniform_sigma(s),
        None => cfg,
    };
    let baseline_path = out.join("baseline.safetensors");
    let reused = match &args.baseline {
        Some(p) => Some(load_baseline(p, &scene_cfg)?),
        None if args.reuse && baseline_path.exists() => {
            eprintln!("reusing {}", baseline_path.display());
            Some(load_baseline(&baseline_path, &scene_cfg)?)
        }
        None => None,
    };
    let data_cfg: TrafficConfig = match &reused {
        Some(c) => c.meta("traffic")?,
        None => cfg.clone(),
    };

    // The oracle's speed: label the training scenes (all valid by construction).
    let all: Vec<u32> = (0..train_set.len() as u32).collect();
    let train = TrafficData::new(train_set, scaler.clone(), &data_cfg, &dev)?;
    let t0 = Instant::now();
    let (rates, _) = label_scenes(&train, &all, &train.set.agents)?;
    let labelled_per_second = train.set.len() as f64 / t0.elapsed().as_secs_f64();
    eprintln!(
        "oracle: {} training scenes labelled, {:.2}% infracting, {:.0} scenes/s on one core",
        rates.scenes,
        100.0 * rates.infraction,
        labelled_per_second
    );
    if rates.infraction > 0.0 {
        candle_core::bail!("the generator made infracting scenes: {rates:?}");
    }
    let test = TrafficData::new(test_set, scaler, &data_cfg, &dev)?;

    // Baseline.
    let n_draws = args.draws.unwrap_or(if q { 400 } else { 4_000 });
    let n_check_draws = args.check_draws.unwrap_or(if q { 100 } else { 500 });
    let n_classifier_iters = args.classifier_iters.unwrap_or(if q { 300 } else { 3_000 });
    let n_distill_iters = args.distill_iters.unwrap_or(if q { 300 } else { 4_000 });
    // Names checked before any training, so that a misspelt row fails fast.
    for name in args.eval_models.iter().flatten() {
        let iteration = name
            .strip_prefix("genneg_")
            .and_then(|k| k.parse::<usize>().ok());
        let known = [
            "baseline",
            "baseline_more",
            "distilled",
            "wo_is",
            "imbalanced",
            "time_independent",
        ];
        if !known.contains(&name.as_str())
            && !iteration.is_some_and(|k| (1..=args.iterations).contains(&k))
        {
            candle_core::bail!(
                "--eval-models: {name:?} is not a row of the table ({}, or genneg_1 to genneg_{})",
                known.join(", "),
                args.iterations
            );
        }
    }
    let ckpt = match reused {
        Some(c) => c,
        None => {
            let partial_path = out.join("baseline.partial.safetensors");
            let resume = if args.reuse && partial_path.exists() {
                let c = load_baseline(&partial_path, &scene_cfg)?;
                eprintln!(
                    "resuming the baseline from {} (step {})",
                    partial_path.display(),
                    c.meta::<u64>("step")?
                );
                Some(c)
            } else {
                None
            };
            let mut progress = Progress::new("baseline", cfg.iters as usize);
            let mut c = match args.save_every {
                0 => train_score(&cfg, &train, &dev, &mut progress)?,
                every => train_score_resumable(
                    &cfg,
                    &train,
                    resume.as_ref(),
                    every,
                    &mut |c| {
                        let mut c = c.clone();
                        c.set_meta(SCENE_CONFIG_KEY, &scene_cfg)?;
                        c.save(&partial_path)
                    },
                    &dev,
                    &mut progress,
                )?,
            };
            c.set_meta(SCENE_CONFIG_KEY, &scene_cfg)?;
            c.save(&baseline_path)?;
            if partial_path.exists() {
                std::fs::remove_file(&partial_path)?;
            }
            c
        }
    };
    let baseline = TrafficModel::load(&ckpt, DType::F32, &dev)?;

    let sigma_max = baseline.config.process.sigma(1.0);
    if !(args.sigma_min > 0.0 && args.sigma_min < sigma_max) {
        candle_core::bail!("--sigma-min {} must be in (0, {sigma_max})", args.sigma_min);
    }
    let sigmas = append_zero(karras(steps, args.sigma_min, sigma_max, 7.0)?);
    // The classifiers' settings: the baseline's network and process, their own noise
    // levels if asked.
    let with_sigma = |flag: &str, sigma: Option<f64>| match sigma {
        Some(s) if !(s > 0.0 && s < sigma_max) => {
            candle_core::bail!("--{flag} {s} must be in (0, {sigma_max})")
        }
        Some(s) => Ok(baseline.config.clone().with_log_uniform_sigma(s)),
        None => Ok(baseline.config.clone()),
    };
    let classifier_cfg = with_sigma(
        "classifier-log-uniform-sigma",
        args.classifier_log_uniform_sigma,
    )?;
    // The distillation's settings likewise, and its own learning rate if asked.
    let mut distill_cfg = with_sigma("distill-log-uniform-sigma", args.distill_log_uniform_sigma)?;
    if let Some(lr) = args.distill_lr {
        distill_cfg.lr = lr;
    }

    // How far the map probe reads from a vehicle's centre, metres (0 without a probe):
    // an offroad vehicle farther than this sees the road only through the map tokens.
    let probe_reach_m = baseline.config.net.map_probe.map_or(0.0, |p| {
        let cell = 2.0 * scene_cfg.half_size / baseline.config.net.map_input_side() as f64;
        p.spacing * (p.side - 1) as f64 / 2.0 * cell
    });

    // Gen-neG iterations: draw from the current stack on training maps, label, train a
    // per-vehicle IS-balanced classifier, stack it. The ablations reuse iteration 1's draws.
    let mut classifiers: Vec<StackedClassifier> = Vec::new();
    let mut ablations: Vec<(String, StackedClassifier)> = Vec::new();
    let mut checks: Vec<CheckReport> = Vec::new();
    let file_of = |it: usize, name: &str| {
        out.join(if name == "genneg" {
            format!("genneg_{it}.safetensors")
        } else {
            format!("{name}.safetensors")
        })
    };
    for it in 1..=args.iterations {
        // (name, training set, σ of a time-independent classifier)
        let mut kinds = vec![("genneg".to_string(), ClassifierKind::IsBalanced, None)];
        if it == 1 && !args.no_ablations {
            kinds.push(("wo_is".into(), ClassifierKind::WithoutIs, None));
            kinds.push(("imbalanced".into(), ClassifierKind::Imbalanced, None));
            kinds.push((
                "time_independent".into(),
                ClassifierKind::TimeIndependent,
                Some(SIGMA_CLEAN),
            ));
        }
        let stack = baseline
            .with_classifiers(&classifiers, args.guidance_sigma_max)
            .guided(&dev)?;
        let mut trained: Vec<(String, Checkpoint)> = Vec::new();
        if args.reuse && kinds.iter().all(|(n, _, _)| file_of(it, n).exists()) {
            for (name, _, _) in &kinds {
                let path = file_of(it, name);
                eprintln!("iteration {it}: reusing {}", path.display());
                let c = Checkpoint::load(&path)?;
                // Files saved before the key existed were all seeded by --seed.
                let then = match c.metadata.contains_key(GENNEG_SEED_KEY) {
                    true => c.meta(GENNEG_SEED_KEY)?,
                    false => seed,
                };
                if then != genneg_seed {
                    candle_core::bail!(
                        "classifier {} was trained with Gen-neG seed {then}, this run's --genneg-seed is {genneg_seed}; use another --out or drop --reuse",
                        path.display()
                    );
                }
                // A classifier trained at other noise levels than this command asks for
                // would make its table rows lie about their command.
                let fitted: TrafficConfig = c.meta("traffic")?;
                if fitted.train_sigma != classifier_cfg.train_sigma {
                    candle_core::bail!(
                        "classifier {} was trained at noise levels {}, this run's --classifier-log-uniform-sigma asks for {}; use another --out or drop --reuse",
                        path.display(),
                        describe_sigma(&fitted.train_sigma),
                        describe_sigma(&classifier_cfg.train_sigma)
                    );
                }
                trained.push((name.clone(), c));
            }
        } else {
            let drawn = {
                let mut progress = Progress::new(&format!("iteration {it}: drawing"), n_draws);
                draw_scenes(
                    &stack,
                    &train,
                    n_draws,
                    &sampler,
                    &sigmas,
                    genneg_seed.wrapping_add(100 + it as u64),
                    500,
                    &mut |d| progress.update(d, "scenes"),
                )?
            };
            eprintln!("iteration {it}: {}", drawn.summary());
            let (valid, invalid) = (drawn.valid_found, drawn.invalid_found);
            if valid == 0 || invalid == 0 {
                eprintln!(
                    "iteration {it}: {valid} valid and {invalid} invalid vehicles drawn: a classifier needs both; stopping Gen-neG after {} iteration(s)",
                    it - 1
                );
                break;
            }
            for (name, kind, sigma_clean) in kinds {
                let set = LabelledSet::new(&drawn, kind)?;
                eprintln!(
                    "iteration {it}: {name} classifier on {} valid + {} invalid vehicles (vehicle α = {:.4})",
                    set.kept.0, set.kept.1, set.alpha
                );
                let mut c = train_agent_classifier(
                    &classifier_cfg,
                    &set,
                    &train,
                    n_classifier_iters,
                    genneg_seed.wrapping_add(it as u64),
                    sigma_clean,
                    &dev,
                    &mut Progress::new(
                        &format!("iteration {it}: {name} classifier"),
                        n_classifier_iters as usize,
                    ),
                )?;
                c.set_meta(GENNEG_SEED_KEY, &genneg_seed)?;
                c.save(file_of(it, &name))?;
                trained.push((name, c));
            }
        }
        // The check set: more scenes from the same stack, apart from the training draws.
        let check_set = match n_check_draws {
            0 => None,
            n => {
                let mut progress = Progress::new(&format!("iteration {it}: check draws"), n);
                Some(draw_scenes(
                    &stack,
                    &train,
                    n,
                    &sampler,
                    &sigmas,
                    genneg_seed.wrapping_add(200 + it as u64),
                    500,
                    &mut |d| progress.update(d, "scenes"),
                )?)
            }
        };
        drop(stack);
        let check_set = match check_set {
            Some(drawn) => Some(JudgedScenes::new(drawn, &train)?),
            None => None,
        };
        for (name, c) in trained {
            let clf = load_agent_classifier(&c)?;
            if let Some(check) = &check_set {
                let rows = check_agent_classifier(
                    &clf,
                    &baseline,
                    check,
                    &train,
                    &CHECK_SIGMAS,
                    genneg_seed.wrapping_add(300 + it as u64),
                    500,
                )?;
                let name = format!("{name}_{it}");
                print_check(&name, check.scenes(), &rows);
                let mut pulls = Vec::new();
                for s in [0.01, 0.1] {
                    let p = offroad_pull(&clf, &baseline, check, &train, s, probe_reach_m, 100)?;
                    let f = or_dash;
                    eprintln!(
                        "{name} pull on offroad vehicles at σ = {s}: {} with the centre on the road; {} within {probe_reach_m} m of it (cos to the road {}, |∇| {} /m), {} beyond (cos {}, |∇| {} /m); median distance {} m",
                        p.centre_on_road, p.near, f(p.cos_near), f(p.pull_near), p.far, f(p.cos_far), f(p.pull_far), f(p.median_distance_m)
                    );
                    pulls.push(p);
                }
                checks.push(CheckReport {
                    name,
                    scenes: check.scenes(),
                    rows,
                    offroad_pull: pulls,
                });
            }
            if name == "genneg" {
                classifiers.push(clf);
            } else {
                ablations.push((name, clf));
            }
        }
    }

    // Distillation of the last iteration into the baseline's architecture.
    let distilled = match classifiers.len() {
        0 => None,
        k if !args.no_distill => {
            let teacher = baseline
                .with_classifiers(&classifiers, args.guidance_sigma_max)
                .guided(&dev)?;
            let dcfg = TrafficConfig {
                iters: n_distill_iters,
                ..distill_cfg.clone()
            };
            let path = out.join("distilled.safetensors");
            let partial_path = out.join("distilled.partial.safetensors");
            let record = DistillTeacher {
                iterations: k,
                guidance_sigma_max: args.guidance_sigma_max,
                classifiers_fnv1a: (1..=k)
                    .map(|it| std::fs::read(file_of(it, "genneg")).map(|b| fnv1a(&b)))
                    .collect::<std::io::Result<_>>()?,
                draws: args.distill_draws,
                draws_from: match (args.distill_draws, args.distill_draws_from) {
                    (0, _) => "none",
                    (_, DrawSource::Teacher) => "teacher",
                    (_, DrawSource::Baseline) => "baseline",
                }
                .into(),
            };
            // A finished distillation of fewer steps than asked, or an interrupted one,
            // is continued (the result is the uninterrupted run's), the further of the
            // two. Both are checked first, as this run's saves overwrite them: one of
            // another teacher, or further along than asked, is refused, not lost.
            let mut found = None::<(u64, PathBuf, Checkpoint)>;
            for p in [&path, &partial_path] {
                if args.reuse && p.exists() {
                    let c = Checkpoint::load(p)?;
                    check_teacher(&c, p, &record)?;
                    let step: u64 = c.meta("step")?;
                    if step > n_distill_iters {
                        candle_core::bail!(
                            "distilled model {} has done {step} steps, more than --distill-iters {n_distill_iters}; pass --distill-iters {step} to evaluate it, or use another --out",
                            p.display()
                        );
                    }
                    if found.as_ref().is_none_or(|(s, _, _)| step > *s) {
                        found = Some((step, p.clone(), c));
                    }
                }
            }
            // (a finished distillation to reuse, a saved state to continue from)
            let (reused, resume) = match found {
                Some((step, p, c)) if step == n_distill_iters => {
                    eprintln!("reusing {}", p.display());
                    (Some(c), None)
                }
                Some((step, p, c)) => {
                    eprintln!(
                        "continuing the distillation in {} from step {step} to {n_distill_iters}",
                        p.display()
                    );
                    (None, Some(c))
                }
                None => (None, None),
            };
            let c = if let Some(c) = reused {
                c
            } else {
                let with_draws = match args.distill_draws {
                    0 => None,
                    n => {
                        let baseline_alone = baseline.stack().guided(&dev)?;
                        let (who, source): (_, &dyn Score) = match args.distill_draws_from {
                            DrawSource::Teacher => ("teacher", &teacher),
                            DrawSource::Baseline => ("baseline", &baseline_alone),
                        };
                        let mut progress =
                            Progress::new(&format!("distillation: {who} drawing"), n);
                        let drawn = draw_scenes(
                            source,
                            &train,
                            n,
                            &sampler,
                            &sigmas,
                            seed.wrapping_add(300),
                            500,
                            &mut |d| progress.update(d, "scenes"),
                        )?;
                        eprintln!("distillation: {who}'s {}", drawn.summary());
                        let agents = baseline
                            .scaler
                            .denormalize(&drawn.x.flatten_all()?.to_vec1::<f32>()?);
                        let copies = (train.set.len() / n).max(1);
                        Some(train.with_scenes(&drawn.keys, &agents, copies)?)
                    }
                };
                let mut progress = Progress::new(&format!("distil {k}"), n_distill_iters as usize);
                let data = with_draws.as_ref().unwrap_or(&train);
                let mut c = match (args.save_every, &resume) {
                    (0, None) => distill(&dcfg, &teacher, &ckpt, data, &dev, &mut progress)?,
                    (every, _) => distill_resumable(
                        &dcfg,
                        &teacher,
                        &ckpt,
                        data,
                        resume.as_ref(),
                        if every == 0 {
                            n_distill_iters.max(1)
                        } else {
                            every
                        },
                        &mut |c| {
                            let mut c = c.clone();
                            c.set_meta(DISTILL_TEACHER_KEY, &record)?;
                            c.save(&partial_path)
                        },
                        &dev,
                        &mut progress,
                    )?,
                };
                c.set_meta(DISTILL_TEACHER_KEY, &record)?;
                c.save(&path)?;
                if partial_path.exists() {
                    std::fs::remove_file(&partial_path)?;
                }
                c
            };
            Some(TrafficModel::load(&c, DType::F32, &dev)?)
        }
        _ => None,
    };

    // The control: as many more steps of plain training as the distillation took.
    let control = match args.control_iters {
        None => None,
        Some(n) => {
            let path = out.join("baseline_more.safetensors");
            let c = if args.reuse && path.exists() {
                eprintln!("reusing {}", path.display());
                Checkpoint::load(&path)?
            } else {
                let ccfg = TrafficConfig {
                    iters: n,
                    ..baseline.config.clone()
                };
                let mut progress = Progress::new("baseline, more steps", n as usize);
                let c = train_more(&ccfg, &ckpt, &train, &dev, &mut progress)?;
                c.save(&path)?;
                c
            };
            Some(TrafficModel::load(&c, DType::F32, &dev)?)
        }
    };

    // Evaluation on the held-out split's maps (test unless --eval-split says otherwise).
    let gate = args.guidance_sigma_max;
    let mut models: Vec<(String, Stack)> = vec![("baseline".into(), baseline.stack())];
    if let Some(c) = &control {
        models.push(("baseline_more".into(), c.stack()));
    }
    for k in 1..=classifiers.len() {
        let stack = baseline.with_classifiers(&classifiers[..k], gate);
        models.push((format!("genneg_{k}"), stack));
    }
    if let Some(d) = &distilled {
        models.push(("distilled".into(), d.stack()));
    }
    for (name, c) in &ablations {
        let stack = baseline.with_classifiers(std::slice::from_ref(c), gate);
        models.push((name.clone(), stack));
    }
    if let Some(keep) = &args.eval_models {
        if let Some(unknown) = keep.iter().find(|k| !models.iter().any(|(n, _)| n == *k)) {
            let names: Vec<&str> = models.iter().map(|(n, _)| n.as_str()).collect();
            candle_core::bail!(
                "--eval-models: no model {unknown:?} in this run (it has {})",
                names.join(", ")
            );
        }
        models.retain(|(n, _)| keep.contains(n));
    }
    let idx: Vec<u32> = (0..test.set.len() as u32).collect();
    let dim = test.set.scene_dim();
    let mut rows = Vec::new();
    let mut panels = Vec::new();
    for (name, stack) in &models {
        let model = stack.guided(&dev)?;
        let mut progress = Progress::new(&format!("{name}: sampling"), idx.len());
        let t0 = Instant::now();
        let scenes = sample_scenes(
            &model,
            &test,
            &idx,
            &sampler,
            &sigmas,
            seed.wrapping_add(7),
            500,
            &mut |done| progress.update(done, "scenes"),
        )?;
        let (rates, _) = label_scenes(&test, &idx, &scenes)?;
        eprintln!("{name}: features {}", feature_summary(&scenes)?);
        let step_ms = {
            let b = idx.len().min(500);
            let cond = test.cond_of(&idx[..b])?;
            let x = test.x.rows(&idx[..b])?;
            sampler_step_ms(&model, &sampler, &x, &cond, 1.0, 0.9, 5)?
        };
        let process = &baseline.config.process;
        let elbo = r_elbo(&model, process, &test, 8, seed.wrapping_add(11), 500)?;
        eprintln!(
            "{name}: {:.2}% infractions ({:.2}% collision, {:.2}% offroad; vehicles {:.2}% / {:.2}% / {:.2}%), r-ELBO {elbo:.3}, {} scenes in {:.0}s",
            100.0 * rates.infraction,
            100.0 * rates.collision,
            100.0 * rates.offroad,
            100.0 * rates.vehicle_infraction,
            100.0 * rates.vehicle_collision,
            100.0 * rates.vehicle_offroad,
            rates.scenes,
            t0.elapsed().as_secs_f64()
        );
        for i in 0..4.min(idx.len()) {
            panels.push(scene_panel(
                &format!("{name} {i}"),
                test.set.map_of(i),
                &scenes[i * dim..(i + 1) * dim],
                300,
            ));
        }
        rows.push(Row {
            name: name.clone(),
            collision_rate: rates.collision,
            offroad_rate: rates.offroad,
            infraction_rate: rates.infraction,
            vehicle_infraction_rate: rates.vehicle_infraction,
            r_elbo: elbo,
            step_ms,
            params: stack.params(),
        });
    }
    eprintln!("data: features {}", feature_summary(&test.set.agents)?);
    for i in 0..4.min(idx.len()) {
        panels.push(scene_panel(
            &format!("data {i}"),
            test.set.map_of(i),
            test.set.scene(i),
            300,
        ));
    }
    save_grid(&out.join("scenes.png"), &panels, 4)?;
    eprintln!("wrote {}", out.join("scenes.png").display());

    println!(
        "| model | collision % | offroad % | infraction % | vehicles infracting % | r-ELBO | step ms (batch 500) | params |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
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
    if let Some(p) = &args.common.json {
        write_json(
            p,
            &Report {
                models: rows,
                train_scenes: train.set.len(),
                eval_scenes: test.set.len(),
                eval_split: args.eval_split.name(),
                seed,
                genneg_seed,
                eval_seed,
                labelled_per_second,
                classifier_checks: checks,
            },
        )?;
    }
    Ok(())
}
