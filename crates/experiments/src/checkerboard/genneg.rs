//! Gen-neG on the checkerboard (paper §4.1, Fig. 3–4, App. D.1): the run's
//! configuration, the per-model evaluation row (infraction, held-out NLL, MMD, step
//! time, parallel samples needed), resuming iterations from saved stacks, and the
//! table and charts.

use super::{label, sample_with, scatter_png, BaselineConfig};
use crate::config::Preset;
use crate::plot::{line_chart, BLUE, ORANGE};
use crate::runtime::heun_step_ms;
use candle_core::{bail, DType, Device, Result, Tensor};
use scoreguide_genneg::{
    collect, train_classifier, ClassifierKind, ClassifierTrainConfig, CollectConfig, DistillConfig,
    Draws, LabelledSet, Stack, StackedClassifier, Task,
};
use scoreguide_guidance::{Cond, Score};
use scoreguide_metrics::{
    mmd2_gaussian, negative_log_likelihood, parallel_samples_needed, NllConfig,
};
use scoreguide_samplers::{initial_noise, Sampler};
use scoreguide_sde::SampleNoise;
use scoreguide_train::{load_score_model, Checkpoint, Progress, Weights};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

/// The `genneg_checkerboard` run. The full preset is sized for about 70 minutes on 2
/// CPU cores, below the paper's (50k per class, 20k classifier steps at batch 8192):
/// see docs/REPRODUCING.md.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GennegCheckerboardConfig {
    /// Trained when no `--baseline` checkpoint is given.
    pub baseline: BaselineConfig,
    /// Gen-neG iterations.
    pub iterations: usize,
    /// Valid and invalid samples per classifier (the paper: 50k).
    pub per_class: usize,
    /// Most samples drawn per iteration after the first.
    pub budget: usize,
    /// Most samples drawn in iteration 1, from the unguided baseline (cheaper per draw
    /// and richer in invalid samples than the guided models of later iterations).
    pub first_budget: usize,
    /// Go on with at least this many invalid samples when the budget runs out.
    pub min_negatives: usize,
    /// Each classifier's training (iterations, batch, network, optimiser).
    pub classifier: ClassifierTrainConfig,
    /// The w/o IS, imbalanced and time-independent ablations on iteration 1's draws.
    pub ablations: bool,
    /// Distillation of iteration 1 and the last.
    pub distill: Option<DistillConfig>,
    /// Samples per model for the infraction rate and MMD.
    pub samples: usize,
    /// Held-out points for the NLL.
    pub nll_points: usize,
    /// Heun steps for every sampler call: guided collection with k classifiers costs
    /// about 1 + 2.4k base evaluations per step, so 2 CPU cores afford fewer than the
    /// baseline example's 100.
    pub steps: usize,
}

impl Preset for GennegCheckerboardConfig {
    fn quick() -> Self {
        let full = Self::full();
        Self {
            baseline: BaselineConfig {
                iters: 3_000,
                ..BaselineConfig::default()
            },
            per_class: 1_000,
            budget: 20_000,
            first_budget: 20_000,
            min_negatives: 100,
            classifier: ClassifierTrainConfig {
                iters: 300,
                batch: 1024,
                ..full.classifier.clone()
            },
            distill: Some(DistillConfig {
                iters: 300,
                ..DistillConfig::default()
            }),
            samples: 4_000,
            nll_points: 200,
            steps: 32,
            ..full
        }
    }

