//! Speed of a two-moons classifier training step (batch 4000, one thread): cross-entropy
//! against DLSM, each with and without subnormal floats flushed to zero
//! (`runtime::flush_subnormals_to_zero`), every setting in its own process. Not a test:
//! compare the ratios within one run.
//!
//!     cargo run --release --example dlsm_step

use candle_core::{DType, Device};
use clap::Parser;
use scoreguide::data::Dataset;
use scoreguide::moons::{moons_data, train_classifier, ClassifierLoss, MoonsConfig};
use scoreguide::nets::{ParamStore, ToyMlpConfig, ToyScore};
use scoreguide::train::Progress;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Training steps timed per setting.
    #[arg(long, default_value_t = 60)]
    steps: u64,
    /// Internal: measure in this process (`ce` or `dlsm`), flushing subnormals or not.
    #[arg(long, hide = true)]
    worker: Option<String>,
    #[arg(long, hide = true)]
    flush: bool,
}

fn main() -> candle_core::Result<()> {
    let args = Args::parse();
    let Some(which) = &args.worker else {
        println!("| loss | subnormals | ms per step |");
        println!("|---|---|---|");
        for which in ["ce", "dlsm"] {
            for flush in [false, true] {
                let exe = std::env::current_exe()?;
                let mut cmd = std::process::Command::new(exe);
                cmd.args(["--worker", which, "--steps", &args.steps.to_string()]);
                if flush {
                    cmd.arg("--flush");
                }
                let out = cmd.output()?;
                if !out.status.success() {
                    candle_core::bail!("worker failed: {}", String::from_utf8_lossy(&out.stderr));
                }
                let ms = String::from_utf8_lossy(&out.stdout).trim().to_string();
                let mode = if flush { "flushed to zero" } else { "kept" };
                println!("| {which} | {mode} | {ms} |");
            }
        }
        return Ok(());
    };
    scoreguide::runtime::set_threads(Some(1));
    if args.flush {
        scoreguide::runtime::flush_subnormals_to_zero(1)?;
    }
    let dev = Device::Cpu;
    let cfg = MoonsConfig {
        classifier_iters: args.steps,
        ..MoonsConfig::default()
    };
    let (points, labels) = moons_data(&cfg)?;
    let data = Dataset::new(points, "two moons")?;
    // An untrained score model is as good as a trained one for timing.
    let store = ParamStore::new(0);
    let net_cfg = ToyMlpConfig {
        in_dim: 2,
        out_dim: 2,
    };
    net_cfg.build(&store.var_builder(DType::F32, &dev))?;
    let prior = ToyScore(net_cfg.build(&store.frozen_var_builder(DType::F32, &dev)?)?);
    let loss = if which == "ce" {
        ClassifierLoss::CrossEntropy
    } else {
        ClassifierLoss::Dlsm
    };
    let t = Instant::now();
    train_classifier(
        &cfg,
        loss,
        &prior,
        &data,
        &labels,
        None,
        &dev,
        &mut Progress::hidden(),
    )?;
    println!(
        "{:.1}",
        t.elapsed().as_secs_f64() * 1000.0 / args.steps as f64
    );
    Ok(())
}
