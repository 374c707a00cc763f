//! Traffic scenes (Gen-neG paper §4.2, on our procedural stand-in data): feature
//! scaling, the baseline score model (the scene transformer under a VP process, trained
//! with DSM), map-conditioned sampling, scene-level infraction rates, and rendering of
//! scenes with their infracting vehicles highlighted, like the paper's Fig. 1.

use crate::data::{Dataset, MapLayers, SceneSet};
use crate::guidance::{check_batch, grad_log_prob, log_sigmoid, per_sample, LogProb, Score};
use crate::losses::{distillation, dsm, DsmWeighting};
use crate::nets::{
    BoundScene, MapProbe, ParamStore, Precond, SceneMaps, SceneTransformer, SceneTransformerConfig,
    ScoreNet, SinusoidalEmbedding,
};
use crate::oracles::scene::VEHICLE_FEATURES;
use crate::oracles::{check_scene, OrientedBox, RoadRaster, SceneVerdict};
use crate::plot::{Canvas, Rgb, BLACK, BLUE, RED};
use crate::samplers::{initial_noise, Sampler};
use crate::sde::{randn, Process, SampleNoise, SigmaDistribution};
use crate::train::{load_frozen, Checkpoint, Progress, TrainConfig, Trainer, Weights};
use candle_core::{bail, DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};

/// Road colour.
const ROAD: Rgb = [190, 190, 190];

/// One scene on its map as a square panel: road grey, valid vehicles blue, vehicles that
/// collide or leave the road red, each with a stroke from its centre along its heading.
pub fn scene_panel(title: &str, map: &RoadRaster, agents: &[f32], px: usize) -> Canvas {
    let h = map.half_size;
    let mut c = Canvas::new(px + 80, px + 56, (-h, h), (-h, h));
    c.fill_where((-h, h), (-h, h), ROAD, 1.0, |x, y| map.is_road(x, y));
    let verdict = check_scene(map, agents);
    for (i, v) in agents.chunks_exact(VEHICLE_FEATURES).enumerate() {
        let b = OrientedBox::from_features(v);
        let colour = if verdict.infracting() & (1 << i) != 0 {
            RED
        } else {
            BLUE
        };
        let r = 0.5 * b.length.hypot(b.width);
        c.fill_where(
            (b.cx - r, b.cx + r),
            (b.cy - r, b.cy + r),
            colour,
            0.75,
            |x, y| b.contains(x, y),
        );
        let [(ux, uy), _] = b.axes();
        let nose = (b.cx + 0.5 * b.length * ux, b.cy + 0.5 * b.length * uy);
        c.line((b.cx, b.cy), nose, BLACK, 1);
    }
    let ticks = [-h, 0.0, h];
    c.axes(title, &ticks, &ticks);
    c
}

/// Per-feature standardisation of vehicle features, fitted on training scenes: the
/// diffusion model works on standardised values, the oracle on metres.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureScaler {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl FeatureScaler {
    /// Mean and standard deviation of each of the 7 features over all vehicles.
    pub fn fit(agents: &[f32]) -> Result<Self> {
        let f = VEHICLE_FEATURES;
        if agents.is_empty() || agents.len() % f != 0 {
            bail!(
                "feature scaler: {} values are not a whole number of vehicles",
                agents.len()
            );
        }
        let n = (agents.len() / f) as f64;
        let mut mean = vec![0f64; f];
        let mut sq = vec![0f64; f];
        for v in agents.chunks_exact(f) {
            for k in 0..f {
                mean[k] += v[k] as f64 / n;
                sq[k] += (v[k] as f64).powi(2) / n;
            }
        }
        let std: Vec<f32> = (0..f)
            .map(|k| (sq[k] - mean[k] * mean[k]).max(0.0).sqrt().max(1e-3) as f32)
            .collect();
        Ok(Self {
            mean: mean.into_iter().map(|m| m as f32).collect(),
            std,
        })
    }

    pub fn normalize(&self, agents: &[f32]) -> Vec<f32> {
        agents
            .iter()
            .enumerate()
            .map(|(i, v)| (v - self.mean[i % VEHICLE_FEATURES]) / self.std[i % VEHICLE_FEATURES])
            .collect()
    }

    pub fn denormalize(&self, x: &[f32]) -> Vec<f32> {
        x.iter()
            .enumerate()
            .map(|(i, v)| v * self.std[i % VEHICLE_FEATURES] + self.mean[i % VEHICLE_FEATURES])
            .collect()
    }
}

/// The baseline's settings: network, VP process (a DDPM-style model driven in σ-space,
/// ε-prediction), training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrafficConfig {
    pub net: SceneTransformerConfig,
    pub process: Process,
    pub batch: usize,
    pub iters: u64,
    pub lr: f64,
    pub seed: u64,
    /// Noise levels seen in training (networks and classifiers); `None`: DDPM's t
    /// uniform on [1e-3, 1], which puts little weight on the small σ where vehicles are
    /// placed to within the road's margins.
    #[serde(default)]
    pub train_sigma: Option<SigmaDistribution>,
    /// How the maps are drawn for the networks (`net.map_channels` layers).
    #[serde(default)]
    pub map_layers: MapLayers,
}

impl Default for TrafficConfig {
    fn default() -> Self {
        Self {
            net: SceneTransformerConfig::traffic(VEHICLE_FEATURES),
            process: Process::vp(0.1, 20.0),
            batch: 256,
            iters: 20_000,
            lr: 5e-4,
            seed: 0,
            train_sigma: None,
            map_layers: MapLayers::Road,
        }
    }
}

impl TrafficConfig {
    /// This configuration with the networks seeing the maps as rendered road images
    /// ([`MapLayers::RoadAndLanes`]: road, lane centres, direction of travel) at 64 cells
    /// per side (1 m on our 64 m scenes; the map encoder averages them to its 32).
    /// A probe added after this ([`TrafficConfig::with_map_probe`]) reads a grid 1 m
    /// apart; one added before keeps its grid in metres (2 m apart).
    pub fn with_lane_maps(self) -> Self {
        self.with_rendered_maps(MapLayers::RoadAndLanes)
    }

