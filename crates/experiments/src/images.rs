//! Image score models: a U-Net trained with DSM (EDM preconditioning and weighting) on
//! Fashion-MNIST or CIFAR, in stages that resume exactly, sampled with EDM's Heun
//! sampler, and the grids of images a person looks at; and the classifier of clean
//! images that the classification accuracy score (CAS) trains and tests.

use crate::config::Preset;
use candle_core::{bail, DType, Device, Result, Tensor};
use scoreguide_data::images::flip_rng;
use scoreguide_data::{cifar, fashion_mnist, ImageSet, ImageSplit};
use scoreguide_guidance::Cond;
use scoreguide_losses::{dsm, DsmWeighting};
use scoreguide_nets::{
    AnyNet, NetConfig, NoiseNet, ParamStore, Precond, ResNetConfig, ScoreModelConfig, ScoreNet,
    UNetConfig,
};
use scoreguide_samplers::{sample_many, HeunOptions, Sampler};
use scoreguide_sde::{karras, randn, SigmaDistribution};
use scoreguide_train::{
    load_frozen, load_score_model, train_resumable, Checkpoint, Progress, Staged, TrainConfig,
    Trainer, Weights,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Which image set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageData {
    FashionMnist,
    Cifar10,
    Cifar100,
}

impl ImageData {
    /// The split, from `dir` (for Fashion-MNIST, else `$SCOREGUIDE_FASHION_MNIST` or
    /// Debian's folder).
    pub fn load(&self, dir: Option<&Path>, split: ImageSplit) -> Result<ImageSet> {
        match self {
            Self::FashionMnist => fashion_mnist(dir, split),
            Self::Cifar10 | Self::Cifar100 => {
                let Some(dir) = dir else {
                    bail!("{self:?}: give the folder of the binary batches (`data_dir`)");
                };
                cifar(dir, *self == Self::Cifar100, split)
            }
        }
    }

    /// The first `n` training images (all of them for 0).
    pub fn training_images(&self, dir: Option<&Path>, n: usize) -> Result<ImageSet> {
        let set = self.load(dir, ImageSplit::Train)?;
        match n {
            0 => Ok(set),
            n => set.take(n),
        }
    }
}

/// The score model's training and sampling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageScoreConfig {
    pub data: ImageData,
    /// Folder of the data set's files (see [`ImageData::load`]).
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// Training images used (0: all).
    #[serde(default)]
    pub train_images: usize,
    pub unet: UNetConfig,
    pub batch: usize,
    pub iters: u64,
    pub lr: f64,
    pub warmup_steps: u64,
    pub ema_decay: f64,
    pub grad_clip: Option<f64>,
    /// Random left–right flips of training images.
    pub flip: bool,
    pub sigma: SigmaDistribution,
    /// State saved every this many steps (0: only at the end).
    pub save_every: u64,
    /// Heun steps of EDM's sampler (Karras grid, ρ = 7, σ from 80 to 0.002).
    pub sampler_steps: usize,
    /// Images drawn for the grid.
    pub samples: usize,
    pub seed: u64,
}

impl Preset for ImageScoreConfig {
    /// Minutes on 2 cores: a small U-Net for 300 steps on 2,000 Fashion-MNIST images.
    fn quick() -> Self {
        Self {
            train_images: 2000,
            unet: UNetConfig {
                base_channels: 16,
                multipliers: vec![1, 2],
                blocks_per_level: 1,
                attention_resolutions: vec![14],
                dropout: 0.0,
                ..UNetConfig::small_grey()
            },
            batch: 32,
            iters: 300,
            warmup_steps: 50,
            save_every: 100,
            sampler_steps: 18,
            samples: 36,
            ..Self::full()
        }
    }

    /// Hours on 2 cores: `UNetConfig::small_grey` (1.6M parameters) on all 60,000
    /// Fashion-MNIST training images for 10,000 steps (about 2.5 hours of two cores
    /// here; the learning rate is constant after warm-up, so a longer budget only adds
    /// steps).
    fn full() -> Self {
        Self {
            data: ImageData::FashionMnist,
            data_dir: None,
            train_images: 0,
            unet: UNetConfig::small_grey(),
            batch: 64,
            iters: 10_000,
            lr: 2e-4,
            warmup_steps: 1000,
            ema_decay: 0.999,
            grad_clip: Some(1.0),
            flip: false,
            sigma: SigmaDistribution::edm_log_normal(),
            save_every: 250,
            sampler_steps: 18,
            samples: 100,
            seed: 0,
        }
    }

