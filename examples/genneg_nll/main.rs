//! Where a Gen-neG model's held-out NLL outliers are, and why: per-point NLL of saved
//! stacks (from `genneg_checkerboard`) on the held-out checkerboard points, the points
//! above a threshold with their distance to the nearest square edge and to the board's
//! border, and what each stacked classifier says there (log C at σ_min).
//!
//!     cargo run --release --example genneg_nll -- out/genneg_checkerboard/genneg_1.safetensors out/genneg_checkerboard/genneg_5.safetensors

use candle_core::{DType, Tensor};
use clap::Parser;
use scoreguide::checkerboard::nll::{
    distances, gated, log_c, mean, median, outliers, print_diagnosis, ModelReport,
};
use scoreguide::data::checkerboard;
use scoreguide::genneg::Stack;
use scoreguide::metrics::{negative_log_likelihood, NllConfig};
use scoreguide::runtime::{write_json, CommonArgs};
use scoreguide::train::Checkpoint;
use std::path::PathBuf;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Held-out NLL outliers of Gen-neG stacks: where they are and why")]
struct Args {
    /// Stack checkpoints written by genneg_checkerboard (genneg_K.safetensors).
    stacks: Vec<PathBuf>,
    /// Held-out points (the first N of the example's held-out set).
    #[arg(long, default_value_t = 1_000)]
    points: usize,
    /// NLL above this (nats) is an outlier.
    #[arg(long, default_value_t = 10.0)]
    threshold: f64,
    /// Diagnostic: also evaluate each stack with its classifiers switched off above this
    /// noise level (repeatable), to see which noise levels the NLL change comes from.
    #[arg(long)]
    guidance_sigma_max: Vec<f64>,
    /// With `--guidance-sigma-max`: also draw this many samples of each gated model and
    /// report its infraction rate (same sampler and seed as genneg_checkerboard).
    #[arg(long, default_value_t = 0)]
    infraction_samples: usize,
    /// Heun steps for those samples (genneg_checkerboard's full-mode value).
    #[arg(long, default_value_t = 64)]
    sample_steps: usize,
    /// How many of the largest NLL increases to list.
    #[arg(long, default_value_t = 8)]
    top: usize,
    /// RK4 steps of the probability-flow ODE (the example's value).
    #[arg(long, default_value_t = 40)]
    steps: usize,
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> candle_core::Result<()> {
    let args = Args::parse();
    scoreguide::runtime::on_compute_threads(args.common.threads, || run(args))
}

fn run(args: Args) -> candle_core::Result<()> {
    let dev = args.common.setup()?;
    if args.stacks.is_empty() {
        candle_core::bail!("give at least one stack checkpoint");
    }
    let held = checkerboard(args.points, scoreguide::checkerboard::HELD_OUT_SEED)?
        .to_dtype(DType::F64)?
        .to_device(&dev)?;
    let pts: Vec<[f64; 2]> = held
        .to_vec2::<f64>()?
        .into_iter()
        .map(|r| [r[0], r[1]])
        .collect();
    let cfg = NllConfig {
        steps: args.steps,
        ..NllConfig::default()
    };
    let sigma_min = Tensor::full(cfg.sigma_min, args.points, &dev)?;
    let mut baseline_nll: Option<Vec<f64>> = None;
    let mut reports = Vec::new();
    let (edge_all, border_all): (Vec<f64>, Vec<f64>) = pts.iter().map(|p| distances(*p)).unzip();
    println!(
        "held-out points: {}; mean distance to a square edge {:.3}, to the border {:.3}",
        args.points,
        mean(&edge_all),
        mean(&border_all)
    );
    for path in &args.stacks {
        let stack = Stack::from_checkpoint(&Checkpoint::load(path)?)
            .map_err(|e| candle_core::Error::msg(format!("{}: {e}", path.display())))?;
        if baseline_nll.is_none() {
            let t = std::time::Instant::now();
            let base = stack.truncated(0).guided_as(DType::F64, &dev)?;
            baseline_nll = Some(negative_log_likelihood(&base, &held, &cfg)?);
            eprintln!("baseline NLL in {:.0}s", t.elapsed().as_secs_f64());
        }
        let base_nll = baseline_nll.as_ref().expect("computed above");
        let t = std::time::Instant::now();
        let nll = negative_log_likelihood(&stack.guided_as(DType::F64, &dev)?, &held, &cfg)?;
        for &cut in &args.guidance_sigma_max {
            let g = gated(&stack, cut);
            let g_nll = negative_log_likelihood(&g.guided_as(DType::F64, &dev)?, &held, &cfg)?;
            let infraction = if args.infraction_samples > 0 {
                let model = g.guided(&dev)?;
                let x = scoreguide::checkerboard::sample(
                    &model,
                    args.infraction_samples,
                    args.sample_steps,
                    args.common.seed.wrapping_add(7),
                    10_000,
                    &dev,
                    &format!("gated at {cut}: sampling"),
                )?;
                let (rate, _) = scoreguide::checkerboard::label(&x)?;
                format!(
                    ", infraction {:.3}% [{:.3}, {:.3}]",
                    100.0 * rate.rate,
                    100.0 * rate.ci95.0,
                    100.0 * rate.ci95.1
                )
            } else {
                String::new()
            };
            println!(
                "{} with guidance only at σ ≤ {cut}: NLL mean {:.4}, median {:.4}, above {}: {}{infraction}",
                path.display(),
                mean(&g_nll),
                median(&g_nll),
                args.threshold,
                g_nll.iter().filter(|v| **v > args.threshold).count()
            );
        }
        eprintln!(
            "{}: NLL in {:.0}s",
            path.display(),
            t.elapsed().as_secs_f64()
        );
        let log_c = log_c(&stack, &held, &sigma_min, &dev)?;
        let outliers = outliers(&pts, &nll, base_nll, &log_c, args.threshold);
        let inliers: Vec<f64> = nll
            .iter()
            .copied()
            .filter(|v| *v <= args.threshold)
            .collect();
        println!();
        println!(
            "{} ({} classifiers): NLL mean {:.4}, median {:.4}; baseline mean {:.4}, median {:.4}; {} points above {} nats (mean without them {:.4})",
            path.display(),
            stack.classifiers.len(),
            mean(&nll),
            median(&nll),
            mean(base_nll),
            median(base_nll),
            outliers.len(),
            args.threshold,
            mean(&inliers)
        );
        print_diagnosis(&pts, &nll, base_nll, &log_c, &outliers, args.top);
        reports.push(ModelReport {
            path: path.display().to_string(),
            classifiers: stack.classifiers.len(),
            nll_mean: mean(&nll),
            nll_median: median(&nll),
            nll_mean_without_outliers: mean(&inliers),
            outliers,
        });
    }
    if let Some(p) = &args.common.json {
        write_json(p, &reports)?;
    }
    Ok(())
}
