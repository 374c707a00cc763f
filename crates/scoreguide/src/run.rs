//! The `scoreguide` command's experiment subcommands: `train`, `genneg`, `sample`, `eval`.
//! Each is a thin composition of the experiments crate, as the examples are, so what a
//! command writes is what the example would.

use candle_core::{bail, DType, Device, Result, Tensor};
use scoreguide::checkerboard::genneg::{
    iteration, resume_iteration, GennegCheckerboardConfig, COLLECTION_META,
};
use scoreguide::checkerboard::{
    label, load_baseline, paper_sampler, train_baseline_synced, CheckerboardConfig,
};
use scoreguide::config::{save_resolved, ConfigArgs};
use scoreguide::dlsm_images::{DlsmImagesConfig, Stages};
use scoreguide::genneg::{Stack, Unconditioned};
use scoreguide::guidance::Score;
use scoreguide::images::{train_image_score_in, ImageScoreConfig};
use scoreguide::moons::{moons_data, train_models, DlsmMoonsConfig};
use scoreguide::oracles::Checkerboard;
use scoreguide::traffic::run::{print_table, TrafficRunConfig};
use scoreguide::traffic::stages::Run as TrafficRun;
use scoreguide::train::{load_score_model, Checkpoint, Progress, Staged, Weights};
use std::path::{Path, PathBuf};

/// The experiments `scoreguide train` trains.
pub const TRAINS: &str =
    "checkerboard, genneg_motion, genneg_traffic, dlsm_moons, image_score, dlsm_images";

/// The experiment a configuration file belongs to: `--experiment`, else the name of the
/// folder it is in (`configs/<experiment>/…`).
pub fn experiment_of(config: &ConfigArgs, given: Option<&str>, default: &str) -> String {
    given
        .map(str::to_string)
        .or_else(|| {
            config
                .config
                .as_ref()
                .and_then(|p| p.parent())
                .and_then(|d| d.file_name())
                .map(|n| n.to_string_lossy().to_string())
        })
        .unwrap_or_else(|| default.to_string())
}

/// One process of a data-parallel run: its rank, the number of processes, its device.
pub struct Parallel {
    pub rank: usize,
    pub world: usize,
    pub device: String,
}