    fn validate(&self) -> Result<()> {
        self.unet.validate()?;
        self.sigma.validate()?;
        if self.batch == 0 || self.iters == 0 || self.sampler_steps == 0 || self.samples == 0 {
            bail!("image score model: batch, iters, sampler_steps and samples must be positive");
        }
        Ok(())
    }
}

impl ImageScoreConfig {
    pub fn model(&self) -> ScoreModelConfig {
        ScoreModelConfig {
            net: NetConfig::UNet(self.unet.clone()),
            precond: Precond::edm(),
        }
    }

    /// The training images, checked against the network's image shape.
    pub fn training_set(&self) -> Result<ImageSet> {
        let set = self
            .data
            .training_images(self.data_dir.as_deref(), self.train_images)?;
        self.check_fits(&set)?;
        Ok(set)
    }

    fn check_fits(&self, set: &ImageSet) -> Result<()> {
        if (set.channels, set.size) != (self.unet.channels, self.unet.size) {
            bail!(
                "image score model: the data are {}×{}×{} images, the U-Net takes {}×{}×{}",
                set.channels,
                set.size,
                set.size,
                self.unet.channels,
                self.unet.size,
                self.unet.size
            );
        }
        Ok(())
    }

    /// EDM's Heun sampler and its noise grid (ending at 0).
    pub fn sampler(&self) -> Result<(Sampler, Vec<f64>)> {
        let mut sigmas = karras(self.sampler_steps, 0.002, 80.0, 7.0)?;
        sigmas.push(0.0);
        Ok((Sampler::Heun(HeunOptions::default()), sigmas))
    }
}

/// Trains the U-Net; returns the final checkpoint (`model` metadata: the score model,
/// `images`: this configuration). With `staged`, continues a saved state and saves
/// every `save_every` steps.
pub fn train_image_score(
    cfg: &ImageScoreConfig,
    set: &ImageSet,
    staged: Option<Staged>,
    device: &Device,
    progress: &mut Progress,
) -> Result<Checkpoint> {
    cfg.validate()?;
    cfg.check_fits(set)?;
    let store = ParamStore::new(cfg.seed);
    let model = cfg.model().build(&store.var_builder(DType::F32, device))?;
    let train = TrainConfig {
        lr: cfg.lr,
        ema_decay: cfg.ema_decay,
        grad_clip: cfg.grad_clip,
        warmup_steps: cfg.warmup_steps,
        seed: cfg.seed,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(store, train)?;
    let describe = |mut c: Checkpoint| -> Result<Checkpoint> {
        c.set_meta("model", &cfg.model())?;
        c.set_meta("images", cfg)?;
        Ok(c)
    };
    let loss = |step: u64, rng: &mut rand::rngs::StdRng| {
        let idx = set.images.step_batch(cfg.batch, cfg.seed, step)?;
        let (x0, _) = set.batch(&idx, cfg.flip, &mut flip_rng(cfg.seed, step))?;
        let x0 = x0.to_device(device)?;
        let sigma = cfg.sigma.sample_tensor(x0.dim(0)?, rng, device)?;
        let z = randn(rng, x0.dims(), device)?;
        dsm(
            &model,
            &x0,
            &sigma,
            &z,
            &Cond::none(),
            DsmWeighting::Edm { sigma_data: 1.0 },
        )
    };
    Ok(trainer.fit(cfg.iters, staged, progress, loss, &describe)?.0)
}

/// [`train_image_score`] in `out` as a stage: `score.safetensors` when finished, its
/// state every `save_every` steps in `score.partial.safetensors`; with `reuse`, a
/// finished model is returned as it is and a saved state continued.
pub fn train_image_score_in(
    cfg: &ImageScoreConfig,
    set: &ImageSet,
    out: &Path,
    reuse: bool,
    device: &Device,
) -> Result<Checkpoint> {
    train_resumable(out, "score", reuse, cfg.save_every, cfg.iters, |staged| {
        let mut progress = Progress::new("U-Net (DSM)", cfg.iters as usize);
        train_image_score(cfg, set, Some(staged), device, &mut progress)
    })
}

/// The EMA score model of a checkpoint of [`train_image_score`].
pub fn load_image_score(c: &Checkpoint, device: &Device) -> Result<ScoreNet<AnyNet>> {
    Ok(load_score_model(c, Weights::Ema, DType::F32, device)?.0)
}

/// `n` samples `[n, C·S·S]` in [−1, 1] (clamped), sample i from noise stream (seed, i).
pub fn sample_images(
    cfg: &ImageScoreConfig,
    model: &ScoreNet<AnyNet>,
    n: usize,
    seed: u64,
    device: &Device,
    progress: &mut Progress,
) -> Result<Tensor> {
    let (sampler, sigmas) = cfg.sampler()?;
    let batch = cfg.batch.min(n).max(1);
    let x = sample_many(
        &sampler,
        model,
        &Cond::none(),
        n,
        &[cfg.unet.in_dim()],
        &sigmas,
        seed,
        batch,
        device,
        &mut |done| progress.update(done, ""),
    )?;
    x.clamp(-1.0, 1.0)
}

/// The first `most` of `images` (`[n, C·S·S]`) as a square-ish PNG grid
/// ([`save_image_grid`]); returns how many it shows.
pub fn save_first_images(
    path: &Path,
    images: &Tensor,
    channels: usize,
    size: usize,
    most: usize,
) -> Result<usize> {
    let shown = images.dim(0)?.min(most);
    let cols = (shown as f64).sqrt().ceil() as usize;
    save_image_grid(path, &images.narrow(0, 0, shown)?, channels, size, cols)?;
    Ok(shown)
}

/// Writes `images` (`[n, C·S·S]` in [−1, 1], C = 1 or 3) as a PNG grid of `cols`
/// columns with a 2-pixel gap, atomically.
pub fn save_image_grid(
    path: &Path,
    images: &Tensor,
    channels: usize,
    size: usize,
    cols: usize,
) -> Result<()> {
    let (n, d) = images.dims2()?;
    if d != channels * size * size || !(channels == 1 || channels == 3) || cols == 0 || n == 0 {
        bail!("image grid: {n} rows of {d} values are not {channels}×{size}×{size} images");
    }
    let v = images
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let rows = n.div_ceil(cols);
    let gap = 2;
    let (w, h) = (cols * (size + gap) + gap, rows * (size + gap) + gap);
    let mut rgb = vec![1f32; w * h * 3];
    for (i, img) in v.chunks_exact(d).enumerate() {
        let (ox, oy) = (
            gap + (i % cols) * (size + gap),
            gap + (i / cols) * (size + gap),
        );
        for y in 0..size {
            for x in 0..size {
                for c in 0..3 {
                    let ch = if channels == 1 { 0 } else { c };
                    let value = img[(ch * size + y) * size + x];
                    rgb[((oy + y) * w + ox + x) * 3 + c] = (value.clamp(-1.0, 1.0) + 1.0) / 2.0;
                }
            }
        }
    }
    crate::plot::save_png(path, w, h, &rgb)
}

/// A classifier of clean images (the noise-free ResNet), trained with cross-entropy:
/// CAS's classifier, trained on real or generated labelled images and scored on the
/// real test set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageClassifierConfig {
    pub data: ImageData,
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// Training images used (0: all).
    #[serde(default)]
    pub train_images: usize,
    pub resnet: ResNetConfig,
    pub batch: usize,
    pub iters: u64,
    pub lr: f64,
    pub warmup_steps: u64,
    pub flip: bool,
    pub seed: u64,
}

