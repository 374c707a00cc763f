//! DLSM on images (paper §5, Table 2): one unconditional U-Net score model, trained once
//! ([`crate::images`]) and frozen; σ-conditioned ResNet classifiers trained on it with
//! cross-entropy (the base method, and the scaling method that multiplies its likelihood
//! score by α) or with L_DLSM + λ L_CE (the paper's method); class-conditional samples
//! from s_θ(x; σ) + α ∇x log p_φ(y | x; σ) for each method, and Table 2's metrics on them.

use crate::config::Preset;
use crate::image_metrics::{image_metrics, FeatureNetwork, Images};
use crate::images::{
    accuracy, feature_network, load_image_classifier, load_image_score, save_image_grid,
    train_image_classifier, train_image_score, ImageClassifierConfig, ImageData, ImageScoreConfig,
};
use crate::moons::ClassifierLoss;
use candle_core::{bail, DType, Device, Result, Tensor, Var};
use scoreguide_data::images::flip_rng;
use scoreguide_data::{ImageSet, ImageSplit};
use scoreguide_guidance::{log_softmax, one_hot, Cond, Guided, Score};
use scoreguide_losses::{cross_entropy, dlsm, DsmWeighting};
use scoreguide_nets::{
    AnyNet, Classifier, ClassifierConfig, NetConfig, ParamStore, ResNetConfig, ScoreNet,
};
use scoreguide_samplers::{sample_many, HeunOptions, PcOptions, Sampler};
use scoreguide_sde::{append_zero, derive_seed, karras, log_linear, randn, SigmaDistribution};
use scoreguide_train::{
    load_frozen, train_resumable, Checkpoint, Progress, Staged, TrainConfig, Trainer, Weights,
};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The three methods of Table 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// The cross-entropy classifier's likelihood score as it is.
    Base,
    /// The cross-entropy classifier's likelihood score ×α (Dhariwal & Nichol 2021).
    Scaling,
    /// The classifier trained with L_DLSM + λ L_CE.
    Dlsm,
}

impl Method {
    pub const ALL: [Method; 3] = [Method::Base, Method::Scaling, Method::Dlsm];

    pub fn name(&self) -> &'static str {
        match self {
            Self::Base => "base",
            Self::Scaling => "scaling",
            Self::Dlsm => "dlsm",
        }
    }

    /// The classifier it guides with: `ce` or `dlsm`.
    pub fn classifier(&self) -> &'static str {
        match self {
            Self::Base | Self::Scaling => "ce",
            Self::Dlsm => "dlsm",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == name)
            .ok_or_else(|| {
                candle_core::Error::msg(format!("method {name:?}: expected base, scaling or dlsm"))
            })
    }
}

/// The noise-conditioned classifier that guides, and how it is trained (the score model
/// frozen).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuidanceClassifierConfig {
    /// A ResNet with the noise branch (DLSM: ResNet-18 for 10 classes, -34 for 100).
    pub resnet: ResNetConfig,
    pub batch: usize,
    pub iters: u64,
    pub lr: f64,
    pub warmup_steps: u64,
    pub grad_clip: Option<f64>,
    pub ema_decay: f64,
    /// Noise levels of training: the authors' VE σ(t) with t ~ U(0, 1), i.e. log-uniform
    /// on the sampler's [σ_min, σ_max].
    pub sigma: SigmaDistribution,
    /// λ of L_total = L_DLSM + λ L_CE (the paper: 1 on images).
    pub ce_weight: f64,
    /// λ(σ) of L_DLSM. The authors' image code uses 1 and averages the squared error over
    /// pixels (not summed), which is what is done here.
    pub dlsm_weighting: DsmWeighting,
    /// Random left–right flips of training images.
    pub flip: bool,
    /// State saved every this many steps (0: only at the end).
    pub save_every: u64,
}

impl GuidanceClassifierConfig {
    pub fn classifier(&self) -> ClassifierConfig {
        ClassifierConfig::categorical(NetConfig::ResNet(self.resnet.clone()))
    }

    pub fn validate(&self) -> Result<()> {
        self.resnet.validate()?;
        self.sigma.validate()?;
        if self.resnet.noise_embedding.is_none() {
            bail!("guidance classifier: the ResNet needs its noise branch (noise_embedding)");
        }
        if self.batch == 0 || self.iters == 0 {
            bail!("guidance classifier: batch and iters must be positive");
        }
        if !(self.ce_weight >= 0.0 && self.ce_weight.is_finite()) {
            bail!(
                "guidance classifier: ce_weight must be ≥ 0, got {}",
                self.ce_weight
            );
        }
        Ok(())
    }
}

/// A sampler of the image experiment, on noise levels from `sigma_max` down to
/// `sigma_min`, then 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ImageSampler {
    /// EDM's Heun sampler on Karras et al.'s grid (ρ = 7): 2 evaluations per step.
    Heun { steps: usize },
    /// Song et al.'s predictor–corrector (reverse diffusion + one Langevin step at `snr`)
    /// on a geometric grid, as the paper: 2 evaluations per step.
    Pc { steps: usize, snr: f64 },
}

