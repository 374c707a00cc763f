//! DLSM on images (paper §5, Table 2): one unconditional U-Net, classifiers trained on it
//! with cross-entropy (base, and scaling ×α) or L_DLSM + λ L_CE (dlsm), class-conditional
//! samples of each method and Table 2's metrics, in stages that resume exactly
//! (`--reuse`). See README.md beside this file.

use clap::{Parser, ValueEnum};
use scoreguide::config::{save_resolved, ConfigArgs};
use scoreguide::dlsm_images::{
    classes_above, classwise_figure, first_per_class, likelihood_score_excess, mean_per_class,
    method_grid, summarise, table, DlsmImagesConfig, Evaluator, Method, Scores, Stages,
    EXCESS_SIGMAS,
};
use scoreguide::guidance::Score;
use scoreguide::image_metrics::{FeatureNetwork, Images};
use scoreguide::inception::FidInception;
use scoreguide::runtime::{write_json, CommonArgs};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Instant;

/// Test images of the held-out likelihood-score check.
const EXCESS_IMAGES: usize = 1000;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum Stage {
    Score,
    Classifiers,
    Samples,
    Scores,
}

#[derive(Parser)]
#[command(about = "DLSM on images: base, scaling and DLSM-trained classifier guidance (Table 2)")]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    common: CommonArgs,
    /// Reuse what an earlier run in the output directory finished, and continue what it
    /// saved part of.
    #[arg(long)]
    reuse: bool,
    /// Stop after this stage.
    #[arg(long, value_enum)]
    until: Option<Stage>,
    /// Train only this classifier (`ce`, `dlsm`) or sample only this method (`base`,
    /// `scaling`, `dlsm`): stages in parallel processes, one per core.
    #[arg(long)]
    only: Option<String>,
}

fn main() -> candle_core::Result<()> {
    // The DLSM loss differentiates through ∇x log p(y | x): candle must keep the graph of
    // every backward pass, a setting each thread reads once, so before anything runs.
    std::env::set_var("CANDLE_GRAD_DO_NOT_DETACH", "1");
    let args = Args::parse();
    scoreguide::runtime::on_compute_threads(args.common.threads, || run(args))
}

