//! The `scoreguide` command's experiment subcommands: `train`, `genneg`, `sample`, `eval`.
//! Each is a thin composition of the experiments crate, as the examples are, so what a
//! command writes is what the example would.

use candle_core::{bail, DType, Device, Result, Tensor};
use scoreguide::checkerboard::genneg::{iteration, GennegCheckerboardConfig, COLLECTION_META};
use scoreguide::checkerboard::{
    label, load_baseline, paper_sampler, train_baseline, CheckerboardConfig,
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
pub fn train(
    config: &ConfigArgs,
    experiment: &str,
    out: &Path,
    seed: u64,
    resume: bool,
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
    save_resolved(&cfg, out)?;
    let path = out.join("baseline.safetensors");
    let partial = out.join("baseline.partial.safetensors");
    let kept = match resume && partial.exists() {
        true => Some(Checkpoint::load(&partial)?),
        false => None,
    };
    let mut save = |c: &Checkpoint| c.save(&partial);
    let staged = Staged {
        resume: kept.as_ref(),
        save_every: match cfg.save_every {
            0 => cfg.baseline.iters.max(1),
            n => n,
        },
        save: &mut save,
    };
    let mut progress = Progress::new("train", cfg.baseline.iters as usize);
    let b = train_baseline(&cfg.baseline, Some(staged), &Device::Cpu, &mut progress)?;
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
