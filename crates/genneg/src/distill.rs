//! Distilling a guided stack into one network (Gen-neG Eq. 12).

use candle_core::{bail, DType, Device, Result, Tensor};
use scoreguide_data::Dataset;
use scoreguide_guidance::{Cond, Score};
use scoreguide_losses::{distillation, DsmWeighting};
use scoreguide_nets::{ParamStore, ScoreModelConfig};
use scoreguide_sde::{randn, SigmaDistribution};
use scoreguide_train::{Checkpoint, Progress, Staged, TrainConfig, Trainer};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Distillation settings; the paper uses the base's architecture and lr 3e-4, batch 1000.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillConfig {
    pub iters: u64,
    pub batch: usize,
    pub train: TrainConfig,
    pub sigma: SigmaDistribution,
    pub weighting: DsmWeighting,
}

impl Default for DistillConfig {
    fn default() -> Self {
        Self {
            iters: 20_000,
            batch: 1000,
            train: TrainConfig {
                lr: 3e-4,
                ema_decay: 0.999,
                ..TrainConfig::default()
            },
            sigma: SigmaDistribution::LogUniform {
                min: 2e-3,
                max: 80.0,
            },
            weighting: DsmWeighting::Edm { sigma_data: 1.0 },
        }
    }
}

/// The condition of a batch's rows, given their indices in the data set
/// (`&|_| Ok(Cond::none())` for an unconditioned model).
pub type RowCond<'a> = &'a dyn Fn(&[u32]) -> Result<Cond>;

/// Trains a student of architecture `student` to match `teacher` on noised true data
/// (each row with its condition from `row_cond`). The student starts from `init` (the
/// base model's weights: ours, it starts close to the teacher) or from a fresh seeded
/// initialisation. Returns the trainer's checkpoint with `model` and `distillation`
/// metadata; its `ema.*` weights are the distilled model. With `staged`, the state is
/// saved as it goes and a saved state is continued.
#[allow(clippy::too_many_arguments)]
pub fn distill(
    teacher: &dyn Score,
    data: &Dataset,
    row_cond: RowCond,
    student: &ScoreModelConfig,
    init: Option<&BTreeMap<String, Tensor>>,
    cfg: &DistillConfig,
    staged: Option<Staged>,
    device: &Device,
    progress: &mut Progress,
) -> Result<Checkpoint> {
    cfg.sigma.validate()?;
    if cfg.batch == 0 {
        bail!("distillation: the batch must be positive");
    }
    let store = ParamStore::new(cfg.train.seed);
    let model = student.build(&store.var_builder(DType::F32, device))?;
    if let Some(w) = init {
        store.assign(w, "distillation initial weights")?;
    }
    let mut trainer = Trainer::new(store, cfg.train.clone())?;
    let describe = |mut c: Checkpoint| -> Result<Checkpoint> {
        c.set_meta("model", student)?;
        c.set_meta("distillation", cfg)?;
        Ok(c)
    };
    let loss = |step: u64, rng: &mut rand::rngs::StdRng| {
        let idx = data.step_batch(cfg.batch, cfg.train.seed, step)?;
        let x0 = data.rows(&idx)?.to_device(device)?;
        let cond = row_cond(&idx)?;
        let sigma = cfg.sigma.sample_tensor(x0.dim(0)?, rng, device)?;
        let z = randn(rng, x0.dims(), device)?;
        distillation(&model, teacher, &x0, &sigma, &z, &cond, cfg.weighting)
    };
    Ok(trainer.fit(cfg.iters, staged, progress, loss, &describe)?.0)
}
