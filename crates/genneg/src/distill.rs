//! Distilling a guided stack into one network (Gen-neG Eq. 12).

use candle_core::{DType, Device, Result, Tensor};
use scoreguide_data::Dataset;
use scoreguide_guidance::Score;
use scoreguide_losses::{distillation, DsmWeighting};
use scoreguide_nets::{ParamStore, ScoreModelConfig};
use scoreguide_sde::{randn, SigmaDistribution};
use scoreguide_train::{Checkpoint, Progress, TrainConfig, Trainer};
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

/// Trains a student of architecture `student` to match `teacher` on noised true data.
/// The student starts from `init` (the base model's weights: ours, it starts close to
/// the teacher) or from a fresh seeded initialisation. Returns the trainer's checkpoint
/// with `model` metadata; its `ema.*` weights are the distilled model.
pub fn distill(
    teacher: &dyn Score,
    data: &Dataset,
    student: &ScoreModelConfig,
    init: Option<&BTreeMap<String, Tensor>>,
    cfg: &DistillConfig,
    device: &Device,
    progress: &mut Progress,
) -> Result<Checkpoint> {
    cfg.sigma.validate()?;
    let store = ParamStore::new(cfg.train.seed);
    let model = student.build(&store.var_builder(DType::F32, device))?;
    if let Some(w) = init {
        store.assign(w, "distillation initial weights")?;
    }
    let mut trainer = Trainer::new(store, cfg.train.clone())?;
    trainer.run(cfg.iters, progress, |step, rng| {
        let x0 = data
            .rows(&data.step_batch(cfg.batch, cfg.train.seed, step)?)?
            .to_device(device)?;
        let sigma = cfg.sigma.sample_tensor(x0.dim(0)?, rng, device)?;
        let z = randn(rng, x0.dims(), device)?;
        distillation(&model, teacher, &x0, &sigma, &z, cfg.weighting)
    })?;
    let mut c = trainer.checkpoint()?;
    c.set_meta("model", student)?;
    c.set_meta("distillation", cfg)?;
    Ok(c)
}