impl ImageSampler {
    pub fn build(&self, sigma_min: f64, sigma_max: f64) -> Result<(Sampler, Vec<f64>)> {
        Ok(match *self {
            Self::Heun { steps } => (
                Sampler::Heun(HeunOptions::default()),
                append_zero(karras(steps, sigma_min, sigma_max, 7.0)?),
            ),
            Self::Pc { steps, snr } => (
                Sampler::PredictorCorrector(PcOptions {
                    snr,
                    corrector_steps: 1,
                }),
                append_zero(log_linear(steps, sigma_min, sigma_max)?),
            ),
        })
    }

    pub fn steps(&self) -> usize {
        match *self {
            Self::Heun { steps } | Self::Pc { steps, .. } => steps,
        }
    }

    /// A short name for file names: `heun18`, `pc200`.
    pub fn tag(&self) -> String {
        match *self {
            Self::Heun { steps } => format!("heun{steps}"),
            Self::Pc { steps, .. } => format!("pc{steps}"),
        }
    }

    pub fn describe(&self) -> String {
        match *self {
            Self::Heun { steps } => format!("Heun, {steps} steps (Karras grid)"),
            Self::Pc { steps, snr } => format!("PC, {steps} steps (snr {snr})"),
        }
    }
}

/// The `dlsm_images` run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DlsmImagesConfig {
    /// The unconditional score model and its data (trained by the run's first stage).
    pub score: ImageScoreConfig,
    /// A finished `image_score` checkpoint to use instead of training `score`.
    #[serde(default)]
    pub score_checkpoint: Option<PathBuf>,
    pub classifier: GuidanceClassifierConfig,
    /// α of the scaling method (Table 2's is Table A5's α = 10).
    pub scaling: f64,
    /// Conditional samples per class, for each method and seed.
    pub n_per_class: usize,
    /// Sampling seeds: each gives one full set per method (the same noise for every
    /// method, so their differences are paired).
    pub seeds: Vec<u64>,
    pub sampler: ImageSampler,
    /// The noise range of sampling (and of the classifiers' training distribution).
    pub sigma_min: f64,
    pub sigma_max: f64,
    /// Images per sampling batch.
    pub sample_batch: usize,
    /// Nearest neighbours of precision/recall/density/coverage (the paper: 3).
    pub k: usize,
    /// Real test images the metrics compare against (0: the whole test split).
    pub real_images: usize,
    /// Compute the Inception metrics (FID, KID, P/R/D/C); the domain FID, IS and CAS
    /// need no Inception weights.
    pub inception: bool,
    /// CAS's classifier, trained on each method's samples and scored on the real test
    /// set; the same configuration trained on the real training set gives the domain
    /// features, the IS classifier and CAS's upper bound.
    pub cas: ImageClassifierConfig,
    /// A real-data classifier from the `cas` example to use instead of training one.
    #[serde(default)]
    pub domain_classifier: Option<PathBuf>,
    /// Samplers compared with `sampler` on the base method, `compare_per_class` images
    /// per class (empty: no comparison).
    pub compare_samplers: Vec<ImageSampler>,
    pub compare_per_class: usize,
    /// Images per class and method in the PNG grid.
    pub grid_per_class: usize,
}

impl Preset for DlsmImagesConfig {
    /// Minutes on 2 cores: the quick U-Net, ResNet-18 of width 8 for 150 steps, 4
    /// images per class, 10 Heun steps, 200 real images.
    fn quick() -> Self {
        Self {
            score: ImageScoreConfig::quick(),
            classifier: GuidanceClassifierConfig {
                resnet: ResNetConfig::resnet18(1, 28, 10, 8),
                batch: 32,
                iters: 150,
                save_every: 50,
                ..Self::full().classifier
            },
            n_per_class: 4,
            seeds: vec![0],
            sampler: ImageSampler::Heun { steps: 10 },
            sample_batch: 40,
            real_images: 200,
            cas: ImageClassifierConfig {
                iters: 100,
                ..ImageClassifierConfig::quick()
            },
            compare_samplers: vec![ImageSampler::Pc {
                steps: 20,
                snr: 0.16,
            }],
            compare_per_class: 4,
            grid_per_class: 4,
            ..Self::full()
        }
    }

    /// Hours on 2 cores: the `image_score` U-Net on Fashion-MNIST, ResNet-18 of width 16
    /// at the paper's batch 100 and Adam 2e-4, 100 samples per class and method for each
    /// of two seeds with 18 Heun steps, metrics against the 10,000 test images.
    fn full() -> Self {
        Self {
            score: ImageScoreConfig::full(),
            score_checkpoint: None,
            classifier: GuidanceClassifierConfig {
                resnet: ResNetConfig::resnet18(1, 28, 10, 16),
                batch: 100,
                iters: 4000,
                lr: 2e-4,
                warmup_steps: 0,
                grad_clip: Some(1.0),
                ema_decay: 0.999,
                sigma: SigmaDistribution::LogUniform {
                    min: 0.01,
                    max: 50.0,
                },
                ce_weight: 1.0,
                dlsm_weighting: DsmWeighting::Unit,
                flip: false,
                save_every: 250,
            },
            scaling: 10.0,
            n_per_class: 100,
            seeds: vec![0, 1],
            sampler: ImageSampler::Heun { steps: 18 },
            sigma_min: 0.01,
            sigma_max: 50.0,
            sample_batch: 50,
            k: 3,
            real_images: 0,
            inception: true,
            cas: ImageClassifierConfig {
                iters: 1500,
                ..ImageClassifierConfig::full()
            },
            domain_classifier: None,
            compare_samplers: vec![ImageSampler::Pc {
                steps: 200,
                snr: 0.16,
            }],
            compare_per_class: 20,
            grid_per_class: 6,
        }
    }