/// `scoreguide train`: an experiment's models, as its example trains them, into `out`
/// (each resumable with `resume`): the checkerboard's and the motion and traffic runs'
/// baselines (`baseline.safetensors`), the two-moons score model and classifiers, the
/// image U-Net (`score.safetensors`), and `dlsm_images`' U-Net and classifiers.
#[allow(clippy::too_many_arguments)]
pub fn train(
    config: &ConfigArgs,
    experiment: &str,
    out: &Path,
    seed: u64,
    resume: bool,
    parallel: Option<Parallel>,
) -> Result<()> {
    let dev = Device::Cpu;
    if parallel.is_some() && experiment != "checkerboard" {
        bail!("scoreguide train --world-size: data-parallel training is built for the checkerboard only, not `{experiment}`");
    }
    match experiment {
        "checkerboard" => {}
        "genneg_motion" => {
            let run = motion_run(config, out, seed, resume)?;
            let (train, _) = run.data()?;
            run.baseline(&train)?;
            println!("baseline: {}", out.join("baseline.safetensors").display());
            return Ok(());
        }
        "genneg_traffic" => {
            let run = traffic_run(config, out, seed, resume)?;
            let mut data = run.data(None)?;
            run.baseline(&mut data)?;
            println!("baseline: {}", out.join("baseline.safetensors").display());
            return Ok(());
        }
        "dlsm_moons" => {
            let mut cfg: DlsmMoonsConfig = config.resolve()?;
            cfg.moons.seed = seed;
            save_resolved(&cfg, out)?;
            let (points, labels) = moons_data(&cfg.moons)?;
            train_models(&cfg, &points, &labels, out, resume, None, &dev)?;
            println!("score model and classifiers ce, dlsm, total: {}", out.display());
            return Ok(());
        }
        "image_score" => {
            let mut cfg: ImageScoreConfig = config.resolve()?;
            cfg.seed = seed;
            save_resolved(&cfg, out)?;
            let set = cfg.training_set()?;
            train_image_score_in(&cfg, &set, out, resume, &dev)?;
            println!("score model: {}", out.join("score.safetensors").display());
            return Ok(());
        }
        "dlsm_images" => {
            let mut cfg: DlsmImagesConfig = config.resolve()?;
            cfg.score.seed = seed;
            save_resolved(&cfg, out)?;
            let stages = Stages {
                cfg: &cfg,
                out: out.to_path_buf(),
                reuse: resume,
                device: dev,
            };
            let (_, prior) = stages.score_model()?;
            stages.classifier("ce", None)?;
            stages.classifier("dlsm", Some(&prior))?;
            stages.real_classifier()?;
            println!("score model and classifiers: {}", out.display());
            return Ok(());
        }
        _ => bail!(
            "scoreguide train: experiment `{experiment}` is not one this command trains ({TRAINS}); run its example: cargo run --release --example {experiment}"
        ),
    }
    let cfg = config.resolve::<CheckerboardConfig>()?.seeded(seed);
    let (rank, dev, sync) = match parallel {
        None => (0, dev, None),
        Some(p) => {
            let (dev, sync) = data_parallel(&p, out)?;
            (p.rank, dev, Some(sync))
        }
    };
    if rank == 0 {
        save_resolved(&cfg, out)?;
    }
    let path = out.join("baseline.safetensors");
    if resume && path.exists() {
        // Finished: what was kept is the run's result (checked to load).
        Checkpoint::load(&path)?;
        println!("baseline kept: {}", path.display());
        return Ok(());
    }
    let partial = out.join("baseline.partial.safetensors");
    let kept = match resume && partial.exists() {
        true => Some(Checkpoint::load(&partial)?),
        false => None,
    };
    // Every rank holds the same state; rank 0 keeps it.
    let mut save = |c: &Checkpoint| if rank == 0 { c.save(&partial) } else { Ok(()) };
    let staged = Staged {
        resume: kept.as_ref(),
        save_every: match cfg.save_every {
            0 => cfg.baseline.iters.max(1),
            n => n,
        },
        save: &mut save,
    };
    let mut progress = Progress::new("train", cfg.baseline.iters as usize);
    let b = train_baseline_synced(&cfg.baseline, Some(staged), sync, &dev, &mut progress)?;
    if rank != 0 {
        return Ok(());
    }
    b.checkpoint.save(&path)?;
    std::fs::remove_file(&partial).ok();
    println!(
        "trained {} steps in {:.1} s: {}",
        cfg.baseline.iters,
        b.train_seconds,
        path.display()
    );
    Ok(())
}

