//! The motion experiment's configuration, with its quick and full presets.

use crate::config::Preset;
use candle_core::{bail, Result};
use scoreguide_data::motion::{Action, MotionConfig};
use scoreguide_genneg::{ClassifierTrainConfig, CollectConfig, DistillConfig};
use scoreguide_losses::DsmWeighting;
use scoreguide_nets::{
    ClassifierConfig, MotionOutput, MotionTransformerConfig, NetConfig, Precond, ScoreModelConfig,
};
use scoreguide_oracles::motion::GroundOracle;
use scoreguide_samplers::{HeunOptions, Sampler};
use scoreguide_sde::{append_zero, karras, Process, SigmaDistribution};
use scoreguide_train::TrainConfig;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// What the score network predicts (MDM predicts x0; DDPM's default is ε).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    X0,
    Eps,
}

impl Prediction {
    pub fn name(&self) -> &'static str {
        match self {
            Self::X0 => "x0",
            Self::Eps => "eps",
        }
    }
}

/// The motions: procedural ones, or HumanML3D's where `humanml3d` names its folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MotionDataConfig {
    pub frames: usize,
    pub min_frames: usize,
    /// Procedural training and test motions.
    pub train: usize,
    pub test: usize,
    /// HumanML3D's folder (`train.txt`, `test.txt`, `new_joint_vecs/`, `Mean.npy`,
    /// `Std.npy`); `None`: the procedural stand-in.
    pub humanml3d: Option<PathBuf>,
}

/// The baseline diffusion model: an MDM-style transformer under a DDPM process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MotionModelConfig {
    pub net: MotionTransformerConfig,
    pub prediction: Prediction,
    /// DDPM steps (cosine schedule, as MDM).
    pub diffusion_steps: usize,
    pub iters: u64,
    pub batch: usize,
    pub lr: f64,
    pub ema_decay: f64,
    /// Share of training rows whose label is dropped (classifier-free guidance's null
    /// label, as MDM's condition masking).
    pub label_dropout: f64,
    pub save_every: u64,
}

/// How motions are drawn from a model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum MotionSampler {
    /// Heun on a Karras grid (ρ = 7) from σ = min(80, the process's largest) to its
    /// smallest (`steps` steps, 2 evaluations each but the last).
    Heun { steps: usize },
    /// DDPM's ancestral sampler on `steps` of the process's own noise levels, evenly
    /// spaced in its step index (all of them when `steps` is the process's).
    Ddpm { steps: usize },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GennegConfig {
    /// N valid and N invalid motions for the classifiers (the paper: ~250k each).
    pub per_class: usize,
    /// The most motions to draw looking for them.
    pub budget: usize,
    pub classifier_iters: u64,
    pub classifier_batch: usize,
    pub classifier_lr: f64,
    /// Train w/o IS, imbalanced and time-independent beside Gen-neG.
    pub ablations: bool,
    /// Distil the Gen-neG stack into one network (0: no distillation).
    pub distill_iters: u64,
}

/// The motion encoder whose features FID, KID and diversity use: a σ-free classifier of
/// the action, trained on the training motions (HumanML3D's evaluator's role).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncoderConfig {
    pub iters: u64,
    pub batch: usize,
    pub lr: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Motions per model and sampling seed (test motions' labels and lengths in turn).
    pub samples: usize,
    /// Sampling seeds: each model is judged on `seeds` independent draws.
    pub seeds: usize,
    /// Noise draws per test motion for r-ELBO.
    pub r_elbo_draws: usize,
    /// δ of "parallel samples needed" (one valid motion with probability 1 − δ).
    pub delta: f64,
    /// The baseline and Gen-neG iteration 1 drawn once more with the paper's DDPM
    /// ancestral sampler, beside the configured sampler on as many motions.
    #[serde(default)]
    pub sampler_comparison: Option<SamplerComparison>,
}

/// The paper's sampler (DDPM ancestral) against the configured one, on a subset.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplerComparison {
    pub samples: usize,
    /// DDPM steps (the process's own noise levels, evenly spaced in step index).
    pub ddpm_steps: usize,
}

/// Everything a `genneg_motion` run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MotionRunConfig {
    pub data: MotionDataConfig,
    pub model: MotionModelConfig,
    /// A motion infracts when a joint is more than this far under the ground (m).
    pub tolerance: f64,
    pub sampler: MotionSampler,
    pub genneg: GennegConfig,
    pub encoder: EncoderConfig,
    pub eval: EvalConfig,
}

