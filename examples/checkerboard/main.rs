//! Gen-neG's checkerboard baseline (paper §4.1, App. B.1): an EDM model trained on 1000
//! points of the checkerboard's white squares still puts mass on the black ones. See
//! README.md beside this file.

use clap::Parser;
use scoreguide::checkerboard::{
    label, load_baseline, sample, scatter_png, train_baseline, CheckerboardConfig,
};
use scoreguide::config::{save_resolved, ConfigArgs};
use scoreguide::runtime::{write_json, CommonArgs};
use scoreguide::train::{Checkpoint, Progress, Staged};
use serde::Serialize;
use std::path::PathBuf;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Gen-neG checkerboard baseline: train, sample, count infractions")]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    common: CommonArgs,
    /// Sample from this checkpoint instead of training.
    #[arg(long)]
    load: Option<PathBuf>,
    /// Continue the training state saved in the output folder (`save_every`).
    #[arg(long)]
    resume: bool,
}

#[derive(Serialize)]
struct Report {
    infraction_rate: f64,
    infraction_ci95: [f64; 2],
    n_samples: usize,
    train_iters: u64,
    train_seconds: f64,
    sample_seconds: f64,
}

fn main() -> candle_core::Result<()> {
    let args = Args::parse();
    scoreguide::runtime::on_compute_threads(args.common.threads, || run(args))
}

fn run(args: Args) -> candle_core::Result<()> {
    let cfg = args
        .config
        .resolve::<CheckerboardConfig>()?
        .seeded(args.common.seed);
    let dev = args.common.setup()?;
    let out = args.common.out_dir("checkerboard");
    save_resolved(&cfg, &out)?;

    let baseline = match &args.load {
        Some(path) => {
            let b = load_baseline(path, &dev)?;
            let steps: u64 = b.checkpoint.meta("step")?;
            eprintln!("loaded {} (trained {steps} steps)", path.display());
            b
        }
        None => {
            let path = out.join("baseline.safetensors");
            let partial = out.join("baseline.partial.safetensors");
            let resume = match args.resume && partial.exists() {
                true => Some(Checkpoint::load(&partial)?),
                false => None,
            };
            let every = match cfg.save_every {
                0 => cfg.baseline.iters.max(1),
                n => n,
            };
            let mut save = |c: &Checkpoint| c.save(&partial);
            let staged = Staged {
                resume: resume.as_ref(),
                save_every: every,
                save: &mut save,
            };
            let mut progress = Progress::new("train", cfg.baseline.iters as usize);
            let b = train_baseline(&cfg.baseline, Some(staged), &dev, &mut progress)?;
            b.checkpoint.save(&path)?;
            std::fs::remove_file(&partial).ok();
            eprintln!(
                "trained {} steps in {:.1}s; checkpoint {}",
                cfg.baseline.iters,
                b.train_seconds,
                path.display()
            );
            b
        }
    };
    let train_iters: u64 = baseline.checkpoint.meta("step")?;

    let start = std::time::Instant::now();
    let x = sample(
        &baseline.model,
        cfg.samples,
        cfg.steps,
        args.common.seed.wrapping_add(1),
        cfg.sample_batch,
        &dev,
        "sample",
    )?;
    let sample_seconds = start.elapsed().as_secs_f64();
    let (rate, verdicts) = label(&x)?;

    println!();
    println!("| model    | samples | infraction % | 95% interval     | train iters | train s | sample s |");
    println!("|----------|---------|--------------|------------------|-------------|---------|----------|");
    println!(
        "| baseline | {:>7} | {:>12.3} | [{:>6.3}, {:>6.3}] | {:>11} | {:>7.1} | {:>8.1} |",
        cfg.samples,
        100.0 * rate.rate,
        100.0 * rate.ci95.0,
        100.0 * rate.ci95.1,
        train_iters,
        baseline.train_seconds,
        sample_seconds
    );

    let png = out.join("baseline_samples.png");
    let title = format!(
        "baseline: {:.2}% infractions ({} samples)",
        100.0 * rate.rate,
        cfg.samples
    );
    scatter_png(&png, &title, &x, &verdicts, 20_000)?;
    eprintln!("wrote {}", png.display());

    if let Some(path) = &args.common.json {
        write_json(
            path,
            &Report {
                infraction_rate: rate.rate,
                infraction_ci95: [rate.ci95.0, rate.ci95.1],
                n_samples: cfg.samples,
                train_iters,
                train_seconds: baseline.train_seconds,
                sample_seconds,
            },
        )?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
