//! The Gen-neG checkerboard baseline (paper §4.1, App. B.1) as a reusable recipe:
//! data, training, sampling, and the scatter plot; Gen-neG's iterations on it in
//! [`genneg`].

pub mod genneg;
pub mod nll;
pub mod sis;

use crate::config::Preset;
use crate::plot::{Canvas, BLUE, GREY, RED};
use candle_core::{bail, DType, Device, Result, Tensor};
use rand::rngs::StdRng;
use scoreguide_data::{checkerboard, Dataset};
use scoreguide_guidance::{Cond, Score};
use scoreguide_losses::{dsm, DsmWeighting};
use scoreguide_nets::{AnyNet, ParamStore, ScoreModelConfig, ScoreNet};
use scoreguide_oracles::{Checkerboard, Oracle, Verdict};
use scoreguide_samplers::{sample_many, HeunOptions, Sampler};
use scoreguide_sde::{append_zero, log_linear, randn, SigmaDistribution};
use scoreguide_train::{
    load_score_model, Checkpoint, Progress, Staged, TrainConfig, Trainer, Weights,
};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Everything that defines the baseline run. Defaults are the paper's (App. B.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaselineConfig {
    pub train_points: usize,
    pub iters: u64,
    /// Full batch (= `train_points`) in the paper.
    pub batch_size: usize,
    pub sigma: SigmaDistribution,
    pub weighting: DsmWeighting,
    pub train: TrainConfig,
    pub model: ScoreModelConfig,
    pub data_seed: u64,
}

impl Default for BaselineConfig {
    fn default() -> Self {
        Self {
            train_points: 1000,
            iters: 30_000,
            batch_size: 1000,
            sigma: SigmaDistribution::LogUniform {
                min: 2e-3,
                max: 80.0,
            },
            weighting: DsmWeighting::Edm { sigma_data: 1.0 },
            train: TrainConfig {
                lr: 3e-4,
                ema_decay: 0.999,
                ..TrainConfig::default()
            },
            model: ScoreModelConfig::checkerboard(),
            data_seed: 0,
        }
    }
}

/// The checkerboard experiment (`examples/checkerboard`): the baseline, and how many
/// samples to draw from it and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckerboardConfig {
    pub baseline: BaselineConfig,
    /// Samples drawn to count infractions.
    pub samples: usize,
    /// Heun steps of the paper's sampler.
    pub steps: usize,
    /// Samples per sampling batch.
    pub sample_batch: usize,
    /// Save the training state every this many steps (`--resume` continues it); 0: at
    /// the end only.
    pub save_every: u64,
}

impl Preset for CheckerboardConfig {
    fn quick() -> Self {
        Self {
            baseline: BaselineConfig {
                iters: 400,
                ..BaselineConfig::default()
            },
            samples: 10_000,
            ..Self::full()
        }
    }