    fn full() -> Self {
        Self {
            baseline: BaselineConfig::default(),
            iterations: 5,
            per_class: 10_000,
            budget: 150_000,
            first_budget: 150_000,
            min_negatives: 300,
            classifier: ClassifierTrainConfig {
                iters: 2_000,
                batch: 4096,
                ..ClassifierTrainConfig::default()
            },
            ablations: true,
            distill: Some(DistillConfig {
                iters: 4_000,
                ..DistillConfig::default()
            }),
            samples: 20_000,
            nll_points: 1_000,
            steps: 64,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.per_class == 0 || self.samples == 0 || self.steps == 0 || self.nll_points == 0 {
            bail!("genneg_checkerboard config: per_class, samples, steps and nll_points must be positive, got {self:?}");
        }
        self.classifier.sigma.validate()
    }
}

impl GennegCheckerboardConfig {
    /// The same run seeded by `seed`: the baseline's data and initialisation, the
    /// classifiers' (iteration k: seed + k; the ablations: seed + 1), the distillations'.
    pub fn seeded(mut self, seed: u64) -> Self {
        self.baseline.data_seed = seed;
        self.baseline.train.seed = seed;
        self.classifier.train.seed = seed;
        self
    }
}

impl GennegCheckerboardConfig {
    /// Classifier k's training (iteration k; the ablations are 1): seeded by seed + k.
    pub fn classifier_for(&self, seed: u64, k: u64) -> ClassifierTrainConfig {
        ClassifierTrainConfig {
            train: scoreguide_train::TrainConfig {
                seed: seed + k,
                ..self.classifier.train.clone()
            },
            ..self.classifier.clone()
        }
    }

    /// Most samples drawn in iteration `it`.
    pub fn budget_of(&self, it: usize) -> usize {
        if it == 1 {
            self.first_budget
        } else {
            self.budget
        }
    }
}

/// Gen-neG iteration `it` on `current`: draws until `per_class` valid and invalid
/// samples are in hand (seeded by `seed` and `it`), trains an IS-balanced classifier on
/// them and stacks it. Returns the new stack, the iteration's log and its draws.
#[allow(clippy::too_many_arguments)]
pub fn iteration(
    cfg: &GennegCheckerboardConfig,
    current: &Stack,
    it: usize,
    sampler: &Sampler,
    sigmas: &[f64],
    task: &dyn Task,
    seed: u64,
    dev: &Device,
) -> Result<(Stack, IterationLog, Draws)> {
    let collect_cfg = CollectConfig {
        per_class: Some(cfg.per_class),
        batch: 10_000,
        budget: cfg.budget_of(it),
        min_negatives: cfg.min_negatives,
        seed: scoreguide_sde::derive_seed(seed, 100 + it as u64),
    };
    let mut progress = Progress::new(&format!("iteration {it}: sampling"), cfg.budget_of(it));
    let c = collect(
        &current.guided(dev)?,
        sampler,
        sigmas,
        task,
        &[2],
        &collect_cfg,
        dev,
        &mut |drawn, p, n| progress.update(drawn, &format!("{p} valid, {n} invalid")),
    )?;
    eprintln!("iteration {it}: {}", c.summary());
    let log = IterationLog {
        iteration: it,
        resumed_from: None,
        collection: Some(CollectionLog {
            drawn: c.drawn,
            positives_found: c.valid_found,
            negatives_found: c.invalid_found,
            alpha: c.alpha(),
            budget_exhausted: c.budget_exhausted,
        }),
    };
    let set = LabelledSet::new(&c, ClassifierKind::IsBalanced)?;
    let ccfg = cfg.classifier_for(seed, it as u64);
    let mut progress = Progress::new(&format!("iteration {it}: classifier"), ccfg.iters as usize);
    let trained = train_classifier(&set, task, true, &ccfg, dev, &mut progress)?;
    let next = current.with(StackedClassifier::from_checkpoint(&trained.checkpoint)?);
    Ok((next, log, c))
}

/// Held-out points: the first `nll` for the NLL (f64) and 4,000 for the MMD.
pub struct HeldOut {
    pub nll: Tensor,
    pub mmd: Vec<f64>,
}

/// One model's row: samples it (writing `dir/NAME.png`), and measures infraction, MMD
/// against `held`, the Heun step time and the held-out NLL.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    name: &str,
    model: &Model,
    sampler: &Sampler,
    sigmas: &[f64],
    samples: usize,
    held: &HeldOut,
    seed: u64,
    dir: &Path,
    dev: &Device,
) -> Result<Row> {
    let t0 = Instant::now();
    let score = model.score(DType::F32, dev)?;
    let what = format!("{name}: sampling");
    let x = sample_with(
        score.as_ref(),
        sampler,
        sigmas,
        samples,
        seed,
        10_000,
        dev,
        &what,
    )?;
    let (rate, verdicts) = label(&x)?;
    scatter_png(
        &dir.join(format!("{name}.png")),
        &format!("{name}: {:.2}% infractions", 100.0 * rate.rate),
        &x,
        &verdicts,
        20_000,
    )?;
    let fake: Vec<f64> = x
        .narrow(0, 0, 4_000.min(samples))?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()?;
    let mmd = mmd2_gaussian(&fake, &held.mmd, 2, MMD_BANDWIDTH)?;
    let step_ms = step_time_ms(score.as_ref(), sigmas, dev)?;
    let nll_cfg = NllConfig {
        steps: 40,
        ..NllConfig::default()
    };
    let nll = negative_log_likelihood(model.score(DType::F64, dev)?.as_ref(), &held.nll, &nll_cfg)?;
    let mut sorted = nll.clone();
    sorted.sort_by(f64::total_cmp);
    let row = Row {
        name: name.to_string(),
        infraction_rate: rate.rate,
        infraction_ci95: [rate.ci95.0, rate.ci95.1],
        nll: nll.iter().sum::<f64>() / nll.len() as f64,
        nll_median: sorted[sorted.len() / 2],
        nll_above_10: nll.iter().filter(|v| **v > 10.0).count(),
        mmd,
        step_ms,
        parallel_samples: parallel_samples_needed(rate.rate, DELTA),
    };
    eprintln!(
        "{name}: {:.3}% infractions, NLL {:.4} (median {:.4}), evaluated in {:.0}s",
        100.0 * row.infraction_rate,
        row.nll,
        row.nll_median,
        t0.elapsed().as_secs_f64()
    );
    Ok(row)
}