    fn validate(&self) -> Result<()> {
        self.score.validate()?;
        self.classifier.validate()?;
        self.cas.validate()?;
        let r = &self.classifier.resnet;
        let u = &self.score.unet;
        let c = &self.cas.resnet;
        if (r.channels, r.size) != (u.channels, u.size)
            || (c.channels, c.size, c.classes) != (r.channels, r.size, r.classes)
        {
            bail!(
                "dlsm_images config: the U-Net takes {}×{}×{} images, the guidance classifier {}×{}×{} of {} classes, CAS's classifier {}×{}×{} of {} classes: they must agree",
                u.channels, u.size, u.size, r.channels, r.size, r.size, r.classes, c.channels, c.size, c.size, c.classes
            );
        }
        if self.n_per_class == 0 || self.seeds.is_empty() || self.sample_batch == 0 {
            bail!("dlsm_images config: n_per_class, seeds and sample_batch must not be empty");
        }
        if self.k == 0 || self.n_per_class * r.classes <= self.k {
            bail!(
                "dlsm_images config: k = {} needs more than k samples ({} per class)",
                self.k,
                self.n_per_class
            );
        }
        if !(self.sigma_min > 0.0 && self.sigma_max > self.sigma_min) {
            bail!(
                "dlsm_images config: need 0 < sigma_min < sigma_max, got {} and {}",
                self.sigma_min,
                self.sigma_max
            );
        }
        if !(self.scaling > 0.0 && self.scaling.is_finite()) {
            bail!(
                "dlsm_images config: scaling must be positive, got {}",
                self.scaling
            );
        }
        if !self.compare_samplers.is_empty()
            && self.compare_per_class.min(self.n_per_class) <= self.k
        {
            bail!(
                "dlsm_images config: the sampler comparison's class-wise metrics need more than k = {} images per class, got compare_per_class = {}",
                self.k,
                self.compare_per_class
            );
        }
        for s in std::iter::once(&self.sampler).chain(&self.compare_samplers) {
            if s.steps() == 0 {
                bail!("dlsm_images config: sampler {s:?} needs steps > 0");
            }
        }
        Ok(())
    }
}

impl DlsmImagesConfig {
    /// The guidance scale of `method`.
    pub fn scale(&self, method: Method) -> f64 {
        match method {
            Method::Scaling => self.scaling,
            Method::Base | Method::Dlsm => 1.0,
        }
    }

    pub fn data(&self) -> ImageData {
        self.score.data
    }

    /// The real test images the metrics compare against, named as `scoreguide metrics`
    /// names the data set (so their Inception features share its cache).
    pub fn real_test(&self) -> Result<crate::image_metrics::Images> {
        let dir = self.score.data_dir.as_deref();
        let set = self.data().load(dir, ImageSplit::Test)?;
        let spec = match (self.data(), dir) {
            (ImageData::FashionMnist, None) => "fashion-mnist:test".to_string(),
            (ImageData::FashionMnist, Some(d)) => format!("mnist:{}:test", d.display()),
            (ImageData::Cifar10, d) => {
                format!("cifar10:{}:test", d.unwrap_or(".".as_ref()).display())
            }
            (ImageData::Cifar100, d) => {
                format!("cifar100:{}:test", d.unwrap_or(".".as_ref()).display())
            }
        };
        let images = crate::image_metrics::Images::from_set(&set, &spec);
        match self.real_images {
            0 => Ok(images),
            n => images.take(n),
        }
    }
}

