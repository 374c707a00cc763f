//! DLSM's two-moons experiment (paper §3, Table 1, Fig. 1): a score model trained with
//! DSM, classifiers trained with cross-entropy, DLSM, or both, and how far each
//! classifier-guided posterior score is from the true (Parzen) one.
//!
//! ```text
//! cargo run --release --example dlsm_moons -- --quick
//! cargo run --release --example dlsm_moons -- --json out/dlsm_moons/result.json
//! ```

use candle_core::{DType, Tensor};
use clap::Parser;
use scoreguide::data::Dataset;
use scoreguide::guidance::{Cond, LogProb, Score};
use scoreguide::metrics::{prdc, score_errors, Prdc};
use scoreguide::moons::{
    class_parzen, error_grid, load_classifier, load_score, moons_data, pc_sampler, sample_class,
    to_f64_rows, train_classifier, train_score, ClassifierLoss, MoonsConfig,
};
use scoreguide::nets::ToyClassifier;
use scoreguide::plot::{save_grid, Canvas, Rgb, BLACK, BLUE, ORANGE};

const DARK_GREY: Rgb = [90, 90, 90];
use scoreguide::runtime::{write_json, CommonArgs};
use scoreguide::train::{Checkpoint, Progress};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "DLSM on two moons: score errors and conditional samples (paper Table 1)")]
struct Args {
    /// Reduced sizes: a check in minutes.
    #[arg(long)]
    quick: bool,
    /// Score-model training iterations (default 40k, the paper's; 4k with --quick).
    #[arg(long)]
    score_iters: Option<u64>,
    /// Training iterations of each classifier (default 40k; 4k with --quick).
    #[arg(long)]
    classifier_iters: Option<u64>,
    /// Conditional samples per class and method (default 10k; 2k with --quick).
    #[arg(long)]
    samples: Option<usize>,
    /// Predictor–corrector steps (default 1000, the paper's; 200 with --quick).
    #[arg(long)]
    steps: Option<usize>,
    /// Nearest neighbours for precision/recall/density/coverage.
    #[arg(long, default_value_t = 5)]
    k: usize,
    /// Reuse the checkpoints of an earlier run in the output directory.
    #[arg(long)]
    reuse: bool,
    /// Train (or reuse) the score model and only this classifier (`ce`, `dlsm` or
    /// `total`), then stop: lets the classifiers train in parallel processes, one per
    /// core, before a `--reuse` run evaluates them all.
    #[arg(long)]
    train_only: Option<String>,
    #[command(flatten)]
    common: CommonArgs,
}

/// σ at which DLSM measures score errors (SPEC §6).
const SIGMA_EVAL: f64 = 7.5;
const CLASSES: [u32; 2] = [0, 1];

#[derive(Serialize)]
struct Method {
    name: String,
    d_p: [f64; 2],
    d_l: [f64; 2],
    precision: [f64; 2],
    recall: [f64; 2],
    density: [f64; 2],
    coverage: [f64; 2],
}

#[derive(Serialize)]
struct Report {
    methods: Vec<Method>,
    sigma_eval: f64,
    k: usize,
    samples_per_class: usize,
    pc_steps: usize,
    /// (σ, mean ‖s_θ − s_Parzen‖ / mean ‖s_Parzen‖) of the prior score model.
    prior_relative_error: Vec<(f64, f64)>,
}

