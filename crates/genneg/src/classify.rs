//! Training Gen-neG's classifiers: the IS-balanced loss and the paper's ablations.

use crate::collect::Draws;
use crate::task::Task;
use candle_core::{bail, DType, Device, Result, Tensor};
use scoreguide_data::Dataset;
use scoreguide_losses::weighted_binary_cross_entropy;
use scoreguide_nets::{Classifier, ClassifierConfig, ParamStore};
use scoreguide_sde::{randn, SigmaDistribution};
use scoreguide_train::{Checkpoint, Progress, TrainConfig, Trainer};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Which classifier of Gen-neG §3 / Table 1 to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClassifierKind {
    /// Balanced set, valid components weighted by α and invalid ones by 1 − α (Eq. 11).
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

/// A classifier's training set: rows, the keys their conditions come from, labels
/// (1 = valid) and weights per (row, component), `[N, K]`; a weight of 0 leaves a
/// component out.
pub struct LabelledSet {
    pub x: Dataset,
    pub keys: Vec<u32>,
    pub labels: Tensor,
    pub weights: Tensor,
    /// Valid and invalid components with a positive weight.
    pub kept: (usize, usize),
    /// α of the draws the set was made from.
    pub alpha: f64,
}

impl LabelledSet {
    /// The training set `kind` uses from `draws`. Balanced kinds keep the first N valid
    /// and N invalid components in drawing order (N = [`Draws::balanced_count`]); the
    /// imbalanced kind keeps the first rows drawn, up to 2N components when N was asked
    /// for (the balanced set's size), every row otherwise.
    pub fn new(draws: &Draws, kind: ClassifierKind) -> Result<Self> {
        let k = draws.components;
        let rows = draws.rows();
        let n = draws.balanced_count();
        if n == 0 {
            bail!(
                "Gen-neG classifier set: need valid and invalid components, got {} valid and {} invalid",
                draws.valid_found,
                draws.invalid_found
            );
        }
        let alpha = draws.alpha();
        let prefix = draws.per_class.map_or(usize::MAX, |n| 2 * n);
        let (mut seen_valid, mut seen_invalid, mut kept) = (0, 0, (0, 0));
        let (mut keep_rows, mut labels, mut weights) = (Vec::new(), Vec::new(), Vec::new());
        for (i, row) in draws.valid.chunks_exact(k).enumerate() {
            let in_prefix = i * k < prefix;
            let mut w_row = vec![0f32; k];
            for (w, &v) in w_row.iter_mut().zip(row) {
                let seen = if v {
                    &mut seen_valid
                } else {
                    &mut seen_invalid
                };
                *seen += 1;
                *w = match kind {
                    ClassifierKind::Imbalanced if in_prefix => 1.0,
                    ClassifierKind::Imbalanced => 0.0,
                    _ if *seen > n => 0.0,
                    ClassifierKind::WithoutIs => 1.0,
                    ClassifierKind::IsBalanced | ClassifierKind::TimeIndependent => {
                        (if v { alpha } else { 1.0 - alpha }) as f32
                    }
                };
                if *w > 0.0 {
                    if v {
                        kept.0 += 1
                    } else {
                        kept.1 += 1
                    }
                }
            }
            if w_row.iter().any(|&w| w > 0.0) {
                keep_rows.push(i as u32);
                labels.extend(row.iter().map(|&v| if v { 1f32 } else { 0.0 }));
                weights.extend(w_row);
            }
        }
        if let Some(sis) = &draws.sis {
            // The imbalanced set keeps the draws' class proportions, so its weights are
            // normalised over both classes together; the balanced ones within each.
            let by_class = kind != ClassifierKind::Imbalanced;
            reweight(
                &mut weights,
                &labels,
                &keep_rows,
                &sis.log_weights,
                k,
                by_class,
            );
        }
        let m = keep_rows.len();
        debug_assert!(m <= rows);
        let device = draws.x.device();
        let x = draws
            .x
            .index_select(&Tensor::from_vec(keep_rows.clone(), m, device)?, 0)?;
        Ok(Self {
            x: Dataset::new(x, "Gen-neG classifier set")?,
            keys: keep_rows.iter().map(|&i| draws.keys[i as usize]).collect(),
            labels: Tensor::from_vec(labels, (m, k), device)?,
            weights: Tensor::from_vec(weights, (m, k), device)?,
            kept,
            alpha,
        })
    }
}

/// Rows drawn from a proposal stand for the target's class-conditional distributions
/// once each kept component is weighted by its row's importance weight, normalised to
/// mean 1 over the kept components of its class (`by_class`; else over all of them):
/// the class weights (α, 1 − α, or 1) are kept as they are, and equal importance
/// weights change nothing.
fn reweight(
    weights: &mut [f32],
    labels: &[f32],
    rows: &[u32],
    log_w: &[f64],
    k: usize,
    by_class: bool,
) {
    let lw = |i: usize| log_w[rows[i / k] as usize];
    let kept = |i: usize| weights[i] > 0.0;
    let class = |l: f32| if by_class { l as usize } else { 0 };
    // Per class, log Σ w over its kept components (shifted by the class's largest).
    let mut top = [f64::NEG_INFINITY; 2];
    for i in (0..weights.len()).filter(|&i| kept(i)) {
        let c = class(labels[i]);
        top[c] = top[c].max(lw(i));
    }
    let (mut sum, mut count) = ([0f64; 2], [0usize; 2]);
    for i in (0..weights.len()).filter(|&i| kept(i)) {
        let c = class(labels[i]);
        sum[c] += (lw(i) - top[c]).exp();
        count[c] += 1;
    }
    for (i, l) in labels.iter().enumerate() {
        if weights[i] > 0.0 {
            let c = class(*l);
            let w = (lw(i) - top[c]).exp() * count[c] as f64 / sum[c];
            weights[i] = (weights[i] as f64 * w) as f32;
        }
    }
}

/// A trained classifier: the frozen EMA network and its checkpoint (`classifier`
/// metadata: its [`ClassifierConfig`]; `sigma_clean` for a time-independent one).
pub struct TrainedClassifier {
    pub classifier: Classifier,
    pub checkpoint: Checkpoint,
}

impl TrainedClassifier {
    /// The EMA weights.
    pub fn weights(&self) -> BTreeMap<String, Tensor> {
        self.checkpoint.section("ema")
    }
}

/// Trains a classifier on `set` (its rows' conditions from `task`): noisy inputs
/// x0 + σ z at σ from `cfg.sigma` when `time_dependent`, clean inputs at
/// `cfg.sigma_clean` otherwise, and the weighted cross-entropy over (row, component)
/// pairs (Eq. 11 with the set's weights).
pub fn train_classifier(
    set: &LabelledSet,
    task: &dyn Task,
    time_dependent: bool,
    cfg: &ClassifierTrainConfig,
    device: &Device,
    progress: &mut Progress,
) -> Result<TrainedClassifier> {
    cfg.sigma.validate()?;
    if cfg.batch == 0 || cfg.iters == 0 {
        bail!("classifier training: batch and iters must be positive");
    }
    let k = task.components();
    if set.labels.dims() != [set.x.len(), k] || set.weights.dims() != set.labels.dims() {
        bail!(
            "classifier training: labels {:?} and weights {:?} for {} rows of {k} components",
            set.labels.dims(),
            set.weights.dims(),
            set.x.len()
        );
    }
    let store = ParamStore::new(cfg.train.seed);
    let classifier = cfg.model.build(&store.var_builder(DType::F32, device))?;
    if classifier.out_dim() != k {
        bail!(
            "classifier training: the network has {} outputs per row, the task labels {k} components",
            classifier.out_dim()
        );
    }
    let (labels, weights) = (
        set.labels.to_device(device)?,
        set.weights.to_device(device)?,
    );
    let mut trainer = Trainer::new(store, cfg.train.clone())?;
    trainer.run(cfg.iters, progress, |step, rng| {
        let idx = set.x.step_batch(cfg.batch, cfg.train.seed, step)?;
        let x0 = set.x.rows(&idx)?.to_device(device)?;
        let ids = Tensor::from_slice(&idx, idx.len(), device)?;
        let keys: Vec<u32> = idx.iter().map(|&i| set.keys[i as usize]).collect();
        let cond = task.cond(&keys)?;
        let (x, sigma) = if time_dependent {
            let sigma = cfg.sigma.sample_tensor(idx.len(), rng, device)?;
            let z = randn(rng, x0.dims(), device)?;
            let s = scoreguide_guidance::per_sample(&sigma, &x0)?;
            ((x0 + z.broadcast_mul(&s)?)?, sigma)
        } else {
            (x0, Tensor::full(cfg.sigma_clean as f32, idx.len(), device)?)
        };
        let logits = classifier.logits(&x, &sigma, &cond)?;
        weighted_binary_cross_entropy(
            &logits,
            &labels.index_select(&ids, 0)?,
            &weights.index_select(&ids, 0)?,
        )
    })?;
    let mut checkpoint = trainer.checkpoint()?;
    checkpoint.set_meta("classifier", &cfg.model)?;
    checkpoint.set_meta("classifier_training", cfg)?;
    checkpoint.set_meta("sigma_clean", &(!time_dependent).then_some(cfg.sigma_clean))?;
    let frozen = cfg.model.build(&candle_nn::VarBuilder::from_tensors(
        trainer.ema().shadow.clone().into_iter().collect(),
        DType::F32,
        device,
    ))?;
    Ok(TrainedClassifier {
        classifier: frozen,
        checkpoint,
    })
}
