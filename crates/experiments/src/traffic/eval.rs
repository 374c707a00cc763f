//! Evaluation: sampling on held-out maps, scene and vehicle rates, r-ELBO, and diagnostics of a classifier.

use super::{JudgedScenes, TrafficData, TrafficModel};
use candle_core::{bail, DType, Result, Tensor};
use scoreguide_genneg::StackedClassifier;
use scoreguide_guidance::{Cond, Score};
use scoreguide_losses::{dsm, DsmWeighting};
use scoreguide_nets::Classifier;
use scoreguide_oracles::scene::VEHICLE_FEATURES;
use scoreguide_oracles::{check_scene, RoadRaster, SceneVerdict};
use scoreguide_samplers::{initial_noise, Sampler};
use scoreguide_sde::{randn, Process, SampleNoise};
use serde::Serialize;

/// Scenes from `model` (a baseline, a distilled model or a Gen-neG stack's guided
/// score), scene k on the map of `data`'s scene `scene_indices[k]`, in batches of
/// `batch`, with per-sample seeded noise; returned in metres (`[n · A · 7]` values).
#[allow(clippy::too_many_arguments)]
pub fn sample_scenes(
    model: &dyn Score,
    data: &TrafficData,
    scene_indices: &[u32],
    sampler: &Sampler,
    sigmas: &[f64],
    seed: u64,
    batch: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<f32>> {
    let dim = data.set.scene_dim();
    let device = data.maps.device();
    let mut out = Vec::with_capacity(scene_indices.len() * dim);
    for (k, idx) in scene_indices.chunks(batch.max(1)).enumerate() {
        let cond = data.cond_of(idx)?;
        let mut noise = SampleNoise::new(seed, k * batch.max(1), idx.len());
        let x0 = initial_noise(&mut noise, &[idx.len(), dim], sigmas[0], DType::F32, device)?;
        let x = sampler.sample_with(model, x0, sigmas, &cond, &mut noise, None)?;
        out.extend(data.scaler.denormalize(&x.flatten_all()?.to_vec1::<f32>()?));
        progress(out.len() / dim);
    }
    Ok(out)
}

/// Scene-level rates: the fraction of scenes with a collision, with a vehicle off the
/// road, and with either; and the fraction of vehicles infracting (a scene rate near 1
/// can hide large changes in how many of its vehicles are wrong).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SceneRates {
    pub collision: f64,
    pub offroad: f64,
    pub infraction: f64,
    pub scenes: usize,
    /// Vehicles colliding / off the road / either, over all vehicles.
    pub vehicle_collision: f64,
    pub vehicle_offroad: f64,
    pub vehicle_infraction: f64,
}

/// Labels `agents` (scene i on map `data.set.map_of(scene_indices[i])`).
pub fn label_scenes(
    data: &TrafficData,
    scene_indices: &[u32],
    agents: &[f32],
) -> Result<(SceneRates, Vec<SceneVerdict>)> {
    let dim = data.set.scene_dim();
    if agents.len() != scene_indices.len() * dim {
        bail!(
            "labelling: {} values for {} scenes of {dim}",
            agents.len(),
            scene_indices.len()
        );
    }
    let verdicts: Vec<SceneVerdict> = scene_indices
        .iter()
        .zip(agents.chunks_exact(dim))
        .map(|(&i, a)| check_scene(data.set.map_of(i as usize), a))
        .collect();
    let n = verdicts.len().max(1) as f64;
    let frac =
        |f: &dyn Fn(&SceneVerdict) -> bool| verdicts.iter().filter(|v| f(v)).count() as f64 / n;
    let vehicles = n * (dim / VEHICLE_FEATURES).max(1) as f64;
    let per_vehicle = |f: &dyn Fn(&SceneVerdict) -> u64| {
        verdicts
            .iter()
            .map(|v| f(v).count_ones() as f64)
            .sum::<f64>()
            / vehicles
    };
    Ok((
        SceneRates {
            collision: frac(&|v| v.collision != 0),
            offroad: frac(&|v| v.offroad != 0),
            infraction: frac(&|v| !v.is_valid()),
            scenes: verdicts.len(),
            vehicle_collision: per_vehicle(&|v| v.collision),
            vehicle_offroad: per_vehicle(&|v| v.offroad),
            vehicle_infraction: per_vehicle(&|v| v.infracting()),
        },
        verdicts,
    ))
}