fn main() -> candle_core::Result<()> {
    let args = Args::parse();
    let dev = args.common.setup_flushing_subnormals()?;
    let out = args.common.out_dir("dlsm_moons");
    let q = args.quick;
    let cfg = MoonsConfig {
        score_iters: args.score_iters.unwrap_or(if q { 4_000 } else { 40_000 }),
        classifier_iters: args
            .classifier_iters
            .unwrap_or(if q { 4_000 } else { 40_000 }),
        seed: args.common.seed,
        ..MoonsConfig::default()
    };
    let n_samples = args.samples.unwrap_or(if q { 2_000 } else { 10_000 });
    let steps = args.steps.unwrap_or(if q { 200 } else { 1_000 });
    let (points, labels) = moons_data(&cfg)?;
    let data = Dataset::new(points.to_device(&dev)?, "two moons")?;

    // Training (or reuse), each model saved as it finishes.
    let t0 = Instant::now();
    let obtain = |name: &str,
                  train: &mut dyn FnMut() -> candle_core::Result<Checkpoint>|
     -> candle_core::Result<Checkpoint> {
        let path = out.join(format!("{name}.safetensors"));
        if args.reuse && path.exists() {
            eprintln!("{name}: reusing {}", path.display());
            return Checkpoint::load(&path);
        }
        let c = train()?;
        scoreguide::runtime::ensure_parent(&path)?;
        c.save(&path)?;
        Ok(c)
    };
    let score_ckpt = obtain("score", &mut || {
        train_score(
            &cfg,
            &data,
            &dev,
            &mut Progress::new("score model (DSM)", cfg.score_iters as usize),
        )
    })?;
    let prior = load_score(&score_ckpt, DType::F32, &dev)?;
    let mut classifiers = Vec::new();
    for (name, loss) in [
        ("ce", ClassifierLoss::CrossEntropy),
        ("dlsm", ClassifierLoss::Dlsm),
        ("total", ClassifierLoss::Total { ce_weight: 0.125 }),
    ] {
        if args.train_only.as_deref().is_some_and(|only| only != name) {
            continue;
        }
        let c = obtain(&format!("classifier_{name}"), &mut || {
            train_classifier(
                &cfg,
                loss,
                &prior,
                &data,
                &labels,
                &dev,
                &mut Progress::new(&format!("classifier {name}"), cfg.classifier_iters as usize),
            )
        })?;
        classifiers.push((name, load_classifier(&c, DType::F32, &dev)?));
    }
    eprintln!("models ready in {:.0}s", t0.elapsed().as_secs_f64());
    if args.train_only.is_some() {
        return Ok(());
    }
    let clf = |n: &str| {
        &classifiers
            .iter()
            .find(|(m, _)| *m == n)
            .expect("trained above")
            .1
    };
    // (name, classifier, scale): the paper's methods (a), (b), (d) and DLSM alone.
    let methods: [(&str, &ToyClassifier, f64); 4] = [
        ("ce", clf("ce"), 1.0),
        ("scaling", clf("ce"), 10.0),
        ("dlsm", clf("dlsm"), 1.0),
        ("total", clf("total"), 1.0),
    ];

    // How well the prior itself knows the data at each noise level: its score against
    // the Parzen score of all points, on every 20th point noised at σ (seeded).
    let prior_errors = prior_error_profile(&prior, &points, args.common.seed)?;
    eprintln!("prior score vs Parzen, mean ‖s_θ − s‖ / mean ‖s‖:");
    for (sigma, e) in &prior_errors {
        eprintln!("  σ = {sigma:<5}: {e:.3}");
    }

    // Score errors on DLSM's grid at σ = 7.5 against Parzen scores.
    let grid = error_grid();
    let grid_t = Tensor::from_vec(
        grid.iter()
            .flat_map(|p| p.map(|v| v as f32))
            .collect::<Vec<f32>>(),
        (grid.len(), 2),
        &dev,
    )?;
    let sig = Tensor::full(SIGMA_EVAL as f32, grid.len(), &dev)?;
    let parzen_all = scoreguide::data::Parzen::new(&points, "two moons")?;
    let parzen_class = CLASSES
        .iter()
        .map(|&c| class_parzen(&points, &labels, c))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let true_prior = to_f64_rows(&parzen_all.score(&grid_t, &sig)?)?;
    let true_post = parzen_class
        .iter()
        .map(|p| to_f64_rows(&p.score(&grid_t, &sig)?))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let model_prior = to_f64_rows(&prior.score(&grid_t, &sig)?)?;
    let likelihood = |c: &ToyClassifier, class: u32, scale: f64| -> candle_core::Result<Vec<f64>> {
        let g = c
            .for_class(class)?
            .input_gradient(&grid_t, &sig, &Cond::none())?
            .expect("the toy classifier has a hand-written input gradient");
        Ok(to_f64_rows(&g)?.into_iter().map(|v| v * scale).collect())
    };

    // Conditional samples, PRDC against each class's data.
    let (sampler, sigmas) = pc_sampler(steps, 0.01, 10.0)?;
    let class_points: Vec<Vec<f64>> = CLASSES
        .iter()
        .map(|&c| {
            to_f64_rows(&points).map(|v| {
                v.chunks_exact(2)
                    .zip(&labels)
                    .filter(|(_, l)| **l == c)
                    .flat_map(|(r, _)| r.to_vec())
                    .collect()
            })
        })
        .collect::<candle_core::Result<_>>()?;
    let mut rows = Vec::new();
    let mut panels = Vec::new();
    let mut sample_panels = Vec::new();
    for (name, c, scale) in methods {
        let mut m = Method {
            name: name.to_string(),
            d_p: [0.0; 2],
            d_l: [0.0; 2],
            precision: [0.0; 2],
            recall: [0.0; 2],
            density: [0.0; 2],
            coverage: [0.0; 2],
        };
        let mut samples = Vec::new();
        for (ci, &class) in CLASSES.iter().enumerate() {
            let lik = likelihood(c, class, scale)?;
            let (dp, dl) = score_errors(&true_post[ci], &true_prior, &model_prior, &lik, 2)?;
            m.d_p[ci] = dp;
            m.d_l[ci] = dl;
            let ts = Instant::now();
            let x = sample_class(
                &prior,
                c,
                class,
                scale,
                n_samples,
                &sampler,
                &sigmas,
                scoreguide::sde::derive_seed(args.common.seed, 1000 + ci as u64),
                &dev,
            )?;
            let fake = to_f64_rows(&x)?;
            let p: Prdc = prdc(&class_points[ci], &fake, 2, args.k)?;
            m.precision[ci] = p.precision;
            m.recall[ci] = p.recall;
            m.density[ci] = p.density;
            m.coverage[ci] = p.coverage;
            eprintln!(
                "{name} class {class}: D_P {dp:.3}, D_L {dl:.3}, precision {:.3}, recall {:.3} ({} samples in {:.0}s)",
                p.precision,
                p.recall,
                n_samples,
                ts.elapsed().as_secs_f64()
            );
            let post: Vec<f64> = model_prior.iter().zip(&lik).map(|(a, b)| a + b).collect();
            panels.push((ci, name.to_string(), post));
            samples.push(fake);
        }
        sample_panels.push((name.to_string(), samples));
        rows.push(m);
    }

    print_table(&rows, args.k);
    figure(
        &out.join("moons.png"),
        &grid,
        &panels,
        &true_post,
        &sample_panels,
        &class_points,
    )?;
    eprintln!("wrote {}", out.join("moons.png").display());
    if let Some(p) = &args.common.json {
        write_json(
            p,
            &Report {
                methods: rows,
                sigma_eval: SIGMA_EVAL,
                k: args.k,
                samples_per_class: n_samples,
                pc_steps: steps,
                prior_relative_error: prior_errors,
            },
        )?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

/// Relative error of `prior`'s score against the Parzen score of `points`, on every 20th
/// point noised at each σ of a fixed list.
fn prior_error_profile(
    prior: &dyn Score,
    points: &Tensor,
    seed: u64,
) -> candle_core::Result<Vec<(f64, f64)>> {
    use rand::SeedableRng;
    let parzen = scoreguide::data::Parzen::new(points, "two moons")?;
    let n = points.dim(0)?;
    let idx = Tensor::arange_step(0u32, n as u32, 20, points.device())?;
    let x0 = points.index_select(&idx, 0)?;
    let m = x0.dim(0)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(31));
    [10.0, 3.0, 1.0, 0.3, 0.1, 0.01]
        .into_iter()
        .map(|sigma: f64| {
            let z = scoreguide::sde::randn(&mut rng, &[m, 2], points.device())?;
            let x = (&x0 + (z * sigma)?)?;
            let sig = Tensor::full(sigma as f32, m, points.device())?;
            let truth = to_f64_rows(&parzen.score(&x, &sig)?)?;
            let model = to_f64_rows(&prior.score(&x, &sig)?)?;
            let (mut err, mut norm) = (0.0, 0.0);
            for (t, s) in truth.chunks_exact(2).zip(model.chunks_exact(2)) {
                err += (t[0] - s[0]).hypot(t[1] - s[1]);
                norm += t[0].hypot(t[1]);
            }
            Ok((sigma, err / norm))
        })
        .collect()
}

fn print_table(rows: &[Method], k: usize) {
    println!();
    println!("| method | D_P c1 | D_P c2 | D_L c1 | D_L c2 | precision c1 | precision c2 | recall c1 | recall c2 | density c1 | density c2 | coverage c1 | coverage c2 |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
            r.name, r.d_p[0], r.d_p[1], r.d_l[0], r.d_l[1], r.precision[0], r.precision[1],
            r.recall[0], r.recall[1], r.density[0], r.density[1], r.coverage[0], r.coverage[1]
        );
    }
    println!("| parzen oracle | 0.000 | 0.000 | 0.000 | 0.000 | – | – | – | – | – | – | – | – |");
    println!("(score errors on a 35 × 35 grid over [−40, 40] × [−25, 25] at σ = {SIGMA_EVAL}; precision/recall/density/coverage with k = {k} against each class's data; c1 = outer moon)");
}

