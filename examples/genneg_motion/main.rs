//! Gen-neG on human motion (paper §4.3, Table 2) on our procedural stand-in for
//! HumanML3D: an MDM-style baseline, one Gen-neG iteration against ground penetration,
//! the ablations (w/o IS, imbalanced, time-independent), the distilled model, and each
//! model's infraction rates, r-ELBO, FID, KID and parallel samples needed over sampling
//! seeds. See README.md beside this file.

use clap::Parser;
use scoreguide::config::{save_resolved, ConfigArgs};
use scoreguide::motion::stages::{sampler_table, Run, SamplerRow};
use scoreguide::motion::{table, ModelRow, MotionRunConfig};
use scoreguide::runtime::{write_json, CommonArgs};
use serde::Serialize;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    about = "Gen-neG on human motion: baseline, Gen-neG iteration 1, ablations, distillation, Table 2"
)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    common: CommonArgs,
    /// Reuse the models, draws and scores found in the output directory, and continue
    /// saved training states.
    #[arg(long)]
    reuse: bool,
    /// Stop after the baseline and the motion encoder: draw from the baseline with the
    /// configured sampler and DDPM's ancestral one (`eval.sampler_comparison`) and print
    /// their infraction, the check before Gen-neG draws from it.
    #[arg(long)]
    check_baseline: bool,
}

#[derive(Serialize)]
struct Report<'a> {
    prediction: &'static str,
    train_motions: usize,
    test_motions: usize,
    /// α: the baseline's valid rate over Gen-neG's draws.
    alpha: f64,
    draws: usize,
    seed: u64,
    models: &'a [ModelRow],
    /// The baseline and genneg_1 with the configured sampler and DDPM's ancestral one.
    sampler_comparison: &'a [SamplerRow],
}

fn main() -> candle_core::Result<()> {
    let args = Args::parse();
    scoreguide::runtime::on_compute_threads(args.common.threads, || run(args))
}

fn run(args: Args) -> candle_core::Result<()> {
    let cfg: MotionRunConfig = args.config.resolve()?;
    let dev = args.common.setup()?;
    let out = args.common.out_dir("genneg_motion");
    save_resolved(&cfg, &out)?;
    let run = Run {
        cfg,
        out,
        dev,
        seed: args.common.seed,
        reuse: args.reuse,
    };
    if args.check_baseline {
        let (train, test) = run.data()?;
        let base = run.baseline(&train)?;
        let encoder = run.encoder(&train, &test)?;
        println!("| t | σ | MSE of D (per value) | MSE of x |\n|---|---|---|---|");
        for [t, sigma, d, x] in run.denoise_profile(&test, &base, 100)? {
            println!("| {t} | {sigma:.4} | {d:.5} | {x:.3e} |");
        }
        println!(
            "{}",
            sampler_table(&run.check_baseline(&test, &encoder, &base)?)
        );
        return Ok(());
    }
    let o = run.run_all()?;
    let samplers = run.compare_samplers(&o.test, &o.encoder, &o.models)?;
    println!("{}", table(&o.rows, run.cfg.eval.samples));
    if !samplers.is_empty() {
        println!("{}", sampler_table(&samplers));
    }
    if let Some(p) = &args.common.json {
        write_json(
            p,
            &Report {
                prediction: run.cfg.model.prediction.name(),
                train_motions: o.train.len(),
                test_motions: o.test.len(),
                alpha: o.models.alpha,
                draws: o.drawn,
                seed: run.seed,
                models: &o.rows,
                sampler_comparison: &samplers,
            },
        )?;
    }
    Ok(())
}