/// Reweighted ELBO of held-out scenes (the Gen-neG paper's r-ELBO: the ELBO with the
/// diffusion loss's own weighting), per scene: −½ E_{t, ε} ‖ε̂(x_t, t) − ε‖² summed over
/// the scene's values, with ε̂ = −σ s the ε-prediction of `model` and t uniform on
/// [1e-3, 1] of `process` (stratified: `draws` levels per scene). Constants are left
/// out, so only differences between models on the same scenes mean something; higher is
/// better.
pub fn r_elbo(
    model: &dyn Score,
    process: &Process,
    data: &TrafficData,
    draws: usize,
    seed: u64,
    batch: usize,
) -> Result<f64> {
    if draws == 0 || data.set.is_empty() {
        bail!("r-ELBO: need at least one draw and one scene");
    }
    let n = data.set.len();
    let device = data.maps.device();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let mut total = 0.0;
    for start in (0..n).step_by(batch.max(1)) {
        let idx: Vec<u32> = (start as u32..(start + batch.max(1)).min(n) as u32).collect();
        let cond = data.cond_of(&idx)?;
        let x0 = data.x.rows(&idx)?;
        for k in 0..draws {
            // Stratified t: draw k covers [k/draws, (k+1)/draws) of [1e-3, 1].
            let sigmas: Vec<f32> = (0..idx.len())
                .map(|_| {
                    let u = (k as f64 + rand::Rng::random::<f64>(&mut rng)) / draws as f64;
                    process.sigma(1e-3 + u * (1.0 - 1e-3)) as f32
                })
                .collect();
            let sigma = Tensor::from_vec(sigmas, idx.len(), device)?;
            let z = randn(&mut rng, x0.dims(), device)?;
            let loss = dsm(model, &x0, &sigma, &z, &cond, DsmWeighting::SigmaSquared)?;
            total += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * idx.len() as f64;
        }
    }
    Ok(-0.5 * total / (n * draws) as f64)
}

/// `[B, A]` logits of "vehicle a is valid" for scenes `x` (standardised) at noise
/// levels `sigma`, on the maps in `cond`; a time-independent classifier (`sigma_clean`)
/// looks at `base`'s one-step estimate x̂0 = x + σ² s.
fn agent_logits(
    classifier: &Classifier,
    sigma_clean: Option<f64>,
    base: &dyn Score,
    x: &Tensor,
    sigma: &Tensor,
    cond: &Cond,
) -> Result<Tensor> {
    match sigma_clean {
        Some(s) => {
            let x0 = base.denoise_with(x, sigma, cond)?;
            let clean = Tensor::full(s, sigma.dims1()?, sigma.device())?.to_dtype(sigma.dtype())?;
            classifier.logits(&x0, &clean, cond)
        }
        None => classifier.logits(x, sigma, cond),
    }
}

/// How well a per-vehicle classifier tells valid vehicles from infracting ones at one
/// noise level, on labelled scenes it was not trained on: its mean P(valid) for valid,
/// colliding and offroad vehicles, and the ROC AUC of its logit for valid against
/// colliding and against offroad vehicles (`None` where a group is empty).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassifierCheck {
    pub sigma: f64,
    pub p_valid: [Option<f64>; 3],
    pub auc_collision: Option<f64>,
    pub auc_offroad: Option<f64>,
}

