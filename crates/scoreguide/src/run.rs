//! The `scoreguide` command's experiment subcommands: `train`, `genneg`, `sample`, `eval`.
//! Each is a thin composition of the experiments crate, as the examples are, so what a
//! command writes is what the example would.

use candle_core::{bail, DType, Device, Result, Tensor};
use scoreguide::checkerboard::genneg::{iteration, GennegCheckerboardConfig, COLLECTION_META};
use scoreguide::checkerboard::{
    label, load_baseline, paper_sampler, train_baseline_synced, CheckerboardConfig,
};
use scoreguide::config::{save_resolved, ConfigArgs};
use scoreguide::genneg::{Stack, Unconditioned};
use scoreguide::guidance::Score;
use scoreguide::oracles::Checkerboard;
use scoreguide::train::{load_score_model, Checkpoint, Progress, Staged, Weights};
use std::path::{Path, PathBuf};

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

/// `scoreguide train`: the checkerboard baseline (resumable), as the `checkerboard`
/// example trains it, or the motion baseline, as `genneg_motion` does, into
/// `out/baseline.safetensors`.
/// One process of a data-parallel run: its rank, the number of processes, its device.
pub struct Parallel {
    pub rank: usize,
    pub world: usize,
    pub device: String,
}

#[allow(clippy::too_many_arguments)]
pub fn train(
    config: &ConfigArgs,
    experiment: &str,
    out: &Path,
    seed: u64,
    resume: bool,
    parallel: Option<Parallel>,
) -> Result<()> {
    match experiment {
        "checkerboard" => {}
        "genneg_motion" => {
            let run = motion_run(config, out, seed, resume)?;
            let (train, _) = run.data()?;
            run.baseline(&train)?;
            println!("baseline: {}", out.join("baseline.safetensors").display());
            return Ok(());
        }
        _ => bail!(
            "scoreguide train: experiment `{experiment}` is not one this command trains yet (checkerboard, genneg_motion); run its example: cargo run --release --example {experiment}"
        ),
    }
    let cfg = config.resolve::<CheckerboardConfig>()?.seeded(seed);
    let (rank, dev, sync) = match parallel {
        None => (0, Device::Cpu, None),
        Some(p) => {
            let (dev, sync) = data_parallel(&p, out)?;
            (p.rank, dev, Some(sync))
        }
    };
    if rank == 0 {
        save_resolved(&cfg, out)?;
    }
    let path = out.join("baseline.safetensors");
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
/// `genneg_checkerboard` example runs them, each stack into `out/genneg_<k>.safetensors`;
/// or the motion run's Gen-neG stages and table, as `genneg_motion` runs them.
pub fn genneg(
    config: &ConfigArgs,
    experiment: &str,
    baseline: Option<&Path>,
    out: &Path,
    seed: u64,
) -> Result<()> {
    match experiment {
        "genneg_checkerboard" => {}
        "genneg_motion" => {
            // The motion run keeps every stage in `out` (its baseline too), so it
            // continues what `scoreguide train` left there.
            if baseline.is_some() {
                bail!("scoreguide genneg: the motion run reads its baseline from --out (what `scoreguide train` wrote there), not --baseline");
            }
            let run = motion_run(config, out, seed, true)?;
            let o = run.run_all()?;
            println!("{}", scoreguide::motion::table(&o.rows, run.cfg.eval.samples));
            return Ok(());
        }
        _ => bail!(
            "scoreguide genneg: experiment `{experiment}` is not one this command runs yet (genneg_checkerboard, genneg_motion); run its example: cargo run --release --example {experiment}"
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
        let (next, log, _) = iteration(&cfg, &stack, it, &sampler, &sigmas, &task, seed, &dev)?;
        let mut ck = next.to_checkpoint()?;
        ck.set_meta(COLLECTION_META, &log)?;
        let path = out.join(format!("genneg_{it}.safetensors"));
        ck.save(&path)?;
        println!("iteration {it}: {}", path.display());
        stack = next;
    }
    Ok(())
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
