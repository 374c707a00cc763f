//! Training the baseline, distilling a stack, and loading models and classifiers.

use super::{FeatureScaler, TrafficConfig, TrafficData};
use candle_core::{bail, DType, Device, Result, Tensor};
use scoreguide_genneg::{Stack, StackedClassifier, Staged};
use scoreguide_guidance::Score;
use scoreguide_losses::{dsm, DsmWeighting};
use scoreguide_nets::ParamStore;
use scoreguide_sde::randn;
use scoreguide_train::{load_frozen, Checkpoint, Progress, TrainConfig, Trainer, Weights};

/// Trains the baseline score model with DSM (λ = σ², the ε-loss of DDPM), each scene
/// conditioned on its map; returns the checkpoint (EMA weights under `ema.`,
/// configuration and scaler in the metadata).
pub fn train_score(
    cfg: &TrafficConfig,
    data: &TrafficData,
    device: &Device,
    progress: &mut Progress,
) -> Result<Checkpoint> {
    fit_score(cfg, data, None, None, device, progress)
}

/// [`train_score`] in stages that survive an interruption ([`Trainer::run_staged`]):
/// every `save_every` steps the whole training state (weights, EMA, Adam moments, step,
/// configuration and scaler) is passed to `save` (write it atomically: `Checkpoint::save`
/// does), and a state saved so is continued with `resume`, to the bit of the
/// uninterrupted run. `resume` must come from this configuration (up to `iters`, so a
/// run can also be extended) and data's scaler.
pub fn train_score_resumable(
    cfg: &TrafficConfig,
    data: &TrafficData,
    resume: Option<&Checkpoint>,
    save_every: u64,
    save: &mut dyn FnMut(&Checkpoint) -> Result<()>,
    device: &Device,
    progress: &mut Progress,
) -> Result<Checkpoint> {
    if let Some(c) = resume {
        check_resumable(c, cfg, data, "resumed baseline")?;
    }
    let staged = Staged {
        resume,
        save_every,
        save,
    };
    fit_score(cfg, data, None, Some(staged), device, progress)
}

/// Trains the baseline `cfg.iters` more steps on the data from its own (EMA) weights,
/// with the same warm start as [`distill`]: the control that separates what
/// distillation adds from what extra training steps add.
pub fn train_more(
    cfg: &TrafficConfig,
    init: &Checkpoint,
    data: &TrafficData,
    device: &Device,
    progress: &mut Progress,
) -> Result<Checkpoint> {
    fit_score(cfg, data, Some(init), None, device, progress)
}

/// Refuses to continue `c` unless it was trained with `cfg` (up to `iters`, so that a
/// run can be extended), on `data`'s scaler, for no more than `cfg.iters` steps.
fn check_resumable(
    c: &Checkpoint,
    cfg: &TrafficConfig,
    data: &TrafficData,
    what: &str,
) -> Result<()> {
    let saved: TrafficConfig = c.meta("traffic")?;
    if (TrafficConfig {
        iters: cfg.iters,
        ..saved.clone()
    }) != *cfg
    {
        bail!("{what}: the checkpoint was trained with {saved:?}, this run asks for {cfg:?}");
    }
    let scaler: FeatureScaler = c.meta("scaler")?;
    if scaler != data.scaler {
        bail!("{what}: the checkpoint's feature scaler is not this data's (other training scenes)");
    }
    let step: u64 = c.meta("step")?;
    if step > cfg.iters {
        bail!(
            "{what}: the checkpoint has done {step} steps, more than the {} asked for",
            cfg.iters
        );
    }
    Ok(())
}

/// A checkpoint's training state with the metadata its loaders read: the score model
/// (what `load_score_model` rebuilds), and the traffic configuration and scaler.
fn with_traffic_meta(
    c: &Checkpoint,
    cfg: &TrafficConfig,
    data: &TrafficData,
) -> Result<Checkpoint> {
    let mut c = c.clone();
    c.set_meta("model", &cfg.score_model())?;
    c.set_meta("traffic", cfg)?;
    c.set_meta("scaler", &data.scaler)?;
    Ok(c)
}

fn fit_score(
    cfg: &TrafficConfig,
    data: &TrafficData,
    init: Option<&Checkpoint>,
    staged: Option<Staged>,
    device: &Device,
    progress: &mut Progress,
) -> Result<Checkpoint> {
    let store = ParamStore::new(cfg.seed);
    let model = cfg
        .score_model()
        .build(&store.var_builder(DType::F32, device))?;
    if let Some(c) = init {
        store.assign(&c.section("ema"), "the initial (baseline) weights")?;
    }
    let train = TrainConfig {
        lr: cfg.lr,
        seed: cfg.seed,
        // A warm start needs less warm-up than training from scratch.
        warmup_steps: if init.is_some() { 200 } else { 500 },
        ..TrainConfig::default()
    };
    let sigma_dist = cfg.sigma_distribution();
    sigma_dist.validate()?;
    let mut trainer = Trainer::new(store, train)?;
    let step_loss = |step: u64, rng: &mut rand::rngs::StdRng| {
        let idx = data.x.step_batch(cfg.batch, cfg.seed, step)?;
        let x0 = data.x.rows(&idx)?;
        let cond = data.cond_of(&idx)?;
        let sigma = sigma_dist.sample_tensor(idx.len(), rng, device)?;
        let z = randn(rng, x0.dims(), device)?;
        dsm(&model, &x0, &sigma, &z, &cond, DsmWeighting::SigmaSquared)
    };
    let describe = |c: Checkpoint| with_traffic_meta(&c, cfg, data);
    Ok(trainer
        .fit(cfg.iters, staged, progress, step_loss, &describe)?
        .0)
}