/// [`ClassifierCheck`]s of `classifier` at each of `sigmas` on the scenes of `judged`
/// (on `data`'s maps), each scene noised once per σ (seeded), in batches of `batch`.
/// Guidance acts through the classifier at every σ of the sampling grid: one that
/// cannot tell an offroad vehicle at the small σ where the last steps place vehicles
/// cannot steer it back.
pub fn check_agent_classifier(
    classifier: &StackedClassifier,
    base: &TrafficModel,
    judged: &JudgedScenes,
    data: &TrafficData,
    sigmas: &[f64],
    seed: u64,
    batch: usize,
) -> Result<Vec<ClassifierCheck>> {
    let (x_all, dim, scenes) = judged.values("classifier check")?;
    let (drawn, verdicts) = (&judged.drawn, &judged.verdicts);
    let agents = dim / VEHICLE_FEATURES;
    let device = data.maps.device();
    let clf = classifier.build(DType::F32, device)?;
    let base_score = base.stack().guided(device)?;
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let mut out = Vec::with_capacity(sigmas.len());
    for &s in sigmas {
        if !(s.is_finite() && s > 0.0) {
            bail!("classifier check: σ must be positive, got {s}");
        }
        let mut logits: Vec<f32> = Vec::with_capacity(scenes * agents);
        for start in (0..scenes).step_by(batch.max(1)) {
            let end = (start + batch.max(1)).min(scenes);
            let n = end - start;
            let x0 = Tensor::from_slice(&x_all[start * dim..end * dim], (n, dim), device)?;
            let z = randn(&mut rng, x0.dims(), device)?;
            let x = (x0 + z.affine(s, 0.0)?)?;
            let sigma = Tensor::full(s as f32, n, device)?;
            let cond = data.cond_of(&drawn.keys[start..end])?;
            let l = agent_logits(
                &clf,
                classifier.time_independent,
                &base_score,
                &x,
                &sigma,
                &cond,
            )?;
            logits.extend(l.flatten_all()?.to_vec1::<f32>()?);
        }
        // Vehicles by group: valid, colliding, offroad (a vehicle can be both).
        let mut groups: [Vec<f64>; 3] = Default::default();
        for (i, v) in verdicts.iter().enumerate() {
            for a in 0..agents {
                let l = logits[i * agents + a] as f64;
                let bit = 1u64 << a;
                if v.infracting() & bit == 0 {
                    groups[0].push(l);
                }
                if v.collision & bit != 0 {
                    groups[1].push(l);
                }
                if v.offroad & bit != 0 {
                    groups[2].push(l);
                }
            }
        }
        let mean_p = |g: &[f64]| {
            (!g.is_empty())
                .then(|| g.iter().map(|l| 1.0 / (1.0 + (-l).exp())).sum::<f64>() / g.len() as f64)
        };
        let auc = |g: &[f64]| -> Result<Option<f64>> {
            if g.is_empty() || groups[0].is_empty() {
                return Ok(None);
            }
            Ok(Some(scoreguide_metrics::roc_auc(&groups[0], g)?))
        };
        out.push(ClassifierCheck {
            sigma: s,
            p_valid: [mean_p(&groups[0]), mean_p(&groups[1]), mean_p(&groups[2])],
            auc_collision: auc(&groups[1])?,
            auc_offroad: auc(&groups[2])?,
        });
    }
    Ok(out)
}

/// Where a classifier's guidance pulls the offroad vehicles of some labelled scenes:
/// for each whose centre is off the road, the distance to the nearest road cell and
/// the cosine between the position part of ∇x log C (in metres) and the way to that
/// cell, split at `near_m` (the map probe's reach).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OffroadPull {
    pub sigma: f64,
    /// Offroad vehicles whose centre is on the road (only the footprint is off).
    pub centre_on_road: usize,
    /// Offroad vehicles with the centre within / beyond `near_m` of the road.
    pub near: usize,
    pub far: usize,
    pub near_m: f64,
    /// Median distance of the off-road centres from the road, metres.
    pub median_distance_m: Option<f64>,
    /// Mean cosine between the pull and the way to the road (1: straight back to it).
    pub cos_near: Option<f64>,
    pub cos_far: Option<f64>,
    /// Median length of the pull, per metre.
    pub pull_near: Option<f64>,
    pub pull_far: Option<f64>,
}

/// The centre of the road cell of `map` nearest to `(x, y)`, if the map has road.
pub fn nearest_road_cell(map: &RoadRaster, x: f64, y: f64) -> Option<(f64, f64)> {
    let side = map.cell_size();
    let mut best: Option<(f64, (f64, f64))> = None;
    for (i, _) in map.road.iter().enumerate().filter(|(_, &r)| r) {
        let cx = -map.half_size + ((i % map.cells) as f64 + 0.5) * side;
        let cy = -map.half_size + ((i / map.cells) as f64 + 0.5) * side;
        let d = (cx - x).powi(2) + (cy - y).powi(2);
        if best.is_none_or(|(b, _)| d < b) {
            best = Some((d, (cx, cy)));
        }
    }
    best.map(|(_, p)| p)
}

