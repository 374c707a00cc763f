//! Sampling the guided posterior score of each method, class by class.

use candle_core::{bail, Device, Result, Tensor};
use scoreguide_guidance::{Cond, Guided, Score};
use scoreguide_nets::Classifier;
use scoreguide_samplers::{sample_many, HeunOptions, PcOptions, Sampler};
use scoreguide_sde::{append_zero, derive_seed, karras, log_linear};
use serde::{Deserialize, Serialize};

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