impl Preset for ImageClassifierConfig {
    /// Minutes: ResNet-18 of width 8 for 300 steps on 5,000 Fashion-MNIST images.
    fn quick() -> Self {
        Self {
            train_images: 5000,
            resnet: ResNetConfig::resnet18(1, 28, 10, 8).noise_free(),
            iters: 300,
            warmup_steps: 50,
            ..Self::full()
        }
    }

    /// ResNet-18 of width 16 for 5 epochs of the 60,000 Fashion-MNIST training images
    /// (about a quarter of an hour on 2 cores).
    fn full() -> Self {
        Self {
            data: ImageData::FashionMnist,
            data_dir: None,
            train_images: 0,
            resnet: ResNetConfig::resnet18(1, 28, 10, 16).noise_free(),
            batch: 64,
            iters: 4690,
            lr: 1e-3,
            warmup_steps: 200,
            flip: true,
            seed: 0,
        }
    }

    fn validate(&self) -> Result<()> {
        self.resnet.validate()?;
        if self.resnet.noise_embedding.is_some() {
            bail!("image classifier: CAS's classifier sees clean images (noise_embedding = none)");
        }
        if self.batch == 0 || self.iters == 0 {
            bail!("image classifier: batch and iters must be positive");
        }
        Ok(())
    }
}

impl ImageClassifierConfig {
    /// The training and test splits (the training split cut to `train_images`).
    pub fn splits(&self) -> Result<(ImageSet, ImageSet)> {
        let train = self
            .data
            .training_images(self.data_dir.as_deref(), self.train_images)?;
        let test = self.data.load(self.data_dir.as_deref(), ImageSplit::Test)?;
        Ok((train, test))
    }
}