/// Trains a guidance classifier on `set` with `loss` (cross-entropy, or L_DLSM + λ L_CE
/// against the frozen `prior`, which cross-entropy does not read); returns the final
/// checkpoint (`model` metadata: the
/// classifier). The DLSM terms differentiate through ∇x log p_φ(y | x; σ): the process
/// must run with `CANDLE_GRAD_DO_NOT_DETACH=1` set before its first backward pass.
#[allow(clippy::too_many_arguments)]
pub fn train_guidance_classifier(
    cfg: &GuidanceClassifierConfig,
    loss: ClassifierLoss,
    prior: Option<&dyn Score>,
    set: &ImageSet,
    seed: u64,
    staged: Option<Staged>,
    device: &Device,
    progress: &mut Progress,
) -> Result<Checkpoint> {
    cfg.validate()?;
    let r = &cfg.resnet;
    if (set.channels, set.size, set.classes) != (r.channels, r.size, r.classes) {
        bail!(
            "guidance classifier: {} holds {}×{}×{} images of {} classes, the ResNet takes {}×{}×{} of {}",
            set.images.name(), set.channels, set.size, set.size, set.classes, r.channels, r.size, r.size, r.classes
        );
    }
    let second_order = !matches!(loss, ClassifierLoss::CrossEntropy);
    if second_order && prior.is_none() {
        bail!("guidance classifier: the DLSM loss needs the score model");
    }
    if second_order && std::env::var("CANDLE_GRAD_DO_NOT_DETACH").as_deref() != Ok("1") {
        bail!("guidance classifier: the DLSM loss differentiates through an input gradient; set CANDLE_GRAD_DO_NOT_DETACH=1 before the first backward pass (the dlsm_images example does)");
    }
    let ccfg = cfg.classifier();
    let store = ParamStore::new(seed);
    let classifier = ccfg.build(&store.var_builder(DType::F32, device))?;
    let train = TrainConfig {
        lr: cfg.lr,
        ema_decay: cfg.ema_decay,
        grad_clip: cfg.grad_clip,
        warmup_steps: cfg.warmup_steps,
        seed,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(store, train)?;
    let describe = |mut c: Checkpoint| -> Result<Checkpoint> {
        c.set_meta("model", &ccfg)?;
        c.set_meta("loss", &loss)?;
        c.set_meta("guidance_classifier", cfg)?;
        Ok(c)
    };
    let pixels = r.in_dim() as f64;
    let step_loss = |step: u64, rng: &mut rand::rngs::StdRng| {
        let idx = set.images.step_batch(cfg.batch, seed, step)?;
        let (x0, y) = set.batch(&idx, cfg.flip, &mut flip_rng(seed, step))?;
        let (x0, y) = (x0.to_device(device)?, y.to_device(device)?);
        let sigma = cfg.sigma.sample_tensor(x0.dim(0)?, rng, device)?;
        let z = randn(rng, x0.dims(), device)?;
        let x = (&x0 + z.broadcast_mul(&sigma.unsqueeze(1)?)?)?;
        let (lambda_dlsm, lambda_ce) = match loss {
            ClassifierLoss::CrossEntropy => {
                return cross_entropy(&classifier.logits(&x, &sigma, &Cond::none())?, &y)
            }
            ClassifierLoss::Dlsm => (1.0, 0.0),
            ClassifierLoss::Total { ce_weight } => (1.0, ce_weight),
        };
        // One forward pass gives log p(y | x) for the cross-entropy and, through one
        // backward pass kept in the graph, ∇x log p(y | x) for L_DLSM.
        let xv = Var::from_tensor(&x)?;
        let logits = classifier.logits(xv.as_tensor(), &sigma, &Cond::none())?;
        let log_p = (log_softmax(&logits)? * one_hot(&y, r.classes, logits.dtype())?)?.sum(1)?;
        // Only the input gradient is kept: the weights' first-order gradients (and the
        // graph only they hold) go before the second pass.
        let Some(g) = log_p.sum_all()?.backward()?.remove(xv.as_tensor()) else {
            bail!("guidance classifier: no input gradient (the ResNet does not see its input)");
        };
        let Some(prior) = prior else {
            bail!("guidance classifier: the DLSM loss needs the score model");
        };
        let s = prior.score(&x, &sigma)?.detach();
        let l = (dlsm(&g, &s, &x0, &sigma, &z, cfg.dlsm_weighting)? * (lambda_dlsm / pixels))?;
        if lambda_ce == 0.0 {
            return Ok(l);
        }
        l + (log_p.mean_all()?.neg()? * lambda_ce)?
    };
    Ok(trainer
        .fit(cfg.iters, staged, progress, step_loss, &describe)?
        .0)
}

/// The frozen classifier (EMA weights) of a [`train_guidance_classifier`] checkpoint.
pub fn load_guidance_classifier(c: &Checkpoint, device: &Device) -> Result<Classifier> {
    let ccfg: ClassifierConfig = c.meta("model")?;
    Ok(load_frozen(
        c,
        Weights::Ema,
        DType::F32,
        device,
        "guidance classifier checkpoint",
        |vb| ccfg.build(vb),
    )?
    .0)
}

/// The noise seed of class `class`'s samples under sampling seed `seed` (the same for
/// every method).
pub fn class_seed(seed: u64, class: u32) -> u64 {
    derive_seed(seed, 1_000_000 + class as u64)
}

/// `n` samples `[n, C·S·S]` of class `class` from s_θ + `scale` ∇x log p_φ(class | x),
/// clamped to [−1, 1]; sample i from noise stream i of [`class_seed`].
#[allow(clippy::too_many_arguments)]
pub fn sample_class(
    prior: &dyn Score,
    classifier: &Classifier,
    scale: f64,
    class: u32,
    n: usize,
    sampler: &Sampler,
    sigmas: &[f64],
    seed: u64,
    batch: usize,
    device: &Device,
    on_step: &mut dyn FnMut(usize),
) -> Result<Tensor> {
    let guided = Guided::new(prior).with(scale, classifier);
    let labels = Tensor::from_vec(vec![class; n], n, device)?;
    let d = match classifier_input(classifier) {
        Some(d) => d,
        None => bail!("guided sampling: the classifier is not an image ResNet"),
    };
    sample_many(
        sampler,
        &guided,
        &Cond::labels(labels),
        n,
        &[d],
        sigmas,
        class_seed(seed, class),
        batch,
        device,
        on_step,
    )?
    .clamp(-1.0, 1.0)
}

fn classifier_input(classifier: &Classifier) -> Option<usize> {
    match classifier.net() {
        scoreguide_nets::AnyNet::ResNet(r) => Some(r.config().in_dim()),
        _ => None,
    }
}

/// Table 2's row of one method for one sampling seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    pub seed: u64,
    pub images: usize,
    /// The network of FID, KID and P/R/D/C (the Inception, or the domain classifier when
    /// the Inception metrics are off).
    pub features: String,
    pub fid: f64,
    pub kid: f64,
    /// Inception Score under the real-data classifier (the wheel's Inception has no
    /// classification head).
    pub is: f64,
    pub is_std: f64,
    pub precision: f64,
    pub recall: f64,
    pub density: f64,
    pub coverage: f64,
    pub cw_precision: f64,
    pub cw_recall: f64,
    pub cw_density: f64,
    pub cw_coverage: f64,
    /// Per class (label order): [precision, recall, density, coverage].
    pub per_class: Vec<[f64; 4]>,
    /// Accuracy on the real test set of a classifier trained on these samples.
    pub cas: f64,
    /// FID on the real-data classifier's penultimate features.
    pub fid_domain: f64,
    /// Σ x and Σ x² over the scored images: kept scores are reused only for the same
    /// samples.
    pub checksum: [f64; 2],
}