/// `scoreguide genneg`: Gen-neG iterations on a checkerboard baseline, as the
/// `genneg_checkerboard` example runs them, each stack into `out/genneg_<k>.safetensors`
/// (with `resume`, iterations kept there are continued from); or the motion or traffic
/// run's Gen-neG stages and table, as their examples run them, continuing from `out`.
pub fn genneg(
    config: &ConfigArgs,
    experiment: &str,
    baseline: Option<&Path>,
    out: &Path,
    seed: u64,
    resume: bool,
) -> Result<()> {
    match experiment {
        "genneg_checkerboard" => {}
        "genneg_motion" | "genneg_traffic" => {
            // These runs keep every stage in `out` (their baseline too), so they
            // continue what `scoreguide train` left there.
            if baseline.is_some() {
                bail!("scoreguide genneg: {experiment} reads its baseline from --out (what `scoreguide train` wrote there), not --baseline");
            }
            if experiment == "genneg_motion" {
                let run = motion_run(config, out, seed, true)?;
                let o = run.run_all()?;
                println!("{}", scoreguide::motion::table(&o.rows, run.cfg.eval.samples));
            } else {
                let run = traffic_run(config, out, seed, true)?;
                let mut data = run.data(None)?;
                let base = run.baseline(&mut data)?;
                let genneg = run.genneg(&data, &base)?;
                let distilled = run.distill(&data, &base, &genneg)?;
                let control = run.control(&data, &base)?;
                let rows =
                    run.evaluate(&data, &base, &genneg, distilled.as_ref(), control.as_ref())?;
                print_table(&rows);
            }
            return Ok(());
        }
        _ => bail!(
            "scoreguide genneg: experiment `{experiment}` is not one this command runs (genneg_checkerboard, genneg_motion, genneg_traffic); run its example: cargo run --release --example {experiment}"
        ),
    }
    let Some(baseline) = baseline else {
        bail!(
            "scoreguide genneg: the checkerboard needs --baseline (what `scoreguide train` wrote)"
        );
    };
    let cfg = config.resolve::<GennegCheckerboardConfig>()?.seeded(seed);
    save_resolved(&cfg, out)?;
    let dev = Device::Cpu;
    let (sampler, sigmas) = paper_sampler(cfg.steps)?;
    let board = Checkerboard::default();
    let task = Unconditioned(&board);
    let b = load_baseline(baseline, &dev)?;
    let mut stack = Stack::new(b.checkpoint.meta("model")?, b.checkpoint.section("ema"));
    for it in 1..=cfg.iterations {
        let path = out.join(format!("genneg_{it}.safetensors"));
        if resume && path.exists() {
            stack = resume_iteration(&path, it, &stack)
                .map_err(|e| {
                    candle_core::Error::msg(format!("{e}; use another --out or drop --resume"))
                })?
                .0;
            println!("iteration {it}: kept {}", path.display());
            continue;
        }
        let (next, log, _) = iteration(&cfg, &stack, it, &sampler, &sigmas, &task, seed, &dev)?;
        let mut ck = next.to_checkpoint()?;
        ck.set_meta(COLLECTION_META, &log)?;
        ck.save(&path)?;
        println!("iteration {it}: {}", path.display());
        stack = next;
    }
    Ok(())
}

/// The traffic run of a configuration, kept in `out` (reused when `reuse`).
fn traffic_run(config: &ConfigArgs, out: &Path, seed: u64, reuse: bool) -> Result<TrafficRun> {
    let cfg: TrafficRunConfig = config.resolve()?;
    save_resolved(&cfg, out)?;
    Ok(TrafficRun::new(
        cfg,
        seed,
        out.to_path_buf(),
        Device::Cpu,
        reuse,
    ))
}

/// The motion run of a configuration, kept in `out` (reused when `reuse`).
fn motion_run(
    config: &ConfigArgs,
    out: &Path,
    seed: u64,
    reuse: bool,
) -> Result<scoreguide::motion::stages::Run> {
    let cfg: scoreguide::motion::MotionRunConfig = config.resolve()?;
    save_resolved(&cfg, out)?;
    Ok(scoreguide::motion::stages::Run {
        cfg,
        out: out.to_path_buf(),
        dev: Device::Cpu,
        seed,
        reuse,
    })
}

/// A model file as a score: a Gen-neG stack (`genneg_<k>.safetensors`) guided by its
/// classifiers, or a score model's EMA weights.
pub(crate) fn model_of(path: &Path, dev: &Device) -> Result<Box<dyn Score>> {
    let c = Checkpoint::load(path)?;
    let named = |e: candle_core::Error| candle_core::Error::msg(format!("{}: {e}", path.display()));
    Ok(if c.metadata.contains_key("classifiers") {
        Box::new(
            Stack::from_checkpoint(&c)
                .map_err(named)?
                .guided(dev)
                .map_err(named)?,
        )
    } else {
        Box::new(
            load_score_model(&c, Weights::Ema, DType::F32, dev)
                .map_err(named)?
                .0,
        )
    })
}

