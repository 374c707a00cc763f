//! Speed of the checkerboard network: a training step (DSM + backward + Adam + EMA,
//! batch 1000), a sampling step (one Heun step = 2 denoiser evaluations, batch 10k), a
//! forward + ∇x pass (what classifier guidance costs, batch 1000) and Heun steps guided
//! by one and two classifiers of the base's size, each with 1 and 2 CPU threads. Prints
//! medians; not a test (these machines are shared and noisy: compare the ratios within
//! one run). `benches/torch/checkerboard.py` is its PyTorch twin and
//! `benches/compare.py` runs the two alternately and prints the ratios.
//!
//!     cargo run --release --example bench
//!     cargo run --release --example bench -- --json out/bench.json

use candle_core::{DType, Device, Tensor, Var};
use clap::Parser;
use rand::SeedableRng;
use scoreguide::checkerboard::{dsm_batch, paper_sampler, BaselineConfig};
use scoreguide::data::{checkerboard, Dataset};
use scoreguide::guidance::Cond;
use scoreguide::guidance::{Guided, LogProb, Score};
use scoreguide::nets::{ClassifierConfig, ParamStore};
use scoreguide::runtime::{heun_step_ms, measure_in_workers, median_ms};
use scoreguide::samplers::initial_noise;
use scoreguide::sde::SampleNoise;
use scoreguide::train::Trainer;
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
    #[arg(long, default_value_t = 30)]
    reps: usize,
    #[arg(long)]
    json: Option<PathBuf>,
    /// Flush subnormal floats to zero in the workers (`runtime::flush_subnormals_to_zero`).
    #[arg(long)]
    flush: bool,
    /// Guide with the classifiers of this Gen-neG stack (genneg_K.safetensors) instead of
    /// one untrained classifier: trained classifiers are confident, and their sigmoid
    /// tails are where subnormal floats come from.
    #[arg(long)]
    stack: Option<PathBuf>,
    /// `cpu`, `cuda` or `cuda:N` (the thread counts then size the host's pool only).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Internal: measure in this process with this many threads and print JSON.
    #[arg(long, hide = true)]
    worker: Option<usize>,
}

#[derive(Serialize, Deserialize, Clone)]
struct Timing {
    threads: usize,
    train_step_ms: f64,
    sample_step_ms: f64,
    /// A classifier's log-probability and its input gradient (what guidance runs per
    /// evaluation), batch 1000.
    forward_grad_x_ms: f64,
    /// The score and its input gradient by autograd through the score network.
    score_grad_x_ms: f64,
    /// Heun step at batch 10k guided by one classifier of the base's size.
    guided_step_ms: f64,
    /// The same guided by two classifiers (without `--stack`), or by the stack's.
    guided2_step_ms: f64,
    params: usize,
}