/// [`Scores::checksum`] of a set of images.
pub fn checksum(images: &Tensor) -> Result<[f64; 2]> {
    let x = images.to_dtype(DType::F64)?;
    Ok([
        x.sum_all()?.to_scalar::<f64>()?,
        x.sqr()?.sum_all()?.to_scalar::<f64>()?,
    ])
}

/// What the samples are scored against: the real test images, the real-data classifier
/// (domain features, IS) and the Inception network.
pub struct Evaluator {
    pub real: Images,
    /// CAS's test set: the whole real test split.
    pub test: ImageSet,
    pub domain: FeatureNetwork,
    pub inception: Option<FeatureNetwork>,
    /// Where the real images' Inception features are kept between runs.
    pub cache: Option<PathBuf>,
}

impl Evaluator {
    /// Table 2's row for `fake` (labelled samples). Trains CAS's classifier on them with
    /// `cfg.cas` and seed `seed`.
    pub fn score(
        &self,
        cfg: &DlsmImagesConfig,
        fake: &Images,
        seed: u64,
        device: &Device,
    ) -> Result<Scores> {
        let Some(labels) = fake.labels.clone() else {
            bail!("{}: samples without labels", fake.name);
        };
        let FeatureNetwork::Domain { classifier, .. } = &self.domain else {
            bail!("the domain feature network must be the real-data classifier");
        };
        let batch = 100;
        let domain = image_metrics(
            &self.real,
            fake,
            &self.domain,
            cfg.k,
            Some((classifier, "the real-data classifier")),
            batch,
            None,
        )?;
        let inception = match &self.inception {
            Some(net) => Some(image_metrics(
                &self.real,
                fake,
                net,
                cfg.k,
                None,
                batch,
                self.cache.as_deref(),
            )?),
            None => None,
        };
        let m = inception.as_ref().unwrap_or(&domain);
        let set = ImageSet::new(
            fake.rows.clone(),
            labels,
            fake.channels,
            fake.size,
            self.test.classes,
            &fake.name,
        )?;
        let cas_cfg = ImageClassifierConfig {
            seed,
            ..cfg.cas.clone()
        };
        let mut progress = Progress::new(
            &format!("CAS classifier on {}", fake.name),
            cas_cfg.iters as usize,
        );
        let c = train_image_classifier(&cas_cfg, &set, device, &mut progress)?;
        let cas = accuracy(&load_image_classifier(&c, device)?, &self.test, 500, device)?;
        let cw = |v: Option<f64>| v.unwrap_or(f64::NAN);
        Ok(Scores {
            seed,
            images: fake.len(),
            features: m.features.clone(),
            fid: m.fid,
            kid: m.kid,
            is: domain.is.unwrap_or(f64::NAN),
            is_std: domain.is_std.unwrap_or(f64::NAN),
            precision: m.precision,
            recall: m.recall,
            density: m.density,
            coverage: m.coverage,
            cw_precision: cw(m.cw_precision),
            cw_recall: cw(m.cw_recall),
            cw_density: cw(m.cw_density),
            cw_coverage: cw(m.cw_coverage),
            per_class: m
                .per_class
                .iter()
                .map(|p| [p.precision, p.recall, p.density, p.coverage])
                .collect(),
            cas,
            fid_domain: domain.fid,
            checksum: checksum(&fake.rows)?,
        })
    }
}

/// One method's rows over the sampling seeds, as the JSON report holds them: every
/// number of [`Scores`] as its mean over the seeds, beside `<name>_std` (the sample
/// standard deviation; 0 for one seed), and the rows themselves under `seeds`.
pub fn summarise(name: &str, scale: f64, rows: &[Scores]) -> Result<serde_json::Value> {
    use serde_json::{json, Map, Value};
    let values: Vec<Map<String, Value>> = rows
        .iter()
        .map(|r| match serde_json::to_value(r) {
            Ok(Value::Object(m)) => Ok(m),
            _ => bail!("scores of {name}: not an object"),
        })
        .collect::<Result<_>>()?;
    let mut out = Map::new();
    out.insert("name".into(), json!(name));
    out.insert("scale".into(), json!(scale));
    if let Some(first) = values.first() {
        for (key, v) in first {
            if key == "seed" || !v.is_number() {
                continue;
            }
            let xs: Vec<f64> = values
                .iter()
                .filter_map(|m| m.get(key).and_then(Value::as_f64))
                .collect();
            let (mean, std) = mean_std(&xs);
            out.insert(key.clone(), json!(mean));
            out.insert(format!("{key}_std"), json!(std));
        }
        out.insert("features".into(), first["features"].clone());
    }
    out.insert(
        "seeds".into(),
        serde_json::to_value(rows).map_err(candle_core::Error::wrap)?,
    );
    Ok(Value::Object(out))
}

