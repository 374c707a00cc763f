//! DLSM on images (paper §5, Table 2): one unconditional U-Net score model, trained once
//! ([`crate::images`]) and frozen; σ-conditioned ResNet classifiers trained on it with
//! cross-entropy (the base method, and the scaling method that multiplies its likelihood
//! score by α) or with L_DLSM + λ L_CE (the paper's method); class-conditional samples
//! from s_θ(x; σ) + α ∇x log p_φ(y | x; σ) for each method, and Table 2's metrics on them.
//!
//! * [`classifier`]: the guidance classifiers' training (CE, or L_DLSM + λ L_CE
//!   through ∇x log p(y | x)) and loading;
//! * [`sampling`]: the samplers and class-conditional sampling of each method;
//! * [`scores`]: Table 2's row of a set of samples, its summary over seeds, the table;
//! * [`stages`]: the run's stages, kept in its output folder and resumed;
//! * [`figures`]: the method grid and Fig. 4's class-wise bars.

pub mod classifier;
pub mod figures;
pub mod sampling;
pub mod scores;
pub mod stages;

pub use classifier::{
    likelihood_score_excess, load_guidance_classifier, train_guidance_classifier, EXCESS_SIGMAS,
};
pub use figures::{classwise_figure, method_grid};
pub use sampling::{class_seed, sample_class, ImageSampler};
pub use scores::{
    checksum, classes_above, first_per_class, mean_per_class, mean_std, summarise, table,
    Evaluator, Scores,
};
pub use stages::Stages;

use crate::config::Preset;
use crate::images::{ImageClassifierConfig, ImageData, ImageScoreConfig};
use crate::moons::ClassifierLoss;
use candle_core::{bail, Result};
use scoreguide_data::ImageSplit;
use scoreguide_losses::DsmWeighting;
use scoreguide_nets::{ClassifierConfig, NetConfig, ResNetConfig};
use scoreguide_sde::SigmaDistribution;
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

/// How L_DLSM's squared error over an image's pixels becomes one number per image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DlsmReduction {
    /// The mean over pixels (the authors' `torch.mean` over every element). With λ = 1
    /// it leaves L_DLSM's parameter gradient 10⁻² to 10⁻⁷ of the cross-entropy's at
    /// σ ≥ 0.1 on 28² images (docs/notes/dlsm-images.md).
    #[default]
    PixelMean,
    /// The sum over pixels (score_sde's DSM with `reduce_mean = False`): with λ = σ² its
    /// gradient is of the cross-entropy's size from σ = 1 to 10.
    PixelSum,
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
    /// λ(σ) of L_DLSM (the authors' image code: 1).
    pub dlsm_weighting: DsmWeighting,
    /// How L_DLSM's squared error is reduced over an image's pixels (the authors' code:
    /// the mean).
    #[serde(default)]
    pub dlsm_reduction: DlsmReduction,
    /// Random left–right flips of training images.
    pub flip: bool,
    /// State saved every this many steps (0: only at the end).
    pub save_every: u64,
}

impl GuidanceClassifierConfig {
    pub fn classifier(&self) -> ClassifierConfig {
        ClassifierConfig::categorical(NetConfig::ResNet(self.resnet.clone()))
    }

    /// The configuration as training with `loss` reads it: cross-entropy reads none of
    /// the DLSM terms, so a kept CE classifier serves any of them.
    pub fn read_by(&self, loss: ClassifierLoss) -> Self {
        let mut c = self.clone();
        if loss == ClassifierLoss::CrossEntropy {
            let unread = DlsmImagesConfig::full().classifier;
            c.ce_weight = unread.ce_weight;
            c.dlsm_weighting = unread.dlsm_weighting;
            c.dlsm_reduction = unread.dlsm_reduction;
        }
        c
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
    /// Where the real images' Inception features are kept between runs (the folder
    /// `scoreguide metrics --feature-cache` uses shares them; default: the output
    /// folder's `feature_cache`).
    #[serde(default)]
    pub feature_cache: Option<PathBuf>,
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
                dlsm_reduction: DlsmReduction::PixelMean,
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
            feature_cache: None,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Classifiers saved before `dlsm_reduction` existed averaged over pixels: their
    /// configuration must read back as the same one, so `--reuse` keeps them.
    #[test]
    fn a_configuration_without_dlsm_reduction_averages_over_pixels() {
        let cfg = DlsmImagesConfig::full().classifier;
        let mut json = serde_json::to_value(&cfg).unwrap();
        json.as_object_mut()
            .unwrap()
            .remove("dlsm_reduction")
            .unwrap();
        let old: GuidanceClassifierConfig = serde_json::from_value(json).unwrap();
        assert_eq!(old, cfg);
        assert_eq!(old.dlsm_reduction, DlsmReduction::PixelMean);
        let sum: DlsmReduction = serde_json::from_str("\"pixel_sum\"").unwrap();
        assert_eq!(sum, DlsmReduction::PixelSum);
    }

    #[test]
    fn a_cross_entropy_classifier_does_not_read_the_dlsm_terms() {
        let cfg = DlsmImagesConfig::full().classifier;
        let other = GuidanceClassifierConfig {
            ce_weight: 0.5,
            dlsm_weighting: DsmWeighting::SigmaSquared,
            dlsm_reduction: DlsmReduction::PixelSum,
            ..cfg.clone()
        };
        let ce = ClassifierLoss::CrossEntropy;
        assert_eq!(other.read_by(ce), cfg.read_by(ce));
        let total = ClassifierLoss::Total { ce_weight: 1.0 };
        assert_ne!(other.read_by(total), cfg.read_by(total));
        let longer = GuidanceClassifierConfig {
            iters: cfg.iters + 1,
            ..cfg.clone()
        };
        assert_ne!(longer.read_by(ce), cfg.read_by(ce));
    }
}
