//! Traffic scenes (Gen-neG paper §4.2, on our procedural stand-in data): what is
//! traffic's own — feature scaling, the configuration of the scene transformer under a VP
//! process, scenes and their maps as each row's condition, the baseline's training,
//! scene-level infraction rates and r-ELBO, the per-vehicle oracle as a Gen-neG
//! [`Task`](crate::genneg::Task) ([`TrafficTask`]), diagnostics of a classifier, and
//! rendering like the paper's Fig. 1. Drawing, labelled sets, classifier training,
//! stacking, gating and distillation are [`crate::genneg`]'s, shared with every
//! experiment.

use crate::data::{Dataset, MapLayers, SceneSet};
use crate::genneg::{
    collect, train_classifier, ClassifierTrainConfig, CollectConfig, DistillConfig, Draws,
    LabelledSet, Stack, StackedClassifier, Staged, Task,
};
use crate::guidance::{Cond, Score};
use crate::losses::{dsm, DsmWeighting};
use crate::nets::{
    Classifier, ClassifierConfig, MapProbe, NetConfig, ParamStore, Precond, SceneTransformerConfig,
    ScoreModelConfig, SinusoidalEmbedding,
};
use crate::oracles::scene::VEHICLE_FEATURES;
use crate::oracles::{check_scene, OrientedBox, RoadRaster, SceneVerdict};
use crate::plot::{Canvas, Rgb, BLACK, BLUE, RED};
use crate::samplers::{initial_noise, Sampler};
use crate::sde::{randn, Process, SampleNoise, SigmaDistribution};
use crate::train::{load_score_model, Checkpoint, Progress, TrainConfig, Trainer, Weights};
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

    /// The score model this configuration describes (what its checkpoints rebuild).
    pub fn score_model(&self) -> ScoreModelConfig {
        ScoreModelConfig {
            net: NetConfig::SceneTransformer(self.net),
            precond: self.precond(),
        }
    }

    /// Gen-neG's per-vehicle classifier: this network with one logit per vehicle, seeing
    /// its inputs as the score network of this process does.
    pub fn classifier(&self) -> ClassifierConfig {
        ClassifierConfig::of_architecture(
            &NetConfig::SceneTransformer(self.net),
            self.process.clone(),
        )
    }

    /// How a per-vehicle classifier is trained: this configuration's batch, learning rate
    /// and noise levels, `iters` steps from `seed` (a short warm-up), at `sigma_clean`
    /// for the time-independent ablation.
    pub fn classifier_training(
        &self,
        iters: u64,
        seed: u64,
        sigma_clean: f64,
    ) -> ClassifierTrainConfig {
        ClassifierTrainConfig {
            model: self.classifier(),
            iters,
            batch: self.batch,
            train: TrainConfig {
                lr: self.lr,
                seed,
                warmup_steps: 200,
                ..TrainConfig::default()
            },
            sigma: self.sigma_distribution(),
            sigma_clean,
        }
    }

    /// How a stack is distilled into this configuration's network: its batch, learning
    /// rate, noise levels and steps, from its seed, λ = σ² as in training.
    pub fn distillation(&self) -> DistillConfig {
        DistillConfig {
            iters: self.iters,
            batch: self.batch,
            train: TrainConfig {
                lr: self.lr,
                seed: self.seed,
                // A warm start needs less warm-up than training from scratch.
                warmup_steps: 200,
                ..TrainConfig::default()
            },
            sigma: self.sigma_distribution(),
            weighting: DsmWeighting::SigmaSquared,
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

    /// The condition of the scenes `idx`: their maps as the context.
    pub fn cond_of(&self, idx: &[u32]) -> Result<Cond> {
        Ok(Cond::context(self.maps_of(idx)?))
    }

    /// The maps of the scenes `idx`, `[len, C, s, s]`.
    pub fn maps_of(&self, idx: &[u32]) -> Result<Tensor> {
        let which = self
            .map_index
            .index_select(&Tensor::from_slice(idx, idx.len(), self.maps.device())?, 0)?;
        self.maps.index_select(&which, 0)
    }
}

/// Trains the baseline score model with DSM (λ = σ², the ε-loss of DDPM), each scene
/// conditioned on its map; returns the checkpoint (EMA weights under `ema.`,
/// configuration and scaler in the metadata).
pub fn train_score(
    cfg: &TrafficConfig,
    data: &TrafficData,
    device: &Device,
    progress: &mut Progress,
) -> Result<Checkpoint> {
    fit_score(cfg, data, None, None, device, progress)
}

/// [`train_score`] in stages that survive an interruption ([`Trainer::run_staged`]):
/// every `save_every` steps the whole training state (weights, EMA, Adam moments, step,
/// configuration and scaler) is passed to `save` (write it atomically: `Checkpoint::save`
/// does), and a state saved so is continued with `resume`, to the bit of the
/// uninterrupted run. `resume` must come from this configuration (up to `iters`, so a
/// run can also be extended) and data's scaler.
pub fn train_score_resumable(
    cfg: &TrafficConfig,
    data: &TrafficData,
    resume: Option<&Checkpoint>,
    save_every: u64,
    save: &mut dyn FnMut(&Checkpoint) -> Result<()>,
    device: &Device,
    progress: &mut Progress,
) -> Result<Checkpoint> {
    if let Some(c) = resume {
        check_resumable(c, cfg, data, "resumed baseline")?;
    }
    let staged = Staged {
        resume,
        save_every,
        save,
    };
    fit_score(cfg, data, None, Some(staged), device, progress)
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
    fit_score(cfg, data, Some(init), None, device, progress)
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

/// A checkpoint's training state with the traffic metadata its loaders read.
fn with_traffic_meta(
    c: &Checkpoint,
    cfg: &TrafficConfig,
    data: &TrafficData,
) -> Result<Checkpoint> {
    let mut c = c.clone();
    c.set_meta("traffic", cfg)?;
    c.set_meta("scaler", &data.scaler)?;
    Ok(c)
}

fn fit_score(
    cfg: &TrafficConfig,
    data: &TrafficData,
    init: Option<&Checkpoint>,
    staged: Option<Staged>,
    device: &Device,
    progress: &mut Progress,
) -> Result<Checkpoint> {
    let store = ParamStore::new(cfg.seed);
    let model = cfg
        .score_model()
        .build(&store.var_builder(DType::F32, device))?;
    if let Some(c) = init {
        store.assign(&c.section("ema"), "the initial (baseline) weights")?;
    }
    let train = TrainConfig {
        lr: cfg.lr,
        seed: cfg.seed,
        // A warm start needs less warm-up than training from scratch.
        warmup_steps: if init.is_some() { 200 } else { 500 },
        ..TrainConfig::default()
    };
    let sigma_dist = cfg.sigma_distribution();
    sigma_dist.validate()?;
    let mut trainer = Trainer::new(store, train)?;
    let step_loss = |step: u64, rng: &mut rand::rngs::StdRng| {
        let idx = data.x.step_batch(cfg.batch, cfg.seed, step)?;
        let x0 = data.x.rows(&idx)?;
        let cond = data.cond_of(&idx)?;
        let sigma = sigma_dist.sample_tensor(idx.len(), rng, device)?;
        let z = randn(rng, x0.dims(), device)?;
        dsm(&model, &x0, &sigma, &z, &cond, DsmWeighting::SigmaSquared)
    };
    match staged {
        None => {
            trainer.run(cfg.iters, progress, step_loss)?;
        }
        Some(st) => {
            if let Some(c) = st.resume {
                trainer.restore(c)?;
            }
            trainer.run_staged(cfg.iters, st.save_every, progress, step_loss, &mut |t| {
                (st.save)(&with_traffic_meta(&t.checkpoint()?, cfg, data)?)
            })?;
        }
    }
    with_traffic_meta(&trainer.checkpoint()?, cfg, data)
}

/// Distils a Gen-neG stack into one network of the baseline's architecture (paper Eq.
/// 12, [`crate::genneg::distill`]): on the **true** training scenes (each on its map),
/// the student's denoiser is fitted to the teacher's (λ = σ²), starting from the
/// baseline's weights `init`. `cfg.iters` steps.
pub fn distill(
    cfg: &TrafficConfig,
    teacher: &dyn Score,
    init: &Checkpoint,
    data: &TrafficData,
    device: &Device,
    progress: &mut Progress,
) -> Result<Checkpoint> {
    let c = crate::genneg::distill(
        teacher,
        &data.x,
        &|idx| data.cond_of(idx),
        &cfg.score_model(),
        Some(&init.section("ema")),
        &cfg.distillation(),
        None,
        device,
        progress,
    )?;
    with_traffic_meta(&c, cfg, data)
}

/// [`distill`] in stages that survive an interruption, and that can be extended: every
/// `save_every` steps the whole training state is passed to `save`, and a state saved so
/// (or a finished distillation of fewer than `cfg.iters` steps) is continued with
/// `resume`, to the bit of the uninterrupted run (the learning rate is constant after
/// its warm-up). The checkpoint does not record the teacher: the caller must check that
/// `resume` was distilled from this `teacher` (e.g. by metadata of its own).
#[allow(clippy::too_many_arguments)]
pub fn distill_resumable(
    cfg: &TrafficConfig,
    teacher: &dyn Score,
    init: &Checkpoint,
    data: &TrafficData,
    resume: Option<&Checkpoint>,
    save_every: u64,
    save: &mut dyn FnMut(&Checkpoint) -> Result<()>,
    device: &Device,
    progress: &mut Progress,
) -> Result<Checkpoint> {
    if let Some(c) = resume {
        check_resumable(c, cfg, data, "resumed distillation")?;
    }
    let c = crate::genneg::distill(
        teacher,
        &data.x,
        &|idx| data.cond_of(idx),
        &cfg.score_model(),
        Some(&init.section("ema")),
        &cfg.distillation(),
        Some(Staged {
            resume,
            save_every,
            save: &mut |c| save(&with_traffic_meta(c, cfg, data)?),
        }),
        device,
        progress,
    )?;
    with_traffic_meta(&c, cfg, data)
}

/// A traffic score model from its checkpoint (EMA weights, its configuration and
/// feature scaler): the baseline, a distilled model or the control.
pub struct TrafficModel {
    pub config: TrafficConfig,
    pub scaler: FeatureScaler,
    /// Parameters of the network.
    pub params: usize,
    weights: std::collections::BTreeMap<String, Tensor>,
}

impl TrafficModel {
    /// Reads and checks the checkpoint (the network is built once, so a missing or
    /// misshapen tensor is reported now, by name).
    pub fn load(c: &Checkpoint, dtype: DType, device: &Device) -> Result<Self> {
        let config: TrafficConfig = c.meta("traffic")?;
        let scaler: FeatureScaler = c.meta("scaler")?;
        let mut described = c.clone();
        described.set_meta("model", &config.score_model())?;
        let params = {
            let store = ParamStore::new(0);
            config
                .score_model()
                .build(&store.var_builder(dtype, device))?;
            store.num_params()
        };
        load_score_model(&described, Weights::Ema, dtype, device)
            .map_err(|e| candle_core::Error::msg(format!("traffic model checkpoint: {e}")))?;
        Ok(Self {
            config,
            scaler,
            params,
            weights: c.section("ema"),
        })
    }

    /// This model as a Gen-neG stack without classifiers.
    pub fn stack(&self) -> Stack {
        Stack::new(self.config.score_model(), self.weights.clone())
    }

    /// This model guided by `classifiers` (weight 1 each), each gated to σ ≤ `gate`
    /// when given: Gen-neG iteration k has k.
    pub fn with_classifiers(&self, classifiers: &[StackedClassifier], gate: Option<f64>) -> Stack {
        classifiers
            .iter()
            .fold(self.stack(), |s, c| s.with(c.clone().gated(gate)))
    }
}

/// A per-vehicle Gen-neG classifier from its checkpoint: one written by
/// [`train_agent_classifier`], or an older one that records only its traffic
/// configuration (`traffic` metadata, one output per agent).
pub fn load_agent_classifier(c: &Checkpoint) -> Result<StackedClassifier> {
    let mut described = c.clone();
    if !c.metadata.contains_key("classifier") {
        let config: TrafficConfig = c.meta("traffic")?;
        if config.net.out_per_agent != 1 {
            bail!(
                "agent classifier checkpoint: the network has {} outputs per agent, not 1",
                config.net.out_per_agent
            );
        }
        described.set_meta("classifier", &config.classifier())?;
    }
    let s = StackedClassifier::from_checkpoint(&described)?;
    s.build(DType::F32, &Device::Cpu)
        .map_err(|e| candle_core::Error::msg(format!("agent classifier checkpoint: {e}")))?;
    Ok(s)
}

/// Gen-neG's view of traffic scenes: a scene is drawn on the map of a training scene
/// (its key, chosen at random), conditioned on that map, and each vehicle is a
/// component, valid unless it collides or leaves the road.
pub struct TrafficTask<'a> {
    pub data: &'a TrafficData,
}

impl Task for TrafficTask<'_> {
    fn components(&self) -> usize {
        self.data.set.scene_dim() / VEHICLE_FEATURES
    }

    fn draw_keys(&self, n: usize, seed: u64) -> Result<Vec<u32>> {
        use rand::{Rng, SeedableRng};
        if self.data.set.is_empty() {
            bail!("traffic draws: the data holds no scenes to take maps from");
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let len = self.data.set.len() as u32;
        Ok((0..n).map(|_| rng.random_range(0..len)).collect())
    }

    fn cond(&self, keys: &[u32]) -> Result<Cond> {
        self.data.cond_of(keys)
    }

    fn label(&self, x: &Tensor, keys: &[u32]) -> Result<Vec<bool>> {
        let agents = self
            .data
            .scaler
            .denormalize(&x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        let (_, verdicts) = label_scenes(self.data, keys, &agents)?;
        let k = self.components();
        Ok(verdicts
            .iter()
            .flat_map(|v| (0..k).map(move |a| v.infracting() & (1 << a) == 0))
            .collect())
    }
}

/// Draws `n` scenes from `model` on random maps of `data` (seeded) and labels each
/// vehicle: [`crate::genneg::collect`] with the whole budget kept.
#[allow(clippy::too_many_arguments)]
pub fn draw_scenes(
    model: &dyn Score,
    data: &TrafficData,
    n: usize,
    sampler: &Sampler,
    sigmas: &[f64],
    seed: u64,
    batch: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<Draws> {
    let cfg = CollectConfig {
        per_class: None,
        batch: batch.max(1),
        budget: n,
        min_negatives: 1,
        seed,
    };
    collect(
        model,
        sampler,
        sigmas,
        &TrafficTask { data },
        &[data.set.scene_dim()],
        &cfg,
        data.maps.device(),
        &mut |drawn, _, _| progress(drawn),
    )
}

/// Drawn scenes with their verdicts (which vehicles collide, which leave the road): what
/// the classifier diagnostics group vehicles by.
pub struct JudgedScenes {
    pub drawn: Draws,
    pub verdicts: Vec<SceneVerdict>,
}

impl JudgedScenes {
    /// Judges `drawn` (scenes on `data`'s maps) with the oracle.
    pub fn new(drawn: Draws, data: &TrafficData) -> Result<Self> {
        let agents = data
            .scaler
            .denormalize(&drawn.x.flatten_all()?.to_vec1::<f32>()?);
        let verdicts = label_scenes(data, &drawn.keys, &agents)?.1;
        Ok(Self { drawn, verdicts })
    }

    pub fn scenes(&self) -> usize {
        self.verdicts.len()
    }

    /// The standardised scenes `[N, A·7]` as one vector, their width, and their count,
    /// after checking that there is one verdict per scene (`what` names the caller).
    fn values(&self, what: &str) -> Result<(Vec<f32>, usize, usize)> {
        let scenes = self.drawn.rows();
        if scenes == 0 || self.verdicts.len() != scenes {
            bail!(
                "{what}: {scenes} scenes drawn and {} verdicts",
                self.verdicts.len()
            );
        }
        let x: Vec<f32> = self.drawn.x.flatten_all()?.to_vec1()?;
        Ok((x, self.drawn.x.elem_count() / scenes, scenes))
    }
}

/// Trains a per-vehicle classifier on `set` (scenes on `data`'s maps) with
/// [`crate::genneg::train_classifier`]: the baseline's network with one logit per
/// vehicle, its batch, learning rate and noise levels (or `sigma_clean` for every scene:
/// the time-independent ablation). The checkpoint also records the classifier's traffic
/// configuration (`traffic`), which reuse checks read.
#[allow(clippy::too_many_arguments)]
pub fn train_agent_classifier(
    base: &TrafficConfig,
    set: &LabelledSet,
    data: &TrafficData,
    iters: u64,
    seed: u64,
    sigma_clean: Option<f64>,
    device: &Device,
    progress: &mut Progress,
) -> Result<Checkpoint> {
    let cfg = base.classifier_training(iters, seed, sigma_clean.unwrap_or(0.0));
    let trained = train_classifier(
        set,
        &TrafficTask { data },
        sigma_clean.is_none(),
        &cfg,
        device,
        progress,
    )?;
    let mut c = trained.checkpoint;
    let traffic = TrafficConfig {
        net: SceneTransformerConfig {
            out_per_agent: 1,
            ..base.net
        },
        iters,
        seed,
        ..base.clone()
    };
    c.set_meta("traffic", &traffic)?;
    Ok(c)
}

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