/// Mean and sample standard deviation (0 for fewer than two values).
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = xs.iter().sum::<f64>() / n;
    let var = match xs.len() {
        1 => 0.0,
        _ => xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0),
    };
    (mean, var.sqrt())
}

/// The stages of a `dlsm_images` run in its output folder, each kept as files that a
/// later run with `reuse` continues from: `score.safetensors` (unless the configuration
/// names a checkpoint), `classifier_ce.safetensors`, `classifier_dlsm.safetensors`,
/// `classifier_real.safetensors` (unless `domain_classifier`), samples per method, seed
/// and class under `samples/`, and each method's scores under `scores/`.
pub struct Stages<'a> {
    pub cfg: &'a DlsmImagesConfig,
    pub out: PathBuf,
    pub reuse: bool,
    pub device: Device,
}

impl Stages<'_> {
    /// The frozen unconditional score model (EMA weights): the configured checkpoint,
    /// or trained here (resumable).
    pub fn score_model(&self) -> Result<(Checkpoint, ScoreNet<AnyNet>)> {
        let cfg = &self.cfg.score;
        let c = match &self.cfg.score_checkpoint {
            Some(p) => {
                eprintln!("score model: {}", p.display());
                Checkpoint::load(p)?
            }
            None => {
                let set = cfg.training_set()?;
                train_resumable(
                    &self.out,
                    "score",
                    self.reuse,
                    cfg.save_every,
                    cfg.iters,
                    |staged| {
                        let mut progress = Progress::new("U-Net (DSM)", cfg.iters as usize);
                        train_image_score(cfg, &set, Some(staged), &self.device, &mut progress)
                    },
                )?
            }
        };
        let model = load_image_score(&c, &self.device)?;
        Ok((c, model))
    }

    /// The guidance classifier `ce` (cross-entropy) or `dlsm` (L_DLSM + λ L_CE), trained
    /// on the frozen `prior` (resumable; cross-entropy needs none).
    pub fn classifier(&self, name: &str, prior: Option<&dyn Score>) -> Result<Classifier> {
        let cfg = &self.cfg.classifier;
        let loss = match name {
            "ce" => ClassifierLoss::CrossEntropy,
            "dlsm" => ClassifierLoss::Total {
                ce_weight: cfg.ce_weight,
            },
            other => bail!("guidance classifier {other:?}: expected ce or dlsm"),
        };
        let set = self
            .cfg
            .score
            .data
            .training_images(self.cfg.score.data_dir.as_deref(), 0)?;
        // A kept classifier (finished or partial) must be this configuration's.
        for kept in [
            format!("classifier_{name}.safetensors"),
            format!("classifier_{name}.partial.safetensors"),
        ] {
            let path = self.out.join(kept);
            if !(self.reuse && path.exists()) {
                continue;
            }
            let c = Checkpoint::load(&path)?;
            let (was, was_loss) = (
                c.meta::<GuidanceClassifierConfig>("guidance_classifier")?,
                c.meta::<ClassifierLoss>("loss")?,
            );
            if (&was, was_loss) != (cfg, loss) {
                bail!(
                    "{}: trained with {was:?} and loss {was_loss:?}, but the configuration asks for {cfg:?} and {loss:?}; use another --out or remove the file",
                    path.display()
                );
            }
        }
        let c = train_resumable(
            &self.out,
            &format!("classifier_{name}"),
            self.reuse,
            cfg.save_every,
            cfg.iters,
            |staged| {
                let what = match name {
                    "ce" => "classifier (cross-entropy)",
                    _ => "classifier (DLSM + CE)",
                };
                let mut progress = Progress::new(what, cfg.iters as usize);
                let seed = self.cfg.score.seed + 1;
                train_guidance_classifier(
                    cfg,
                    loss,
                    prior,
                    &set,
                    seed,
                    Some(staged),
                    &self.device,
                    &mut progress,
                )
            },
        )?;
        load_guidance_classifier(&c, &self.device)
    }

    /// The classifier of real images: domain features, IS and CAS's upper bound; the
    /// configured `cas` checkpoint, or trained here on the real training set.
    pub fn real_classifier(&self) -> Result<(AnyNet, String)> {
        let (c, name) = match &self.cfg.domain_classifier {
            Some(p) => (Checkpoint::load(p)?, p.display().to_string()),
            None => {
                let path = self.out.join("classifier_real.safetensors");
                let c = if self.reuse && path.exists() {
                    Checkpoint::load(&path)?
                } else {
                    let (train, _) = self.cas_splits()?;
                    let mut progress =
                        Progress::new("real-data classifier", self.cfg.cas.iters as usize);
                    let c =
                        train_image_classifier(&self.cfg.cas, &train, &self.device, &mut progress)?;
                    c.save(&path)?;
                    c
                };
                (c, path.display().to_string())
            }
        };
        let net = load_image_classifier(&c, &self.device)?;
        feature_network(&net)?;
        Ok((net, name))
    }

    /// The real test split (CAS's test set).
    pub fn test_set(&self) -> Result<ImageSet> {
        let c = &self.cfg.score;
        c.data.load(c.data_dir.as_deref(), ImageSplit::Test)
    }

    fn cas_splits(&self) -> Result<(ImageSet, ImageSet)> {
        ImageClassifierConfig {
            data: self.cfg.score.data,
            data_dir: self.cfg.score.data_dir.clone(),
            ..self.cfg.cas.clone()
        }
        .splits()
    }

    /// `per_class` samples of every class for `method` (guided by `classifier`) with
    /// `sampler` and sampling seed `seed`, as labelled images; each class is kept under
    /// `samples/{tag}-seed{seed}-class{c}.safetensors` as it is done and read back by a
    /// later run.
    #[allow(clippy::too_many_arguments)]
    pub fn samples(
        &self,
        tag: &str,
        method: Method,
        prior: &dyn Score,
        classifier: &Classifier,
        sampler: &ImageSampler,
        per_class: usize,
        seed: u64,
    ) -> Result<Images> {
        let u = &self.cfg.score.unet;
        let classes = self.cfg.classifier.resnet.classes;
        let (s, sigmas) = sampler.build(self.cfg.sigma_min, self.cfg.sigma_max)?;
        let dir = self.out.join("samples");
        std::fs::create_dir_all(&dir)
            .map_err(|e| candle_core::Error::msg(format!("{}: {e}", dir.display())))?;
        let mut parts = Vec::with_capacity(classes);
        let steps = per_class.div_ceil(self.cfg.sample_batch.min(per_class)) * sampler.steps();
        let mut progress = Progress::new(
            &format!("{tag} seed {seed} ({})", sampler.describe()),
            classes * steps,
        );
        for class in 0..classes as u32 {
            let path = dir.join(format!("{tag}-seed{seed}-class{class}.safetensors"));
            // A kept class is reused only if it was drawn the same way.
            let kept = match self.reuse && path.exists() {
                true => Some(Checkpoint::load(&path)?),
                false => None,
            };
            let x = kept.and_then(|c| {
                let same = c.meta::<Method>("method").ok() == Some(method)
                    && c.meta::<ImageSampler>("sampler").ok().as_ref() == Some(sampler);
                match c.tensors.get("images") {
                    Some(x) if same && x.dims() == [per_class, u.in_dim()] => Some(x.clone()),
                    _ => {
                        eprintln!("{}: drawn otherwise; drawing again", path.display());
                        None
                    }
                }
            });
            let x = match x {
                Some(x) => x.to_device(&self.device)?,
                None => {
                    let done = class as usize * steps;
                    let x = sample_class(
                        prior,
                        classifier,
                        self.cfg.scale(method),
                        class,
                        per_class,
                        &s,
                        &sigmas,
                        seed,
                        self.cfg.sample_batch,
                        &self.device,
                        &mut |k| progress.update(done + k, ""),
                    )?;
                    let mut c = Checkpoint::new();
                    c.tensors.insert("images".into(), x.clone());
                    c.set_meta("method", &method)?;
                    c.set_meta("sampler", sampler)?;
                    c.save(&path)?;
                    x
                }
            };
            parts.push(x);
        }
        progress.update(classes * steps, "");
        let labels = (0..classes as u32)
            .flat_map(|c| std::iter::repeat_n(c, per_class))
            .collect();
        Ok(Images {
            rows: Tensor::cat(&parts, 0)?,
            channels: u.channels,
            size: u.size,
            labels: Some(labels),
            name: format!("{tag} samples (seed {seed})"),
        })
    }

    /// [`Evaluator::score`], kept under `scores/{tag}-seed{seed}.json` and read back by a
    /// later run.
    pub fn scores(
        &self,
        tag: &str,
        evaluator: &Evaluator,
        fake: &Images,
        seed: u64,
    ) -> Result<Scores> {
        let path = self
            .out
            .join("scores")
            .join(format!("{tag}-seed{seed}.json"));
        if self.reuse {
            let kept = std::fs::read_to_string(&path)
                .ok()
                .and_then(|text| serde_json::from_str::<Scores>(&text).ok());
            if let Some(s) = kept {
                if s.checksum == checksum(&fake.rows)? {
                    eprintln!("{tag} seed {seed}: scores from {}", path.display());
                    return Ok(s);
                }
                eprintln!("{}: scores of other samples; scoring again", path.display());
            }
        }
        let s = evaluator.score(self.cfg, fake, seed, &self.device)?;
        crate::runtime::write_json(&path, &s)?;
        Ok(s)
    }
}