/// [`OffroadPull`] of `classifier` at noise level `sigma`, evaluated on the clean
/// scenes of `judged` (on `data`'s maps), in batches of `batch`.
pub fn offroad_pull(
    classifier: &StackedClassifier,
    base: &TrafficModel,
    judged: &JudgedScenes,
    data: &TrafficData,
    sigma: f64,
    near_m: f64,
    batch: usize,
) -> Result<OffroadPull> {
    let (x_all, dim, scenes) = judged.values("offroad pull")?;
    let drawn = &judged.drawn;
    if !(sigma > 0.0 && near_m >= 0.0) {
        bail!("offroad pull: σ must be positive and near_m not negative, got {sigma} and {near_m}");
    }
    let agents = dim / VEHICLE_FEATURES;
    let device = data.maps.device();
    let scaler = &data.scaler;
    let metres = scaler.denormalize(&x_all);
    let one = StackedClassifier {
        weight: 1.0,
        gate: None,
        ..classifier.clone()
    };
    let guided = base.stack().with(one).guided(device)?;
    let (mut on_road, mut dist) = (0, Vec::new());
    // (cosine, |pull|) of the vehicles within and beyond `near_m`.
    let mut near: Vec<(f64, f64)> = Vec::new();
    let mut far: Vec<(f64, f64)> = Vec::new();
    for start in (0..scenes).step_by(batch.max(1)) {
        let end = (start + batch.max(1)).min(scenes);
        let verdicts = &judged.verdicts[start..end];
        if verdicts.iter().all(|v| v.offroad == 0) {
            continue;
        }
        let n = end - start;
        let x = Tensor::from_slice(&x_all[start * dim..end * dim], (n, dim), device)?;
        let sig = Tensor::full(sigma as f32, n, device)?;
        let cond = data.cond_of(&drawn.keys[start..end])?;
        let g: Vec<f32> = guided.guidance(&x, &sig, &cond)?.flatten_all()?.to_vec1()?;
        for (i, v) in (start..end).zip(verdicts) {
            let map = data.set.map_of(drawn.keys[i] as usize);
            for a in (0..agents).filter(|a| v.offroad & (1 << a) != 0) {
                // Vehicle a of scene i: in the whole set (metres) and in this batch (∇).
                let at = i * dim + a * VEHICLE_FEATURES;
                let k = at - start * dim;
                let (px, py) = (metres[at] as f64, metres[at + 1] as f64);
                if map.is_road(px, py) {
                    on_road += 1;
                    continue;
                }
                let Some((rx, ry)) = nearest_road_cell(map, px, py) else {
                    continue;
                };
                // ∂/∂metres = ∂/∂standardised ÷ std.
                let gx = g[k] as f64 / scaler.std[0] as f64;
                let gy = g[k + 1] as f64 / scaler.std[1] as f64;
                let (dx, dy) = (rx - px, ry - py);
                let d = dx.hypot(dy);
                let len = gx.hypot(gy);
                let cos = if len > 0.0 {
                    (gx * dx + gy * dy) / (len * d)
                } else {
                    0.0
                };
                dist.push(d);
                if d <= near_m {
                    near.push((cos, len))
                } else {
                    far.push((cos, len))
                }
            }
        }
    }
    let median = |mut v: Vec<f64>| -> Option<f64> {
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(v[v.len() / 2])
    };
    let mean = |v: &[(f64, f64)]| {
        (!v.is_empty()).then(|| v.iter().map(|p| p.0).sum::<f64>() / v.len() as f64)
    };
    Ok(OffroadPull {
        sigma,
        centre_on_road: on_road,
        near: near.len(),
        far: far.len(),
        near_m,
        median_distance_m: median(dist),
        cos_near: mean(&near),
        cos_far: mean(&far),
        pull_near: median(near.iter().map(|p| p.1).collect()),
        pull_far: median(far.iter().map(|p| p.1).collect()),
    })
}
