//! Drawing motions from a model and the paper's Table 2 metrics.

use super::{MotionData, MotionEncoder, MotionRunConfig};
use candle_core::{bail, DType, Result, Tensor};
use rand::{Rng, SeedableRng};
use scoreguide_guidance::Score;
use scoreguide_losses::{dsm, DsmWeighting};
use scoreguide_metrics::{fid, kid, parallel_samples_needed, Rate};
use scoreguide_oracles::motion::{foot_skating, FEATURES};
use scoreguide_samplers::sample_many;
use scoreguide_sde::randn;
use scoreguide_train::Progress;
use serde::{Deserialize, Serialize};

/// `n` motions from `model` with the labels and lengths of `test`'s motions in turn
/// (motion i under key i mod |test|), sample i from noise stream (seed, i). Returns the
/// standardised rows and their keys.
pub fn sample_motions(
    model: &dyn Score,
    cfg: &MotionRunConfig,
    test: &MotionData,
    n: usize,
    seed: u64,
    progress: &mut Progress,
) -> Result<(Tensor, Vec<u32>)> {
    if test.is_empty() {
        bail!("motion sampling: no test motions to take labels and lengths from");
    }
    let keys: Vec<u32> = (0..n).map(|i| (i % test.len()) as u32).collect();
    let cond = test.cond_of(&keys)?;
    let (sampler, sigmas) = cfg.sampler()?;
    let batch = cfg.model.batch.max(100).min(n);
    let steps_per_batch = sigmas.len() - 1;
    let x = sample_many(
        &sampler,
        model,
        &cond,
        n,
        &[test.set.row_dim()],
        &sigmas,
        seed,
        batch,
        &test.device,
        &mut |done| progress.update(done * batch / steps_per_batch, ""),
    )?;
    Ok((x, keys))
}

/// One model's draws judged and scored (one sampling seed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeedScores {
    pub seed: u64,
    pub motions: usize,
    /// Motions with at least one penetrating frame.
    pub infraction: Rate,
    /// Penetrating frames among all real frames.
    pub infraction_per_frame: Rate,
    /// Mean depth of the deepest joint of infracting motions (m).
    pub mean_depth: f64,
    /// Foot-joint frame pairs in contact that slide more than 2.5 cm (GMD's skating).
    pub skating: f64,
    pub fid: f64,
    pub kid: f64,
    /// Mean feature distance of random pairs of draws (HumanML3D's diversity).
    pub diversity: f64,
    /// The encoder's accuracy on the draws' actions (how recognisable they are).
    pub action_accuracy: f64,
    pub r_elbo: f64,
}

/// Features of `data`'s motions `keys` (standardised rows `x`) under `encoder`.
pub fn features_of(
    encoder: &MotionEncoder,
    data: &MotionData,
    x: &Tensor,
    keys: &[u32],
) -> Result<Vec<f64>> {
    encoder.features(x, &data.set.masks(keys, &data.device)?)
}