    /// [`TrafficConfig::with_lane_maps`] with a fifth layer, the clipped distance to the
    /// road ([`MapLayers::RoadLanesAndDistance`]), whose gradient reaches vehicles far
    /// off the road.
    pub fn with_distance_maps(self) -> Self {
        self.with_rendered_maps(MapLayers::RoadLanesAndDistance)
    }

    /// The maps drawn as `layers` at 64 cells per side (see
    /// [`TrafficConfig::with_lane_maps`]).
    fn with_rendered_maps(mut self, layers: MapLayers) -> Self {
        let before = self.net.map_input_side() as f64;
        self.map_layers = layers;
        self.net.map_channels = layers.channels();
        self.net.map_input_cells = Some(2 * self.net.map_cells);
        let k = self.net.map_input_side() as f64 / before;
        if let Some(p) = &mut self.net.map_probe {
            // Cell centres sit at integer positions: column c at side n is at
            // (c + ½)·k − ½ at side k·n.
            for axis in 0..2 {
                p.scale[axis] *= k;
                p.offset[axis] = (p.offset[axis] + 0.5) * k - 0.5;
            }
            p.spacing *= k;
        }
        self
    }

    /// This configuration with the network reading the map around each vehicle
    /// ([`MapProbe`]): a 5 × 5 grid one map input cell apart (2 m on 32-cell maps of our
    /// 64 m scenes, 1 m with [`TrafficConfig::with_lane_maps`]), placed through
    /// `scaler`'s units on maps spanning ±`half_size` metres.
    pub fn with_map_probe(mut self, scaler: &FeatureScaler, half_size: f64) -> Self {
        let cell = 2.0 * half_size / self.net.map_input_side() as f64;
        let axis = |k: usize| {
            (
                scaler.std[k] as f64 / cell,
                (scaler.mean[k] as f64 + half_size) / cell - 0.5,
            )
        };
        let ((sx, ox), (sy, oy)) = (axis(0), axis(1));
        self.net.map_probe = Some(MapProbe {
            scale: [sx, sy],
            offset: [ox, oy],
            side: 5,
            spacing: 1.0,
        });
        self
    }

    fn precond(&self) -> Precond {
        Precond::Eps {
            process: self.process.clone(),
        }
    }

    /// This configuration with a sinusoidal embedding of each vehicle's position in the
    /// networks (32 values per axis, angular frequencies 1 … 100 per standardised unit:
    /// wavelengths from about 90 m down to about 1 m at our scenes' spread of 14 m).
    pub fn with_position_embedding(mut self) -> Self {
        self.net.position_embedding = Some(SinusoidalEmbedding {
            dim: 32,
            max_freq: 100.0,
        });
        self
    }

    /// This configuration trained at ln σ uniform between `sigma_min` and the process's
    /// σ(1): as much weight per octave of noise at 0.01 as at 10.
    pub fn with_log_uniform_sigma(mut self, sigma_min: f64) -> Self {
        self.train_sigma = Some(SigmaDistribution::LogUniform {
            min: sigma_min,
            max: self.process.sigma(1.0),
        });
        self
    }

    /// Training noise levels: `train_sigma`, else t uniform on [1e-3, 1] through the VP
    /// process.
    fn sigma_distribution(&self) -> SigmaDistribution {
        self.train_sigma
            .clone()
            .unwrap_or_else(|| SigmaDistribution::UniformT {
                process: self.process.clone(),
                t_min: 1e-3,
                t_max: 1.0,
            })
    }
}

/// Scenes ready for a model: standardised vehicles `[N, A·7]`, maps drawn as the
/// model's configuration asks (`[M, C, s, s]`), and which map each scene is on.
pub struct TrafficData {
    pub set: SceneSet,
    pub scaler: FeatureScaler,
    pub x: Dataset,
    pub maps: Tensor,
    pub map_index: Tensor,
}

impl TrafficData {
    /// The maps are drawn for networks of `cfg` (its layers, at its input side).
    pub fn new(
        set: SceneSet,
        scaler: FeatureScaler,
        cfg: &TrafficConfig,
        device: &Device,
    ) -> Result<Self> {
        if cfg.net.map_channels != cfg.map_layers.channels() {
            bail!(
                "traffic config: {:?} maps have {} layers, the network takes {}",
                cfg.map_layers,
                cfg.map_layers.channels(),
                cfg.net.map_channels
            );
        }
        let x = Tensor::from_vec(
            scaler.normalize(&set.agents),
            (set.len(), set.scene_dim()),
            device,
        )?;
        Ok(Self {
            x: Dataset::new(x, "traffic scenes")?,
            maps: set.render_maps(cfg.net.map_input_side(), cfg.map_layers, device)?,
            map_index: Tensor::from_slice(&set.map_index, set.len(), device)?,
            scaler,
            set,
        })
    }

