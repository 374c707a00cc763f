//! Classification accuracy score (CAS, Ravuri & Vinyals 2019): a classifier of clean
//! images trained on labelled images and scored on the real test set. Trained on the
//! real training set it gives CAS's upper bound; trained on a model's labelled samples
//! (`--train FILE`, a safetensors file with `images` `[N, C·S·S]` in [−1, 1] and `labels`
//! `[N]`), the score of that model. See README.md beside this file.

use candle_core::{DType, Device};
use clap::Parser;
use scoreguide::config::{save_resolved, ConfigArgs};
use scoreguide::data::ImageSet;
use scoreguide::images::{
    accuracy, load_image_classifier, train_image_classifier, ImageClassifierConfig,
};
use scoreguide::runtime::{write_json, CommonArgs};
use scoreguide::train::{Checkpoint, Progress};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    about = "Classification accuracy score: train on labelled images, test on the real test set"
)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    common: CommonArgs,
    /// Labelled images to train on (safetensors: `images`, `labels`); the real
    /// training set when absent.
    #[arg(long)]
    train: Option<PathBuf>,
    /// Reuse the classifier of an earlier run in the output directory.
    #[arg(long)]
    reuse: bool,
}

#[derive(Serialize)]
struct Report {
    dataset: String,
    trained_on: String,
    train_images: usize,
    test_images: usize,
    params: usize,
    iters: u64,
    train_seconds: f64,
    /// Accuracy on the real test set.
    cas: f64,
    /// Accuracy on the images it was trained on.
    train_accuracy: f64,
}

/// A file of labelled images (what a class-conditional sampler writes).
fn labelled_images(path: &std::path::Path, like: &ImageSet) -> candle_core::Result<ImageSet> {
    let what = path.display().to_string();
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| candle_core::Error::msg(format!("{what}: {e}")))?;
    let get = |name: &str| {
        tensors
            .get(name)
            .ok_or_else(|| candle_core::Error::msg(format!("{what}: no tensor `{name}`")))
    };
    let images = get("images")?.to_dtype(DType::F32)?;
    let labels = get("labels")?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    ImageSet::new(
        images,
        labels,
        like.channels,
        like.size,
        like.classes,
        &what,
    )
}

fn main() -> candle_core::Result<()> {
    let args = Args::parse();
    scoreguide::runtime::on_compute_threads(args.common.threads, || run(args))
}

fn run(args: Args) -> candle_core::Result<()> {
    let mut cfg: ImageClassifierConfig = args.config.resolve()?;
    cfg.seed = args.common.seed;
    let dev: Device = args.common.setup()?;
    let out = args.common.out_dir("cas");
    save_resolved(&cfg, &out)?;
    let (real_train, test) = cfg.splits()?;
    let (train, trained_on) = match &args.train {
        Some(p) => (labelled_images(p, &real_train)?, p.display().to_string()),
        None => (real_train, "real training images".to_string()),
    };
    eprintln!(
        "{:?}: training on {} ({} images), testing on {} real images",
        cfg.data,
        trained_on,
        train.len(),
        test.len()
    );
    let path = out.join("classifier.safetensors");
    let t0 = Instant::now();
    let ckpt = if args.reuse && path.exists() {
        Checkpoint::load(&path)?
    } else {
        let mut progress = Progress::new("classifier (cross-entropy)", cfg.iters as usize);
        let c = train_image_classifier(&cfg, &train, &dev, &mut progress)?;
        c.save(&path)?;
        c
    };
    let train_seconds = t0.elapsed().as_secs_f64();
    let net = load_image_classifier(&ckpt, &dev)?;
    let params: usize = ckpt.section("ema").values().map(|t| t.elem_count()).sum();
    let cas = accuracy(&net, &test, 500, &dev)?;
    let train_accuracy = accuracy(&net, &train.take(10_000)?, 500, &dev)?;
    println!("| data | trained on | images | CAS (test accuracy) | train accuracy |");
    println!("|---|---|---|---|---|");
    println!(
        "| {:?} | {trained_on} | {} | {cas:.4} | {train_accuracy:.4} |",
        cfg.data,
        train.len()
    );
    if let Some(p) = &args.common.json {
        write_json(
            p,
            &Report {
                dataset: format!("{:?}", cfg.data),
                trained_on,
                train_images: train.len(),
                test_images: test.len(),
                params,
                iters: cfg.iters,
                train_seconds,
                cas,
                train_accuracy,
            },
        )?;
    }
    Ok(())
}