impl Preset for MotionRunConfig {
    fn quick() -> Self {
        Self {
            data: MotionDataConfig {
                frames: 24,
                min_frames: 16,
                train: 600,
                test: 120,
                humanml3d: None,
            },
            model: MotionModelConfig {
                net: MotionTransformerConfig {
                    frames: 24,
                    hidden: 64,
                    heads: 4,
                    blocks: 2,
                    ..MotionTransformerConfig::small(Action::ALL.len())
                },
                prediction: Prediction::X0,
                diffusion_steps: 100,
                iters: 400,
                batch: 64,
                lr: 1e-3,
                ema_decay: 0.99,
                label_dropout: 0.1,
                save_every: 200,
            },
            tolerance: 0.02,
            sampler: MotionSampler::Heun { steps: 12 },
            genneg: GennegConfig {
                per_class: 100,
                budget: 400,
                classifier_iters: 200,
                classifier_batch: 64,
                classifier_lr: 1e-3,
                ablations: true,
                distill_iters: 100,
            },
            encoder: EncoderConfig {
                iters: 200,
                batch: 64,
                lr: 1e-3,
            },
            eval: EvalConfig {
                samples: 120,
                seeds: 2,
                r_elbo_draws: 2,
                delta: 0.01,
                sampler_comparison: Some(SamplerComparison {
                    samples: 40,
                    ddpm_steps: 100,
                }),
            },
        }
    }

    fn full() -> Self {
        Self {
            data: MotionDataConfig {
                frames: 48,
                min_frames: 32,
                train: 10_000,
                test: 1_000,
                humanml3d: None,
            },
            model: MotionModelConfig {
                net: MotionTransformerConfig {
                    frames: 48,
                    ..MotionTransformerConfig::small(Action::ALL.len())
                },
                prediction: Prediction::X0,
                diffusion_steps: 1000,
                iters: 10_000,
                batch: 64,
                lr: 5e-4,
                ema_decay: 0.999,
                label_dropout: 0.1,
                save_every: 500,
            },
            tolerance: 0.005,
            sampler: MotionSampler::Heun { steps: 24 },
            genneg: GennegConfig {
                per_class: 2_000,
                budget: 12_000,
                classifier_iters: 2_000,
                classifier_batch: 64,
                classifier_lr: 5e-4,
                ablations: true,
                distill_iters: 1_500,
            },
            encoder: EncoderConfig {
                iters: 1_500,
                batch: 64,
                lr: 5e-4,
            },
            eval: EvalConfig {
                samples: 500,
                seeds: 3,
                r_elbo_draws: 2,
                delta: 0.01,
                sampler_comparison: Some(SamplerComparison {
                    samples: 200,
                    ddpm_steps: 1000,
                }),
            },
        }
    }

    fn validate(&self) -> Result<()> {
        let d = &self.data;
        self.motion_config().validate()?;
        if d.humanml3d.is_none() && (d.train == 0 || d.test == 0) {
            bail!("motion data: train and test must be positive, got {d:?}");
        }
        let m = &self.model;
        m.net.validate()?;
        if m.net.frames != d.frames || m.net.output != MotionOutput::Frames {
            bail!(
                "motion model: the network must output frames and have data.frames ({}) frames, got {:?}",
                d.frames,
                m.net
            );
        }
        if m.diffusion_steps < 2 || m.iters == 0 || m.batch == 0 {
            bail!(
                "motion model: need diffusion_steps >= 2 and positive iters and batch, got {m:?}"
            );
        }
        if !(0.0..1.0).contains(&m.label_dropout) {
            bail!(
                "motion model: label_dropout must be in [0, 1), got {}",
                m.label_dropout
            );
        }
        self.train().validate()?;
        if !(self.tolerance >= 0.0 && self.tolerance.is_finite()) {
            bail!(
                "motion oracle: tolerance must be >= 0 m, got {}",
                self.tolerance
            );
        }
        match self.sampler {
            MotionSampler::Heun { steps } | MotionSampler::Ddpm { steps } if steps == 0 => {
                bail!("motion sampler: steps must be positive")
            }
            MotionSampler::Ddpm { steps } if steps > m.diffusion_steps => bail!(
                "motion sampler: {steps} DDPM steps of a {}-step process",
                m.diffusion_steps
            ),
            _ => {}
        }
        self.collect(0).validate()?;
        let g = &self.genneg;
        if g.classifier_iters == 0 || g.classifier_batch == 0 {
            bail!("Gen-neG: classifier_iters and classifier_batch must be positive");
        }
        if self.encoder.iters == 0 || self.encoder.batch == 0 {
            bail!("motion encoder: iters and batch must be positive");
        }
        if let Some(c) = &self.eval.sampler_comparison {
            if c.samples == 0 || c.ddpm_steps < 2 || c.ddpm_steps > m.diffusion_steps {
                bail!(
                    "motion evaluation: the sampler comparison needs samples > 0 and 2..={} DDPM steps, got {c:?}",
                    m.diffusion_steps
                );
            }
        }
        let e = &self.eval;
        if e.samples == 0
            || e.seeds == 0
            || e.r_elbo_draws == 0
            || !(e.delta > 0.0 && e.delta < 1.0)
        {
            bail!("motion evaluation: need positive samples, seeds and r_elbo_draws and delta in (0, 1), got {e:?}");
        }
        Ok(())
    }
}

impl MotionRunConfig {
    pub fn oracle(&self) -> GroundOracle {
        GroundOracle {
            tolerance: self.tolerance as f32,
        }
    }

