//! The baseline motion diffusion model and the motion encoder of the metrics.

use super::{MotionData, MotionRunConfig};
use candle_core::{bail, DType, Device, Result, Tensor};
use rand::Rng;
use scoreguide_genneg::Staged;
use scoreguide_guidance::Cond;
use scoreguide_losses::{cross_entropy, dsm};
use scoreguide_nets::{
    MotionOutput, MotionTransformer, MotionTransformerConfig, NoiseNet, ParamStore,
};
use scoreguide_sde::randn;
use scoreguide_train::{load_frozen, Checkpoint, Progress, TrainConfig, Trainer, Weights};

/// Indices of a training batch: `batch` motions drawn uniformly with replacement.
fn batch_of(rng: &mut impl Rng, n: usize, batch: usize) -> Vec<u32> {
    (0..batch).map(|_| rng.random_range(0..n as u32)).collect()
}

/// Trains the baseline (DSM with the prediction's own loss, step index uniform, each
/// motion with its label — dropped to the null label for `label_dropout` of the rows —
/// and its frame mask, padding frames out of the loss). The checkpoint records the
/// score model (`model`), the run's configuration (`motion`) and the standardisation
/// (`normalizer`).
pub fn train_baseline(
    cfg: &MotionRunConfig,
    data: &MotionData,
    seed: u64,
    staged: Option<Staged>,
    progress: &mut Progress,
) -> Result<Checkpoint> {
    let device = &data.device;
    if let Some(c) = staged.as_ref().and_then(|s| s.resume) {
        check_trained_on(c, cfg, data, "the saved baseline")?;
    }
    let store = ParamStore::new(seed);
    let model = cfg
        .score_model()
        .build(&store.var_builder(DType::F32, device))?;
    let mut trainer = Trainer::new(
        store,
        TrainConfig {
            seed,
            ..cfg.train()
        },
    )?;
    let sigma_dist = cfg.train_sigma();
    let (null, dropout) = (cfg.model.net.labels as u32, cfg.model.label_dropout);
    let describe = |mut c: Checkpoint| -> Result<Checkpoint> {
        c.set_meta("model", &cfg.score_model())?;
        c.set_meta("motion", cfg)?;
        c.set_meta("normalizer", &data.norm)?;
        Ok(c)
    };
    let loss = |_: u64, rng: &mut rand::rngs::StdRng| {
        let idx = batch_of(rng, data.len(), cfg.model.batch);
        let x0 = data.rows(&idx)?;
        let mut cond = data.cond_of(&idx)?;
        let labels: Vec<u32> = cond
            .labels
            .as_ref()
            .expect("motion conditions have labels")
            .to_vec1::<u32>()?
            .into_iter()
            .map(|l| {
                if rng.random::<f64>() < dropout {
                    null
                } else {
                    l
                }
            })
            .collect();
        cond.labels = Some(Tensor::from_vec(labels, idx.len(), device)?);
        let sigma = sigma_dist.sample_tensor(idx.len(), rng, device)?;
        let z = randn(rng, x0.dims(), device)?;
        dsm(&model, &x0, &sigma, &z, &cond, cfg.weighting())
    };
    Ok(trainer
        .fit(cfg.model.iters, staged, progress, loss, &describe)?
        .0)
}

/// Refuses a model trained with another configuration (up to training length and
/// evaluation settings) or on other data.
pub fn check_trained_on(
    c: &Checkpoint,
    cfg: &MotionRunConfig,
    data: &MotionData,
    what: &str,
) -> Result<()> {
    let saved: MotionRunConfig = c.meta("motion")?;
    if saved.data != cfg.data
        || saved.model.net != cfg.model.net
        || saved.precond() != cfg.precond()
    {
        bail!(
            "{what} was trained on other data or another model ({:?}, {:?}); use another --out or drop --reuse",
            saved.data,
            saved.model
        );
    }
    let norm: scoreguide_data::motion::Normalizer = c.meta("normalizer")?;
    if norm != data.norm {
        bail!("{what} was trained on other motions (its standardisation differs)");
    }
    Ok(())
}