    /// This data with `copies` copies of more scenes appended, scene k (`agents` in metres,
    /// `[n · A · 7]` values) on the map of this data's scene `scene_indices[k]`, in the
    /// same standardised units (the scaler is kept) and with the same rendered maps. For
    /// distilling where a teacher's own samples go as well as on the data; `copies` sets
    /// their share of the batches.
    pub fn with_scenes(
        &self,
        scene_indices: &[u32],
        agents: &[f32],
        copies: usize,
    ) -> Result<Self> {
        let dim = self.set.scene_dim();
        if agents.len() != scene_indices.len() * dim {
            bail!(
                "appended scenes: {} values for {} scenes of {dim}",
                agents.len(),
                scene_indices.len()
            );
        }
        if agents.iter().any(|v| !v.is_finite()) {
            bail!("appended scenes: the vehicles hold NaN or infinite values");
        }
        let maps = scene_indices
            .iter()
            .map(|&i| {
                self.set.map_index.get(i as usize).copied().ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "appended scenes: scene index {i} is not among the data's {} scenes",
                        self.set.len()
                    ))
                })
            })
            .collect::<Result<Vec<u32>>>()?;
        let mut set = self.set.clone();
        for _ in 0..copies {
            set.map_index.extend_from_slice(&maps);
            set.agents.extend_from_slice(agents);
        }
        // Only the new rows are standardised; the maps are shared, not drawn again.
        let device = self.maps.device();
        let added = Tensor::from_vec(
            self.scaler.normalize(&set.agents[self.set.agents.len()..]),
            (copies * scene_indices.len(), dim),
            device,
        )?;
        Ok(Self {
            x: Dataset::new(Tensor::cat(&[self.x.tensor(), &added], 0)?, self.x.name())?,
            maps: self.maps.clone(),
            map_index: Tensor::from_slice(&set.map_index, set.len(), device)?,
            scaler: self.scaler.clone(),
            set,
        })
    }

    /// The maps of the scenes `idx`, `[len, C, s, s]`.
    pub fn maps_of(&self, idx: &[u32]) -> Result<Tensor> {
        let which = self
            .map_index
            .index_select(&Tensor::from_slice(idx, idx.len(), self.maps.device())?, 0)?;
        self.maps.index_select(&which, 0)
    }
}

/// Trains the baseline score model with DSM (λ = σ², the ε-loss of DDPM); returns the
/// checkpoint (EMA weights under `ema.`, configuration and scaler in the metadata).
pub fn train_score(
    cfg: &TrafficConfig,
    data: &TrafficData,
    device: &Device,
    progress: &mut Progress,
) -> Result<Checkpoint> {
    fit_score(cfg, data, None, None, None, device, progress)
}

/// [`train_score`] in stages that survive an interruption: every `save_every` steps the
/// whole training state (weights, EMA, Adam moments, step, configuration and scaler) is
/// passed to `save` (write it atomically: `Checkpoint::save` does), and a state saved so
/// is continued with `resume`. Each step's randomness depends on the step alone, so the
/// result is the uninterrupted run's to the bit. `resume` must come from this
/// configuration (up to `iters`, so a run can also be extended) and data's scaler.
pub fn train_score_resumable(
    cfg: &TrafficConfig,
    data: &TrafficData,
    resume: Option<&Checkpoint>,
    save_every: u64,
    save: &mut dyn FnMut(&Checkpoint) -> Result<()>,
    device: &Device,
    progress: &mut Progress,
) -> Result<Checkpoint> {
    fit_staged(
        cfg,
        data,
        None,
        None,
        Staged {
            resume,
            save_every,
            save,
        },
        "baseline",
        device,
        progress,
    )
}

/// [`fit_score`] with `staged` saving, after checking `staged.resume` ([`check_resumable`]);
/// `what` names the run in errors ("baseline", "distillation").
#[allow(clippy::too_many_arguments)]
fn fit_staged(
    cfg: &TrafficConfig,
    data: &TrafficData,
    teacher: Option<&TrafficStack>,
    init: Option<&Checkpoint>,
    staged: Staged,
    what: &str,
    device: &Device,
    progress: &mut Progress,
) -> Result<Checkpoint> {
    if staged.save_every == 0 {
        bail!("{what}: save_every must be at least 1 step");
    }
    if let Some(c) = staged.resume {
        check_resumable(c, cfg, data, &format!("resumed {what}"))?;
    }
    fit_score(cfg, data, teacher, init, Some(staged), device, progress)
}

/// Refuses to continue `c` unless it was trained with `cfg` (up to `iters`, so that a
/// run can be extended), on `data`'s scaler, for no more than `cfg.iters` steps.
fn check_resumable(
    c: &Checkpoint,
    cfg: &TrafficConfig,
    data: &TrafficData,
    what: &str,
) -> Result<()> {
    let saved: TrafficConfig = c.meta("traffic")?;
    if (TrafficConfig {
        iters: cfg.iters,
        ..saved.clone()
    }) != *cfg
    {
        bail!("{what}: the checkpoint was trained with {saved:?}, this run asks for {cfg:?}");
    }
    let scaler: FeatureScaler = c.meta("scaler")?;
    if scaler != data.scaler {
        bail!("{what}: the checkpoint's feature scaler is not this data's (other training scenes)");
    }
    let step: u64 = c.meta("step")?;
    if step > cfg.iters {
        bail!(
            "{what}: the checkpoint has done {step} steps, more than the {} asked for",
            cfg.iters
        );
    }
    Ok(())
}

/// Resuming and periodic saving for [`fit_score`].
struct Staged<'a, 'b> {
    resume: Option<&'a Checkpoint>,
    save_every: u64,
    save: &'b mut dyn FnMut(&Checkpoint) -> Result<()>,
}

/// Distils a Gen-neG stack into one network of the baseline's architecture (paper Eq.
/// 12): on the **true** training scenes, the student's denoiser is fitted to the
/// teacher's (λ = σ²), starting from the baseline's weights `init`. `cfg.iters` steps.
pub fn distill(
    cfg: &TrafficConfig,
    teacher: &TrafficStack,
    init: &Checkpoint,
    data: &TrafficData,
    device: &Device,
    progress: &mut Progress,
) -> Result<Checkpoint> {
    fit_score(cfg, data, Some(teacher), Some(init), None, device, progress)
}

