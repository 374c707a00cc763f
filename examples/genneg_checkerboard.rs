//! Gen-neG on the checkerboard (paper §4.1, Fig. 3–4, App. D.1): baseline → Gen-neG
//! iterations with stacked IS-balanced classifiers → distillation of iterations 1 and
//! the last, and the three ablations (w/o IS, imbalanced, time-independent), on one
//! table: infraction % with 95% interval, held-out NLL (mean, median, points above 10
//! nats), MMD, sampling-step time, and parallel samples needed for δ = 1e-9.
//!
//!     cargo run --release --example genneg_checkerboard -- --quick
//!     cargo run --release --example genneg_checkerboard -- --baseline out/checkerboard/baseline.safetensors

use candle_core::{DType, Device, Tensor};
use clap::Parser;
use scoreguide::checkerboard::{
    label, load_baseline, paper_sampler, scatter_png, train_baseline, BaselineConfig,
};
use scoreguide::data::{checkerboard, Dataset};
use scoreguide::genneg::{
    collect, distill, train_classifier, ClassifierKind, ClassifierTrainConfig, CollectConfig,
    DistillConfig, Draws, LabelledSet, Stack, StackedClassifier, Unconditioned,
};
use scoreguide::guidance::Cond;
use scoreguide::guidance::Score;
use scoreguide::metrics::{
    mmd2_gaussian, negative_log_likelihood, parallel_samples_needed, NllConfig,
};
use scoreguide::oracles::Checkerboard;
use scoreguide::plot::{line_chart, BLUE, ORANGE};
use scoreguide::runtime::{device, heun_step_ms, set_threads, write_json};
use scoreguide::samplers::{initial_noise, sample_many};
use scoreguide::sde::SampleNoise;
use scoreguide::train::{load_score_model, Checkpoint, Progress, Weights};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Gen-neG on the checkerboard: iterations, distillation, ablations")]
struct Args {
    /// Reduced sizes everywhere: a check in minutes.
    #[arg(long)]
    quick: bool,
    /// Baseline checkpoint from the `checkerboard` example (trained here if absent).
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Gen-neG iterations.
    #[arg(long, default_value_t = 5)]
    iterations: usize,
    /// Valid and invalid samples per classifier (the paper: 50k).
    #[arg(long)]
    per_class: Option<usize>,
    /// Most samples drawn per iteration.
    #[arg(long)]
    budget: Option<usize>,
    /// Most samples drawn in iteration 1, from the unguided baseline (cheaper per draw
    /// and richer in invalid samples than the guided models of later iterations).
    #[arg(long)]
    first_budget: Option<usize>,
    /// Skip the three ablations.
    #[arg(long)]
    no_ablations: bool,
    /// Take iteration K's stack from `OUT/genneg_K.safetensors` when that file exists
    /// (a run stopped after K iterations goes on from there; the draws and trainings of
    /// later iterations are seeded by their number, so the result is the same). The
    /// file must hold K classifiers on this baseline. The ablations need iteration 1's
    /// samples, so resuming iteration 1 needs `--no-ablations`.
    #[arg(long)]
    resume: bool,
    /// Skip the distillations.
    #[arg(long)]
    no_distill: bool,
    /// Go on with at least this many invalid samples when the budget runs out.
    #[arg(long)]
    min_negatives: Option<usize>,
    /// Classifier training iterations (the paper: 20k at batch 8192).
    #[arg(long)]
    classifier_iters: Option<u64>,
    #[arg(long)]
    classifier_batch: Option<usize>,
    /// Distillation iterations.
    #[arg(long)]
    distill_iters: Option<u64>,
    /// Samples per model for the infraction rate and MMD.
    #[arg(long)]
    samples: Option<usize>,
    /// Held-out points for the NLL.
    #[arg(long)]
    nll_points: Option<usize>,
    /// Heun steps for every sampler call (default 64; 32 with --quick). The baseline
    /// example uses 100; guided collection with k classifiers costs about 1 + 2.4k base
    /// evaluations per step, so 2 CPU cores afford fewer.
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "out/genneg_checkerboard")]
    out: PathBuf,
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long)]
    threads: Option<usize>,
}

/// Run sizes. Full mode is sized for about 70 minutes on 2 CPU cores, below the paper's
/// (50k per class, 20k classifier steps at batch 8192): see docs/REPRODUCING.md.
struct Sizes {
    per_class: usize,
    budget: usize,
    first_budget: usize,
    min_negatives: usize,
    classifier_iters: u64,
    classifier_batch: usize,
    distill_iters: u64,
    samples: usize,
    nll_points: usize,
    baseline_iters: u64,
}

