//! Evaluating DLSM's classifiers on two moons: score errors D_P and D_L against Parzen
//! scores on the paper's grid, and precision/recall/density/coverage of class-conditional
//! samples, per method (Table 1).

use super::{
    class_parzen, error_grid, pc_sampler, sample_class, to_f64_rows, DlsmMoonsConfig,
    MOONS_SAMPLE_SIGMA_MAX,
};
use candle_core::{Device, Result, Tensor};
use scoreguide_data::Parzen;
use scoreguide_guidance::{Cond, LogProb, Score};
use scoreguide_metrics::{prdc, score_errors, Prdc};
use scoreguide_nets::ToyClassifier;
use scoreguide_sde::randn;
use serde::Serialize;
use std::time::Instant;

/// σ at which DLSM measures score errors (DLSM §3, Table 1).
pub const SIGMA_EVAL: f64 = 7.5;
/// The two moons' classes (0: the outer moon).
pub const CLASSES: [u32; 2] = [0, 1];

/// One method's row of Table 1, per class.
#[derive(Debug, Clone, Serialize)]
pub struct Method {
    pub name: String,
    pub d_p: [f64; 2],
    pub d_l: [f64; 2],
    pub precision: [f64; 2],
    pub recall: [f64; 2],
    pub density: [f64; 2],
    pub coverage: [f64; 2],
}

/// Everything the table and the figure show.
pub struct Evaluation {
    pub methods: Vec<Method>,
    /// The grid the score fields are drawn on.
    pub grid: Vec<[f64; 2]>,
    /// (class, method, posterior score on the grid).
    pub fields: Vec<(usize, String, Vec<f64>)>,
    /// The Parzen posterior score per class, on the grid.
    pub true_post: Vec<Vec<f64>>,
    /// (method, samples per class as row-major pairs).
    pub samples: Vec<(String, Vec<Vec<f64>>)>,
    /// The data per class.
    pub class_points: Vec<Vec<f64>>,
}

/// Evaluates each `(name, classifier, scale)` guiding `prior` (the paper's methods: CE,
/// CE scaled, DLSM, total) on the data `points` with `labels`.
pub fn evaluate(
    prior: &dyn Score,
    methods: &[(&str, &ToyClassifier, f64)],
    points: &Tensor,
    labels: &[u32],
    cfg: &DlsmMoonsConfig,
    seed: u64,
    dev: &Device,
) -> Result<Evaluation> {
    let grid = error_grid();
    let grid_t = Tensor::from_vec(
        grid.iter()
            .flat_map(|p| p.map(|v| v as f32))
            .collect::<Vec<f32>>(),
        (grid.len(), 2),
        dev,
    )?;
    let sig = Tensor::full(SIGMA_EVAL as f32, grid.len(), dev)?;
    let parzen_all = Parzen::new(points, "two moons")?;
    let parzen_class = CLASSES
        .iter()
        .map(|&c| class_parzen(points, labels, c))
        .collect::<Result<Vec<_>>>()?;
    let true_prior = to_f64_rows(&parzen_all.score(&grid_t, &sig)?)?;
    let true_post = parzen_class
        .iter()
        .map(|p| to_f64_rows(&p.score(&grid_t, &sig)?))
        .collect::<Result<Vec<_>>>()?;
    let model_prior = to_f64_rows(&prior.score(&grid_t, &sig)?)?;
    let likelihood = |c: &ToyClassifier, class: u32, scale: f64| -> Result<Vec<f64>> {
        let g = c
            .for_class(class)?
            .input_gradient(&grid_t, &sig, &Cond::none())?
            .expect("the toy classifier has a hand-written input gradient");
        Ok(to_f64_rows(&g)?.into_iter().map(|v| v * scale).collect())
    };

    // Conditional samples, PRDC against each class's data.
    let (sampler, sigmas) = pc_sampler(cfg.steps, cfg.sample_sigma_min, MOONS_SAMPLE_SIGMA_MAX)?;
    let class_points: Vec<Vec<f64>> = CLASSES
        .iter()
        .map(|&c| {
            to_f64_rows(points).map(|v| {
                v.chunks_exact(2)
                    .zip(labels)
                    .filter(|(_, l)| **l == c)
                    .flat_map(|(r, _)| r.to_vec())
                    .collect()
            })
        })
        .collect::<Result<_>>()?;
    let mut rows = Vec::new();
    let mut fields = Vec::new();
    let mut sample_panels = Vec::new();
    for &(name, c, scale) in methods {
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
                prior,
                c,
                class,
                scale,
                cfg.samples,
                &sampler,
                &sigmas,
                scoreguide_sde::derive_seed(seed, 1000 + ci as u64),
                dev,
            )?;
            let fake = to_f64_rows(&x)?;
            let p: Prdc = prdc(&class_points[ci], &fake, 2, cfg.k)?;
            m.precision[ci] = p.precision;
            m.recall[ci] = p.recall;
            m.density[ci] = p.density;
            m.coverage[ci] = p.coverage;
            eprintln!(
                "{name} class {class}: D_P {dp:.3}, D_L {dl:.3}, precision {:.3}, recall {:.3} ({} samples in {:.0}s)",
                p.precision,
                p.recall,
                cfg.samples,
                ts.elapsed().as_secs_f64()
            );
            let post: Vec<f64> = model_prior.iter().zip(&lik).map(|(a, b)| a + b).collect();
            fields.push((ci, name.to_string(), post));
            samples.push(fake);
        }
        sample_panels.push((name.to_string(), samples));
        rows.push(m);
    }
    Ok(Evaluation {
        methods: rows,
        grid,
        fields,
        true_post,
        samples: sample_panels,
        class_points,
    })
}

/// Relative error of `prior`'s score against the Parzen score of `points`, on every 20th
/// point noised at each σ of a fixed list.
pub fn prior_error_profile(
    prior: &dyn Score,
    points: &Tensor,
    seed: u64,
) -> Result<Vec<(f64, f64)>> {
    use rand::SeedableRng;
    let parzen = Parzen::new(points, "two moons")?;
    let n = points.dim(0)?;
    let idx = Tensor::arange_step(0u32, n as u32, 20, points.device())?;
    let x0 = points.index_select(&idx, 0)?;
    let m = x0.dim(0)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(31));
    [10.0, 3.0, 1.0, 0.3, 0.1, 0.01]
        .into_iter()
        .map(|sigma: f64| {
            let z = randn(&mut rng, &[m, 2], points.device())?;
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

/// Prints the paper's Table 1 for `rows`.
pub fn print_table(rows: &[Method], k: usize) {
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