/// [`distill`] in stages that survive an interruption, and that can be extended: every
/// `save_every` steps the whole training state is passed to `save`, and a state saved so
/// (or a finished distillation of fewer than `cfg.iters` steps) is continued with
/// `resume`. As for [`train_score_resumable`], the result is the uninterrupted run's to
/// the bit (the learning rate is constant after its warm-up). The checkpoint does not
/// record the teacher: the caller must check that `resume` was distilled from this
/// `teacher` (e.g. by metadata of its own).
#[allow(clippy::too_many_arguments)]
pub fn distill_resumable(
    cfg: &TrafficConfig,
    teacher: &TrafficStack,
    init: &Checkpoint,
    data: &TrafficData,
    resume: Option<&Checkpoint>,
    save_every: u64,
    save: &mut dyn FnMut(&Checkpoint) -> Result<()>,
    device: &Device,
    progress: &mut Progress,
) -> Result<Checkpoint> {
    fit_staged(
        cfg,
        data,
        Some(teacher),
        Some(init),
        Staged {
            resume,
            save_every,
            save,
        },
        "distillation",
        device,
        progress,
    )
}

/// Trains the baseline `cfg.iters` more steps on the data from its own (EMA) weights,
/// with the same warm start as [`distill`]: the control that separates what
/// distillation adds from what extra training steps add.
pub fn train_more(
    cfg: &TrafficConfig,
    init: &Checkpoint,
    data: &TrafficData,
    device: &Device,
    progress: &mut Progress,
) -> Result<Checkpoint> {
    fit_score(cfg, data, None, Some(init), None, device, progress)
}

fn fit_score(
    cfg: &TrafficConfig,
    data: &TrafficData,
    teacher: Option<&TrafficStack>,
    init: Option<&Checkpoint>,
    mut staged: Option<Staged>,
    device: &Device,
    progress: &mut Progress,
) -> Result<Checkpoint> {
    let store = ParamStore::new(cfg.seed);
    let net = SceneTransformer::new(cfg.net, store.var_builder(DType::F32, device))?;
    if let Some(c) = init {
        store.assign(&c.section("ema"), "the initial (baseline) weights")?;
    }
    let train = TrainConfig {
        lr: cfg.lr,
        seed: cfg.seed,
        // A warm start (distillation) needs less warm-up than training from scratch.
        warmup_steps: if init.is_some() { 200 } else { 500 },
        ..TrainConfig::default()
    };
    let sigma_dist = cfg.sigma_distribution();
    sigma_dist.validate()?;
    let mut trainer = Trainer::new(store, train)?;
    if let Some(c) = staged.as_ref().and_then(|s| s.resume) {
        trainer.restore(c)?;
    }
    let state = |trainer: &Trainer| -> Result<Checkpoint> {
        let mut c = trainer.checkpoint()?;
        c.set_meta("traffic", cfg)?;
        c.set_meta("scaler", &data.scaler)?;
        Ok(c)
    };
    let mut step_loss = |step: u64, rng: &mut rand::rngs::StdRng| {
        let idx = data.x.step_batch(cfg.batch, cfg.seed, step)?;
        let x0 = data.x.rows(&idx)?;
        let maps = data.maps_of(&idx)?;
        let model = ScoreNet::new(net.bind(net.encode_maps(&maps)?), cfg.precond())?;
        let sigma = sigma_dist.sample_tensor(idx.len(), rng, device)?;
        let z = randn(rng, x0.dims(), device)?;
        match teacher {
            None => dsm(&model, &x0, &sigma, &z, DsmWeighting::SigmaSquared),
            Some(t) => distillation(
                &model,
                &t.on_maps(&maps)?,
                &x0,
                &sigma,
                &z,
                DsmWeighting::SigmaSquared,
            ),
        }
    };
    match &mut staged {
        None => {
            trainer.run(cfg.iters, progress, &mut step_loss)?;
        }
        Some(st) => {
            while trainer.steps_done() < cfg.iters {
                let until = (trainer.steps_done() / st.save_every + 1) * st.save_every;
                trainer.run(until.min(cfg.iters), progress, &mut step_loss)?;
                (st.save)(&state(&trainer)?)?;
            }
        }
    }
    state(&trainer)
}

/// A frozen traffic score model (EMA weights) and its feature scaler.
pub struct TrafficModel {
    pub config: TrafficConfig,
    pub scaler: FeatureScaler,
    /// Parameters of the network.
    pub params: usize,
    net: SceneTransformer,
}

impl TrafficModel {
    pub fn load(c: &Checkpoint, dtype: DType, device: &Device) -> Result<Self> {
        let config: TrafficConfig = c.meta("traffic")?;
        let scaler: FeatureScaler = c.meta("scaler")?;
        let (net, params) = load_frozen(
            c,
            Weights::Ema,
            dtype,
            device,
            "traffic model checkpoint",
            |vb| SceneTransformer::new(config.net, vb.clone()),
        )?;
        Ok(Self {
            config,
            scaler,
            params,
            net,
        })
    }

    /// The score model for scenes on `maps` (`[B, C, s, s]`, one per scene).
    pub fn on_maps(&self, maps: &Tensor) -> Result<ScoreNet<BoundScene<'_>>> {
        ScoreNet::new(
            self.net.bind(self.net.encode_maps(maps)?),
            self.config.precond(),
        )
    }
}

/// Scenes from `model` (a baseline or a Gen-neG stack), scene k on the map of
/// `data`'s scene `scene_indices[k]`, in batches of `batch`, with per-sample seeded
/// noise; returned in metres (`[n · A · 7]` values).
#[allow(clippy::too_many_arguments)]
pub fn sample_scenes(
    model: &TrafficStack,
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
        let score = model.on_maps(&data.maps_of(idx)?)?;
        let mut noise = SampleNoise::new(seed, k * batch.max(1), idx.len());
        let x0 = initial_noise(&mut noise, &[idx.len(), dim], sigmas[0], DType::F32, device)?;
        let x = sampler.sample(&score, x0, sigmas, &mut noise, None)?;
        out.extend(
            model
                .base
                .scaler
                .denormalize(&x.flatten_all()?.to_vec1::<f32>()?),
        );
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
/// [1e-3, 1] (stratified: `draws` levels per scene). Constants are left out, so only
/// differences between models on the same scenes mean something; higher is better.
pub fn r_elbo(
    model: &TrafficStack,
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
        let score = model.on_maps(&data.maps_of(&idx)?)?;
        let x0 = data.x.rows(&idx)?;
        for k in 0..draws {
            // Stratified t: draw k covers [k/draws, (k+1)/draws) of [1e-3, 1].
            let sigmas: Vec<f32> = (0..idx.len())
                .map(|_| {
                    let u = (k as f64 + rand::Rng::random::<f64>(&mut rng)) / draws as f64;
                    model.base.config.process.sigma(1e-3 + u * (1.0 - 1e-3)) as f32
                })
                .collect();
            let sigma = Tensor::from_vec(sigmas, idx.len(), device)?;
            let z = randn(&mut rng, x0.dims(), device)?;
            let loss = dsm(&score, &x0, &sigma, &z, DsmWeighting::SigmaSquared)?;
            total += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * idx.len() as f64;
        }
    }
    Ok(-0.5 * total / (n * draws) as f64)
}