const X_RANGE: (f64, f64) = (-40.0, 40.0);
const Y_RANGE: (f64, f64) = (-25.0, 25.0);

/// Posterior-score arrows on every other grid point, lengths compressed so both weak and
/// strong fields read.
fn field_panel(title: &str, grid: &[[f64; 2]], score: &[f64], color: Rgb) -> Canvas {
    let mut c = Canvas::new(520, 380, X_RANGE, Y_RANGE);
    let max = score
        .chunks_exact(2)
        .map(|s| s[0].hypot(s[1]))
        .fold(1e-12, f64::max);
    for (i, (p, s)) in grid.iter().zip(score.chunks_exact(2)).enumerate() {
        if (i / 35) % 2 == 1 || (i % 35) % 2 == 1 {
            continue;
        }
        let norm = s[0].hypot(s[1]);
        if norm == 0.0 {
            continue;
        }
        let len = 4.4 * (norm / max).sqrt();
        let tip = (p[0] + s[0] / norm * len, p[1] + s[1] / norm * len);
        c.arrow((p[0], p[1]), tip, color);
    }
    c.axes(title, &[-40.0, -20.0, 0.0, 20.0, 40.0], &[-20.0, 0.0, 20.0]);
    c
}

fn samples_panel(title: &str, per_class: &[Vec<f64>]) -> Canvas {
    let mut c = Canvas::new(520, 380, X_RANGE, Y_RANGE);
    for (pts, color) in per_class.iter().zip([BLUE, ORANGE]) {
        let n = pts.len() / 2;
        let alpha = (1500.0 / n as f32).clamp(0.05, 0.8);
        for p in pts.chunks_exact(2).take(5_000) {
            c.dot(p[0], p[1], 1.2, color, alpha);
        }
    }
    c.axes(title, &[-40.0, -20.0, 0.0, 20.0, 40.0], &[-20.0, 0.0, 20.0]);
    c
}