fn measure(
    threads: usize,
    reps: usize,
    stack: Option<&std::path::Path>,
    dev: &Device,
) -> candle_core::Result<Timing> {
    let dev = dev.clone();
    let cfg = BaselineConfig::default();
    let data = Dataset::new(checkerboard(1000, 0)?, "bench")?.to_device(&dev)?;
    let store = ParamStore::new(0);
    let model = cfg.model.build(&store.var_builder(DType::F32, &dev))?;
    let params = store.num_params();
    let mut trainer = Trainer::new(store.clone(), cfg.train.clone())?;
    let train_step_ms = median_ms(reps, || {
        let mut rng = trainer.step_rng();
        let loss = dsm_batch(&model, &data, &cfg, trainer.steps_done(), &mut rng)?;
        trainer.step(&loss).map(|_| ())
    })?;

    // Sampling uses frozen weights, as the examples do.
    let frozen = cfg
        .model
        .build(&store.frozen_var_builder(DType::F32, &dev)?)?;
    let (_, sigmas) = paper_sampler(100)?;
    let mut noise = SampleNoise::new(0, 0, 10_000);
    let x = initial_noise(&mut noise, &[10_000, 2], 1.0, DType::F32, &dev)?;
    let (s0, s1) = (sigmas[50], sigmas[51]);
    let mut sample_step_ms = heun_step_ms(&frozen, &x, &Cond::none(), s0, s1, reps.min(10))?;
    let classifier = |seed: u64| -> candle_core::Result<_> {
        let store = ParamStore::new(seed);
        ClassifierConfig::checkerboard().build(&store.var_builder(DType::F32, &dev))?;
        ClassifierConfig::checkerboard().build(&store.frozen_var_builder(DType::F32, &dev)?)
    };
    let (guided_step_ms, guided2_step_ms) = match stack {
        None => {
            let guided = Guided::new(&frozen).with(1.0, classifier(1)?);
            let one = heun_step_ms(&guided, &x, &Cond::none(), s0, s1, reps.min(10))?;
            let guided = guided.with(1.0, classifier(2)?);
            (
                one,
                heun_step_ms(&guided, &x, &Cond::none(), s0, s1, reps.min(10))?,
            )
        }
        Some(path) => {
            // The stack's own base and classifiers (trained weights throughout): its first
            // classifier, then all of them.
            let s = scoreguide::genneg::Stack::from_checkpoint(
                &scoreguide::train::Checkpoint::load(path)?,
            )?;
            sample_step_ms = heun_step_ms(
                &s.truncated(0).guided(&dev)?,
                &x,
                &Cond::none(),
                s0,
                s1,
                reps.min(10),
            )?;
            (
                heun_step_ms(
                    &s.truncated(1).guided(&dev)?,
                    &x,
                    &Cond::none(),
                    s0,
                    s1,
                    reps.min(10),
                )?,
                heun_step_ms(&s.guided(&dev)?, &x, &Cond::none(), s0, s1, reps.min(10))?,
            )
        }
    };

    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let xb = scoreguide::sde::randn(&mut rng, &[1000, 2], &dev)?;
    let sb = Tensor::full(0.5f32, 1000, &dev)?;
    let c = classifier(1)?;
    let forward_grad_x_ms = median_ms(reps, || {
        c.input_gradient(&xb, &sb, &Cond::none())?
            .map(|_| ())
            .ok_or_else(|| candle_core::Error::msg("no input gradient"))
    })?;
    let score_grad_x_ms = median_ms(reps, || {
        let xv = Var::from_tensor(&xb)?;
        let out = frozen.score(xv.as_tensor(), &sb)?.sum_all()?;
        let g = out.backward()?;
        g.get(xv.as_tensor())
            .map(|_| ())
            .ok_or_else(|| candle_core::Error::msg("no input gradient"))
    })?;
    Ok(Timing {
        threads,
        train_step_ms,
        sample_step_ms,
        forward_grad_x_ms,
        score_grad_x_ms,
        guided_step_ms,
        guided2_step_ms,
        params,
    })
}

fn main() -> candle_core::Result<()> {
    let args = Args::parse();
    if let Some(t) = args.worker {
        let timing = scoreguide::runtime::on_compute_threads(Some(t), || {
            if args.flush {
                scoreguide::runtime::flush_subnormals_to_zero(t)?;
            }
            let dev = scoreguide::runtime::device(&args.device)?;
            measure(t, args.reps, args.stack.as_deref(), &dev)
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
        "--device".to_string(),
        args.device.clone(),
    ];
    if args.flush {
        worker_args.push("--flush".into());
    }
    if let Some(p) = &args.stack {
        worker_args.extend(["--stack".to_string(), p.display().to_string()]);
    }
    let rows: Vec<Timing> = measure_in_workers(&args.threads, &worker_args)?;
    println!("checkerboard network: {} parameters", rows[0].params);
    println!("| threads | train step, batch 1000 (ms) | Heun step, batch 10k (ms) | fwd + ∇x, batch 1000 (ms) | guided Heun step, 1 classifier (ms) | 2 classifiers (ms) |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} ({:.2}× base) | {:.2} ({:.2}× base) |",
            r.threads,
            r.train_step_ms,
            r.sample_step_ms,
            r.forward_grad_x_ms,
            r.guided_step_ms,
            r.guided_step_ms / r.sample_step_ms,
            r.guided2_step_ms,
            r.guided2_step_ms / r.sample_step_ms,
        );
    }
    if let Some(p) = &args.json {
        scoreguide::runtime::write_json(p, &rows)?;
    }
    Ok(())
}