fn run(args: Args) -> candle_core::Result<()> {
    let mut cfg: DlsmImagesConfig = args.config.resolve()?;
    cfg.score.seed = args.common.seed;
    if let Some(only) = args.only.as_deref() {
        if !["ce", "dlsm", "base", "scaling"].contains(&only) {
            candle_core::bail!("--only {only:?}: expected ce, dlsm, base or scaling");
        }
    }
    let until = args.until.unwrap_or(Stage::Scores);
    let device = args.common.setup()?;
    let out = args.common.out_dir("dlsm_images");
    save_resolved(&cfg, &out)?;
    let stages = Stages {
        cfg: &cfg,
        out: out.clone(),
        reuse: args.reuse,
        device: device.clone(),
    };
    let mut seconds = BTreeMap::new();
    let t = Instant::now();
    // Cross-entropy alone needs no score model: `--only ce` trains while it trains.
    let (score_step, prior) = match args.only.as_deref() {
        Some("ce") if until > Stage::Score => (None, None),
        _ => {
            let (c, prior) = stages.score_model()?;
            (c.meta::<u64>("step").ok(), Some(prior))
        }
    };
    seconds.insert("score", t.elapsed().as_secs_f64());
    if until == Stage::Score {
        return Ok(());
    }

    // `--only`: the methods named (none for `ce`) and the classifiers they or the name need.
    let only = args.only.as_deref();
    let methods: Vec<Method> = Method::ALL
        .into_iter()
        .filter(|m| only.is_none_or(|o| o == m.name()))
        .collect();
    let mut needed: Vec<&str> = methods.iter().map(|m| m.classifier()).collect();
    needed.extend(only.filter(|o| ["ce", "dlsm"].contains(o)));
    needed.sort();
    needed.dedup();

    let t = Instant::now();
    let mut classifiers = BTreeMap::new();
    for name in needed {
        classifiers.insert(
            name,
            stages.classifier(name, prior.as_ref().map(|p| p as &dyn Score))?,
        );
    }
    let real = match only {
        None => Some(stages.real_classifier()?),
        Some(_) => None,
    };
    seconds.insert("classifiers", t.elapsed().as_secs_f64());
    if until == Stage::Classifiers {
        return Ok(());
    }

    let Some(prior) = prior else {
        return Ok(());
    };
    let t = Instant::now();
    let mut samples: BTreeMap<(Method, u64), Images> = BTreeMap::new();
    for &method in &methods {
        for &seed in &cfg.seeds {
            let x = stages.samples(
                method.name(),
                method,
                &prior,
                &classifiers[method.classifier()],
                &cfg.sampler,
                cfg.n_per_class,
                seed,
            )?;
            samples.insert((method, seed), x);
        }
    }
    // The sampler comparison: the base method on the first images of each class.
    let mut compared = Vec::new();
    if methods.contains(&Method::Base) {
        let seed = cfg.seeds[0];
        let per = cfg.compare_per_class.min(cfg.n_per_class);
        for s in &cfg.compare_samplers {
            let tag = format!("base-{}", s.tag());
            let x = stages.samples(&tag, Method::Base, &prior, &classifiers["ce"], s, per, seed)?;
            compared.push((s.describe(), tag, x));
        }
        let main = first_per_class(&samples[&(Method::Base, seed)], cfg.n_per_class, per)?;
        compared.insert(
            0,
            (
                cfg.sampler.describe(),
                format!("base-{}", cfg.sampler.tag()),
                main,
            ),
        );
    }
    seconds.insert("samples", t.elapsed().as_secs_f64());
    if until == Stage::Samples || args.only.is_some() {
        return Ok(());
    }

    let Some((real_classifier, real_name)) = real else {
        return Ok(());
    };
    let t = Instant::now();
    let evaluator = Evaluator {
        real: cfg.real_test()?,
        test: stages.test_set()?,
        domain: FeatureNetwork::Domain {
            classifier: real_classifier,
            name: real_name.clone(),
        },
        inception: match cfg.inception {
            true => Some(FeatureNetwork::Inception(FidInception::from_cache(
                &device,
            )?)),
            false => None,
        },
        cache: Some(
            cfg.feature_cache
                .clone()
                .unwrap_or_else(|| out.join("feature_cache")),
        ),
    };
    let mut rows: BTreeMap<Method, Vec<Scores>> = BTreeMap::new();
    for (&(method, seed), x) in &samples {
        let s = stages.scores(method.name(), &evaluator, x, seed)?;
        rows.entry(method).or_default().push(s);
    }
    let mut comparison = Vec::new();
    for (i, (what, tag, x)) in compared.iter().enumerate() {
        // The main sampler's subset is its whole set when the sizes agree.
        let s = match (i, x.len() == samples[&(Method::Base, cfg.seeds[0])].len()) {
            (0, true) => rows[&Method::Base][0].clone(),
            _ => stages.scores(&format!("{tag}-subset"), &evaluator, x, cfg.seeds[0])?,
        };
        comparison.push(json!({"sampler": what, "images": x.len(), "fid": s.fid, "fid_domain": s.fid_domain, "is": s.is, "cas": s.cas, "precision": s.precision, "recall": s.recall}));
    }
    let real_cas = scoreguide::images::accuracy(
        match &evaluator.domain {
            FeatureNetwork::Domain { classifier, .. } => classifier,
            _ => unreachable!("built as a domain network above"),
        },
        &evaluator.test,
        500,
        &device,
    )?;
    // How near each classifier's input gradient is to the likelihood score: its held-out
    // DLSM loss over that of no guidance (the paper's Fig. 5a, measured on real images).
    let held_out = evaluator
        .test
        .take(EXCESS_IMAGES.min(evaluator.test.len()))?;
    let excess: BTreeMap<&str, Vec<f64>> = classifiers
        .keys()
        .copied()
        .zip(likelihood_score_excess(
            &classifiers.values().collect::<Vec<_>>(),
            &prior,
            &held_out,
            &EXCESS_SIGMAS,
            cfg.seeds[0],
            cfg.sample_batch,
            &device,
        )?)
        .collect();
    seconds.insert("scores", t.elapsed().as_secs_f64());

    print!("{}", table(&rows, &cfg));
    println!("\nCAS of the real-data classifier (upper bound): {real_cas:.4}");
    println!(
        "\nheld-out L_DLSM over no guidance, per pixel ({} test images; lower: nearer the likelihood score)",
        held_out.len()
    );
    println!(
        "| classifier | {} |",
        EXCESS_SIGMAS.map(|s| format!("σ = {s}")).join(" | ")
    );
    println!("|---|{}", "---|".repeat(EXCESS_SIGMAS.len()));
    for (name, e) in &excess {
        let cells: Vec<String> = e.iter().map(|v| format!("{v:.3e}")).collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
    if !comparison.is_empty() {
        println!("\nsampler comparison (base method, seed {}):", cfg.seeds[0]);
        for c in &comparison {
            println!("  {c}");
        }
    }
    let seed = cfg.seeds[0];
    let shown: Vec<&Images> = methods.iter().map(|m| &samples[&(*m, seed)]).collect();
    let grid = out.join("samples.png");
    method_grid(
        &grid,
        &shown,
        cfg.classifier.resnet.classes,
        cfg.n_per_class,
        cfg.grid_per_class,
    )?;
    let per_class: Vec<(&str, Vec<[f64; 4]>)> = rows
        .iter()
        .map(|(m, r)| (m.name(), mean_per_class(r)))
        .collect();
    let fig = out.join("classwise.png");
    classwise_figure(&fig, &per_class)?;
    let better = match (rows.get(&Method::Base), rows.get(&Method::Dlsm)) {
        (Some(base), Some(ours)) => classes_above(base, ours),
        _ => BTreeMap::new(),
    };
    for (metric, n) in &better {
        println!(
            "classes where dlsm's class-wise {metric} is above base's: {n} of {}",
            cfg.classifier.resnet.classes
        );
    }
    eprintln!(
        "wrote {} (rows: classes; columns: {}) and {}",
        grid.display(),
        methods
            .iter()
            .map(|m| m.name())
            .collect::<Vec<_>>()
            .join(", "),
        fig.display()
    );
    if let Some(p) = &args.common.json {
        let methods_json = rows
            .iter()
            .map(|(m, r)| summarise(m.name(), cfg.scale(*m), r))
            .collect::<candle_core::Result<Vec<_>>>()?;
        write_json(
            p,
            &json!({
                "dataset": format!("{:?}", cfg.data()),
                "n_per_class": cfg.n_per_class,
                "sampler": cfg.sampler.describe(),
                "seeds": cfg.seeds,
                "scaling": cfg.scaling,
                "real_images": evaluator.real.len(),
                "score_model_step": score_step,
                "classifier_iters": cfg.classifier.iters,
                "methods": methods_json,
                "classes_dlsm_above_base": better,
                "real_data_cas": real_cas,
                "likelihood_score_excess": {
                    "sigmas": EXCESS_SIGMAS,
                    "images": held_out.len(),
                    "classifiers": excess,
                },
                "sampler_comparison": comparison,
                "seconds": seconds,
            }),
        )?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}