impl Sizes {
    fn of(a: &Args) -> Self {
        let q = a.quick;
        Self {
            per_class: a.per_class.unwrap_or(if q { 1_000 } else { 10_000 }),
            budget: a.budget.unwrap_or(if q { 20_000 } else { 150_000 }),
            first_budget: a
                .first_budget
                .or(a.budget)
                .unwrap_or(if q { 20_000 } else { 150_000 }),
            min_negatives: a.min_negatives.unwrap_or(if q { 100 } else { 300 }),
            classifier_iters: a.classifier_iters.unwrap_or(if q { 300 } else { 2_000 }),
            classifier_batch: a.classifier_batch.unwrap_or(if q { 1024 } else { 4096 }),
            distill_iters: a.distill_iters.unwrap_or(if q { 300 } else { 4_000 }),
            samples: a.samples.unwrap_or(if q { 4_000 } else { 20_000 }),
            nll_points: a.nll_points.unwrap_or(if q { 200 } else { 1_000 }),
            baseline_iters: if q { 3_000 } else { 30_000 },
        }
    }
}

/// One row of the table (and of the JSON).
#[derive(Serialize)]
struct Row {
    name: String,
    infraction_rate: f64,
    infraction_ci95: [f64; 2],
    nll: f64,
    nll_median: f64,
    nll_above_10: usize,
    mmd: f64,
    step_ms: f64,
    parallel_samples: Option<u64>,
}

#[derive(Serialize)]
struct Report {
    models: Vec<Row>,
    mmd_bandwidth: f64,
    delta: f64,
    iterations: Vec<IterationLog>,
}

#[derive(Serialize, Deserialize, Clone)]
struct IterationLog {
    iteration: usize,
    /// The stack this iteration was read from with `--resume`, instead of drawn and trained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    resumed_from: Option<String>,
    /// What the iteration drew; absent for an iteration resumed from a file written
    /// before the draw counts were saved with the stack.
    #[serde(flatten)]
    collection: Option<CollectionLog>,
}

#[derive(Serialize, Deserialize, Clone)]
struct CollectionLog {
    drawn: usize,
    positives_found: usize,
    negatives_found: usize,
    alpha: f64,
    budget_exhausted: bool,
}

const MMD_BANDWIDTH: f64 = 0.5;
const DELTA: f64 = 1e-9;

/// A model to evaluate: sampled in f32, NLL in f64.
enum Model {
    Stack(Box<Stack>),
    Distilled(Checkpoint),
}

impl Model {
    fn score(&self, dtype: DType, dev: &Device) -> candle_core::Result<Box<dyn Score>> {
        Ok(match self {
            Model::Stack(s) => Box::new(s.guided_as(dtype, dev)?),
            Model::Distilled(c) => Box::new(load_score_model(c, Weights::Ema, dtype, dev)?.0),
        })
    }
}