    pub fn motion_config(&self) -> MotionConfig {
        MotionConfig {
            frames: self.data.frames,
            min_frames: self.data.min_frames,
        }
    }

    /// The DDPM process (cosine schedule).
    pub fn process(&self) -> Process {
        Process::ddpm_cosine(self.model.diffusion_steps).expect("diffusion_steps was validated")
    }

    pub fn precond(&self) -> Precond {
        let process = self.process();
        match self.model.prediction {
            Prediction::X0 => Precond::X0 { process },
            Prediction::Eps => Precond::Eps { process },
        }
    }

    pub fn score_model(&self) -> ScoreModelConfig {
        ScoreModelConfig {
            net: NetConfig::MotionTransformer(self.model.net),
            precond: self.precond(),
        }
    }

    /// Training noise levels: the process's step index uniform, as DDPM.
    pub fn train_sigma(&self) -> SigmaDistribution {
        SigmaDistribution::UniformT {
            process: self.process(),
            t_min: 0.0,
            t_max: (self.model.diffusion_steps - 1) as f64,
        }
    }

    /// Each prediction's own loss: MDM's x0 regression (λ = 1 on the denoiser error),
    /// DDPM's ε regression (λ = σ²).
    pub fn weighting(&self) -> DsmWeighting {
        match self.model.prediction {
            Prediction::X0 => DsmWeighting::SigmaFourth,
            Prediction::Eps => DsmWeighting::SigmaSquared,
        }
    }

    pub fn train(&self) -> TrainConfig {
        TrainConfig {
            lr: self.model.lr,
            ema_decay: self.model.ema_decay,
            grad_clip: Some(1.0),
            warmup_steps: 200.min(self.model.iters / 10),
            seed: 0,
            ..TrainConfig::default()
        }
    }

    /// The sampler and its σ grid (descending, ending at 0).
    pub fn sampler(&self) -> Result<(Sampler, Vec<f64>)> {
        let process = self.process();
        let (lo, hi) = process.sigma_range();
        Ok(match self.sampler {
            MotionSampler::Heun { steps } => (
                Sampler::Heun(HeunOptions::default()),
                append_zero(karras(steps, lo, hi.min(80.0), 7.0)?),
            ),
            MotionSampler::Ddpm { steps } => {
                let n = self.model.diffusion_steps;
                let sigmas = (0..steps)
                    .rev()
                    .map(|i| process.sigma((i * (n - 1) / (steps - 1).max(1)) as f64))
                    .collect();
                (Sampler::DdpmAncestral, append_zero(sigmas))
            }
        })
    }

    /// The classifier of Gen-neG: the baseline's architecture without the label branch,
    /// one logit per motion.
    pub fn classifier(&self) -> ClassifierConfig {
        let net = MotionTransformerConfig {
            labels: 0,
            output: MotionOutput::Pooled(1),
            input_skip: false,
            ..self.model.net
        };
        ClassifierConfig::of_architecture(&NetConfig::MotionTransformer(net), self.process())
    }

    pub fn classifier_training(&self, seed: u64, sigma_clean: f64) -> ClassifierTrainConfig {
        ClassifierTrainConfig {
            model: self.classifier(),
            iters: self.genneg.classifier_iters,
            batch: self.genneg.classifier_batch,
            train: TrainConfig {
                lr: self.genneg.classifier_lr,
                seed,
                warmup_steps: 100.min(self.genneg.classifier_iters / 10),
                grad_clip: Some(1.0),
                ..TrainConfig::default()
            },
            sigma: self.train_sigma(),
            sigma_clean,
        }
    }

    pub fn collect(&self, seed: u64) -> CollectConfig {
        CollectConfig {
            per_class: Some(self.genneg.per_class),
            batch: self.model.batch.max(100),
            budget: self.genneg.budget,
            min_negatives: (self.genneg.per_class / 10).max(1),
            seed,
        }
    }

    /// Distillation into the baseline's architecture, warm-started from it, with the
    /// baseline's loss on the noise levels the configured sampler visits (t uniform up to
    /// its first σ). Beyond them the teacher's denoiser D + σ² ∇x log C carries a
    /// guidance term that grows with σ and guides no sample: at the DDPM grid's last
    /// level (σ ≈ 2·10⁴ for 1,000 cosine steps) it differs from the baseline's by 10⁴ per
    /// value, and fitting it was most of what a student learnt.
    pub fn distillation(&self) -> Result<DistillConfig> {
        let process = self.process();
        let (_, sigmas) = self.sampler()?;
        let top = sigmas.first().copied().unwrap_or(0.0);
        let t_max = process
            .t_of_sigma(top)
            .min((self.model.diffusion_steps - 1) as f64);
        Ok(DistillConfig {
            iters: self.genneg.distill_iters,
            batch: self.model.batch,
            train: TrainConfig {
                warmup_steps: 50.min(self.genneg.distill_iters / 10),
                ..self.train()
            },
            sigma: SigmaDistribution::UniformT {
                process,
                t_min: 0.0,
                t_max,
            },
            weighting: self.weighting(),
        })
    }
}
