//! The run's stages, each kept in the output folder and continued by a later run.

use super::scores::checksum;
use super::{
    load_guidance_classifier, sample_class, train_guidance_classifier, DlsmImagesConfig, Evaluator,
    GuidanceClassifierConfig, ImageSampler, Method, Scores,
};
use crate::image_metrics::Images;
use crate::images::{
    feature_network, load_image_classifier, load_image_score, train_image_classifier,
    train_image_score_in, ImageClassifierConfig,
};
use crate::moons::ClassifierLoss;
use candle_core::{bail, Device, Result, Tensor};
use scoreguide_data::{ImageSet, ImageSplit};
use scoreguide_guidance::Score;
use scoreguide_nets::{AnyNet, Classifier, ScoreNet};
use scoreguide_train::{train_resumable, Checkpoint, Progress};
use std::path::PathBuf;

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
                train_image_score_in(cfg, &set, &self.out, self.reuse, &self.device)?
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
            if (was.read_by(loss), was_loss) != (cfg.read_by(loss), loss) {
                bail!(
                    "{}: trained with {was:?} and loss {was_loss:?}, but the configuration asks for {cfg:?} and {loss:?}; use another --out or remove the file",
                    path.display()
                );
            }
        }
        // A DLSM classifier fits the residual of its score model: kept states are reused
        // only with the same one (its output at a fixed input, kept beside them).
        if let Some(prior) = prior.filter(|_| loss != ClassifierLoss::CrossEntropy) {
            let print = self.prior_fingerprint(prior)?;
            let side = self.out.join(format!("classifier_{name}.prior.json"));
            let kept = std::fs::read_to_string(&side)
                .ok()
                .and_then(|t| serde_json::from_str::<[f64; 2]>(&t).ok());
            let has_state = ["safetensors", "partial.safetensors"]
                .iter()
                .any(|e| self.out.join(format!("classifier_{name}.{e}")).exists());
            match kept {
                Some(k) if self.reuse && has_state && k != print => bail!(
                    "{}: the kept DLSM classifier was trained on another score model (its output at a fixed input differs); use another --out or remove it",
                    side.display()
                ),
                _ => crate::runtime::write_json(&side, &print)?,
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
                // Read only when there is training to do.
                let set = self
                    .cfg
                    .score
                    .data
                    .training_images(self.cfg.score.data_dir.as_deref(), 0)?;
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

    /// [`super::checksum`] of the score model's output on a fixed input at σ = 0.5.
    fn prior_fingerprint(&self, prior: &dyn Score) -> Result<[f64; 2]> {
        let (x, sigma) = self.fingerprint_input()?;
        checksum(&prior.score(&x, &sigma)?)
    }

    /// [`super::checksum`] of a guidance classifier's logits on the same fixed input.
    fn classifier_fingerprint(&self, classifier: &Classifier) -> Result<[f64; 2]> {
        let (x, sigma) = self.fingerprint_input()?;
        checksum(&classifier.logits(&x, &sigma, &scoreguide_guidance::Cond::none())?)
    }

    fn fingerprint_input(&self) -> Result<(Tensor, Tensor)> {
        let d = self.cfg.score.unet.in_dim();
        let x = Tensor::arange(0u32, 2 * d as u32, &self.device)?
            .to_dtype(candle_core::DType::F32)?
            .affine(1.0 / d as f64, -1.0)?
            .reshape((2, d))?;
        Ok((x, Tensor::new(&[0.5f32, 0.5], &self.device)?))
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
        let guide = self.classifier_fingerprint(classifier)?;
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
                let same = drawn_by(&c, method, sampler, guide);
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
                    c.set_meta("classifier", &guide)?;
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

/// Whether a kept class of samples was drawn by `method` with `sampler`, guided by the
/// classifier whose fingerprint is `guide` (to rounding: thread counts may sum a GEMM in
/// another order). Files kept before fingerprints were recorded are taken as drawn by it.
fn drawn_by(kept: &Checkpoint, method: Method, sampler: &ImageSampler, guide: [f64; 2]) -> bool {
    let near = |a: [f64; 2]| {
        a.iter()
            .zip(guide)
            .all(|(a, b)| (a - b).abs() <= 1e-5 * (1.0 + b.abs()))
    };
    kept.meta::<Method>("method").ok() == Some(method)
        && kept.meta::<ImageSampler>("sampler").ok().as_ref() == Some(sampler)
        && kept.meta::<[f64; 2]>("classifier").map_or(true, near)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_samples_are_reused_only_from_the_same_method_sampler_and_classifier() {
        let sampler = ImageSampler::Heun { steps: 18 };
        let guide = [12.5, 400.0];
        let kept = |classifier: Option<[f64; 2]>| {
            let mut c = Checkpoint::new();
            c.set_meta("method", &Method::Dlsm).unwrap();
            c.set_meta("sampler", &sampler).unwrap();
            if let Some(k) = classifier {
                c.set_meta("classifier", &k).unwrap();
            }
            c
        };
        assert!(drawn_by(&kept(Some(guide)), Method::Dlsm, &sampler, guide));
        assert!(drawn_by(
            &kept(Some([12.5 + 1e-9, 400.0])),
            Method::Dlsm,
            &sampler,
            guide
        ));
        assert!(!drawn_by(
            &kept(Some([12.6, 400.0])),
            Method::Dlsm,
            &sampler,
            guide
        ));
        assert!(drawn_by(&kept(None), Method::Dlsm, &sampler, guide));
        assert!(!drawn_by(&kept(Some(guide)), Method::Base, &sampler, guide));
        let other = ImageSampler::Heun { steps: 10 };
        assert!(!drawn_by(&kept(Some(guide)), Method::Dlsm, &other, guide));
    }
}
