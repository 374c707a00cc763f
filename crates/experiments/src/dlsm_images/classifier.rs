//! The guidance classifiers: trained with cross-entropy, or with L_DLSM + λ L_CE through
//! the input gradient, on a frozen score model.

use super::{DlsmReduction, GuidanceClassifierConfig};
use crate::moons::ClassifierLoss;
use candle_core::{bail, DType, Device, Result, Tensor, Var};
use scoreguide_data::images::flip_rng;
use scoreguide_data::ImageSet;
use scoreguide_guidance::{grad_log_prob, log_softmax, one_hot, Cond, LogProb, Score};
use scoreguide_losses::{cross_entropy, dlsm};
use scoreguide_nets::{Classifier, ClassifierConfig, ParamStore};
use scoreguide_sde::randn;
use scoreguide_train::{load_frozen, Checkpoint, Progress, Staged, TrainConfig, Trainer, Weights};

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
    let per_image = match cfg.dlsm_reduction {
        DlsmReduction::PixelMean => 1.0 / r.in_dim() as f64,
        DlsmReduction::PixelSum => 1.0,
    };
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
        let l = (dlsm(&g, &s, &x0, &sigma, &z, cfg.dlsm_weighting)? * (lambda_dlsm * per_image))?;
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

/// Noise levels of [`likelihood_score_excess`].
pub const EXCESS_SIGMAS: [f64; 6] = [0.1, 0.3, 1.0, 3.0, 10.0, 30.0];

/// Each guidance classifier's held-out DLSM loss at each σ of `sigmas` (`[classifier][σ]`),
/// as its excess over a classifier with no input gradient, per pixel:
/// E‖g‖² + 2 E[g · (s_θ + z/σ)] over `set`'s images x0 and labels y, with x = x0 + σ z and
/// g = ∇x log p_φ(y | x; σ) as guidance computes it. Where the frozen `prior` s_θ is the
/// true score this is E‖g − ∇x log p(y | x)‖² − E‖∇x log p(y | x)‖²: lower is a closer
/// likelihood score (the quantity L_DLSM trains), 0 is no guidance. The classifiers see
/// the same noise (from `seed`) and share the score model's pass over it.
pub fn likelihood_score_excess(
    classifiers: &[&Classifier],
    prior: &dyn Score,
    set: &ImageSet,
    sigmas: &[f64],
    seed: u64,
    batch: usize,
    device: &Device,
) -> Result<Vec<Vec<f64>>> {
    if set.is_empty() || batch == 0 {
        bail!(
            "likelihood score excess: no images ({} held out, batch {batch})",
            set.len()
        );
    }
    let mut out = vec![Vec::with_capacity(sigmas.len()); classifiers.len()];
    for (i, &s) in sigmas.iter().enumerate() {
        if !(s > 0.0 && s.is_finite()) {
            bail!("likelihood score excess: σ = {s} must be positive and finite");
        }
        let mut rng =
            <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed ^ ((i as u64) << 32));
        let mut totals = vec![0f64; classifiers.len()];
        let mut count = 0usize;
        for start in (0..set.len()).step_by(batch) {
            let idx: Vec<u32> = (start..(start + batch).min(set.len()))
                .map(|j| j as u32)
                .collect();
            let (x0, y) = set.batch(&idx, false, &mut flip_rng(seed, 0))?;
            let (x0, cond) = (x0.to_device(device)?, Cond::labels(y.to_device(device)?));
            let sigma = Tensor::full(s as f32, idx.len(), device)?;
            let z = randn(&mut rng, x0.dims(), device)?;
            let x = (&x0 + (&z * s)?)?;
            let residual = (prior.score(&x, &sigma)?.detach() + (&z / s)?)?;
            for (total, &c) in totals.iter_mut().zip(classifiers) {
                let term: Box<dyn LogProb + '_> = Box::new(c);
                let g = grad_log_prob(&[(1.0, term)], &x, &sigma, &cond)?.detach();
                let excess = (g.sqr()? + ((&g * &residual)? * 2.0)?)?;
                *total += excess.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            }
            count += x.elem_count();
        }
        for (o, total) in out.iter_mut().zip(totals) {
            o.push(total / count as f64);
        }
    }
    Ok(out)
}
