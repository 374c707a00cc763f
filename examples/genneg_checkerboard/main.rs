//! Gen-neG on the checkerboard (paper §4.1, Fig. 3–4, App. D.1): baseline → Gen-neG
//! iterations with stacked IS-balanced classifiers → distillation of iterations 1 and
//! the last, and the three ablations, on one table. See README.md beside this file.

use candle_core::DType;
use clap::Parser;
use scoreguide::checkerboard::genneg::{
    evaluate, iteration, plot_iterations, print_table, resume_iteration, GennegCheckerboardConfig,
    HeldOut, IterationLog, Model, Row, COLLECTION_META, DELTA, MMD_BANDWIDTH,
};
use scoreguide::checkerboard::{load_baseline, paper_sampler, train_baseline, HELD_OUT_SEED};
use scoreguide::config::{save_resolved, ConfigArgs};
use scoreguide::data::{checkerboard, Dataset};
use scoreguide::genneg::{
    distill, train_classifier, ClassifierKind, Draws, LabelledSet, Stack, StackedClassifier,
    Unconditioned,
};
use scoreguide::guidance::Cond;
use scoreguide::oracles::Checkerboard;
use scoreguide::runtime::{write_json, CommonArgs};
use scoreguide::train::Progress;
use serde::Serialize;
use std::path::PathBuf;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Gen-neG on the checkerboard: iterations, distillation, ablations")]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    common: CommonArgs,
    /// Baseline checkpoint from the `checkerboard` example (trained here if absent).
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Take iteration K's stack from `OUT/genneg_K.safetensors` when that file exists
    /// (a run stopped after K iterations goes on from there; the draws and trainings of
    /// later iterations are seeded by their number, so the result is the same). The
    /// ablations need iteration 1's samples, so resuming iteration 1 needs
    /// `--set ablations=false`.
    #[arg(long)]
    resume: bool,
}

#[derive(Serialize)]
struct Report {
    models: Vec<Row>,
    mmd_bandwidth: f64,
    delta: f64,
    iterations: Vec<IterationLog>,
}

fn main() -> candle_core::Result<()> {
    let args = Args::parse();
    scoreguide::runtime::on_compute_threads(args.common.threads, || run(args))
}

fn run(args: Args) -> candle_core::Result<()> {
    let seed = args.common.seed;
    let cfg = args
        .config
        .resolve::<GennegCheckerboardConfig>()?
        .seeded(seed);
    let dev = args.common.setup()?;
    let out = args.common.out_dir("genneg_checkerboard");
    save_resolved(&cfg, &out)?;
    let (sampler, sigmas) = paper_sampler(cfg.steps)?;
    let board = Checkerboard::default();
    let task = Unconditioned(&board);

    let baseline = match &args.baseline {
        Some(p) => load_baseline(p, &dev)?,
        None => {
            let mut progress = Progress::new("baseline", cfg.baseline.iters as usize);
            let b = train_baseline(&cfg.baseline, None, &dev, &mut progress)?;
            b.checkpoint.save(out.join("baseline.safetensors"))?;
            b
        }
    };
    let stack0 = Stack::new(
        baseline.checkpoint.meta("model")?,
        baseline.checkpoint.section("ema"),
    );
    let b = &cfg.baseline;
    let train_data = Dataset::new(
        checkerboard(b.train_points, b.data_seed)?,
        "checkerboard training set",
    )?;
    let held_out = checkerboard(cfg.nll_points.max(4_000), HELD_OUT_SEED)?;
    let held = HeldOut {
        nll: held_out
            .narrow(0, 0, cfg.nll_points)?
            .to_dtype(DType::F64)?
            .to_device(&dev)?,
        mmd: held_out
            .narrow(0, 0, 4_000)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1()?,
    };
    // Gen-neG iterations.
    let mut stacks = vec![stack0.clone()];
    let mut logs = Vec::new();
    let mut first: Option<Draws> = None;
    let mut resuming = args.resume;
    for it in 1..=cfg.iterations {
        let saved = out.join(format!("genneg_{it}.safetensors"));
        // Resume only along an unbroken chain: a later file was built on other classifiers
        // than the ones this run trains (and would be refused).
        if resuming && saved.exists() {
            if it == 1 && cfg.ablations {
                candle_core::bail!(
                    "--resume would read iteration 1 from {}, but the ablations need its samples: add --set ablations=false",
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
        let current = stacks.last().expect("stack 0 exists");
        let (next, log, c) = iteration(&cfg, current, it, &sampler, &sigmas, &task, seed, &dev)?;
        logs.push(log.clone());
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
    if let Some(c) = first.as_ref().filter(|_| cfg.ablations) {
        for (name, kind) in [
            ("wo_is", ClassifierKind::WithoutIs),
            ("imbalanced", ClassifierKind::Imbalanced),
            ("time_independent", ClassifierKind::TimeIndependent),
        ] {
            let set = LabelledSet::new(c, kind)?;
            let ccfg = cfg.classifier_for(seed, 1);
            let mut progress = Progress::new(&format!("ablation {name}"), ccfg.iters as usize);
            let t = train_classifier(
                &set,
                &task,
                kind.time_dependent(),
                &ccfg,
                &dev,
                &mut progress,
            )?;
            ablations.push((
                name.to_string(),
                stack0.with(StackedClassifier::from_checkpoint(&t.checkpoint)?),
            ));
        }
    }

    // Distillation of iteration 1 and the last.
    let mut distilled = Vec::new();
    for k in [1, cfg.iterations]
        .into_iter()
        .filter(|&k| cfg.distill.is_some() && k >= 1 && k < stacks.len())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let dcfg = cfg.distill.as_ref().expect("filtered on");
        let mut progress = Progress::new(&format!("distil {k}"), dcfg.iters as usize);
        let s = &stacks[k];
        let ck = distill(
            &s.guided(&dev)?,
            &train_data,
            &|_| Ok(Cond::none()),
            &s.base_config,
            Some(&s.base),
            dcfg,
            None,
            &dev,
            &mut progress,
        )?;
        ck.save(out.join(format!("distilled_{k}.safetensors")))?;
        distilled.push((format!("distilled_{k}"), ck));
    }

    // Evaluation.
    let mut models: Vec<(String, Model)> =
        vec![("baseline".into(), Model::Stack(Box::new(stack0)))];
    for (k, s) in stacks.into_iter().enumerate().skip(1) {
        models.push((format!("genneg_{k}"), Model::Stack(Box::new(s))));
    }
    models.extend(distilled.into_iter().map(|(n, c)| (n, Model::Distilled(c))));
    models.extend(
        ablations
            .into_iter()
            .map(|(n, s)| (n, Model::Stack(Box::new(s)))),
    );
    let rows = models
        .iter()
        .map(|(name, m)| {
            evaluate(
                name,
                m,
                &sampler,
                &sigmas,
                cfg.samples,
                &held,
                seed.wrapping_add(7),
                &out,
                &dev,
            )
        })
        .collect::<candle_core::Result<Vec<_>>>()?;

    print_table(&rows);
    plot_iterations(&out, &rows, cfg.iterations)?;
    if let Some(p) = &args.common.json {
        let report = Report {
            models: rows,
            mmd_bandwidth: MMD_BANDWIDTH,
            delta: DELTA,
            iterations: logs,
        };
        write_json(p, &report)?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}
