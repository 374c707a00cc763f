//! DLSM's two-moons experiment (paper §3, Table 1), as functions the
//! `dlsm_moons` example and the tests share: data, the score model trained with DSM, the
//! noise-conditioned classifier trained with cross-entropy, DLSM or both, the score-error
//! grid, and class-conditional sampling; the evaluation of each method ([`eval`]) and
//! the paper's Fig. 1 ([`render`]).

pub mod eval;
pub mod render;

use crate::config::Preset;
use candle_core::{bail, DType, Device, Result, Tensor};
use scoreguide_data::{two_moons, Dataset, Parzen};
use scoreguide_guidance::{Cond, Guided, Score};
use scoreguide_losses::{cross_entropy, dlsm, dsm, DsmWeighting};
use scoreguide_nets::{
    AnyNet, NetConfig, ParamStore, Precond, ScoreModelConfig, ScoreNet, ToyClassifier, ToyMlpConfig,
};
use scoreguide_samplers::{initial_noise, PcOptions, Sampler};
use scoreguide_sde::{append_zero, log_linear, randn, SampleNoise, SigmaDistribution};
use scoreguide_train::{
    load_frozen, load_score_model, train_resumable, Checkpoint, Progress, Staged, TrainConfig,
    Trainer, Weights,
};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// How a classifier is trained (the score model frozen).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ClassifierLoss {
    /// Cross-entropy only (the paper's "base").
    CrossEntropy,
    /// L_DLSM only.
    Dlsm,
    /// L_DLSM + c · L_CE (the paper's "ours", c = 0.125 on two moons).
    Total { ce_weight: f64 },
}

/// The `dlsm_moons` run: the models' settings and the evaluation's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DlsmMoonsConfig {
    pub moons: MoonsConfig,
    /// Conditional samples per class and method.
    pub samples: usize,
    /// Predictor–corrector steps.
    pub steps: usize,
    /// The sampler's smallest σ (its grid runs geometrically from 10 down to it, then its
    /// last step returns the denoised estimate there): a score model that is accurate
    /// only down to some σ is sampled no further.
    #[serde(default = "default_sample_sigma_min")]
    pub sample_sigma_min: f64,
    /// Nearest neighbours of precision/recall/density/coverage.
    pub k: usize,
    /// Save each training's state every this many steps (`--resume` continues it);
    /// 0: at the end only.
    pub save_every: u64,
}

impl Preset for DlsmMoonsConfig {
    /// 4k steps per model, 2k samples per class, 200 PC steps.
    fn quick() -> Self {
        Self {
            moons: MoonsConfig {
                score_iters: 4_000,
                classifier_iters: 4_000,
                ..MoonsConfig::default()
            },
            samples: 2_000,
            steps: 200,
            ..Self::full()
        }
    }

    /// The paper's sizes: 40k steps per model, 10k samples per class, 1000 PC steps.
    fn full() -> Self {
        Self {
            moons: MoonsConfig::default(),
            samples: 10_000,
            steps: 1_000,
            sample_sigma_min: default_sample_sigma_min(),
            k: 5,
            save_every: 0,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.samples == 0 || self.steps == 0 || self.k == 0 {
            bail!("dlsm_moons config: samples, steps and k must be positive, got {self:?}");
        }
        if !(self.sample_sigma_min > 0.0 && self.sample_sigma_min < MOONS_SAMPLE_SIGMA_MAX) {
            bail!(
                "dlsm_moons config: sample_sigma_min must lie in (0, {MOONS_SAMPLE_SIGMA_MAX}), got {}",
                self.sample_sigma_min
            );
        }
        if self.moons.points == 0 || self.moons.batch == 0 {
            bail!("dlsm_moons config: moons.points and moons.batch must be positive");
        }
        let net = &self.moons.score_net;
        if (net.in_dim(), net.out_dim()) != (2, 2) {
            bail!(
                "dlsm_moons config: moons.score_net must map 2 values to 2, got {} to {}",
                net.in_dim(),
                net.out_dim()
            );
        }
        self.moons.sigma.validate()?;
        self.moons.precond.validate()
    }
}

/// The σ at which conditional sampling starts.
pub const MOONS_SAMPLE_SIGMA_MAX: f64 = 10.0;

fn default_sample_sigma_min() -> f64 {
    0.01
}

/// The per-coordinate RMS of the centred moons at scale 20 (√0.4975 · 20, from
/// make_moons' circles), EDM's σ_data for the score model.
pub const MOONS_SIGMA_DATA: f64 = 14.0;

/// Settings of the models: the authors' code (DLSM App. A.6), except that the score
/// model is EDM-preconditioned and weighted so that it stays accurate at small σ (the
/// authors' raw-σ network with the σ⁴ weight knows nothing of the moons below σ ≈ 3;
/// `precond = identity`, `weighting = sigma_fourth` restores it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoonsConfig {
    pub points: usize,
    /// Multiplies the centred make_moons coordinates.
    pub scale: f64,
    pub sigma: SigmaDistribution,
    /// The score model's network: DLSM's toy MLP (the default), or any of the
    /// registry's with 2 inputs and 2 outputs (e.g. the checkerboard's residual MLP).
    #[serde(default = "toy_score_net")]
    pub score_net: NetConfig,
    /// The score model's preconditioning: DLSM's toy code feeds the raw σ and reads the
    /// score off the output (`identity`); `edm` lets it stay accurate at small σ.
    pub precond: Precond,
    /// The score model's DSM weight λ(σ).
    pub weighting: DsmWeighting,
    /// The classifiers' DLSM weight λ(σ) (the authors' code: σ⁴).
    pub classifier_weighting: DsmWeighting,
    pub batch: usize,
    pub score_iters: u64,
    pub score_lr: f64,
    pub classifier_iters: u64,
    pub seed: u64,
}

