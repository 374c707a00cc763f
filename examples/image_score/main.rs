//! An image score model: the U-Net of `UNetConfig` trained with DSM on Fashion-MNIST
//! (or CIFAR-10/100 from a folder of their batches), in stages that resume exactly
//! (`--reuse`), then sampled with EDM's Heun sampler into a PNG grid. See README.md
//! beside this file.

use clap::Parser;
use scoreguide::config::{save_resolved, ConfigArgs};
use scoreguide::images::{
    load_image_score, sample_images, save_first_images, train_image_score_in, ImageScoreConfig,
};
use scoreguide::runtime::{write_json, CommonArgs};
use scoreguide::train::{Checkpoint, Progress};
use serde::Serialize;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Train a U-Net score model on images and sample it")]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    common: CommonArgs,
    /// Reuse a finished model in the output directory, or continue its saved state.
    #[arg(long)]
    reuse: bool,
    /// Stop after training (sample in a later `--reuse` run).
    #[arg(long)]
    train_only: bool,
    /// Sample the last saved state of an unfinished run (its EMA weights) without
    /// training; the run continues later with `--reuse`.
    #[arg(long)]
    sample_partial: bool,
}

#[derive(Serialize)]
struct Report {
    dataset: String,
    train_images: usize,
    params: usize,
    iters: u64,
    /// Wall time of this run's training (0 when the model was reused).
    train_seconds: f64,
    samples: usize,
    sampler_steps: usize,
    sample_seconds_per_image: f64,
}

fn main() -> candle_core::Result<()> {
    let args = Args::parse();
    scoreguide::runtime::on_compute_threads(args.common.threads, || run(args))
}

fn run(args: Args) -> candle_core::Result<()> {
    let mut cfg: ImageScoreConfig = args.config.resolve()?;
    cfg.seed = args.common.seed;
    let dev = args.common.setup()?;
    let out = args.common.out_dir("image_score");
    save_resolved(&cfg, &out)?;
    let set = cfg.training_set()?;
    eprintln!(
        "{:?}: {} training images of {}×{}×{}",
        cfg.data,
        set.len(),
        set.channels,
        set.size,
        set.size
    );

    let partial = out.join("score.partial.safetensors");
    let t0 = Instant::now();
    let ckpt = if args.sample_partial {
        if !partial.exists() {
            candle_core::bail!("--sample-partial: no saved state at {}", partial.display());
        }
        eprintln!("sampling the saved state {}", partial.display());
        Checkpoint::load(&partial)?
    } else {
        train_image_score_in(&cfg, &set, &out, args.reuse, &dev)?
    };
    let train_seconds = t0.elapsed().as_secs_f64();
    let params: usize = ckpt.section("ema").values().map(|t| t.elem_count()).sum();
    let step = ckpt.meta::<u64>("step").unwrap_or(cfg.iters);
    eprintln!(
        "score model: {params} parameters, {step} of {} steps",
        cfg.iters
    );
    if args.train_only {
        return Ok(());
    }

    let model = load_image_score(&ckpt, &dev)?;
    let batches = cfg.samples.div_ceil(cfg.batch.min(cfg.samples));
    let mut progress = Progress::new("sampling", batches * cfg.sampler_steps);
    let t1 = Instant::now();
    let x = sample_images(
        &cfg,
        &model,
        cfg.samples,
        args.common.seed,
        &dev,
        &mut progress,
    )?;
    let per_image = t1.elapsed().as_secs_f64() / cfg.samples as f64;
    // Every sample for `scoreguide metrics --fake`, the first 100 in the grid.
    let array = out.join("samples.safetensors");
    let mut samples = Checkpoint::new();
    samples.tensors.insert("images".into(), x.clone());
    samples.save(&array)?;
    let png = out.join("samples.png");
    let shown = save_first_images(&png, &x, cfg.unet.channels, cfg.unet.size, 100)?;
    let real = set.take(shown)?;
    save_first_images(
        &out.join("data.png"),
        real.images.tensor(),
        set.channels,
        set.size,
        shown,
    )?;
    eprintln!(
        "wrote {} (and data.png, real images) and {} — {per_image:.2} s per image",
        png.display(),
        array.display()
    );
    if let Some(p) = &args.common.json {
        write_json(
            p,
            &Report {
                dataset: format!("{:?}", cfg.data),
                train_images: set.len(),
                params,
                iters: step,
                train_seconds,
                samples: cfg.samples,
                sampler_steps: cfg.sampler_steps,
                sample_seconds_per_image: per_image,
            },
        )?;
    }
    Ok(())
}