/// Distils a Gen-neG stack into one network of the baseline's architecture (paper Eq.
/// 12, [`scoreguide_genneg::distill`]): on the **true** training scenes (each on its map),
/// the student's denoiser is fitted to the teacher's (λ = σ²), starting from the
/// baseline's weights `init`. `cfg.iters` steps.
pub fn distill(
    cfg: &TrafficConfig,
    teacher: &dyn Score,
    init: &Checkpoint,
    data: &TrafficData,
    device: &Device,
    progress: &mut Progress,
) -> Result<Checkpoint> {
    distill_staged(cfg, teacher, init, data, None, device, progress)
}

/// [`distill`] in stages that survive an interruption, and that can be extended: every
/// `save_every` steps the whole training state is passed to `save`, and a state saved so
/// (or a finished distillation of fewer than `cfg.iters` steps) is continued with
/// `resume`, to the bit of the uninterrupted run (the learning rate is constant after
/// its warm-up). The checkpoint does not record the teacher: the caller must check that
/// `resume` was distilled from this `teacher` (e.g. by metadata of its own).
#[allow(clippy::too_many_arguments)]
pub fn distill_resumable(
    cfg: &TrafficConfig,
    teacher: &dyn Score,
    init: &Checkpoint,
    data: &TrafficData,
    resume: Option<&Checkpoint>,
    save_every: u64,
    save: &mut dyn FnMut(&Checkpoint) -> Result<()>,
    device: &Device,
    progress: &mut Progress,
) -> Result<Checkpoint> {
    if let Some(c) = resume {
        check_resumable(c, cfg, data, "resumed distillation")?;
    }
    let staged = Staged {
        resume,
        save_every,
        save: &mut |c| save(&with_traffic_meta(c, cfg, data)?),
    };
    distill_staged(cfg, teacher, init, data, Some(staged), device, progress)
}

/// [`distill`], saving in stages when `staged` says so.
fn distill_staged(
    cfg: &TrafficConfig,
    teacher: &dyn Score,
    init: &Checkpoint,
    data: &TrafficData,
    staged: Option<Staged>,
    device: &Device,
    progress: &mut Progress,
) -> Result<Checkpoint> {
    let c = scoreguide_genneg::distill(
        teacher,
        &data.x,
        &|idx| data.cond_of(idx),
        &cfg.score_model(),
        Some(&init.section("ema")),
        &cfg.distillation(),
        staged,
        device,
        progress,
    )?;
    with_traffic_meta(&c, cfg, data)
}

/// A traffic score model from its checkpoint (EMA weights, its configuration and
/// feature scaler): the baseline, a distilled model or the control.
pub struct TrafficModel {
    pub config: TrafficConfig,
    pub scaler: FeatureScaler,
    /// Parameters of the network.
    pub params: usize,
    weights: std::collections::BTreeMap<String, Tensor>,
}

impl TrafficModel {
    /// Reads and checks the checkpoint (the network is built once, so a missing or
    /// misshapen tensor is reported now, by name).
    pub fn load(c: &Checkpoint, dtype: DType, device: &Device) -> Result<Self> {
        let config: TrafficConfig = c.meta("traffic")?;
        let scaler: FeatureScaler = c.meta("scaler")?;
        let model = config.score_model();
        let what = "traffic model checkpoint";
        let (_, params) = load_frozen(c, Weights::Ema, dtype, device, what, |vb| model.build(vb))?;
        Ok(Self {
            config,
            scaler,
            params,
            weights: c.section("ema"),
        })
    }

    /// This model as a Gen-neG stack without classifiers.
    pub fn stack(&self) -> Stack {
        Stack::new(self.config.score_model(), self.weights.clone())
    }

    /// This model guided by `classifiers` (weight 1 each), each gated to σ ≤ `gate`
    /// when given: Gen-neG iteration k has k.
    pub fn with_classifiers(&self, classifiers: &[StackedClassifier], gate: Option<f64>) -> Stack {
        classifiers
            .iter()
            .fold(self.stack(), |s, c| s.with(c.clone().gated(gate)))
    }
}

/// A per-vehicle Gen-neG classifier from its checkpoint: one written by
/// [`train_agent_classifier`](super::genneg::train_agent_classifier), or an older one that records only its traffic
/// configuration (`traffic` metadata, one output per agent).
pub fn load_agent_classifier(c: &Checkpoint) -> Result<StackedClassifier> {
    let mut described = c.clone();
    if !c.metadata.contains_key("classifier") {
        let config: TrafficConfig = c.meta("traffic")?;
        if config.net.out_per_agent != 1 {
            bail!(
                "agent classifier checkpoint: the network has {} outputs per agent, not 1",
                config.net.out_per_agent
            );
        }
        described.set_meta("classifier", &config.classifier())?;
    }
    let s = StackedClassifier::from_checkpoint(&described)?;
    s.build(DType::F32, &Device::Cpu)
        .map_err(|e| candle_core::Error::msg(format!("agent classifier checkpoint: {e}")))?;
    Ok(s)
}
