//! DLSM's two-moons experiment (paper §3, Table 1, Fig. 1): a score model trained with
//! DSM, classifiers trained with cross-entropy, DLSM, or both, and how far each
//! classifier-guided posterior score is from the true (Parzen) one. See README.md beside
//! this file.

use clap::Parser;
use scoreguide::config::{save_resolved, ConfigArgs};
use scoreguide::moons::eval::{evaluate, print_table, prior_error_profile, Method, SIGMA_EVAL};
use scoreguide::moons::render::figure;
use scoreguide::moons::{moons_data, train_models, DlsmMoonsConfig, MoonsModels};
use scoreguide::nets::ToyClassifier;
use scoreguide::runtime::{write_json, CommonArgs};
use serde::Serialize;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "DLSM on two moons: score errors and conditional samples (paper Table 1)")]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    common: CommonArgs,
    /// Reuse the finished models of an earlier run in the output directory, and
    /// continue the saved states of unfinished ones (`save_every`).
    #[arg(long)]
    reuse: bool,
    /// Train (or reuse) the score model and only this classifier (`ce`, `dlsm` or
    /// `total`; `score`: none, and print the score model's error profile), then stop:
    /// lets the classifiers train in parallel processes, one per core, before a
    /// `--reuse` run evaluates them all.
    #[arg(long)]
    train_only: Option<String>,
}

#[derive(Serialize)]
struct Report {
    methods: Vec<Method>,
    sigma_eval: f64,
    k: usize,
    samples_per_class: usize,
    pc_steps: usize,
    /// The sampler's smallest σ (its last step returns the denoised estimate there).
    sample_sigma_min: f64,
    /// (σ, mean ‖s_θ − s_Parzen‖ / mean ‖s_Parzen‖) of the prior score model.
    prior_relative_error: Vec<(f64, f64)>,
}

fn main() -> candle_core::Result<()> {
    let args = Args::parse();
    scoreguide::runtime::on_compute_threads(args.common.threads, || run(args))
}

fn run(args: Args) -> candle_core::Result<()> {
    let mut cfg: DlsmMoonsConfig = args.config.resolve()?;
    cfg.moons.seed = args.common.seed;
    let dev = args.common.setup_flushing_subnormals()?;
    let out = args.common.out_dir("dlsm_moons");
    save_resolved(&cfg, &out)?;
    let (points, labels) = moons_data(&cfg.moons)?;

    // Training (or reuse), each model saved as it finishes; with `save_every`, its state
    // as it goes.
    let t0 = Instant::now();
    let only = args.train_only.as_deref();
    let MoonsModels { prior, classifiers } =
        train_models(&cfg, &points, &labels, &out, args.reuse, only, &dev)?;
    eprintln!("models ready in {:.0}s", t0.elapsed().as_secs_f64());
    if only.is_some_and(|o| o != "score") {
        return Ok(());
    }
    // How well the prior itself knows the data at each noise level.
    let prior_errors = prior_error_profile(&prior, &points, args.common.seed)?;
    eprintln!("prior score vs Parzen, mean ‖s_θ − s‖ / mean ‖s‖:");
    for (sigma, e) in &prior_errors {
        eprintln!("  σ = {sigma:<5}: {e:.3}");
    }
    if only.is_some() {
        return Ok(());
    }
    let clf = |n: &str| -> &ToyClassifier {
        &classifiers
            .iter()
            .find(|(m, _)| *m == n)
            .expect("trained above")
            .1
    };
    // (name, classifier, scale): the paper's methods (a), (b), (d) and DLSM alone.
    let methods = [
        ("ce", clf("ce"), 1.0),
        ("scaling", clf("ce"), 10.0),
        ("dlsm", clf("dlsm"), 1.0),
        ("total", clf("total"), 1.0),
    ];

    let eval = evaluate(
        &prior,
        &methods,
        &points,
        &labels,
        &cfg,
        args.common.seed,
        &dev,
    )?;
    print_table(&eval.methods, cfg.k);
    println!(
        "(samples: predictor–corrector, {} steps geometric from σ = 10 to {}, the last returning the denoised estimate)",
        cfg.steps, cfg.sample_sigma_min
    );
    let png = out.join("moons.png");
    figure(&png, &eval)?;
    eprintln!("wrote {}", png.display());
    if let Some(p) = &args.common.json {
        write_json(
            p,
            &Report {
                methods: eval.methods,
                sigma_eval: SIGMA_EVAL,
                k: cfg.k,
                samples_per_class: cfg.samples,
                pc_steps: cfg.steps,
                sample_sigma_min: cfg.sample_sigma_min,
                prior_relative_error: prior_errors,
            },
        )?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}
