//! Speed of the image U-Net (`UNetConfig::small_grey`, 28 × 28 × 1, and
//! `UNetConfig::small_colour`, 32 × 32 × 3): a training step (DSM with EDM weighting +
//! backward + Adam + EMA, batch 64) and a sampling step (one Heun step = 2 evaluations,
//! batch 64, frozen weights); and the noise-conditioned ResNet-18 classifier (width 32,
//! 28 × 28 × 1, 10 classes): log p(y | x; σ) and its input gradient, what classifier
//! guidance runs per evaluation. Each with 1 and 2 CPU threads in its own process. Prints
//! medians; not a test (compare ratios within one run). `benches/torch/unet.py` is its
//! PyTorch twin and `benches/compare.py --networks images` runs the two alternately.
//!
//!     cargo run --release --example bench_images
//!     cargo run --release --example bench_images -- --json out/bench_images.json
//!     cargo run --release --example bench_images -- --inception
//!
//! `--inception` measures the FID Inception instead (features of a batch of 299 × 299
//! images, per image; `scoreguide inception install` first); its PyTorch twin is
//! `benches/torch/inception.py`, which runs the reference TorchScript itself.

use candle_core::{DType, Device, Tensor};
use clap::Parser;
use scoreguide::guidance::Cond;
use scoreguide::guidance::LogProb;
use scoreguide::losses::{dsm, DsmWeighting};
use scoreguide::nets::{
    ClassifierConfig, NetConfig, ParamStore, Precond, ResNetConfig, ScoreModelConfig, UNetConfig,
};
use scoreguide::runtime::{heun_step_ms, measure_in_workers, median_ms};
use scoreguide::sde::SigmaDistribution;
use scoreguide::train::{TrainConfig, Trainer};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Thread counts to measure, each in its own process.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Timed repetitions per measurement (the median is reported).
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// Images per batch (default 64; 16 with `--inception`).
    #[arg(long)]
    batch: Option<usize>,
    /// Measure only the 28 × 28 × 1 network (the colour one takes four times longer).
    #[arg(long)]
    grey_only: bool,
    /// Measure the FID Inception's features instead (batch `--batch`, default 16 here).
    #[arg(long)]
    inception: bool,
    #[arg(long)]
    json: Option<PathBuf>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Internal: measure in this process with this many threads and print JSON.
    #[arg(long, hide = true)]
    worker: Option<usize>,
}

#[derive(Serialize, Deserialize, Clone)]
struct InceptionTiming {
    threads: usize,
    batch: usize,
    /// FID Inception pool features of a [batch, 3, 299, 299] input, per image.
    inception_ms_per_image: f64,
}

fn measure_inception(
    threads: usize,
    batch: usize,
    reps: usize,
    dev: &Device,
) -> candle_core::Result<InceptionTiming> {
    let net = scoreguide::inception::FidInception::from_cache(dev)?;
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(2);
    let x = scoreguide::sde::randn(&mut rng, &[batch, 3, 299, 299], dev)?.tanh()?;
    let ms = median_ms(reps, || net.features(&x).map(|_| ()))?;
    Ok(InceptionTiming {
        threads,
        batch,
        inception_ms_per_image: ms / batch as f64,
    })
}

#[derive(Serialize, Deserialize, Clone)]
struct Timing {
    threads: usize,
    batch: usize,
    grey_train_step_ms: f64,
    grey_sample_step_ms: f64,
    grey_params: usize,
    /// ResNet-18 (width 32) log p(y | x; σ) and ∇x of it, batch 64 of 28 × 28 × 1.
    resnet_grad_x_ms: f64,
    resnet_params: usize,
    /// None with `--grey-only`.
    colour_train_step_ms: Option<f64>,
    colour_sample_step_ms: Option<f64>,
    colour_params: Option<usize>,
}

/// (train step, Heun step, parameters) of one U-Net.
fn measure_unet(
    net: UNetConfig,
    batch: usize,
    reps: usize,
    dev: &Device,
) -> candle_core::Result<(f64, f64, usize)> {
    let dim = net.in_dim();
    let cfg = ScoreModelConfig {
        net: NetConfig::UNet(net),
        precond: Precond::edm(),
    };
    let store = ParamStore::new(0);
    let model = cfg.build(&store.var_builder(DType::F32, dev))?;
    let params = store.num_params();
    // Fixed images in [−1, 1] (the speed does not depend on what they show).
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
    let x0 = scoreguide::sde::randn(&mut rng, &[batch, dim], dev)?.tanh()?;
    let mut trainer = Trainer::new(store.clone(), TrainConfig::default())?;
    let sigmas = SigmaDistribution::LogUniform {
        min: 2e-3,
        max: 80.0,
    };
    let train_ms = median_ms(reps, || {
        let mut rng = trainer.step_rng();
        let sigma = sigmas.sample_tensor(batch, &mut rng, dev)?;
        let z = scoreguide::sde::randn(&mut rng, &[batch, dim], dev)?;
        let loss = dsm(
            &model,
            &x0,
            &sigma,
            &z,
            &Cond::none(),
            DsmWeighting::Edm { sigma_data: 1.0 },
        )?;
        trainer.step(&loss).map(|_| ())
    })?;
    let frozen = cfg.build(&store.frozen_var_builder(DType::F32, dev)?)?;
    let x = scoreguide::sde::randn(&mut rng, &[batch, dim], dev)?;
    let sample_ms = heun_step_ms(&frozen, &x, &Cond::none(), 0.5, 0.45, reps)?;
    Ok((train_ms, sample_ms, params))
}

