//! Gen-neG on traffic scenes: the task, drawing and judging scenes, per-vehicle classifiers.

use super::{label_scenes, TrafficConfig, TrafficData};
use candle_core::{bail, DType, Device, Result, Tensor};
use scoreguide_genneg::{collect, train_classifier, CollectConfig, Draws, LabelledSet, Task};
use scoreguide_guidance::{Cond, Score};
use scoreguide_nets::SceneTransformerConfig;
use scoreguide_oracles::scene::VEHICLE_FEATURES;
use scoreguide_oracles::SceneVerdict;
use scoreguide_samplers::Sampler;
use scoreguide_train::{Checkpoint, Progress};

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
/// vehicle: [`scoreguide_genneg::collect`] with the whole budget kept.
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
    pub(super) fn values(&self, what: &str) -> Result<(Vec<f32>, usize, usize)> {
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
/// [`scoreguide_genneg::train_classifier`]: the baseline's network with one logit per
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