/// One row of the table (and of the JSON).
#[derive(Serialize)]
pub struct Row {
    pub name: String,
    pub infraction_rate: f64,
    pub infraction_ci95: [f64; 2],
    pub nll: f64,
    pub nll_median: f64,
    pub nll_above_10: usize,
    pub mmd: f64,
    pub step_ms: f64,
    pub parallel_samples: Option<u64>,
}

#[derive(Serialize, Deserialize, Clone)]
pub struct IterationLog {
    pub iteration: usize,
    /// The stack this iteration was read from with `--resume`, instead of drawn and trained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from: Option<String>,
    /// What the iteration drew; absent for an iteration resumed from a file written
    /// before the draw counts were saved with the stack.
    #[serde(flatten)]
    pub collection: Option<CollectionLog>,
}

#[derive(Serialize, Deserialize, Clone)]
pub struct CollectionLog {
    pub drawn: usize,
    pub positives_found: usize,
    pub negatives_found: usize,
    pub alpha: f64,
    pub budget_exhausted: bool,
}

pub const MMD_BANDWIDTH: f64 = 0.5;
pub const DELTA: f64 = 1e-9;

/// A model to evaluate: sampled in f32, NLL in f64.
pub enum Model {
    Stack(Box<Stack>),
    Distilled(Checkpoint),
}

impl Model {
    pub fn score(&self, dtype: DType, dev: &Device) -> Result<Box<dyn Score>> {
        Ok(match self {
            Model::Stack(s) => Box::new(s.guided_as(dtype, dev)?),
            Model::Distilled(c) => Box::new(load_score_model(c, Weights::Ema, dtype, dev)?.0),
        })
    }
}

/// Checkpoint metadata key holding an iteration's [`IterationLog`].
pub const COLLECTION_META: &str = "genneg_checkerboard.collection";