/// The paper's Fig. 1: posterior-score fields for each class (rows 1–2) and samples
/// (row 3), one column per method and the Parzen oracle (with the data as its samples).
fn figure(
    path: &Path,
    grid: &[[f64; 2]],
    panels: &[(usize, String, Vec<f64>)],
    true_post: &[Vec<f64>],
    samples: &[(String, Vec<Vec<f64>>)],
    data: &[Vec<f64>],
) -> candle_core::Result<()> {
    let names: Vec<String> = samples.iter().map(|(n, _)| n.clone()).collect();
    let mut all = Vec::new();
    for (ci, oracle) in true_post.iter().enumerate() {
        for name in &names {
            let (_, _, s) = panels
                .iter()
                .find(|(c, n, _)| *c == ci && n == name)
                .expect("one panel per method and class");
            all.push(field_panel(
                &format!("{name}: class {}", ci + 1),
                grid,
                s,
                BLACK,
            ));
        }
        all.push(field_panel(
            &format!("oracle: class {}", ci + 1),
            grid,
            oracle,
            DARK_GREY,
        ));
    }
    for (name, s) in samples {
        all.push(samples_panel(&format!("{name}: samples"), s));
    }
    all.push(samples_panel("data", data));
    save_grid(path, &all, names.len() + 1)
}
