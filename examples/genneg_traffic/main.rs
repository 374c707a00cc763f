//! Traffic scenes (Gen-neG paper §4.2, Table 1) on our procedural stand-in data: the
//! baseline scene-transformer diffusion model, Gen-neG iterations with per-vehicle
//! IS-balanced classifiers, the ablations, the distillation of the last iteration, and
//! each model's collision / offroad / infraction rates and r-ELBO on held-out maps. See
//! README.md beside this file.

use clap::Parser;
use scoreguide::config::{save_resolved, ConfigArgs};
use scoreguide::runtime::{write_json, CommonArgs};
use scoreguide::traffic::run::{print_table, CheckReport, Row, TrafficRunConfig};
use scoreguide::traffic::stages::Run;
use serde::Serialize;
use std::path::PathBuf;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    about = "Gen-neG on traffic scenes: baseline, iterations, ablations, distillation, Table 1"
)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    common: CommonArgs,
    /// Reuse the baseline, classifiers and distilled model found in the output
    /// directory, and continue saved training states.
    #[arg(long)]
    reuse: bool,
    /// Reuse this baseline checkpoint instead of training one.
    #[arg(long)]
    baseline: Option<PathBuf>,
}

#[derive(Serialize)]
struct Report {
    models: Vec<Row>,
    train_scenes: usize,
    /// Scenes the models were evaluated on (from `eval_split`).
    eval_scenes: usize,
    /// The split `models` were evaluated on: "test" or "validation".
    eval_split: &'static str,
    /// The seeds as this run used them: data and baseline, Gen-neG, evaluation split.
    seed: u64,
    genneg_seed: u64,
    eval_seed: u64,
    labelled_per_second: f64,
    /// Each classifier's check on scenes held out from its training.
    classifier_checks: Vec<CheckReport>,
}

fn main() -> candle_core::Result<()> {
    let args = Args::parse();
    scoreguide::runtime::on_compute_threads(args.common.threads, || run(args))
}

fn run(args: Args) -> candle_core::Result<()> {
    let cfg: TrafficRunConfig = args.config.resolve()?;
    let dev = args.common.setup()?;
    let out = args.common.out_dir("genneg_traffic");
    save_resolved(&cfg, &out)?;
    let run = Run::new(cfg, args.common.seed, out, dev, args.reuse);

    let mut data = run.data(args.baseline.as_deref())?;
    let base = run.baseline(&mut data)?;
    let genneg = run.genneg(&data, &base)?;
    let distilled = run.distill(&data, &base, &genneg)?;
    let control = run.control(&data, &base)?;
    let rows = run.evaluate(&data, &base, &genneg, distilled.as_ref(), control.as_ref())?;

    print_table(&rows);
    if let Some(p) = &args.common.json {
        let report = Report {
            models: rows,
            train_scenes: data.train.set.len(),
            eval_scenes: data.test.set.len(),
            eval_split: run.cfg.eval.split.name(),
            seed: run.seed,
            genneg_seed: run.genneg_seed,
            eval_seed: run.eval_seed,
            labelled_per_second: data.labelled_per_second,
            classifier_checks: genneg.checks,
        };
        write_json(p, &report)?;
    }
    Ok(())
}