/// Iteration `it`'s stack read back from `path`, checked to be `previous` (this run's
/// stack of iteration `it` − 1) plus one classifier, with the draw counts saved in it
/// (absent from files written before they were saved; the log says where the stack came
/// from either way).
pub fn resume_iteration(path: &Path, it: usize, previous: &Stack) -> Result<(Stack, IterationLog)> {
    let ck = Checkpoint::load(path)?;
    let stack = Stack::from_checkpoint(&ck)?;
    if stack.classifiers.len() != it {
        bail!(
            "{} holds {} classifiers, iteration {it} needs {it}",
            path.display(),
            stack.classifiers.len()
        );
    }
    let same_start = same_tensors(&stack.base, &previous.base)
        && previous
            .classifiers
            .iter()
            .zip(&stack.classifiers)
            .all(|(a, b)| same_tensors(&a.tensors, &b.tensors));
    if !same_start {
        bail!(
            "{} was not built on this run's baseline and iterations 1…{}",
            path.display(),
            it - 1
        );
    }
    let mut log = ck
        .meta::<IterationLog>(COLLECTION_META)
        .unwrap_or(IterationLog {
            iteration: it,
            resumed_from: None,
            collection: None,
        });
    log.resumed_from = Some(path.display().to_string());
    Ok((stack, log))
}

/// Whether two sets of named tensors are the same names, shapes and values.
pub fn same_tensors(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> bool {
    a.len() == b.len()
        && a.iter().all(|(name, x)| {
            b.get(name).is_some_and(|y| {
                x.shape() == y.shape()
                    && (x - y)
                        .and_then(|d| {
                            d.abs()?
                                .flatten_all()?
                                .max(0)?
                                .to_dtype(DType::F64)?
                                .to_scalar::<f64>()
                        })
                        .is_ok_and(|m| m == 0.0)
            })
        })
}

/// Median time of one Heun step (two evaluations) at batch 10k, mid-grid.
pub fn step_time_ms(model: &dyn Score, sigmas: &[f64], dev: &Device) -> Result<f64> {
    let n = 10_000;
    let mut noise = SampleNoise::new(0, 0, n);
    let x = initial_noise(&mut noise, &[n, 2], 1.0, DType::F32, dev)?;
    let mid = sigmas.len() / 2;
    heun_step_ms(model, &x, &Cond::none(), sigmas[mid], sigmas[mid + 1], 5)
}

pub fn print_table(rows: &[Row]) {
    println!();
    println!("| model | infraction % | 95% interval | NLL mean | NLL median | NLL > 10 | MMD² (bw {MMD_BANDWIDTH}) | step ms | parallel samples (δ = 1e-9) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {:.3} | [{:.3}, {:.3}] | {:.4} | {:.4} | {} | {:.5} | {:.1} | {} |",
            r.name,
            100.0 * r.infraction_rate,
            100.0 * r.infraction_ci95[0],
            100.0 * r.infraction_ci95[1],
            r.nll,
            r.nll_median,
            r.nll_above_10,
            r.mmd,
            r.step_ms,
            r.parallel_samples.map_or("∞".into(), |p| p.to_string())
        );
    }
}

/// Infraction % and held-out NLL across iterations 0 (baseline) … K, like the paper's
/// Fig. 4: two charts, each on its own axis.
pub fn plot_iterations(dir: &Path, rows: &[Row], iterations: usize) -> Result<()> {
    let series: Vec<&Row> = rows.iter().take(iterations + 1).collect();
    let pts = |f: &dyn Fn(&Row) -> f64| -> Vec<(f64, f64)> {
        series
            .iter()
            .enumerate()
            .map(|(k, r)| (k as f64, f(r)))
            .collect()
    };
    let xt: Vec<f64> = (0..=iterations).map(|k| k as f64).collect();
    line_chart(
        &dir.join("iterations_infraction.png"),
        "infraction % by Gen-neG iteration",
        &xt,
        &[(BLUE, pts(&|r| 100.0 * r.infraction_rate))],
    )?;
    line_chart(
        &dir.join("iterations_nll.png"),
        "held-out NLL: mean (orange), median (blue)",
        &xt,
        &[(ORANGE, pts(&|r| r.nll)), (BLUE, pts(&|r| r.nll_median))],
    )
}