/// `scoreguide eval`: the infraction rate of samples under an oracle, as the examples'
/// tables print it.
pub fn eval(samples: &Path, oracle: &str, json: bool) -> Result<()> {
    if oracle != "checkerboard" {
        bail!("scoreguide eval: unknown oracle `{oracle}` (known: checkerboard)");
    }
    let c = Checkpoint::load(samples)?;
    let x: Tensor = match (c.tensors.get("samples"), c.tensors.len()) {
        (Some(t), _) => t.clone(),
        (None, 1) => c.tensors.values().next().expect("one tensor").clone(),
        _ => bail!(
            "{}: no tensor `samples` (and not a single tensor)",
            samples.display()
        ),
    };
    if x.rank() != 2 || x.dim(1)? != 2 {
        bail!(
            "{}: the checkerboard oracle judges [N, 2] points, got {:?}",
            samples.display(),
            x.dims()
        );
    }
    let (rate, _) = label(&x.to_dtype(DType::F32)?)
        .map_err(|e| candle_core::Error::msg(format!("{}: {e}", samples.display())))?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "samples": rate.n,
                "infraction_rate": rate.rate,
                "infraction_ci95": [rate.ci95.0, rate.ci95.1],
            })
        );
    } else {
        println!("| samples | infraction % | 95% interval |");
        println!("|---|---|---|");
        println!(
            "| {} | {:.3} | [{:.3}, {:.3}] |",
            rate.n,
            100.0 * rate.rate,
            100.0 * rate.ci95.0,
            100.0 * rate.ci95.1
        );
    }
    Ok(())
}

/// The default output folder of an experiment's commands.
pub fn default_out(experiment: &str) -> PathBuf {
    Path::new("out").join(format!("cli-{experiment}"))
}

/// The gradient average of rank `p.rank` of a data-parallel run (NCCL; the id handed
/// over in `out/nccl-id`).
#[cfg(feature = "nccl")]
fn data_parallel(
    p: &Parallel,
    out: &Path,
) -> Result<(Device, Box<dyn scoreguide::train::GradientSync>)> {
    let dev = scoreguide::runtime::device(&p.device)?;
    std::fs::create_dir_all(out)?;
    let id = out.join("nccl-id");
    let sync = scoreguide::train::DataParallel::join(p.rank, p.world, &id, &dev)?;
    Ok((dev, Box::new(sync)))
}

#[cfg(not(feature = "nccl"))]
fn data_parallel(
    p: &Parallel,
    _out: &Path,
) -> Result<(Device, Box<dyn scoreguide::train::GradientSync>)> {
    bail!(
        "scoreguide train --world-size {} (rank {} on {}): this build has no NCCL; build it with `cargo build --release --features nccl` (CUDA and NCCL needed)",
        p.world,
        p.rank,
        p.device
    )
}

/// `scoreguide train --world-size N` without `--rank`: starts ranks 0 … N−1 of this very
/// command, rank r on `cuda:r`, and waits for them all (a stale NCCL id of an earlier
/// run is removed first).
pub fn launch_ranks(world: usize, out: &Path) -> Result<()> {
    std::fs::remove_file(out.join("nccl-id")).ok();
    let exe = std::env::current_exe()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let children: Vec<_> = (0..world)
        .map(|r| {
            std::process::Command::new(&exe)
                .args(&args)
                .args(["--rank", &r.to_string(), "--device", &format!("cuda:{r}")])
                .spawn()
        })
        .collect::<std::io::Result<_>>()?;
    let mut failed = Vec::new();
    for (r, mut c) in children.into_iter().enumerate() {
        if !c.wait()?.success() {
            failed.push(r);
        }
    }
    if !failed.is_empty() {
        bail!("scoreguide train: ranks {failed:?} of {world} failed");
    }
    Ok(())
}
