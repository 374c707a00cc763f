//! Speed of the traffic scene transformer (`SceneTransformerConfig::traffic`, as
//! `genneg_traffic` trains it): a training step (DSM + backward + Adam + EMA at batch
//! 256, maps encoded in the step), a sampling step (one Heun step = 2 evaluations at
//! batch 256 on frozen weights) and the same step guided by one per-vehicle classifier
//! of the base's size (the paper's Table 4: about 1.5× the base), and a distillation step
//! of that guided teacher (σ ln-uniform from 0.01, as `genneg_traffic` with
//! `distill.log_uniform_sigma = 0.01` trains it) with the classifier on every row and
//! gated to σ ≤ 0.2 (`genneg.guidance_sigma_max = 0.2`: it runs on about a third of the rows),
//! each with 1 and 2 CPU threads in its own process. Prints medians; not a test (compare the ratios within
//! one run: these machines are shared and noisy).
//!
//!     cargo run --release --example bench_traffic
//!     cargo run --release --example bench_traffic -- --lane-maps   # the full run's network
//!     cargo run --release --example bench_traffic -- --json out/bench_traffic.json

use candle_core::{DType, Device};
use clap::Parser;
use scoreguide::data::{SceneConfig, SceneSet, Split};
use scoreguide::genneg::StackedClassifier;
use scoreguide::nets::ParamStore;
use scoreguide::runtime::{heun_step_ms, measure_in_workers};
use scoreguide::traffic::{
    distill, load_agent_classifier, train_score, FeatureScaler, TrafficConfig, TrafficData,
    TrafficModel,
};
use scoreguide::train::{Checkpoint, Progress};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Thread counts to measure, each in its own process.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Timed repetitions per measurement (the median is reported; training steps are
    /// timed as a run of this many).
    #[arg(long, default_value_t = 20)]
    reps: usize,
    /// Batch (scenes) for every measurement.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// The full traffic run's network (`genneg_traffic --lane-maps --map-probe`): lane
    /// maps through cross-attention, read around each vehicle by a probe.
    #[arg(long)]
    lane_maps: bool,
    /// Skip the distillation steps (what `benches/compare.py` compares with PyTorch is
    /// the training, sampling and guided steps).
    #[arg(long)]
    no_distill: bool,
    #[arg(long)]
    json: Option<PathBuf>,
    /// Internal: measure in this process with this many threads and print JSON.
    #[arg(long, hide = true)]
    worker: Option<usize>,
}

#[derive(Serialize, Deserialize, Clone)]
struct Timing {
    threads: usize,
    batch: usize,
    /// Mean of a run of `reps` training steps (a run's set-up subtracted).
    train_step_ms: f64,
    sample_step_ms: f64,
    /// Heun step guided by one per-vehicle classifier of the base's size.
    guided_step_ms: f64,
    /// Distillation step of that guided teacher, the classifier on every row.
    distill_step_ms: Option<f64>,
    /// The same with the classifier gated to σ ≤ 0.2.
    distill_gated_step_ms: Option<f64>,
    params: usize,
}

fn measure(
    threads: usize,
    reps: usize,
    batch: usize,
    lane_maps: bool,
    distillation: bool,
) -> candle_core::Result<Timing> {
    if batch == 0 || reps == 0 {
        candle_core::bail!("--batch and --reps must be positive, got {batch} and {reps}");
    }
    let dev = Device::Cpu;
    let set = SceneSet::generate(&SceneConfig::default(), Split::Train, 16, batch.max(64), 0)?;
    let scaler = FeatureScaler::fit(&set.agents)?;
    let cfg = TrafficConfig {
        batch,
        ..TrafficConfig::default()
    };
    let cfg = match lane_maps {
        true => cfg
            .with_lane_maps()
            .with_map_probe(&scaler, set.config.half_size),
        false => cfg,
    };
    let data = TrafficData::new(set, scaler, &cfg, &dev)?;

    // Training: the mean step of a run of 3 + `reps` steps less a run of 3 (set-up and
    // the final checkpoint cancel), after a run that warms the allocator up.
    let (ckpt, train_step_ms) = step_ms(reps, |iters| {
        train_score(
            &TrafficConfig {
                iters,
                ..cfg.clone()
            },
            &data,
            &dev,
            &mut Progress::hidden(),
        )
    })?;

    // Sampling on frozen weights, as the examples do.
    let base = TrafficModel::load(&ckpt, DType::F32, &dev)?;
    let classifier = untrained_classifier(&cfg, &dev)?;
    let idx: Vec<u32> = (0..batch as u32).collect();
    let cond = data.cond_of(&idx)?;
    let x = data.x.rows(&idx)?;
    let plain = base.stack().guided(&dev)?;
    let sample_step_ms = heun_step_ms(&plain, &x, &cond, 1.0, 0.9, reps)?;
    let one = std::slice::from_ref(&classifier);
    let guided = base.with_classifiers(one, None).guided(&dev)?;
    let guided_step_ms = heun_step_ms(&guided, &x, &cond, 1.0, 0.9, reps)?;

    let distill_cfg = cfg.clone().with_log_uniform_sigma(0.01);
    let distill_ms = |teacher: &dyn scoreguide::guidance::Score| {
        step_ms(reps, |iters| {
            let cfg = TrafficConfig {
                iters,
                ..distill_cfg.clone()
            };
            distill(&cfg, teacher, &ckpt, &data, &dev, &mut Progress::hidden())
        })
        .map(|(_, ms)| ms)
    };
    let (distill_step_ms, distill_gated_step_ms) = match distillation {
        true => (
            Some(distill_ms(&guided)?),
            Some(distill_ms(
                &base.with_classifiers(one, Some(0.2)).guided(&dev)?,
            )?),
        ),
        false => (None, None),
    };
    Ok(Timing {
        threads,
        batch,
        train_step_ms,
        sample_step_ms,
        guided_step_ms,
        distill_step_ms,
        distill_gated_step_ms,
        params: base.params,
    })
}