/// (fwd + ∇x, parameters) of the noise-conditioned ResNet-18 classifier.
fn measure_resnet(batch: usize, reps: usize, dev: &Device) -> candle_core::Result<(f64, usize)> {
    let cfg =
        ClassifierConfig::categorical(NetConfig::ResNet(ResNetConfig::resnet18(1, 28, 10, 32)));
    let store = ParamStore::new(0);
    cfg.build(&store.var_builder(DType::F32, dev))?;
    let params = store.num_params();
    let classifier = cfg.build(&store.frozen_var_builder(DType::F32, dev)?)?;
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
    let x = scoreguide::sde::randn(&mut rng, &[batch, 784], dev)?;
    let sigma = Tensor::full(0.5f32, batch, dev)?;
    let labels: Vec<u32> = (0..batch as u32).map(|i| i % 10).collect();
    let cond = Cond::labels(Tensor::from_vec(labels, batch, dev)?);
    // What guidance does for a network without a hand-written input gradient.
    let ms = median_ms(reps, || {
        let xv = candle_core::Var::from_tensor(&x)?;
        let lp = classifier.log_prob_with(xv.as_tensor(), &sigma, &cond)?;
        let g = lp.sum_all()?.backward()?;
        g.get(xv.as_tensor())
            .map(|_| ())
            .ok_or_else(|| candle_core::Error::msg("no input gradient"))
    })?;
    Ok((ms, params))
}

fn measure(
    threads: usize,
    reps: usize,
    batch: usize,
    grey_only: bool,
    dev: &Device,
) -> candle_core::Result<Timing> {
    if batch == 0 || reps == 0 {
        candle_core::bail!("--batch and --reps must be positive, got {batch} and {reps}");
    }
    let (gt, gs, gp) = measure_unet(UNetConfig::small_grey(), batch, reps, dev)?;
    let (rg, rp) = measure_resnet(batch, reps, dev)?;
    let (ct, cs, cp) = match grey_only {
        true => (None, None, None),
        false => {
            let (t, s, p) = measure_unet(UNetConfig::small_colour(), batch, reps, dev)?;
            (Some(t), Some(s), Some(p))
        }
    };
    Ok(Timing {
        threads,
        batch,
        grey_train_step_ms: gt,
        grey_sample_step_ms: gs,
        grey_params: gp,
        resnet_grad_x_ms: rg,
        resnet_params: rp,
        colour_train_step_ms: ct,
        colour_sample_step_ms: cs,
        colour_params: cp,
    })
}

fn main() -> candle_core::Result<()> {
    let args = Args::parse();
    let batch = args.batch.unwrap_or(if args.inception { 16 } else { 64 });
    if let (Some(t), true) = (args.worker, args.inception) {
        let timing = scoreguide::runtime::on_compute_threads(Some(t), || {
            let dev = scoreguide::runtime::device(&args.device)?;
            measure_inception(t, batch, args.reps, &dev)
        })?;
        println!(
            "{}",
            serde_json::to_string(&timing).expect("timing serialises")
        );
        return Ok(());
    }
    if let Some(t) = args.worker {
        let timing = scoreguide::runtime::on_compute_threads(Some(t), || {
            let dev = scoreguide::runtime::device(&args.device)?;
            measure(t, args.reps, batch, args.grey_only, &dev)
        })?;
        println!(
            "{}",
            serde_json::to_string(&timing).expect("timing serialises")
        );
        return Ok(());
    }
    let mut worker_args = vec![
        "--reps".to_string(),
        args.reps.to_string(),
        "--batch".to_string(),
        batch.to_string(),
        "--device".to_string(),
        args.device.clone(),
    ];
    if args.grey_only {
        worker_args.push("--grey-only".into());
    }
    if args.inception {
        worker_args.push("--inception".into());
        let rows: Vec<InceptionTiming> = measure_in_workers(&args.threads, &worker_args)?;
        println!("FID Inception features, batch {batch} of 299 × 299 × 3");
        println!("| threads | ms per image |");
        println!("|---|---|");
        for r in &rows {
            println!("| {} | {:.1} |", r.threads, r.inception_ms_per_image);
        }
        if let Some(p) = &args.json {
            scoreguide::runtime::write_json(p, &rows)?;
        }
        return Ok(());
    }
    let rows: Vec<Timing> = measure_in_workers(&args.threads, &worker_args)?;
    let ms = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.1}"));
    println!(
        "U-Nets: 28 × 28 × 1 {} parameters, 32 × 32 × 3 {} parameters; batch {}",
        rows[0].grey_params,
        rows[0]
            .colour_params
            .map_or("–".to_string(), |p| p.to_string()),
        rows[0].batch
    );
    println!(
        "ResNet-18 classifier (width 32): {} parameters",
        rows[0].resnet_params
    );
    println!("| threads | 28² train step (ms) | 28² Heun step (ms) | ResNet fwd + ∇x (ms) | 32²×3 train step (ms) | 32²×3 Heun step (ms) |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {} | {} |",
            r.threads,
            r.grey_train_step_ms,
            r.grey_sample_step_ms,
            r.resnet_grad_x_ms,
            ms(r.colour_train_step_ms),
            ms(r.colour_sample_step_ms)
        );
    }
    if let Some(p) = &args.json {
        scoreguide::runtime::write_json(p, &rows)?;
    }
    Ok(())
}