    fn full() -> Self {
        Self {
            baseline: BaselineConfig::default(),
            samples: 100_000,
            steps: 100,
            sample_batch: 10_000,
            save_every: 0,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.samples == 0
            || self.steps == 0
            || self.sample_batch == 0
            || self.baseline.batch_size == 0
            || self.baseline.train_points == 0
        {
            bail!("checkerboard config: samples, steps, sample_batch, baseline.batch_size and baseline.train_points must be positive, got {self:?}");
        }
        self.baseline.train.validate()?;
        self.baseline.sigma.validate()
    }
}

impl CheckerboardConfig {
    /// The same run seeded by `seed` (data, initialisation and sampling noise).
    pub fn seeded(mut self, seed: u64) -> Self {
        self.baseline.data_seed = seed;
        self.baseline.train.seed = seed;
        self
    }
}

/// The paper's sampler: 100 Heun steps, churn 10, log-linear σ grid 80 → 2e-3, then 0.
pub fn paper_sampler(steps: usize) -> Result<(Sampler, Vec<f64>)> {
    let sigmas = append_zero(log_linear(steps, 2e-3, 80.0)?);
    Ok((
        Sampler::Heun(HeunOptions {
            churn: 10.0,
            ..HeunOptions::default()
        }),
        sigmas,
    ))
}

/// Seed of the held-out checkerboard points the examples evaluate NLL and MMD on (an
/// independent stream from the training set's).
pub const HELD_OUT_SEED: u64 = 1_000_003;

/// One DSM loss on a batch of `data`: σ from `cfg.sigma`, noise from `rng`.
pub fn dsm_batch(
    model: &dyn Score,
    data: &Dataset,
    cfg: &BaselineConfig,
    step: u64,
    rng: &mut StdRng,
) -> Result<Tensor> {
    let x0 = data.rows(&data.step_batch(cfg.batch_size, cfg.train.seed, step)?)?;
    let sigma = cfg.sigma.sample_tensor(x0.dim(0)?, rng, x0.device())?;
    let z = randn(rng, x0.dims(), x0.device())?;
    dsm(model, &x0, &sigma, &z, &Cond::none(), cfg.weighting)
}

/// A trained baseline: the checkpoint and the frozen EMA model it describes.
pub struct Baseline {
    pub checkpoint: Checkpoint,
    pub model: ScoreNet<AnyNet>,
    pub train_seconds: f64,
    pub losses: Vec<f32>,
}

/// Trains the baseline with DSM on `cfg.train_points` checkerboard points; with
/// `staged`, continues a saved state and saves as it goes (to the bit of the
/// uninterrupted run).
pub fn train_baseline(
    cfg: &BaselineConfig,
    staged: Option<Staged>,
    device: &Device,
    progress: &mut Progress,
) -> Result<Baseline> {
    train_baseline_synced(cfg, staged, None, device, progress)
}

/// [`train_baseline`] as one rank of a data-parallel run (`sync`: the gradients'
/// average over the ranks); every rank trains on the full batch with its own noise.
pub fn train_baseline_synced(
    cfg: &BaselineConfig,
    staged: Option<Staged>,
    sync: Option<Box<dyn scoreguide_train::GradientSync>>,
    device: &Device,
    progress: &mut Progress,
) -> Result<Baseline> {
    cfg.sigma.validate()?;
    let data = Dataset::new(
        checkerboard(cfg.train_points, cfg.data_seed)?,
        "checkerboard training set",
    )?
    .to_device(device)?;
    let store = ParamStore::new(cfg.train.seed);
    let model = cfg.model.build(&store.var_builder(DType::F32, device))?;
    let mut trainer = Trainer::new(store, cfg.train.clone())?;
    if let Some(sync) = sync {
        trainer = trainer.with_gradient_sync(sync);
    }
    if let Some(c) = staged.as_ref().and_then(|s| s.resume) {
        let saved: BaselineConfig = c.meta("baseline")?;
        if (BaselineConfig {
            iters: cfg.iters,
            ..saved.clone()
        }) != *cfg
        {
            bail!("resumed baseline: the checkpoint was trained with {saved:?}, this run asks for {cfg:?}");
        }
    }
    let start = std::time::Instant::now();
    let describe = |mut c: Checkpoint| -> Result<Checkpoint> {
        c.set_meta("model", &cfg.model)?;
        c.set_meta("process", &cfg.sigma)?;
        c.set_meta("baseline", cfg)?;
        c.set_meta("train_seconds", &start.elapsed().as_secs_f64())?;
        Ok(c)
    };
    let (checkpoint, losses) = trainer.fit(
        cfg.iters,
        staged,
        progress,
        |step, rng| dsm_batch(&model, &data, cfg, step, rng),
        &describe,
    )?;
    let train_seconds = checkpoint.meta("train_seconds")?;
    let (model, _) = load_score_model(&checkpoint, Weights::Ema, DType::F32, device)?;
    Ok(Baseline {
        checkpoint,
        model,
        train_seconds,
        losses,
    })
}

/// Loads a baseline checkpoint written by [`train_baseline`] (EMA weights).
pub fn load_baseline(path: &Path, device: &Device) -> Result<Baseline> {
    let checkpoint = Checkpoint::load(path)?;
    let (model, _) = load_score_model(&checkpoint, Weights::Ema, DType::F32, device)
        .map_err(|e| candle_core::Error::msg(format!("checkpoint {}: {e}", path.display())))?;
    let train_seconds = checkpoint.meta("train_seconds").unwrap_or(0.0);
    Ok(Baseline {
        checkpoint,
        model,
        train_seconds,
        losses: Vec::new(),
    })
}

/// Draws `n` samples from `model` with the paper's sampler, showing progress.
pub fn sample(
    model: &dyn Score,
    n: usize,
    steps: usize,
    seed: u64,
    batch: usize,
    device: &Device,
    label: &str,
) -> Result<Tensor> {
    let (sampler, sigmas) = paper_sampler(steps)?;
    sample_with(model, &sampler, &sigmas, n, seed, batch, device, label)
}

/// [`sample`] with the sampler and σ grid given.
#[allow(clippy::too_many_arguments)]
pub fn sample_with(
    model: &dyn Score,
    sampler: &Sampler,
    sigmas: &[f64],
    n: usize,
    seed: u64,
    batch: usize,
    device: &Device,
    label: &str,
) -> Result<Tensor> {
    let batches = n.div_ceil(batch);
    let mut progress = Progress::new(label, batches * (sigmas.len() - 1));
    sample_many(
        sampler,
        model,
        &Cond::none(),
        n,
        &[2],
        sigmas,
        seed,
        batch,
        device,
        &mut |done| progress.update(done, "steps"),
    )
}

/// Scatter plot of `samples` over the board, valid points blue and infractions red.
pub fn scatter_png(
    path: &Path,
    title: &str,
    samples: &Tensor,
    verdicts: &[Verdict],
    max_points: usize,
) -> Result<()> {
    let board = Checkerboard::default();
    let mut c = Canvas::new(760, 760, (-5.0, 5.0), (-5.0, 5.0));
    let s = board.side();
    for i in 0..board.squares {
        for j in 0..board.squares {
            let (x0, y0) = (
                -board.half_width + i as f64 * s,
                -board.half_width + j as f64 * s,
            );
            if board.is_white(x0 + 0.5 * s, y0 + 0.5 * s) {
                c.fill_rect(x0, y0, x0 + s, y0 + s, GREY);
            }
        }
    }
    let pts = samples.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let n = pts.len().min(max_points);
    // Faint dots for many points, so density shows; infractions drawn last, on top.
    let alpha = (3000.0 / n as f32).clamp(0.08, 0.8);
    for (p, v) in pts.iter().zip(verdicts).take(n) {
        if v.valid {
            c.dot(p[0] as f64, p[1] as f64, 1.5, BLUE, alpha);
        }
    }
    for (p, v) in pts.iter().zip(verdicts).take(n) {
        if !v.valid {
            c.dot(p[0] as f64, p[1] as f64, 2.0, RED, 0.9);
        }
    }
    let ticks = [-4.0, -2.0, 0.0, 2.0, 4.0];
    c.axes(title, &ticks, &ticks);
    c.save(path)
}

/// Verdicts of the checkerboard oracle on `samples: [N, 2]`.
pub fn label(samples: &Tensor) -> Result<(scoreguide_metrics::Rate, Vec<Verdict>)> {
    let board = Checkerboard::default();
    scoreguide_metrics::infraction_rate(&board as &dyn Oracle, samples)
}