fn main() -> candle_core::Result<()> {
    let args = Args::parse();
    let threads = set_threads(args.threads);
    let dev = device(&args.device)?;
    let sz = Sizes::of(&args);
    eprintln!(
        "genneg_checkerboard: {} mode, {threads} thread(s)",
        if args.quick { "quick" } else { "full" }
    );
    let (sampler, sigmas) = paper_sampler(args.steps.unwrap_or(if args.quick { 32 } else { 64 }))?;
    let board = Checkerboard::default();

    // Baseline.
    let base_cfg = BaselineConfig {
        iters: sz.baseline_iters,
        ..BaselineConfig::default()
    };
    let baseline = match &args.baseline {
        Some(p) => load_baseline(p, &dev)?,
        None => {
            let b = train_baseline(
                &base_cfg,
                None,
                &dev,
                &mut Progress::new("baseline", base_cfg.iters as usize),
            )?;
            let p = args.out.join("baseline.safetensors");
            scoreguide::runtime::ensure_parent(&p)?;
            b.checkpoint.save(&p)?;
            b
        }
    };
    let base_model_cfg = baseline.checkpoint.meta("model")?;
    let stack0 = Stack::new(base_model_cfg, baseline.checkpoint.section("ema"));
    let train_data = Dataset::new(
        checkerboard(base_cfg.train_points, base_cfg.data_seed)?,
        "checkerboard training set",
    )?;
    // Held-out data from an independent stream.
    let held_out = checkerboard(
        sz.nll_points.max(4_000),
        scoreguide::checkerboard::HELD_OUT_SEED,
    )?;

    let mut ccfg = ClassifierTrainConfig {
        iters: sz.classifier_iters,
        batch: sz.classifier_batch,
        ..ClassifierTrainConfig::default()
    };
    ccfg.train.seed = args.seed;
    let budget = |it: usize| if it == 1 { sz.first_budget } else { sz.budget };
    let collect_cfg = |it: usize| CollectConfig {
        per_class: Some(sz.per_class),
        batch: 10_000,
        budget: budget(it),
        min_negatives: sz.min_negatives,
        seed: scoreguide::sde::derive_seed(args.seed, 100 + it as u64),
    };

    // Gen-neG iterations.
    let mut stacks = vec![stack0.clone()];
    let mut logs = Vec::new();
    let mut first: Option<Draws> = None;
    let mut resuming = args.resume;
    for it in 1..=args.iterations {
        let saved = args.out.join(format!("genneg_{it}.safetensors"));
        // Resume only along an unbroken chain: a later file was built on other classifiers
        // than the ones this run trains (and would be refused).
        if resuming && saved.exists() {
            if it == 1 && !args.no_ablations {
                candle_core::bail!(
                    "--resume would read iteration 1 from {}, but the ablations need its samples: add --no-ablations",
                    saved.display()
                );
            }
            let previous = stacks.last().expect("stack 0 exists");
            let (stack, log) = resume_iteration(&saved, it, previous)?;
            eprintln!("iteration {it}: resumed from {}", saved.display());
            logs.push(log);
            stacks.push(stack);
            continue;
        }
        resuming = false;
        let current = stacks.last().expect("stack 0 exists").clone();
        let model = current.guided(&dev)?;
        let mut progress = Progress::new(&format!("iteration {it}: sampling"), budget(it));
        let c = collect(
            &model,
            &sampler,
            &sigmas,
            &Unconditioned(&board),
            &[2],
            &collect_cfg(it),
            &dev,
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
        logs.push(log.clone());
        let set = LabelledSet::new(&c, ClassifierKind::IsBalanced)?;
        let cfg_it = ClassifierTrainConfig {
            train: scoreguide::train::TrainConfig {
                seed: args.seed + it as u64,
                ..ccfg.train.clone()
            },
            ..ccfg.clone()
        };
        let tensors = train_classifier(
            &set,
            &Unconditioned(&board),
            true,
            &cfg_it,
            &dev,
            &mut Progress::new(
                &format!("iteration {it}: classifier"),
                cfg_it.iters as usize,
            ),
        )?
        .weights();
        let mut next = current.clone();
        next.classifiers.push(StackedClassifier {
            config: cfg_it.model.clone(),
            weight: 1.0,
            time_independent: None,
            gate: None,
            tensors,
        });
        scoreguide::runtime::ensure_parent(&saved)?;
        let mut ck = next.to_checkpoint()?;
        ck.set_meta(COLLECTION_META, &log)?;
        ck.save(&saved)?;
        stacks.push(next);
        if it == 1 {
            first = Some(c);
        }
    }

    // Ablations, on iteration 1's samples.
    let mut ablations = Vec::new();
    if let Some(c) = first.as_ref().filter(|_| !args.no_ablations) {
        for (name, kind) in [
            ("wo_is", ClassifierKind::WithoutIs),
            ("imbalanced", ClassifierKind::Imbalanced),
            ("time_independent", ClassifierKind::TimeIndependent),
        ] {
            let set = LabelledSet::new(c, kind)?;
            let cfg_a = ClassifierTrainConfig {
                train: scoreguide::train::TrainConfig {
                    seed: args.seed + 1,
                    ..ccfg.train.clone()
                },
                ..ccfg.clone()
            };
            let tensors = train_classifier(
                &set,
                &Unconditioned(&board),
                kind.time_dependent(),
                &cfg_a,
                &dev,
                &mut Progress::new(&format!("ablation {name}"), cfg_a.iters as usize),
            )?
            .weights();
            let mut s = stack0.clone();
            s.classifiers.push(StackedClassifier {
                config: cfg_a.model.clone(),
                weight: 1.0,
                time_independent: (!kind.time_dependent()).then_some(cfg_a.sigma_clean),
                gate: None,
                tensors,
            });
            ablations.push((name.to_string(), s));
        }
    }

    // Distillation of iteration 1 and the last.
    let dcfg = DistillConfig {
        iters: sz.distill_iters,
        ..DistillConfig::default()
    };
    let mut distilled = Vec::new();
    for k in [1, args.iterations]
        .into_iter()
        .filter(|&k| !args.no_distill && k >= 1 && k < stacks.len())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let teacher = stacks[k].guided(&dev)?;
        let ck = distill(
            &teacher,
            &train_data,
            &|_| Ok(Cond::none()),
            &stacks[k].base_config,
            Some(&stacks[k].base),
            &dcfg,
            None,
            &dev,
            &mut Progress::new(&format!("distil {k}"), dcfg.iters as usize),
        )?;
        ck.save(args.out.join(format!("distilled_{k}.safetensors")))?;
        distilled.push((format!("distilled_{k}"), ck));
    }

    // Evaluation.
    let mut models: Vec<(String, Model)> =
        vec![("baseline".into(), Model::Stack(Box::new(stack0.clone())))];
    for (k, s) in stacks.iter().enumerate().skip(1) {
        models.push((format!("genneg_{k}"), Model::Stack(Box::new(s.clone()))));
    }
    models.extend(distilled.into_iter().map(|(n, c)| (n, Model::Distilled(c))));
    models.extend(
        ablations
            .into_iter()
            .map(|(n, s)| (n, Model::Stack(Box::new(s)))),
    );

    let held_nll = held_out
        .narrow(0, 0, sz.nll_points)?
        .to_dtype(DType::F64)?
        .to_device(&dev)?;
    let held_mmd: Vec<f64> = held_out
        .narrow(0, 0, 4_000)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()?;
    let nll_cfg = NllConfig {
        steps: 40,
        ..NllConfig::default()
    };
    let mut rows = Vec::new();
    for (name, m) in &models {
        let t0 = Instant::now();
        let score = m.score(DType::F32, &dev)?;
        let mut progress = Progress::new(
            &format!("{name}: sampling"),
            sz.samples.div_ceil(10_000) * (sigmas.len() - 1),
        );
        let x = sample_many(
            &sampler,
            score.as_ref(),
            &Cond::none(),
            sz.samples,
            &[2],
            &sigmas,
            args.seed.wrapping_add(7),
            10_000,
            &dev,
            &mut |d| progress.update(d, "steps"),
        )?;
        let (rate, verdicts) = label(&x)?;
        scatter_png(
            &args.out.join(format!("{name}.png")),
            &format!("{name}: {:.2}% infractions", 100.0 * rate.rate),
            &x,
            &verdicts,
            20_000,
        )?;
        let fake: Vec<f64> = x
            .narrow(0, 0, 4_000.min(sz.samples))?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1()?;
        let mmd = mmd2_gaussian(&fake, &held_mmd, 2, MMD_BANDWIDTH)?;
        let step_ms = step_time_ms(score.as_ref(), &sigmas, &dev)?;
        let nll =
            negative_log_likelihood(m.score(DType::F64, &dev)?.as_ref(), &held_nll, &nll_cfg)?;
        let mut sorted = nll.clone();
        sorted.sort_by(f64::total_cmp);
        let row = Row {
            name: name.clone(),
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
        rows.push(row);
    }

    print_table(&rows);
    plot_iterations(&args.out, &rows, args.iterations)?;
    if let Some(p) = &args.json {
        write_json(
            p,
            &Report {
                models: rows,
                mmd_bandwidth: MMD_BANDWIDTH,
                delta: DELTA,
                iterations: logs,
            },
        )?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

/// Checkpoint metadata key holding an iteration's [`IterationLog`].
const COLLECTION_META: &str = "genneg_checkerboard.collection";

/// Iteration `it`'s stack read back from `path`, checked to be `previous` (this run's
/// stack of iteration `it` − 1) plus one classifier, with the draw counts saved in it
/// (absent from files written before they were saved; the log says where the stack came
/// from either way).
fn resume_iteration(
    path: &Path,
    it: usize,
    previous: &Stack,
) -> candle_core::Result<(Stack, IterationLog)> {
    let ck = Checkpoint::load(path)?;
    let stack = Stack::from_checkpoint(&ck)?;
    if stack.classifiers.len() != it {
        candle_core::bail!(
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
        candle_core::bail!(
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
fn same_tensors(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> bool {
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
fn step_time_ms(model: &dyn Score, sigmas: &[f64], dev: &Device) -> candle_core::Result<f64> {
    let n = 10_000;
    let mut noise = SampleNoise::new(0, 0, n);
    let x = initial_noise(&mut noise, &[n, 2], 1.0, DType::F32, dev)?;
    let mid = sigmas.len() / 2;
    heun_step_ms(model, &x, &Cond::none(), sigmas[mid], sigmas[mid + 1], 5)
}

fn print_table(rows: &[Row]) {
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
fn plot_iterations(dir: &Path, rows: &[Row], iterations: usize) -> candle_core::Result<()> {
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