/// The PNG grid of DLSM's figures: a row per class, `per_method` samples of each method
/// side by side (methods in the order given).
pub fn method_grid(
    path: &std::path::Path,
    samples: &[&Images],
    classes: usize,
    per_class: usize,
    per_method: usize,
) -> Result<()> {
    let Some(first) = samples.first() else {
        bail!("sample grid: no methods");
    };
    let shown = per_method.min(per_class);
    let mut rows = Vec::new();
    for class in 0..classes {
        for s in samples {
            rows.push(s.rows.narrow(0, class * per_class, shown)?);
        }
    }
    save_image_grid(
        path,
        &Tensor::cat(&rows, 0)?,
        first.channels,
        first.size,
        shown * samples.len(),
    )
}

/// DLSM's Fig. 4: the class-wise precision, recall, density and coverage of each method
/// as grouped bars, one panel per metric.
pub fn classwise_figure(path: &std::path::Path, methods: &[(&str, Vec<[f64; 4]>)]) -> Result<()> {
    use crate::plot::{bar_panel, save_grid, BLUE, GREEN, ORANGE, RED};
    let colours = [BLUE, ORANGE, GREEN, RED];
    let panels: Vec<_> = ["precision", "recall", "density", "coverage"]
        .iter()
        .enumerate()
        .map(|(k, metric)| {
            let series: Vec<_> = methods
                .iter()
                .enumerate()
                .map(|(i, (name, per_class))| {
                    (
                        *name,
                        colours[i % colours.len()],
                        per_class.iter().map(|v| v[k]).collect(),
                    )
                })
                .collect();
            bar_panel(&format!("class-wise {metric} per class"), &series)
        })
        .collect();
    save_grid(path, &panels, 2)
}

