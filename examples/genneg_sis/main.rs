//! Gen-neG's cheaper synthetic sets on the checkerboard (App. D.2, Fig. 9): a chain
//! whose sets come from its current model beside one whose sets come from the baseline,
//! weighted by sequential importance sampling. See README.md beside this file.

use clap::Parser;
use scoreguide::checkerboard::sis::{
    chain, evaluate, plot, table, SetMethod, SisCheckerboardConfig,
};
use scoreguide::checkerboard::{load_baseline, train_baseline};
use scoreguide::config::{save_resolved, ConfigArgs};
use scoreguide::genneg::{Stack, Unconditioned};
use scoreguide::oracles::Checkerboard;
use scoreguide::runtime::{write_json, CommonArgs};
use scoreguide::train::Progress;
use std::path::PathBuf;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Gen-neG synthetic sets by sequential importance sampling (Fig. 9)")]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    common: CommonArgs,
    /// Baseline checkpoint (the `checkerboard` example's; trained here if absent, and
    /// kept as OUT/baseline.safetensors).
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Read the baseline and iterations already in OUT instead of redoing them.
    #[arg(long)]
    reuse: bool,
    /// Run one chain only (standard or sis).
    #[arg(long)]
    only: Option<String>,
}

fn main() -> candle_core::Result<()> {
    let args = Args::parse();
    scoreguide::runtime::on_compute_threads(args.common.threads, || run(args))
}

fn run(args: Args) -> candle_core::Result<()> {
    let seed = args.common.seed;
    let cfg = args.config.resolve::<SisCheckerboardConfig>()?.seeded(seed);
    let dev = args.common.setup()?;
    let out = args.common.out_dir("genneg_sis");
    save_resolved(&cfg, &out)?;
    let kept = out.join("baseline.safetensors");
    let baseline = match &args.baseline {
        Some(p) => load_baseline(p, &dev)?,
        None if args.reuse && kept.exists() => load_baseline(&kept, &dev)?,
        None => {
            let mut progress = Progress::new("baseline", cfg.baseline.iters as usize);
            let b = train_baseline(&cfg.baseline, None, &dev, &mut progress)?;
            b.checkpoint.save(&kept)?;
            b
        }
    };
    let stack0 = Stack::new(
        baseline.checkpoint.meta("model")?,
        baseline.checkpoint.section("ema"),
    );
    let board = Checkerboard::default();
    let task = Unconditioned(&board);
    let (base_rate, _) = evaluate(
        &stack0.guided(&dev)?,
        &cfg,
        seed,
        "baseline: evaluating",
        &dev,
    )?;
    let methods = match args.only.as_deref() {
        None => vec![SetMethod::Standard, SetMethod::Sis],
        Some("standard") => vec![SetMethod::Standard],
        Some("sis") => vec![SetMethod::Sis],
        Some(other) => candle_core::bail!("--only {other}: expected standard or sis"),
    };
    let mut rows = Vec::new();
    for m in methods {
        rows.extend(chain(
            m, &cfg, &stack0, &task, seed, &out, args.reuse, &dev,
        )?);
    }
    println!("{}", table(&base_rate, &rows));
    plot(&out, &rows)?;
    if let Some(path) = &args.common.json {
        write_json(
            path,
            &serde_json::json!({
                "baseline_infraction": base_rate.rate,
                "baseline_ci95": [base_rate.ci95.0, base_rate.ci95.1],
                "rows": rows,
            }),
        )?;
    }
    Ok(())
}