impl Default for MoonsConfig {
    fn default() -> Self {
        Self {
            points: 10_000,
            scale: 20.0,
            sigma: SigmaDistribution::LogUniform {
                min: 1e-3,
                max: 10.0,
            },
            score_net: toy_score_net(),
            precond: Precond::Edm {
                sigma_data: MOONS_SIGMA_DATA,
            },
            weighting: DsmWeighting::Edm {
                sigma_data: MOONS_SIGMA_DATA,
            },
            classifier_weighting: DsmWeighting::SigmaFourth,
            batch: 4_000,
            score_iters: 40_000,
            score_lr: 6.5e-4,
            classifier_iters: 40_000,
            seed: 0,
        }
    }
}

impl ClassifierLoss {
    /// The learning rate of the authors' code for this loss (CE: the paper's classifier
    /// rate, A.6.2).
    pub fn learning_rate(&self) -> f64 {
        match self {
            Self::CrossEntropy | Self::Dlsm => 2e-5,
            Self::Total { .. } => 1e-5,
        }
    }
}

/// make_moons(n, noise 0), centred and scaled: `([n, 2] f32, labels)`, outer moon = 0.
pub fn moons_data(cfg: &MoonsConfig) -> Result<(Tensor, Vec<u32>)> {
    let (x, labels) = two_moons(cfg.points, 0.0, cfg.seed)?;
    let centred = x.broadcast_sub(&x.mean_keepdim(0)?)?;
    Ok(((centred * cfg.scale)?, labels))
}

fn toy_config(out_dim: usize) -> ToyMlpConfig {
    ToyMlpConfig { in_dim: 2, out_dim }
}

fn toy_score_net() -> NetConfig {
    NetConfig::ToyMlp(toy_config(2))
}

