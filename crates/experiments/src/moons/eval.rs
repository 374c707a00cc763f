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
    /// Share of the class's samples nearer the other class's data than their own: drawn
    /// onto the wrong moon.
    pub wrong_class: [f64; 2],
    /// (σ, mean ‖k ∇x log p_φ(y | x) − ∇x log p(y | x)‖, mean ‖∇x log p(y | x)‖) at each
    /// class's data noised at σ, the truth from the Parzen scores: where along the
    /// noise levels the method's likelihood score is right (the truth vanishes at small σ,
    /// where a class's points are far from the other's, so the error is not relative).
    pub likelihood_error: Vec<(f64, f64, f64)>,
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
            wrong_class: [0.0; 2],
            likelihood_error: likelihood_error_profile(
                c,
                scale,
                points,
                labels,
                (&parzen_all, &parzen_class),
                seed,
            )?,
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
            m.wrong_class[ci] = nearer_other(&fake, &class_points[ci], &class_points[1 - ci]);
            eprintln!(
                "{name} class {class}: D_P {dp:.3}, D_L {dl:.3}, precision {:.3}, recall {:.3}, on the other moon {:.3} ({} samples in {:.0}s)",
                p.precision,
                p.recall,
                m.wrong_class[ci],
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

/// [`Method::likelihood_error`] of `classifier` scaled by `scale`: every 20th point of
/// each class noised at each σ of [`PROFILE_SIGMAS`].
pub fn likelihood_error_profile(
    classifier: &ToyClassifier,
    scale: f64,
    points: &Tensor,
    labels: &[u32],
    (parzen_all, parzen_class): (&Parzen, &[Parzen]),
    seed: u64,
) -> Result<Vec<(f64, f64, f64)>> {
    use rand::SeedableRng;
    let dev = points.device();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(37));
    PROFILE_SIGMAS
        .into_iter()
        .map(|sigma: f64| {
            let (mut err, mut norm, mut n) = (0.0, 0.0, 0usize);
            for (ci, &class) in CLASSES.iter().enumerate() {
                let idx: Vec<u32> = labels
                    .iter()
                    .enumerate()
                    .filter(|(_, &l)| l == class)
                    .map(|(i, _)| i as u32)
                    .step_by(20)
                    .collect();
                let m = idx.len();
                let x0 = points.index_select(&Tensor::new(idx, dev)?, 0)?;
                let z = randn(&mut rng, &[m, 2], dev)?;
                let x = (&x0 + (z * sigma)?)?;
                let sig = Tensor::full(sigma as f32, m, dev)?;
                let truth = (parzen_class[ci].score(&x, &sig)? - parzen_all.score(&x, &sig)?)?;
                let g = classifier
                    .for_class(class)?
                    .input_gradient(&x, &sig, &Cond::none())?
                    .expect("the toy classifier has a hand-written input gradient");
                let (truth, g) = (to_f64_rows(&truth)?, to_f64_rows(&g)?);
                for (t, g) in truth.chunks_exact(2).zip(g.chunks_exact(2)) {
                    err += (t[0] - scale * g[0]).hypot(t[1] - scale * g[1]);
                    norm += t[0].hypot(t[1]);
                    n += 1;
                }
            }
            Ok((sigma, err / n as f64, norm / n as f64))
        })
        .collect()
}

/// The noise levels of the error profiles.
pub const PROFILE_SIGMAS: [f64; 6] = [10.0, 3.0, 1.0, 0.3, 0.1, 0.01];

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
    PROFILE_SIGMAS
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
    println!("| method | D_P c1 | D_P c2 | D_L c1 | D_L c2 | precision c1 | precision c2 | recall c1 | recall c2 | density c1 | density c2 | coverage c1 | coverage c2 | other moon c1 | other moon c2 |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
            r.name, r.d_p[0], r.d_p[1], r.d_l[0], r.d_l[1], r.precision[0], r.precision[1],
            r.recall[0], r.recall[1], r.density[0], r.density[1], r.coverage[0], r.coverage[1],
            r.wrong_class[0], r.wrong_class[1]
        );
    }
    println!(
        "| parzen oracle | 0.000 | 0.000 | 0.000 | 0.000 | – | – | – | – | – | – | – | – | – | – |"
    );
    println!("(score errors on a 35 × 35 grid over [−40, 40] × [−25, 25] at σ = {SIGMA_EVAL}; precision/recall/density/coverage with k = {k} against each class's data; other moon: share of a class's samples nearer the other class's data; c1 = outer moon)");
    println!("\nlikelihood score vs Parzen at each class's data noised at σ, mean ‖k ∇x log p_φ − ∇x log p(y | x)‖ (the truth's mean norm in the last row):");
    let header: Vec<String> = PROFILE_SIGMAS.iter().map(|s| format!("σ = {s}")).collect();
    println!("| method | {} |", header.join(" | "));
    println!("|---|{}", "---|".repeat(PROFILE_SIGMAS.len()));
    for r in rows {
        let cells: Vec<String> = r
            .likelihood_error
            .iter()
            .map(|(_, e, _)| format!("{e:.4}"))
            .collect();
        println!("| {} | {} |", r.name, cells.join(" | "));
    }
    if let Some(r) = rows.first() {
        let cells: Vec<String> = r
            .likelihood_error
            .iter()
            .map(|(_, _, t)| format!("{t:.4}"))
            .collect();
        println!("| ‖∇x log p(y | x)‖ | {} |", cells.join(" | "));
    }
}

/// Share of the points `x` (row-major pairs) whose nearest point of `other` is nearer
/// than their nearest point of `own`.
pub fn nearer_other(x: &[f64], own: &[f64], other: &[f64]) -> f64 {
    let nearest = |p: &[f64], set: &[f64]| {
        set.chunks_exact(2)
            .map(|q| (p[0] - q[0]).powi(2) + (p[1] - q[1]).powi(2))
            .fold(f64::INFINITY, f64::min)
    };
    let n = x.len() / 2;
    if n == 0 {
        return 0.0;
    }
    let wrong = x
        .chunks_exact(2)
        .filter(|p| nearest(p, other) < nearest(p, own))
        .count();
    wrong as f64 / n as f64
}

#[cfg(test)]
mod tests {
    use super::nearer_other;

    #[test]
    fn nearer_other_counts_points_closer_to_the_other_set() {
        let own = [0.0, 0.0, 1.0, 0.0];
        let other = [10.0, 0.0];
        // 0.5 and 4.9 are nearer `own` (the midpoint is 5.5); 6 and 12 nearer `other`.
        let x = [0.5, 0.0, 4.9, 0.0, 6.0, 0.0, 12.0, 0.0];
        assert_eq!(nearer_other(&x, &own, &other), 0.5);
        assert_eq!(nearer_other(&x, &other, &own), 0.5);
        assert_eq!(nearer_other(&x[..2], &own, &other), 0.0);
        assert_eq!(nearer_other(&[], &own, &other), 0.0);
    }
}
