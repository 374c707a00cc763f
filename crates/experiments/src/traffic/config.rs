//! The traffic experiment's configuration: feature scaling and the networks' settings.

use candle_core::{bail, Result};
use scoreguide_data::MapLayers;
use scoreguide_genneg::{ClassifierTrainConfig, DistillConfig};
use scoreguide_losses::DsmWeighting;
use scoreguide_nets::{
    ClassifierConfig, MapProbe, NetConfig, Precond, SceneTransformerConfig, ScoreModelConfig,
    SinusoidalEmbedding,
};
use scoreguide_oracles::scene::VEHICLE_FEATURES;
use scoreguide_sde::{Process, SigmaDistribution};
use scoreguide_train::TrainConfig;
use serde::{Deserialize, Serialize};

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

    pub(super) fn precond(&self) -> Precond {
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
    pub(super) fn sigma_distribution(&self) -> SigmaDistribution {
        self.train_sigma
            .clone()
            .unwrap_or_else(|| SigmaDistribution::UniformT {
                process: self.process.clone(),
                t_min: 1e-3,
                t_max: 1.0,
            })
    }
}