/// Mean Euclidean distance between `pairs` random pairs of rows of `f` (`d` columns).
pub fn diversity(f: &[f64], d: usize, pairs: usize, seed: u64) -> f64 {
    let n = f.len() / d;
    if n < 2 {
        return 0.0;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let total: f64 = (0..pairs)
        .map(|_| {
            let (a, b) = (rng.random_range(0..n), rng.random_range(0..n));
            f[a * d..(a + 1) * d]
                .iter()
                .zip(&f[b * d..(b + 1) * d])
                .map(|(x, y)| (x - y) * (x - y))
                .sum::<f64>()
                .sqrt()
        })
        .sum();
    total / pairs as f64
}

/// Judges and scores draws `x` (keys into `test`) against the test motions' features.
#[allow(clippy::too_many_arguments)]
pub fn score_draws(
    cfg: &MotionRunConfig,
    test: &MotionData,
    encoder: &MotionEncoder,
    real_features: &[f64],
    x: &Tensor,
    keys: &[u32],
    seed: u64,
    r_elbo: f64,
) -> Result<SeedScores> {
    let oracle = cfg.oracle();
    let verdicts = test.judge(&oracle, x, keys)?;
    let bad = verdicts.iter().filter(|v| v.infracting()).count();
    let frames: usize = verdicts.iter().map(|v| v.penetrating.len()).sum();
    let bad_frames: usize = verdicts.iter().map(|v| v.penetrating_frames()).sum();
    let depths: Vec<f64> = verdicts
        .iter()
        .filter(|v| v.infracting())
        .map(|v| v.deepest as f64)
        .collect();
    let values = test
        .norm
        .denormalize(&x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    let d = test.set.row_dim();
    let (mut skate, mut contact) = (0, 0);
    for (r, &k) in keys.iter().enumerate() {
        let (s, c) = foot_skating(
            &values[r * d..(r + 1) * d],
            test.set.lengths[k as usize],
            0.05,
            0.025,
        )
        .map_err(|e| candle_core::Error::msg(format!("motion {r}: {e}")))?;
        skate += s;
        contact += c;
    }
    let fake = features_of(encoder, test, x, keys)?;
    let dim = encoder.dim();
    let labels: Vec<u32> = keys.iter().map(|&k| test.set.actions[k as usize]).collect();
    Ok(SeedScores {
        seed,
        motions: keys.len(),
        infraction: Rate::new(bad, keys.len())?,
        infraction_per_frame: Rate::new(bad_frames, frames)?,
        mean_depth: depths.iter().sum::<f64>() / depths.len().max(1) as f64,
        skating: skate as f64 / contact.max(1) as f64,
        fid: fid(real_features, &fake, dim)?,
        kid: kid(real_features, &fake, dim)?,
        diversity: diversity(&fake, dim, 300, seed),
        action_accuracy: encoder.accuracy(x, &test.set.masks(keys, &test.device)?, &labels)?,
        r_elbo,
    })
}

/// Reweighted ELBO (Gen-neG Eq. 4 with uniform γ_t): −½ E_t ‖ε̂ − ε‖² on `data`'s
/// motions, t uniform over the process's steps (stratified over `draws` draws per
/// motion), per real value (padding frames out), so motions of any length compare.
pub fn r_elbo(
    model: &dyn Score,
    cfg: &MotionRunConfig,
    data: &MotionData,
    draws: usize,
    seed: u64,
) -> Result<f64> {
    if draws == 0 || data.is_empty() {
        bail!("r-ELBO: need at least one draw and one motion");
    }
    let process = cfg.process();
    let (t0, t1) = process.t_range();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut total, mut values) = (0.0, 0.0);
    let n = data.len();
    for start in (0..n).step_by(100) {
        let idx: Vec<u32> = (start as u32..(start + 100).min(n) as u32).collect();
        let x0 = data.rows(&idx)?;
        let cond = data.cond_of(&idx)?;
        let real: f64 = idx
            .iter()
            .map(|&i| (data.set.lengths[i as usize] * FEATURES) as f64)
            .sum();
        for k in 0..draws {
            let sigmas: Vec<f32> = (0..idx.len())
                .map(|_| {
                    let u = (k as f64 + rng.random::<f64>()) / draws as f64;
                    process.sigma(t0 + u * (t1 - t0)) as f32
                })
                .collect();
            let sigma = Tensor::from_vec(sigmas, idx.len(), &data.device)?;
            let z = randn(&mut rng, x0.dims(), &data.device)?;
            let loss = dsm(model, &x0, &sigma, &z, &cond, DsmWeighting::SigmaSquared)?;
            total += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * idx.len() as f64;
        }
        values += real;
    }
    Ok(-0.5 * total / (values * draws as f64))
}

/// A model's row of the table: each metric's mean and sample std over sampling seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRow {
    pub name: String,
    pub infraction_rate: f64,
    pub infraction_rate_std: f64,
    pub infraction_per_frame: f64,
    pub infraction_per_frame_std: f64,
    pub r_elbo: f64,
    pub r_elbo_std: f64,
    pub fid: f64,
    pub fid_std: f64,
    pub kid: f64,
    pub kid_std: f64,
    pub diversity: f64,
    pub skating: f64,
    pub action_accuracy: f64,
    /// At the mean infraction rate, for one valid motion with probability 1 − δ.
    pub parallel_samples_needed: Option<u64>,
    pub seeds: Vec<SeedScores>,
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m, var.sqrt())
}

impl ModelRow {
    pub fn new(name: &str, seeds: Vec<SeedScores>, delta: f64) -> Result<Self> {
        if seeds.is_empty() {
            bail!("motion table: model {name} has no scored seeds");
        }
        let col = |f: fn(&SeedScores) -> f64| mean_std(&seeds.iter().map(f).collect::<Vec<_>>());
        let (inf, inf_s) = col(|s| s.infraction.rate);
        let (ipf, ipf_s) = col(|s| s.infraction_per_frame.rate);
        let (elbo, elbo_s) = col(|s| s.r_elbo);
        let (fid, fid_s) = col(|s| s.fid);
        let (kid, kid_s) = col(|s| s.kid);
        Ok(Self {
            name: name.into(),
            infraction_rate: inf,
            infraction_rate_std: inf_s,
            infraction_per_frame: ipf,
            infraction_per_frame_std: ipf_s,
            r_elbo: elbo,
            r_elbo_std: elbo_s,
            fid,
            fid_std: fid_s,
            kid,
            kid_std: kid_s,
            diversity: col(|s| s.diversity).0,
            skating: col(|s| s.skating).0,
            action_accuracy: col(|s| s.action_accuracy).0,
            parallel_samples_needed: parallel_samples_needed(inf, delta),
            seeds,
        })
    }
}

/// Table 2 as markdown: mean ± std over sampling seeds.
pub fn table(rows: &[ModelRow], samples: usize) -> String {
    let mut s = "| model | infraction % | inf. per frame % | r-ELBO | FID | KID ×10³ | diversity | skating % | action acc. | parallel samples |\n|---|---|---|---|---|---|---|---|---|---|\n".to_string();
    for r in rows {
        s += &format!(
            "| {} | {:.2} ± {:.2} | {:.2} ± {:.2} | {:.4} ± {:.4} | {:.3} ± {:.3} | {:.2} ± {:.2} | {:.3} | {:.1} | {:.3} | {} |\n",
            r.name,
            100.0 * r.infraction_rate,
            100.0 * r.infraction_rate_std,
            100.0 * r.infraction_per_frame,
            100.0 * r.infraction_per_frame_std,
            r.r_elbo,
            r.r_elbo_std,
            r.fid,
            r.fid_std,
            1e3 * r.kid,
            1e3 * r.kid_std,
            r.diversity,
            100.0 * r.skating,
            r.action_accuracy,
            r.parallel_samples_needed
                .map_or("—".to_string(), |n| n.to_string()),
        );
    }
    s + &format!(
        "\n{} motions per model and seed, {} seed(s); ± is the sample std over seeds.\n",
        samples,
        rows.first().map_or(0, |r| r.seeds.len())
    )
}
