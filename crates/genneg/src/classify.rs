//! Training Gen-neG's classifiers: the IS-balanced loss and the paper's ablations.

use crate::collect::Collected;
use candle_core::{bail, DType, Device, Result, Tensor};
use scoreguide_data::Dataset;
use scoreguide_losses::{binary_cross_entropy, ClassWeights};
use scoreguide_nets::{Classifier, ClassifierConfig, ParamStore};
use scoreguide_sde::{randn, SigmaDistribution};
use scoreguide_train::{Progress, TrainConfig, Trainer};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Which classifier of Gen-neG §3 / Table 1 to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClassifierKind {
    /// Balanced set, positives weighted by α and negatives by 1 − α (Eq. 11).
    IsBalanced,
    /// Balanced set, no importance weights ("w/o IS").
    WithoutIs,
    /// Plain cross-entropy on the draws in their natural proportions ("imbalanced").
    Imbalanced,
    /// IS-balanced, but trained on clean samples and guided through x̂0 = x + σ² s
    /// ("time-independent").
    TimeIndependent,
}

impl ClassifierKind {
    pub fn time_dependent(&self) -> bool {
        !matches!(self, Self::TimeIndependent)
    }
}

/// How to train one classifier. Defaults are the paper's checkerboard settings
/// (20k iterations, batch 8192, Adam lr 3e-3) with the base model's σ range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifierTrainConfig {
    pub model: ClassifierConfig,
    pub iters: u64,
    pub batch: usize,
    pub train: TrainConfig,
    pub sigma: SigmaDistribution,
    /// The noise level a time-independent classifier is conditioned on (clean data).
    pub sigma_clean: f64,
}

impl Default for ClassifierTrainConfig {
    fn default() -> Self {
        Self {
            model: ClassifierConfig::checkerboard(),
            iters: 20_000,
            batch: 8192,
            train: TrainConfig {
                lr: 3e-3,
                ema_decay: 0.999,
                ..TrainConfig::default()
            },
            sigma: SigmaDistribution::LogUniform {
                min: 2e-3,
                max: 80.0,
            },
            sigma_clean: 2e-3,
        }
    }
}

/// Samples with binary labels (1 = valid) and the class weights of the loss.
pub struct LabelledSet {
    pub x: Dataset,
    pub labels: Tensor,
    pub weights: ClassWeights,
}

impl LabelledSet {
    /// The training set a [`ClassifierKind`] uses from a collection.
    pub fn from_collected(c: &Collected, kind: ClassifierKind) -> Result<Self> {
        let device = c.positives.device();
        match kind {
            ClassifierKind::Imbalanced => {
                let labels: Vec<f32> = c.unbalanced_labels.iter().map(|&l| l as f32).collect();
                Ok(Self {
                    x: Dataset::new(c.unbalanced.clone(), "Gen-neG unbalanced sample")?,
                    labels: Tensor::from_vec(labels, c.unbalanced_labels.len(), device)?,
                    weights: ClassWeights::UNIT,
                })
            }
            _ => {
                let (np, nn) = (c.positives.dim(0)?, c.negatives.dim(0)?);
                let x = Tensor::cat(&[&c.positives, &c.negatives], 0)?;
                let labels: Vec<f32> = (0..np + nn)
                    .map(|i| if i < np { 1.0 } else { 0.0 })
                    .collect();
                let weights = match kind {
                    ClassifierKind::WithoutIs => ClassWeights::UNIT,
                    _ => ClassWeights::importance(c.alpha)?,
                };
                Ok(Self {
                    x: Dataset::new(x, "Gen-neG balanced sample")?,
                    labels: Tensor::from_vec(labels, np + nn, device)?,
                    weights,
                })
            }
        }
    }
}

/// Trains a classifier on `set`: noisy inputs x0 + σ z at σ from `cfg.sigma` when
/// `time_dependent`, clean inputs at `cfg.sigma_clean` otherwise. Returns the frozen
/// EMA classifier and its weights.
pub fn train_classifier(
    set: &LabelledSet,
    time_dependent: bool,
    cfg: &ClassifierTrainConfig,
    device: &Device,
    progress: &mut Progress,
) -> Result<(Classifier, BTreeMap<String, Tensor>)> {
    cfg.sigma.validate()?;
    if cfg.batch == 0 || cfg.iters == 0 {
        bail!("classifier training: batch and iters must be positive");
    }
    if set.labels.dims() != [set.x.len()] {
        bail!(
            "classifier training: {} labels for {} samples",
            set.labels.elem_count(),
            set.x.len()
        );
    }
    let store = ParamStore::new(cfg.train.seed);
    let classifier = cfg.model.build(&store.var_builder(DType::F32, device))?;
    if classifier.out_dim() != 1 {
        bail!("classifier training: a binary classifier needs out_dim 1");
    }
    let mut trainer = Trainer::new(store, cfg.train.clone())?;
    trainer.run(cfg.iters, progress, |step, rng| {
        let idx = set.x.step_batch(cfg.batch, cfg.train.seed, step)?;
        let x0 = set.x.rows(&idx)?.to_device(device)?;
        let ids = Tensor::from_slice(&idx, idx.len(), device)?;
        let y = set.labels.to_device(device)?.index_select(&ids, 0)?;
        let (x, sigma) = if time_dependent {
            let sigma = cfg.sigma.sample_tensor(idx.len(), rng, device)?;
            let z = randn(rng, x0.dims(), device)?;
            ((x0 + z.broadcast_mul(&sigma.unsqueeze(1)?)?)?, sigma)
        } else {
            (x0, Tensor::full(cfg.sigma_clean as f32, idx.len(), device)?)
        };
        let logits = classifier.logits(&x, &sigma)?.squeeze(1)?;
        binary_cross_entropy(&logits, &y, set.weights)
    })?;
    let weights = trainer.ema().shadow.clone();
    let frozen = cfg.model.build(&candle_nn::VarBuilder::from_tensors(
        weights.clone().into_iter().collect(),
        DType::F32,
        device,
    ))?;
    Ok((frozen, weights))
}