/// The first `m` images of each class of `x`, which holds `per_class` images of each
/// class in class order (as [`Stages::samples`] returns them).
pub fn first_per_class(x: &Images, per_class: usize, m: usize) -> Result<Images> {
    if per_class == 0 || m > per_class || x.len() % per_class != 0 {
        bail!(
            "{}: cannot take {m} of {per_class} images per class from {} images",
            x.name,
            x.len()
        );
    }
    let classes = x.len() / per_class;
    let rows = (0..classes)
        .map(|c| x.rows.narrow(0, c * per_class, m))
        .collect::<Result<Vec<_>>>()?;
    Ok(Images {
        rows: Tensor::cat(&rows, 0)?,
        labels: Some(
            (0..classes as u32)
                .flat_map(|c| std::iter::repeat_n(c, m))
                .collect(),
        ),
        name: format!("{} (first {m} per class)", x.name),
        ..x.clone()
    })
}

/// Per class, the mean over seeds of [precision, recall, density, coverage].
pub fn mean_per_class(rows: &[Scores]) -> Vec<[f64; 4]> {
    let classes = rows.first().map_or(0, |r| r.per_class.len());
    (0..classes)
        .map(|c| {
            let mut v = [0.0; 4];
            for r in rows {
                for (k, x) in v.iter_mut().enumerate() {
                    *x += r.per_class[c][k] / rows.len() as f64;
                }
            }
            v
        })
        .collect()
}

/// For each class-wise metric, the number of classes where `ours` (mean over seeds) is
/// above `base`.
pub fn classes_above(
    base: &[Scores],
    ours: &[Scores],
) -> std::collections::BTreeMap<&'static str, usize> {
    let (b, o) = (mean_per_class(base), mean_per_class(ours));
    ["precision", "recall", "density", "coverage"]
        .into_iter()
        .enumerate()
        .map(|(k, metric)| {
            (
                metric,
                b.iter().zip(&o).filter(|(b, o)| o[k] > b[k]).count(),
            )
        })
        .collect()
}

/// Table 2 as markdown: a row per metric, a column per method, mean ± sample deviation
/// over the seeds.
pub fn table(
    rows: &std::collections::BTreeMap<Method, Vec<Scores>>,
    cfg: &DlsmImagesConfig,
) -> String {
    use std::fmt::Write;
    let fmt = |xs: Vec<f64>| {
        let (m, s) = mean_std(&xs);
        match xs.len() {
            1 => format!("{m:.3}"),
            _ => format!("{m:.3} ± {s:.3}"),
        }
    };
    let mut out = format!(
        "\n{:?}, {} samples per class and method, {} seed(s), {}\n",
        cfg.data(),
        cfg.n_per_class,
        cfg.seeds.len(),
        cfg.sampler.describe()
    );
    let names: Vec<&str> = rows.keys().map(|m| m.name()).collect();
    let _ = writeln!(out, "| metric | {} |", names.join(" | "));
    let _ = writeln!(out, "|---|{}", "---|".repeat(names.len()));
    type Get = fn(&Scores) -> f64;
    let metrics: [(&str, Get); 13] = [
        ("FID", |s| s.fid),
        ("IS", |s| s.is),
        ("precision", |s| s.precision),
        ("recall", |s| s.recall),
        ("density", |s| s.density),
        ("coverage", |s| s.coverage),
        ("CAS", |s| s.cas),
        ("(CW) precision", |s| s.cw_precision),
        ("(CW) recall", |s| s.cw_recall),
        ("(CW) density", |s| s.cw_density),
        ("(CW) coverage", |s| s.cw_coverage),
        ("FID (domain)", |s| s.fid_domain),
        ("KID", |s| s.kid),
    ];
    for (name, get) in metrics {
        let cells: Vec<String> = rows
            .values()
            .map(|r| fmt(r.iter().map(get).collect()))
            .collect();
        let _ = writeln!(out, "| {name} | {} |", cells.join(" | "));
    }
    out
}