/// The action classifier whose features FID, KID and diversity use: the baseline's
/// architecture without labels, one logit per action, on clean motions.
pub fn encoder_config(cfg: &MotionRunConfig, actions: usize) -> MotionTransformerConfig {
    MotionTransformerConfig {
        labels: 0,
        output: MotionOutput::Pooled(actions),
        input_skip: false,
        ..cfg.model.net
    }
}

/// Number of action labels in `data` (the largest plus one).
pub fn actions_of(data: &MotionData) -> usize {
    data.set.actions.iter().max().map_or(0, |&m| m as usize + 1)
}

/// Trains the motion encoder (cross-entropy on the training motions' actions).
pub fn train_encoder(
    cfg: &MotionRunConfig,
    data: &MotionData,
    seed: u64,
    staged: Option<Staged>,
    progress: &mut Progress,
) -> Result<Checkpoint> {
    let actions = actions_of(data);
    if actions < 2 {
        bail!(
            "motion encoder: needs at least 2 action labels to learn features from, the data has {actions}"
        );
    }
    let device = &data.device;
    let net_cfg = encoder_config(cfg, actions);
    let store = ParamStore::new(seed);
    let net = MotionTransformer::new(net_cfg, store.var_builder(DType::F32, device))?;
    let train = TrainConfig {
        lr: cfg.encoder.lr,
        seed,
        grad_clip: Some(1.0),
        warmup_steps: 100.min(cfg.encoder.iters / 10),
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(store, train)?;
    let describe = |mut c: Checkpoint| -> Result<Checkpoint> {
        c.set_meta("encoder", &net_cfg)?;
        c.set_meta("normalizer", &data.norm)?;
        Ok(c)
    };
    let loss = |_: u64, rng: &mut rand::rngs::StdRng| {
        let idx = batch_of(rng, data.len(), cfg.encoder.batch);
        let x0 = data.rows(&idx)?;
        let cond = data.cond_of(&idx)?;
        let labels = cond.labels.clone().expect("motion conditions have labels");
        let mask_only = Cond::none().with_mask(cond.mask.expect("motion conditions have masks"));
        let c = Tensor::zeros(idx.len(), DType::F32, device)?;
        cross_entropy(&net.forward(&x0, &c, &mask_only)?, &labels)
    };
    Ok(trainer
        .fit(cfg.encoder.iters, staged, progress, loss, &describe)?
        .0)
}

/// A trained motion encoder (frozen EMA weights).
pub struct MotionEncoder {
    net: MotionTransformer,
}

impl MotionEncoder {
    pub fn load(c: &Checkpoint, device: &Device) -> Result<Self> {
        let cfg: MotionTransformerConfig = c.meta("encoder")?;
        let (net, _) = load_frozen(
            c,
            Weights::Ema,
            DType::F32,
            device,
            "motion encoder",
            |vb| MotionTransformer::new(cfg, vb.clone()),
        )?;
        Ok(Self { net })
    }

    pub fn dim(&self) -> usize {
        self.net.config().hidden
    }

    /// Features `[n × dim]` (f64, row-major) of standardised motions `x` with frame
    /// masks `mask`, in batches.
    pub fn features(&self, x: &Tensor, mask: &Tensor) -> Result<Vec<f64>> {
        let n = x.dim(0)?;
        let mut out = Vec::with_capacity(n * self.dim());
        for start in (0..n).step_by(256) {
            let len = 256.min(n - start);
            let cond = Cond::none().with_mask(mask.narrow(0, start, len)?);
            let c = Tensor::zeros(len, DType::F32, x.device())?;
            let f = self
                .net
                .pooled_features(&x.narrow(0, start, len)?, &c, &cond)?;
            out.extend(f.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?);
        }
        Ok(out)
    }

    /// Share of motions `x` (masks `mask`) classified as their action `labels`.
    pub fn accuracy(&self, x: &Tensor, mask: &Tensor, labels: &[u32]) -> Result<f64> {
        let cond = Cond::none().with_mask(mask.clone());
        let c = Tensor::zeros(x.dim(0)?, DType::F32, x.device())?;
        let pred: Vec<u32> = self.net.forward(x, &c, &cond)?.argmax(1)?.to_vec1()?;
        let hits = pred.iter().zip(labels).filter(|(p, l)| p == l).count();
        Ok(hits as f64 / labels.len().max(1) as f64)
    }
}