/// The inputs a classifier sees at noise level σ: the process's own `x_t = α(σ) x_σ`
/// and noise condition, per sample.
fn process_inputs(process: &Process, x: &Tensor, sigma: &Tensor) -> Result<(Tensor, Tensor)> {
    let s: Vec<f64> = sigma.to_dtype(DType::F64)?.to_vec1()?;
    let dev = x.device();
    let alpha: Vec<f64> = s.iter().map(|&v| process.alpha_at_sigma(v)).collect();
    let cond: Vec<f64> = s.iter().map(|&v| process.noise_condition(v)).collect();
    let alpha = Tensor::from_vec(alpha, s.len(), dev)?.to_dtype(x.dtype())?;
    let cond = Tensor::from_vec(cond, s.len(), dev)?.to_dtype(x.dtype())?;
    Ok((x.broadcast_mul(&alpha.unsqueeze(1)?)?, cond))
}

/// A time-dependent per-vehicle classifier (Gen-neG's traffic classifier): the scene
/// transformer with one logit per vehicle, l_a(x; σ) = logit of "vehicle a is valid".
/// A scene's log C(x; σ) is Σ_a log sigmoid(l_a): valid iff every vehicle is.
pub struct AgentClassifier {
    pub config: TrafficConfig,
    /// Set for the time-independent ablation: the classifier was trained on (nearly)
    /// clean scenes at this σ and guides through the base model's one-step estimate
    /// x̂0 = x + σ² s(x; σ).
    pub sigma_clean: Option<f64>,
    /// Parameters of the network.
    pub params: usize,
    net: SceneTransformer,
}

impl AgentClassifier {
    pub fn load(c: &Checkpoint, dtype: DType, device: &Device) -> Result<Self> {
        let config: TrafficConfig = c.meta("traffic")?;
        if config.net.out_per_agent != 1 {
            bail!(
                "agent classifier checkpoint: the network has {} outputs per agent, not 1",
                config.net.out_per_agent
            );
        }
        let (net, params) = load_frozen(
            c,
            Weights::Ema,
            dtype,
            device,
            "agent classifier checkpoint",
            |vb| SceneTransformer::new(config.net, vb.clone()),
        )?;
        let sigma_clean: Option<f64> = match c.metadata.get("sigma_clean") {
            Some(_) => c.meta("sigma_clean")?,
            None => None,
        };
        Ok(Self {
            config,
            sigma_clean,
            params,
            net,
        })
    }

    /// `[B, A]` logits for scenes on `maps`.
    fn logits(
        net: &SceneTransformer,
        process: &Process,
        x: &Tensor,
        sigma: &Tensor,
        maps: &SceneMaps,
    ) -> Result<Tensor> {
        let (x_in, cond) = process_inputs(process, x, sigma)?;
        net.forward(&x_in, &cond, maps)
    }

    /// This classifier as a guidance term for scenes on `maps` (`[B, C, s, s]`); `base`
    /// gives the one-step estimate a time-independent classifier looks at.
    pub fn on_maps<'a>(
        &'a self,
        maps: &Tensor,
        base: &'a TrafficModel,
    ) -> Result<BoundClassifier<'a>> {
        Ok(BoundClassifier {
            classifier: self,
            maps: self.net.encode_maps(maps)?,
            denoiser: match self.sigma_clean {
                Some(_) => Some(base.on_maps(maps)?),
                None => None,
            },
        })
    }
}

/// An [`AgentClassifier`] with one batch's maps bound: a [`LogProb`] term.
pub struct BoundClassifier<'a> {
    classifier: &'a AgentClassifier,
    maps: SceneMaps,
    denoiser: Option<ScoreNet<BoundScene<'a>>>,
}

impl BoundClassifier<'_> {
    /// `[B, A]` logits of "vehicle a is valid" for scenes `x` (standardised) at noise
    /// levels `sigma` (`[B]`).
    pub fn logits(&self, x: &Tensor, sigma: &Tensor) -> Result<Tensor> {
        let c = self.classifier;
        let maps = self.maps.to_dtype(x.dtype())?;
        match (&self.denoiser, c.sigma_clean) {
            (Some(d), Some(s)) => {
                let x0 = d.denoise(x, sigma)?;
                let clean =
                    Tensor::full(s, sigma.dims1()?, sigma.device())?.to_dtype(sigma.dtype())?;
                AgentClassifier::logits(&c.net, &c.config.process, &x0, &clean, &maps)
            }
            _ => AgentClassifier::logits(&c.net, &c.config.process, x, sigma, &maps),
        }
    }
}