/// Trains the classifier on `set` (cross-entropy on its labels); returns the final
/// checkpoint (`model` metadata: the network).
pub fn train_image_classifier(
    cfg: &ImageClassifierConfig,
    set: &ImageSet,
    device: &Device,
    progress: &mut Progress,
) -> Result<Checkpoint> {
    cfg.validate()?;
    if (set.channels, set.size, set.classes)
        != (cfg.resnet.channels, cfg.resnet.size, cfg.resnet.classes)
    {
        bail!(
            "image classifier: {}×{}×{} images of {} classes, the ResNet takes {}×{}×{} of {}",
            set.channels,
            set.size,
            set.size,
            set.classes,
            cfg.resnet.channels,
            cfg.resnet.size,
            cfg.resnet.size,
            cfg.resnet.classes
        );
    }
    let net_cfg = NetConfig::ResNet(cfg.resnet.clone());
    let store = ParamStore::new(cfg.seed);
    let net = net_cfg.build(&store.var_builder(DType::F32, device))?;
    let train = TrainConfig {
        lr: cfg.lr,
        warmup_steps: cfg.warmup_steps,
        seed: cfg.seed,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(store, train)?;
    let describe = |mut c: Checkpoint| -> Result<Checkpoint> {
        c.set_meta("model", &net_cfg)?;
        c.set_meta("classifier", cfg)?;
        Ok(c)
    };
    let zero = Tensor::zeros(cfg.batch, DType::F32, device)?;
    let loss = |step: u64, _rng: &mut rand::rngs::StdRng| {
        let idx = set.images.step_batch(cfg.batch, cfg.seed, step)?;
        let (x, y) = set.batch(&idx, cfg.flip, &mut flip_rng(cfg.seed, step))?;
        let logits = net.forward(
            &x.to_device(device)?,
            &zero.narrow(0, 0, idx.len())?,
            &Cond::none(),
        )?;
        candle_nn::loss::cross_entropy(&logits, &y.to_device(device)?)
    };
    Ok(trainer.fit(cfg.iters, None, progress, loss, &describe)?.0)
}

/// The classifier of a [`train_image_classifier`] checkpoint, EMA weights, frozen.
pub fn load_image_classifier(c: &Checkpoint, device: &Device) -> Result<AnyNet> {
    let cfg: NetConfig = c.meta("model")?;
    Ok(load_frozen(
        c,
        Weights::Ema,
        DType::F32,
        device,
        "classifier checkpoint",
        |vb| cfg.build(vb),
    )?
    .0)
}

/// Share of `set`'s images whose most likely class under `net` is their label.
pub fn accuracy(net: &AnyNet, set: &ImageSet, batch: usize, device: &Device) -> Result<f64> {
    let mut right = 0usize;
    let idx: Vec<u32> = (0..set.len() as u32).collect();
    for chunk in idx.chunks(batch.max(1)) {
        let x = set.images.rows(chunk)?.to_device(device)?;
        let zero = Tensor::zeros(chunk.len(), DType::F32, device)?;
        let predicted = net
            .forward(&x, &zero, &Cond::none())?
            .argmax(1)?
            .to_vec1::<u32>()?;
        right += predicted
            .iter()
            .zip(chunk)
            .filter(|(p, &i)| **p == set.labels[i as usize])
            .count();
    }
    Ok(right as f64 / set.len().max(1) as f64)
}

/// The network of [`domain_features`]: a noise-free ResNet, else an error that says so.
pub fn feature_network(classifier: &AnyNet) -> Result<&scoreguide_nets::ResNet> {
    let AnyNet::ResNet(net) = classifier else {
        bail!("domain features: the classifier must be a ResNet (the cas example trains one)");
    };
    if net.config().noise_embedding.is_some() {
        bail!("domain features: the ResNet must be the noise-free classifier of clean images");
    }
    Ok(net)
}

/// Domain features of images (`[N, C·S·S]` in [−1, 1]): the pooled penultimate layer of
/// a noise-free ResNet classifier ([`train_image_classifier`]), `[N, 8w]` for ResNet-18, in batches of
/// `batch`. A quick FID of images without the Inception network.
pub fn domain_features(classifier: &AnyNet, images: &Tensor, batch: usize) -> Result<Tensor> {
    let net = feature_network(classifier)?;
    let n = images.dim(0)?;
    let mut parts = Vec::new();
    for start in (0..n).step_by(batch.max(1)) {
        let len = batch.max(1).min(n - start);
        let x = images.narrow(0, start, len)?;
        let zero = Tensor::zeros(len, x.dtype(), x.device())?;
        parts.push(net.features(&x, &zero)?);
    }
    Tensor::cat(&parts, 0)
}