/// Trains the score model with DSM; returns the checkpoint (EMA weights under `ema.`).
/// With `staged`, continues a saved state and saves as it goes.
pub fn train_score(
    cfg: &MoonsConfig,
    data: &Dataset,
    staged: Option<Staged>,
    device: &Device,
    progress: &mut Progress,
) -> Result<Checkpoint> {
    cfg.sigma.validate()?;
    let store = ParamStore::new(cfg.seed);
    let model = cfg
        .score_model()
        .build(&store.var_builder(DType::F32, device))?;
    let train = TrainConfig {
        lr: cfg.score_lr,
        seed: cfg.seed,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(store, train)?;
    let describe = |mut c: Checkpoint| -> Result<Checkpoint> {
        c.set_meta("model", &cfg.score_model())?;
        c.set_meta("moons", cfg)?;
        Ok(c)
    };
    let loss = |step: u64, rng: &mut rand::rngs::StdRng| {
        let x0 = data.rows(&data.step_batch(cfg.batch, cfg.seed, step)?)?;
        let sigma = cfg.sigma.sample_tensor(x0.dim(0)?, rng, device)?;
        let z = randn(rng, x0.dims(), device)?;
        dsm(&model, &x0, &sigma, &z, &Cond::none(), cfg.weighting)
    };
    Ok(trainer
        .fit(cfg.score_iters, staged, progress, loss, &describe)?
        .0)
}

impl MoonsConfig {
    /// The score network under the configured preconditioning (identity: its output is
    /// the score, s = F(x, σ)).
    pub fn score_model(&self) -> ScoreModelConfig {
        ScoreModelConfig {
            net: self.score_net.clone(),
            precond: self.precond.clone(),
        }
    }
}

/// A checkpoint's `model` metadata as a network of the registry; a bare toy MLP
/// configuration (files written before the registry had it) reads as one.
fn described(c: &Checkpoint, as_score_model: bool) -> Result<Checkpoint> {
    let mut c = c.clone();
    if let Ok(toy) = c.meta::<ToyMlpConfig>("model") {
        let net = NetConfig::ToyMlp(toy);
        match as_score_model {
            true => c.set_meta(
                "model",
                &ScoreModelConfig {
                    net,
                    precond: Precond::Identity,
                },
            )?,
            false => c.set_meta("model", &net)?,
        }
    }
    Ok(c)
}

/// The frozen score model of a checkpoint from [`train_score`] (EMA weights).
pub fn load_score(c: &Checkpoint, dtype: DType, device: &Device) -> Result<ScoreNet<AnyNet>> {
    Ok(load_score_model(&described(c, true)?, Weights::Ema, dtype, device)?.0)
}

/// The frozen classifier of a checkpoint from [`train_classifier`] (EMA weights).
pub fn load_classifier(c: &Checkpoint, dtype: DType, device: &Device) -> Result<ToyClassifier> {
    let c = described(c, false)?;
    let net: NetConfig = c.meta("model")?;
    let what = "classifier checkpoint";
    match load_frozen(&c, Weights::Ema, dtype, device, what, |vb| net.build(vb))?.0 {
        AnyNet::ToyMlp(t) => Ok(ToyClassifier(t)),
        _ => bail!("{what}: the network is {net:?}, not DLSM's toy MLP"),
    }
}

/// Trains a 2-class noise-conditioned classifier with `loss`, the score model `prior`
/// frozen. `labels` are the classes of `data`'s rows. With `staged`, continues a saved
/// state and saves as it goes.
#[allow(clippy::too_many_arguments)]
pub fn train_classifier(
    cfg: &MoonsConfig,
    loss: ClassifierLoss,
    prior: &dyn Score,
    data: &Dataset,
    labels: &[u32],
    staged: Option<Staged>,
    device: &Device,
    progress: &mut Progress,
) -> Result<Checkpoint> {
    if labels.len() != data.len() {
        bail!(
            "classifier training: {} labels for {} points",
            labels.len(),
            data.len()
        );
    }
    let labels_t = Tensor::from_slice(labels, labels.len(), device)?;
    let store = ParamStore::new(cfg.seed + 1);
    let classifier = ToyClassifier(toy_config(2).build(&store.var_builder(DType::F32, device))?);
    let train = TrainConfig {
        lr: loss.learning_rate(),
        seed: cfg.seed + 1,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(store, train)?;
    let describe = |mut c: Checkpoint| -> Result<Checkpoint> {
        c.set_meta("model", &NetConfig::ToyMlp(toy_config(2)))?;
        c.set_meta("loss", &loss)?;
        Ok(c)
    };
    let step_loss = |step: u64, rng: &mut rand::rngs::StdRng| {
        let idx = data.step_batch(cfg.batch, cfg.seed + 1, step)?;
        let x0 = data.rows(&idx)?;
        let y = labels_t.index_select(&Tensor::from_slice(&idx, idx.len(), device)?, 0)?;
        let sigma = cfg.sigma.sample_tensor(x0.dim(0)?, rng, device)?;
        let z = randn(rng, x0.dims(), device)?;
        let x = (&x0 + z.broadcast_mul(&sigma.unsqueeze(1)?)?)?;
        let ce = || cross_entropy(&classifier.0.forward(&x, &sigma)?, &y);
        let dlsm_term = || -> Result<Tensor> {
            let (_, g) = classifier.log_prob_and_input_grad(&x, &sigma, &y)?;
            let s = prior.score(&x, &sigma)?.detach();
            dlsm(&g, &s, &x0, &sigma, &z, cfg.classifier_weighting)
        };
        match loss {
            ClassifierLoss::CrossEntropy => ce(),
            ClassifierLoss::Dlsm => dlsm_term(),
            ClassifierLoss::Total { ce_weight } => dlsm_term()? + (ce()? * ce_weight)?,
        }
    };
    Ok(trainer
        .fit(cfg.classifier_iters, staged, progress, step_loss, &describe)?
        .0)
}

/// The run's classifiers: the paper's base (cross-entropy), DLSM alone, and its "ours"
/// (L_DLSM + 0.125 · L_CE).
pub const CLASSIFIERS: [(&str, ClassifierLoss); 3] = [
    ("ce", ClassifierLoss::CrossEntropy),
    ("dlsm", ClassifierLoss::Dlsm),
    ("total", ClassifierLoss::Total { ce_weight: 0.125 }),
];

/// The frozen models of a run: the score model and the classifiers trained on it.
pub struct MoonsModels {
    pub prior: ScoreNet<AnyNet>,
    pub classifiers: Vec<(&'static str, ToyClassifier)>,
}

/// The run's models, trained in `out` (`score.safetensors`, `classifier_<name>.safetensors`)
/// or, with `reuse`, reused when finished there and continued from their saved states
/// (`save_every`) when not: the score model, then the classifiers of [`CLASSIFIERS`]
/// (only the one named `only`, when given; `"score"`: none).
pub fn train_models(
    cfg: &DlsmMoonsConfig,
    points: &Tensor,
    labels: &[u32],
    out: &Path,
    reuse: bool,
    only: Option<&str>,
    device: &Device,
) -> Result<MoonsModels> {
    if let Some(only) = only {
        if only != "score" && !CLASSIFIERS.iter().any(|(n, _)| *n == only) {
            bail!("dlsm_moons: no model named {only:?} (score, ce, dlsm or total)");
        }
    }
    let data = Dataset::new(points.to_device(device)?, "two moons")?;
    let m = &cfg.moons;
    let score = train_resumable(
        out,
        "score",
        reuse,
        cfg.save_every,
        m.score_iters,
        |staged| {
            let mut progress = Progress::new("score model (DSM)", m.score_iters as usize);
            train_score(m, &data, Some(staged), device, &mut progress)
        },
    )?;
    let prior = load_score(&score, DType::F32, device)?;
    let mut classifiers = Vec::new();
    for (name, loss) in CLASSIFIERS {
        if only.is_some_and(|only| only != name) {
            continue;
        }
        let file = format!("classifier_{name}");
        let c = train_resumable(
            out,
            &file,
            reuse,
            cfg.save_every,
            m.classifier_iters,
            |staged| {
                let mut progress =
                    Progress::new(&format!("classifier {name}"), m.classifier_iters as usize);
                train_classifier(
                    m,
                    loss,
                    &prior,
                    &data,
                    labels,
                    Some(staged),
                    device,
                    &mut progress,
                )
            },
        )?;
        classifiers.push((name, load_classifier(&c, DType::F32, device)?));
    }
    Ok(MoonsModels { prior, classifiers })
}

/// DLSM's evaluation points: a 35 × 35 grid over [−40, 40] × [−25, 25] (`[1225, 2]`).
pub fn error_grid() -> Vec<[f64; 2]> {
    let lin = |a: f64, b: f64, i: usize| a + (b - a) * i as f64 / 34.0;
    (0..35)
        .flat_map(|i| (0..35).map(move |j| [lin(-40.0, 40.0, i), lin(-25.0, 25.0, j)]))
        .collect()
}

/// Rows of `points` whose label is `class`, as a [`Parzen`] oracle.
pub fn class_parzen(points: &Tensor, labels: &[u32], class: u32) -> Result<Parzen> {
    let idx: Vec<u32> = (0..labels.len() as u32)
        .filter(|&i| labels[i as usize] == class)
        .collect();
    let rows = points.index_select(&Tensor::from_slice(&idx, idx.len(), points.device())?, 0)?;
    Parzen::new(&rows, &format!("class {class} points"))
}

/// Row-major f64 values of a `[B, d]` tensor.
pub fn to_f64_rows(t: &Tensor) -> Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()
}

/// The predictor–corrector sampler (Song et al. 2021) on `steps` geometric noise levels from `sigma_max` to
/// `sigma_min`, then 0.
pub fn pc_sampler(steps: usize, sigma_min: f64, sigma_max: f64) -> Result<(Sampler, Vec<f64>)> {
    Ok((
        Sampler::PredictorCorrector(PcOptions::default()),
        append_zero(log_linear(steps, sigma_min, sigma_max)?),
    ))
}

/// `n` samples of class `class` from s_θ + k ∇x log p_φ(class | x), in batches, with
/// per-sample seeded noise.
#[allow(clippy::too_many_arguments)]
pub fn sample_class(
    prior: &dyn Score,
    classifier: &ToyClassifier,
    class: u32,
    scale: f64,
    n: usize,
    sampler: &Sampler,
    sigmas: &[f64],
    seed: u64,
    device: &Device,
) -> Result<Tensor> {
    let guided = Guided::new(prior).with(scale, classifier.for_class(class)?);
    let batch = 10_000.min(n);
    let mut out = Vec::new();
    let mut start = 0;
    while start < n {
        let b = batch.min(n - start);
        let mut noise = SampleNoise::new(seed, start, b);
        let x0 = initial_noise(&mut noise, &[b, 2], sigmas[0], DType::F32, device)?;
        out.push(sampler.sample(&guided, x0, sigmas, &mut noise, None)?);
        start += b;
    }
    Tensor::cat(&out, 0)
}
