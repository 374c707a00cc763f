//! Where a Gen-neG model's held-out NLL outliers are, and why: per-point NLL of saved
//! stacks (from `genneg_checkerboard`) on the held-out checkerboard points, the points
//! above a threshold with their distance to the nearest square edge and to the board's
//! border, and what each stacked classifier says there (log C at σ_min).
//!
//!     cargo run --release --example genneg_nll -- out/genneg_checkerboard/genneg_1.safetensors out/genneg_checkerboard/genneg_5.safetensors

use candle_core::{DType, Tensor};
use clap::Parser;
use scoreguide::data::checkerboard;
use scoreguide::genneg::Stack;
use scoreguide::guidance::{Gated, LogProb};
use scoreguide::metrics::{negative_log_likelihood, NllConfig};
use scoreguide::nets::Classifier;
use scoreguide::runtime::{write_json, CommonArgs};
use scoreguide::train::Checkpoint;
use serde::Serialize;
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

#[derive(Serialize)]
struct Outlier {
    x: [f64; 2],
    nll: f64,
    baseline_nll: f64,
    edge_distance: f64,
    border_distance: f64,
    /// log C_k(x; σ_min) for each stacked classifier.
    log_c: Vec<f64>,
}

#[derive(Serialize)]
struct ModelReport {
    path: String,
    classifiers: usize,
    nll_mean: f64,
    nll_median: f64,
    nll_mean_without_outliers: f64,
    outliers: Vec<Outlier>,
}

/// Distance to the nearest square edge (a multiple of 2 in x or y inside the board) and
/// to the board's border at ±4.
fn distances(p: [f64; 2]) -> (f64, f64) {
    let edge = p
        .iter()
        .map(|v| {
            let r = v.rem_euclid(2.0);
            r.min(2.0 - r)
        })
        .fold(f64::INFINITY, f64::min);
    let border = p
        .iter()
        .map(|v| 4.0 - v.abs())
        .fold(f64::INFINITY, f64::min);
    (edge, border)
}

/// The stack's base and time-dependent classifiers, each classifier gated at
/// `sigma_max`, with weights in `dtype`.
fn gated_stack(
    stack: &Stack,
    sigma_max: f64,
    dtype: DType,
    dev: &candle_core::Device,
) -> candle_core::Result<scoreguide::guidance::Guided<'static>> {
    let vb = |t: &std::collections::BTreeMap<String, Tensor>| {
        candle_nn::VarBuilder::from_tensors(
            t.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            dtype,
            dev,
        )
    };
    let base = stack.base_config.build(&vb(&stack.base))?;
    let mut g = scoreguide::guidance::Guided::new(base);
    for c in &stack.classifiers {
        if c.time_independent.is_some() {
            candle_core::bail!("gating supports time-dependent classifiers only");
        }
        let term: Classifier = c.config.build(&vb(&c.tensors))?;
        g.push(c.weight, Gated::new(term, sigma_max));
    }
    Ok(g)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

fn main() -> candle_core::Result<()> {
    let args = Args::parse();
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
            let gated = gated_stack(&stack, cut, DType::F64, &dev)?;
            let g_nll = negative_log_likelihood(&gated, &held, &cfg)?;
            let infraction = if args.infraction_samples > 0 {
                let model = gated_stack(&stack, cut, DType::F32, &dev)?;
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
        let log_c: Vec<Vec<f64>> = stack
            .classifiers
            .iter()
            .map(|c| -> candle_core::Result<Vec<f64>> {
                let vb = candle_nn::VarBuilder::from_tensors(
                    c.tensors
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                    DType::F64,
                    &dev,
                );
                let clf: Classifier = c.config.build(&vb)?;
                clf.log_prob(&held, &sigma_min)?.to_vec1::<f64>()
            })
            .collect::<candle_core::Result<_>>()?;
        let outliers: Vec<Outlier> = (0..args.points)
            .filter(|&i| nll[i] > args.threshold)
            .map(|i| {
                let (edge_distance, border_distance) = distances(pts[i]);
                Outlier {
                    x: pts[i],
                    nll: nll[i],
                    baseline_nll: base_nll[i],
                    edge_distance,
                    border_distance,
                    log_c: log_c.iter().map(|c| c[i]).collect(),
                }
            })
            .collect();
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
        if !outliers.is_empty() {
            println!("| x | y | NLL | baseline NLL | to edge | to border | log C_k(x; σ_min) |");
            println!("|---|---|---|---|---|---|---|");
            for o in &outliers {
                let lc: Vec<String> = o.log_c.iter().map(|v| format!("{v:.2}")).collect();
                println!(
                    "| {:.3} | {:.3} | {:.2} | {:.2} | {:.3} | {:.3} | {} |",
                    o.x[0],
                    o.x[1],
                    o.nll,
                    o.baseline_nll,
                    o.edge_distance,
                    o.border_distance,
                    lc.join(", ")
                );
            }
        }
        // Where the change in NLL comes from: Σ_k log C_k at σ_min against the NLL change.
        let dn: Vec<f64> = nll.iter().zip(base_nll).map(|(a, b)| a - b).collect();
        let sum_lc: Vec<f64> = (0..args.points)
            .map(|i| log_c.iter().map(|c| c[i]).sum::<f64>())
            .collect();
        let corr = {
            let (ma, mb) = (mean(&dn), mean(&sum_lc));
            let cov: f64 = dn
                .iter()
                .zip(&sum_lc)
                .map(|(a, b)| (a - ma) * (b - mb))
                .sum();
            let va: f64 = dn.iter().map(|a| (a - ma).powi(2)).sum();
            let vb: f64 = sum_lc.iter().map(|b| (b - mb).powi(2)).sum();
            cov / (va * vb).sqrt()
        };
        println!(
            "NLL change vs baseline: mean {:+.4}; correlation with Σ_k log C_k(x; σ_min): {corr:.3}",
            mean(&dn)
        );
        // Which points carry the mean's change: the largest increases, and how the
        // change splits between points near a square edge and the rest.
        let mut order: Vec<usize> = (0..args.points).collect();
        order.sort_by(|&a, &b| dn[b].total_cmp(&dn[a]));
        println!("largest NLL increases:");
        println!("| x | y | NLL | baseline NLL | to edge | to border | Σ log C_k |");
        println!("|---|---|---|---|---|---|---|");
        for &i in order.iter().take(args.top) {
            let (e, b) = distances(pts[i]);
            println!(
                "| {:.3} | {:.3} | {:.2} | {:.2} | {:.3} | {:.3} | {:.2} |",
                pts[i][0], pts[i][1], nll[i], base_nll[i], e, b, sum_lc[i]
            );
        }
        for cut in [0.05, 0.1, 0.2] {
            let (near, far): (Vec<usize>, Vec<usize>) =
                (0..args.points).partition(|&i| edge_all[i] < cut);
            let part = |ix: &[usize]| ix.iter().map(|&i| dn[i]).sum::<f64>() / args.points as f64;
            println!(
                "points within {cut} of a square edge: {} of {}, contributing {:+.4} of the mean change (the rest {:+.4})",
                near.len(),
                args.points,
                part(&near),
                part(&far)
            );
        }
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