impl LogProb for BoundClassifier<'_> {
    fn log_prob(&self, x: &Tensor, sigma: &Tensor) -> Result<Tensor> {
        log_sigmoid(&self.logits(x, sigma)?)?.sum(1)
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

/// [`ClassifierCheck`]s of `classifier` at each of `sigmas` on the scenes of `drawn`
/// (on `data`'s maps), each scene noised once per σ (seeded), in batches of `batch`.
/// Guidance acts through the classifier at every σ of the sampling grid: one that
/// cannot tell an offroad vehicle at the small σ where the last steps place vehicles
/// cannot steer it back.
pub fn check_agent_classifier(
    classifier: &AgentClassifier,
    base: &TrafficModel,
    drawn: &Drawn,
    data: &TrafficData,
    sigmas: &[f64],
    seed: u64,
    batch: usize,
) -> Result<Vec<ClassifierCheck>> {
    let scenes = drawn.verdicts.len();
    if scenes == 0 {
        bail!("classifier check: no scenes drawn");
    }
    let dim = drawn.x.len() / scenes;
    let agents = dim / VEHICLE_FEATURES;
    let device = data.maps.device();
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
            let x0 = Tensor::from_slice(&drawn.x[start * dim..end * dim], (n, dim), device)?;
            let z = randn(&mut rng, x0.dims(), device)?;
            let x = (x0 + z.affine(s, 0.0)?)?;
            let sigma = Tensor::full(s as f32, n, device)?;
            let bound =
                classifier.on_maps(&data.maps_of(&drawn.scene_indices[start..end])?, base)?;
            logits.extend(bound.logits(&x, &sigma)?.flatten_all()?.to_vec1::<f32>()?);
        }
        // Vehicles by group: valid, colliding, offroad (a vehicle can be both).
        let mut groups: [Vec<f64>; 3] = Default::default();
        for (i, v) in drawn.verdicts.iter().enumerate() {
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
            Ok(Some(crate::metrics::roc_auc(&groups[0], g)?))
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
/// scenes of `drawn` (on `data`'s maps), in batches of `batch`.
pub fn offroad_pull(
    classifier: &AgentClassifier,
    base: &TrafficModel,
    drawn: &Drawn,
    data: &TrafficData,
    sigma: f64,
    near_m: f64,
    batch: usize,
) -> Result<OffroadPull> {
    let scenes = drawn.verdicts.len();
    if scenes == 0 {
        bail!("offroad pull: no scenes drawn");
    }
    if !(sigma > 0.0 && near_m >= 0.0) {
        bail!("offroad pull: σ must be positive and near_m not negative, got {sigma} and {near_m}");
    }
    let dim = drawn.x.len() / scenes;
    let agents = dim / VEHICLE_FEATURES;
    let device = data.maps.device();
    let scaler = &base.scaler;
    let metres = base.scaler.denormalize(&drawn.x);
    let (mut on_road, mut dist) = (0, Vec::new());
    // (cosine, |pull|) of the vehicles within and beyond `near_m`.
    let mut near: Vec<(f64, f64)> = Vec::new();
    let mut far: Vec<(f64, f64)> = Vec::new();
    for start in (0..scenes).step_by(batch.max(1)) {
        let end = (start + batch.max(1)).min(scenes);
        if drawn.verdicts[start..end].iter().all(|v| v.offroad == 0) {
            continue;
        }
        let n = end - start;
        let x = candle_core::Var::from_tensor(&Tensor::from_slice(
            &drawn.x[start * dim..end * dim],
            (n, dim),
            device,
        )?)?;
        let sig = Tensor::full(sigma as f32, n, device)?;
        let bound = classifier.on_maps(&data.maps_of(&drawn.scene_indices[start..end])?, base)?;
        let lp = bound.log_prob(x.as_tensor(), &sig)?.sum_all()?;
        let grads = lp.backward()?;
        let g: Vec<f32> = match grads.get(x.as_tensor()) {
            Some(g) => g.flatten_all()?.to_vec1()?,
            None => bail!("offroad pull: the classifier's log C does not depend on the scenes"),
        };
        for i in start..end {
            let v = &drawn.verdicts[i];
            let map = data.set.map_of(drawn.scene_indices[i] as usize);
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

/// A baseline plus stacked classifiers (weight 1 each): Gen-neG iteration k has k.
pub struct TrafficStack<'a> {
    pub base: &'a TrafficModel,
    pub classifiers: Vec<&'a AgentClassifier>,
    /// Switch the classifiers off above this σ (see [`Gated`]).
    pub guidance_sigma_max: Option<f64>,
}

impl<'a> TrafficStack<'a> {
    pub fn new(base: &'a TrafficModel) -> Self {
        Self {
            base,
            classifiers: Vec::new(),
            guidance_sigma_max: None,
        }
    }

    /// The same stack with its classifiers switched off above `sigma_max`.
    pub fn gated(mut self, sigma_max: Option<f64>) -> Self {
        self.guidance_sigma_max = sigma_max;
        self
    }

    pub fn with(&self, classifier: &'a AgentClassifier) -> Self {
        let mut classifiers = self.classifiers.clone();
        classifiers.push(classifier);
        Self {
            base: self.base,
            classifiers,
            guidance_sigma_max: self.guidance_sigma_max,
        }
    }

    /// The guided score for scenes on `maps`: s_θ + Σ_k ∇x log C_k.
    pub fn on_maps(&self, maps: &Tensor) -> Result<StackScore<'a>> {
        Ok(StackScore {
            base: self.base.on_maps(maps)?,
            model: self.base,
            classifiers: self.classifiers.clone(),
            bound: bind_classifiers(&self.classifiers, maps, self.base)?,
            maps: maps.clone(),
            gate: self.guidance_sigma_max,
        })
    }

    /// Parameters of the base and every classifier.
    pub fn params(&self) -> usize {
        self.base.params + self.classifiers.iter().map(|c| c.params).sum::<usize>()
    }
}

/// A [`TrafficStack`] on one batch's maps, as a [`Score`]: s_θ + Σ_k ∇x log C_k.
///
/// With a gate the classifiers run only on the rows whose σ is at most the gate (the
/// rows above it get the baseline's score exactly, as with
/// [`Gated`](crate::guidance::Gated)): a sampler's batch shares one σ, so its steps above
/// the gate cost the baseline's alone, and a distillation batch, whose σ is drawn per
/// scene, pays for the classifiers on its gated rows only.
pub struct StackScore<'a> {
    base: ScoreNet<BoundScene<'a>>,
    model: &'a TrafficModel,
    classifiers: Vec<&'a AgentClassifier>,
    /// The classifiers bound to the whole batch's maps (encoded once, for the steps
    /// where every row is gated in).
    bound: Vec<(f64, Box<dyn LogProb + 'a>)>,
    maps: Tensor,
    gate: Option<f64>,
}

impl StackScore<'_> {
    /// Σ_k ∇x log C_k(x; σ), zero on the rows above the gate.
    pub fn guidance(&self, x: &Tensor, sigma: &Tensor) -> Result<Tensor> {
        check_batch(x, sigma)?;
        if self.bound.is_empty() {
            return x.zeros_like();
        }
        let Some(gate) = self.gate else {
            return grad_log_prob(&self.bound, x, sigma);
        };
        // The rows `Gated` keeps: σ ≤ gate compared in σ's dtype.
        let rows: Vec<u32> = sigma
            .le(gate)?
            .to_vec1::<u8>()?
            .iter()
            .enumerate()
            .filter(|(_, keep)| **keep != 0)
            .map(|(i, _)| i as u32)
            .collect();
        if rows.is_empty() {
            return x.zeros_like();
        }
        if rows.len() == x.dim(0)? {
            return grad_log_prob(&self.bound, x, sigma);
        }
        let n = rows.len();
        let idx = Tensor::from_vec(rows, n, x.device())?;
        let terms = bind_classifiers(
            &self.classifiers,
            &self.maps.index_select(&idx, 0)?,
            self.model,
        )?;
        let g = grad_log_prob(
            &terms,
            &x.index_select(&idx, 0)?,
            &sigma.index_select(&idx, 0)?,
        )?;
        x.zeros_like()?.index_add(&idx, &g, 0)
    }
}

/// Each classifier as a guidance term (weight 1) for scenes on `maps`.
fn bind_classifiers<'a>(
    classifiers: &[&'a AgentClassifier],
    maps: &Tensor,
    base: &'a TrafficModel,
) -> Result<Vec<(f64, Box<dyn LogProb + 'a>)>> {
    classifiers
        .iter()
        .map(|c| Ok((1.0, Box::new(c.on_maps(maps, base)?) as Box<dyn LogProb>)))
        .collect()
}

impl Score for StackScore<'_> {
    fn score(&self, x: &Tensor, sigma: &Tensor) -> Result<Tensor> {
        let base = self.base.score(x, sigma)?;
        if self.classifiers.is_empty() {
            return Ok(base);
        }
        base + self.guidance(x, sigma)?
    }

    // The same sums as `Guided`'s, so an ungated step is that of `Guided` to the bit.
    fn denoise(&self, x: &Tensor, sigma: &Tensor) -> Result<Tensor> {
        let base = self.base.denoise(x, sigma)?;
        if self.classifiers.is_empty() {
            return Ok(base);
        }
        let s2 = per_sample(sigma, x)?.sqr()?;
        base + self.guidance(x, sigma)?.broadcast_mul(&s2)?
    }
}

/// How a Gen-neG classifier's training set is made from what a model drew (the paper's
/// Eq. 11 and its ablations), at the level of vehicles: the classifier predicts each
/// vehicle's validity, so a training example is a (scene, vehicle) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Weighting {
    /// N valid + N invalid vehicles (N the rarer class's count), valid ones weighted α,
    /// invalid ones 1 − α, α the model's rate of valid vehicles.
    IsBalanced,
    /// The same balanced set, unweighted.
    WithoutIs,
    /// Every vehicle drawn, unweighted.
    Imbalanced,
}