/// The mean step of `train(iters)`, a run of 3 + `reps` steps less a run of 3 (set-up
/// and the final checkpoint cancel), after a run that warms the allocator up; and that
/// warm-up run's checkpoint.
fn step_ms(
    reps: usize,
    train: impl Fn(u64) -> candle_core::Result<Checkpoint>,
) -> candle_core::Result<(Checkpoint, f64)> {
    let run = |iters: u64| -> candle_core::Result<(f64, Checkpoint)> {
        let t0 = Instant::now();
        let c = train(iters)?;
        Ok((t0.elapsed().as_secs_f64() * 1e3, c))
    };
    let (_, ckpt) = run(3)?; // warm-up: first-touch allocation and page faults
    let (short, _) = run(3)?;
    let (long, _) = run(3 + reps as u64)?;
    Ok((ckpt, (long - short) / reps as f64))
}

/// A per-vehicle classifier of the base's architecture with its initial weights (the
/// time a guided step takes does not depend on what the classifier learnt).
fn untrained_classifier(
    base: &TrafficConfig,
    dev: &Device,
) -> candle_core::Result<StackedClassifier> {
    let cfg = base.classifier();
    let store = ParamStore::new(1);
    cfg.build(&store.var_builder(DType::F32, dev))?;
    let mut c = Checkpoint::new();
    c.insert_section("ema", &store.tensors()?);
    c.set_meta("classifier", &cfg)?;
    load_agent_classifier(&c)
}

fn main() -> candle_core::Result<()> {
    let args = Args::parse();
    if let Some(t) = args.worker {
        let timing = scoreguide::runtime::on_compute_threads(Some(t), || {
            measure(t, args.reps, args.batch, args.lane_maps, !args.no_distill)
        })?;
        println!(
            "{}",
            serde_json::to_string(&timing).expect("timing serialises")
        );
        return Ok(());
    }
    let rows: Vec<Timing> = measure_in_workers(
        &args.threads,
        &[
            "--reps".into(),
            args.reps.to_string(),
            "--batch".into(),
            args.batch.to_string(),
        ]
        .into_iter()
        .chain(args.lane_maps.then(|| "--lane-maps".to_string()))
        .chain(args.no_distill.then(|| "--no-distill".to_string()))
        .collect::<Vec<_>>(),
    )?;
    println!(
        "scene transformer{}: {} parameters, batch {} scenes of 12 vehicles",
        if args.lane_maps {
            " (lane maps, map probe)"
        } else {
            " (road maps)"
        },
        rows[0].params,
        args.batch
    );
    println!(
        "| threads | train step (ms) | Heun step (ms) | guided Heun step, 1 classifier (ms) \
         | distillation step (ms) | distillation step, gated σ ≤ 0.2 (ms) |"
    );
    println!("|---|---|---|---|---|---|");
    let per_train = |ms: Option<f64>, train: f64| {
        ms.map_or("–".to_string(), |m| {
            format!("{m:.1} ({:.2}× train)", m / train)
        })
    };
    for r in &rows {
        println!(
            "| {} | {:.1} | {:.1} | {:.1} ({:.2}× base) | {} | {} |",
            r.threads,
            r.train_step_ms,
            r.sample_step_ms,
            r.guided_step_ms,
            r.guided_step_ms / r.sample_step_ms,
            per_train(r.distill_step_ms, r.train_step_ms),
            per_train(r.distill_gated_step_ms, r.train_step_ms),
        );
    }
    if let Some(p) = &args.json {
        scoreguide::runtime::write_json(p, &rows)?;
    }
    Ok(())
}
