//! Gen-neG's checkerboard baseline (paper §4.1, App. B.1): an EDM model trained on 1000
//! points of the checkerboard's white squares still puts mass on the black ones. Trains
//! it (30k full-batch Adam steps), samples 100k points with 100 Heun steps (churn 10,
//! log-linear σ grid), prints the infraction rate, writes a scatter PNG and a checkpoint.
//!
//!     cargo run --release --example checkerboard             # full run
//!     cargo run --release --example checkerboard -- --quick  # a few hundred steps
//!     cargo run --release --example checkerboard -- --load out/checkerboard/baseline.safetensors

use clap::Parser;
use scoreguide::checkerboard::{
    label, load_baseline, sample, scatter_png, train_baseline, BaselineConfig,
};
use scoreguide::runtime::{device, set_threads, write_json};
use scoreguide::train::Progress;
use serde::Serialize;
use std::path::PathBuf;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Gen-neG checkerboard baseline: train, sample, count infractions")]
struct Args {
    /// A few hundred training steps and 10k samples, for a check in minutes.
    #[arg(long)]
    quick: bool,
    /// Training iterations (default 30000, or 400 with --quick).
    #[arg(long)]
    iters: Option<u64>,
    /// Samples to draw (default 100000, or 10000 with --quick).
    #[arg(long)]
    samples: Option<usize>,
    /// Heun steps.
    #[arg(long, default_value_t = 100)]
    steps: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory for the PNG and the checkpoint.
    #[arg(long, default_value = "out/checkerboard")]
    out: PathBuf,
    /// Sample from this checkpoint instead of training.
    #[arg(long)]
    load: Option<PathBuf>,
    /// Write machine-readable results here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// CPU threads (default: RAYON_NUM_THREADS, else every core).
    #[arg(long)]
    threads: Option<usize>,
    /// Samples per sampling batch.
    #[arg(long, default_value_t = 10_000)]
    batch: usize,
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
    let threads = set_threads(args.threads);
    let dev = device(&args.device)?;
    let n_samples = args
        .samples
        .unwrap_or(if args.quick { 10_000 } else { 100_000 });
    let mut cfg = BaselineConfig {
        iters: args.iters.unwrap_or(if args.quick { 400 } else { 30_000 }),
        data_seed: args.seed,
        ..BaselineConfig::default()
    };
    cfg.train.seed = args.seed;
    eprintln!("checkerboard: device {}, {threads} thread(s)", args.device);

    let baseline = match &args.load {
        Some(path) => {
            let b = load_baseline(path, &dev)?;
            eprintln!(
                "loaded {} (trained {} steps)",
                path.display(),
                b.checkpoint.meta::<u64>("step")?
            );
            b
        }
        None => {
            let mut progress = Progress::new("train", cfg.iters as usize);
            let b = train_baseline(&cfg, &dev, &mut progress)?;
            let path = args.out.join("baseline.safetensors");
            scoreguide::runtime::ensure_parent(&path)?;
            b.checkpoint.save(&path)?;
            eprintln!(
                "trained {} steps in {:.1}s; checkpoint {}",
                cfg.iters,
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
        n_samples,
        args.steps,
        args.seed.wrapping_add(1),
        args.batch,
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
        n_samples,
        100.0 * rate.rate,
        100.0 * rate.ci95.0,
        100.0 * rate.ci95.1,
        train_iters,
        baseline.train_seconds,
        sample_seconds
    );

    let png = args.out.join("baseline_samples.png");
    let title = format!(
        "baseline: {:.2}% infractions ({} samples)",
        100.0 * rate.rate,
        n_samples
    );
    scatter_png(&png, &title, &x, &verdicts, 20_000)?;
    eprintln!("wrote {}", png.display());

    if let Some(path) = &args.json {
        write_json(
            path,
            &Report {
                infraction_rate: rate.rate,
                infraction_ci95: [rate.ci95.0, rate.ci95.1],
                n_samples,
                train_iters,
                train_seconds: baseline.train_seconds,
                sample_seconds,
            },
        )?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