/// Scenes a model drew, labelled per vehicle.
pub struct Drawn {
    /// Standardised values, `[N, A·7]`.
    pub x: Vec<f32>,
    /// Which of the data's scenes (maps) each was drawn on.
    pub scene_indices: Vec<u32>,
    pub verdicts: Vec<SceneVerdict>,
    /// Fraction of valid scenes among all drawn.
    pub scene_alpha: f64,
}

impl Drawn {
    pub fn valid(&self) -> usize {
        self.verdicts.iter().filter(|v| v.is_valid()).count()
    }

    /// Valid and invalid vehicles among all drawn.
    pub fn vehicle_counts(&self) -> (usize, usize) {
        let agents = self.x.len() / self.verdicts.len().max(1) / VEHICLE_FEATURES;
        let invalid: usize = self
            .verdicts
            .iter()
            .map(|v| v.infracting().count_ones() as usize)
            .sum();
        (self.verdicts.len() * agents - invalid, invalid)
    }

    pub fn summary(&self) -> String {
        let v = self.valid();
        format!(
            "{} scenes drawn: {v} valid, {} invalid",
            self.verdicts.len(),
            self.verdicts.len() - v,
        )
    }
}

/// Draws `n` scenes from `model` on random maps of `data` (seeded) and labels them.
#[allow(clippy::too_many_arguments)]
pub fn draw_scenes(
    model: &TrafficStack,
    data: &TrafficData,
    n: usize,
    sampler: &Sampler,
    sigmas: &[f64],
    seed: u64,
    batch: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<Drawn> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let scene_indices: Vec<u32> = (0..n)
        .map(|_| rng.random_range(0..data.set.len() as u32))
        .collect();
    let agents = sample_scenes(
        model,
        data,
        &scene_indices,
        sampler,
        sigmas,
        seed,
        batch,
        progress,
    )?;
    let (rates, verdicts) = label_scenes(data, &scene_indices, &agents)?;
    Ok(Drawn {
        x: model.base.scaler.normalize(&agents),
        scene_indices,
        verdicts,
        scene_alpha: 1.0 - rates.infraction,
    })
}

/// A classifier's training set: scenes, their maps, per-vehicle labels (1 = valid) and
/// per-(scene, vehicle) weights (0 for pairs left out by balancing).
pub struct AgentLabelled {
    pub x: Dataset,
    pub scene_indices: Vec<u32>,
    pub labels: Tensor,
    pub weights: Tensor,
    /// Valid and invalid vehicles kept, and α (the drawn vehicles' valid rate).
    pub kept: (usize, usize),
    pub alpha: f64,
}

impl AgentLabelled {
    /// Builds the set `weighting` asks for from `drawn` (balanced sets keep the first N
    /// valid and N invalid vehicles in drawing order).
    pub fn new(drawn: &Drawn, weighting: Weighting, device: &Device) -> Result<Self> {
        let scenes = drawn.verdicts.len();
        if scenes == 0 {
            bail!("classifier set: no scenes drawn");
        }
        let dim = drawn.x.len() / scenes;
        let agents = dim / VEHICLE_FEATURES;
        let bad = |i: usize, a: usize| drawn.verdicts[i].infracting() & (1 << a) != 0;
        let (n_valid, n_invalid) = drawn.vehicle_counts();
        if n_valid == 0 || n_invalid == 0 {
            bail!("classifier set: need valid and invalid vehicles, got {n_valid} valid and {n_invalid} invalid");
        }
        let alpha = n_valid as f64 / (scenes * agents) as f64;
        let per_class = n_valid.min(n_invalid);
        let (mut kept_valid, mut kept_invalid) = (0, 0);
        let mut x = Vec::new();
        let mut labels = Vec::new();
        let mut weights = Vec::new();
        let mut scene_indices = Vec::new();
        for i in 0..scenes {
            let mut w_row = vec![0f32; agents];
            for (a, w) in w_row.iter_mut().enumerate() {
                let (count, keep) = if bad(i, a) {
                    kept_invalid += 1;
                    (kept_invalid, 1.0 - alpha)
                } else {
                    kept_valid += 1;
                    (kept_valid, alpha)
                };
                *w = match weighting {
                    Weighting::Imbalanced => 1.0,
                    _ if count > per_class => 0.0,
                    Weighting::WithoutIs => 1.0,
                    Weighting::IsBalanced => keep as f32,
                };
            }
            if w_row.iter().any(|&w| w > 0.0) {
                x.extend_from_slice(&drawn.x[i * dim..(i + 1) * dim]);
                labels.extend((0..agents).map(|a| if bad(i, a) { 0f32 } else { 1.0 }));
                weights.extend(w_row);
                scene_indices.push(drawn.scene_indices[i]);
            }
        }
        let n = scene_indices.len();
        let kept = match weighting {
            Weighting::Imbalanced => (n_valid, n_invalid),
            _ => (per_class, per_class),
        };
        Ok(Self {
            x: Dataset::new(Tensor::from_vec(x, (n, dim), device)?, "classifier scenes")?,
            scene_indices,
            labels: Tensor::from_vec(labels, (n, agents), device)?,
            weights: Tensor::from_vec(weights, (n, agents), device)?,
            kept,
            alpha,
        })
    }
}

/// Trains a per-vehicle classifier on `set` (scenes on `data`'s maps): per batch, noise
/// at σ from the baseline's training distribution (or at `sigma_clean` for every scene:
/// the time-independent ablation), and the loss
/// Σ_{scene, vehicle} w · BCE(l, y) / Σ 1[w > 0] (the weighted mean over kept pairs).
#[allow(clippy::too_many_arguments)]
pub fn train_agent_classifier(
    base: &TrafficConfig,
    set: &AgentLabelled,
    data: &TrafficData,
    iters: u64,
    seed: u64,
    sigma_clean: Option<f64>,
    device: &Device,
    progress: &mut Progress,
) -> Result<Checkpoint> {
    let cfg = TrafficConfig {
        net: SceneTransformerConfig {
            out_per_agent: 1,
            ..base.net
        },
        iters,
        seed,
        ..base.clone()
    };
    let store = ParamStore::new(seed);
    let net = SceneTransformer::new(cfg.net, store.var_builder(DType::F32, device))?;
    let train = TrainConfig {
        lr: cfg.lr,
        seed,
        warmup_steps: 200,
        ..TrainConfig::default()
    };
    let sigma_dist = cfg.sigma_distribution();
    sigma_dist.validate()?;
    let mut trainer = Trainer::new(store, train)?;
    trainer.run(iters, progress, |step, rng| {
        let idx = set.x.step_batch(cfg.batch, seed, step)?;
        let rows = Tensor::from_slice(&idx, idx.len(), device)?;
        let x0 = set.x.rows(&idx)?;
        let scenes: Vec<u32> = idx.iter().map(|&i| set.scene_indices[i as usize]).collect();
        let maps = net.encode_maps(&data.maps_of(&scenes)?)?;
        let sigma = match sigma_clean {
            Some(s) => Tensor::full(s as f32, idx.len(), device)?,
            None => sigma_dist.sample_tensor(idx.len(), rng, device)?,
        };
        let z = randn(rng, x0.dims(), device)?;
        let x = (&x0 + z.broadcast_mul(&sigma.unsqueeze(1)?)?)?;
        let logits = AgentClassifier::logits(&net, &cfg.process, &x, &sigma, &maps)?;
        let y = set.labels.index_select(&rows, 0)?;
        let w = set.weights.index_select(&rows, 0)?;
        // −[y log σ(l) + (1 − y) log σ(−l)] per (scene, vehicle).
        let nll = ((&y * log_sigmoid(&logits)?)?
            + (y.affine(-1.0, 1.0)? * log_sigmoid(&logits.neg()?)?)?)?
        .neg()?;
        let kept = w.gt(0.0)?.to_dtype(DType::F32)?.sum_all()?.maximum(1.0)?;
        (nll * w)?.sum_all()?.broadcast_div(&kept)
    })?;
    let mut c = trainer.checkpoint()?;
    c.set_meta("traffic", &cfg)?;
    c.set_meta("sigma_clean", &sigma_clean)?;
    Ok(c)
}
