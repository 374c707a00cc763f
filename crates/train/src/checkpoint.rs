//! Rebuilding networks from checkpoints.

use candle_core::{bail, DType, Device, Result};
use candle_nn::VarBuilder;
use scoreguide_checkpoint::Checkpoint;
use scoreguide_nets::{AnyNet, ParamStore, ScoreModelConfig, ScoreNet};

/// Which weights of a training checkpoint to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    /// The exponential moving average (what one samples from).
    Ema,
    /// The raw optimised weights.
    Model,
}

impl Weights {
    pub fn prefix(&self) -> &'static str {
        match self {
            Self::Ema => "ema",
            Self::Model => "model",
        }
    }
}

/// Rebuilds the score model a checkpoint describes (its `model` metadata) with frozen
/// weights: no caller needs to repeat the architecture.
pub fn load_score_model(
    ckpt: &Checkpoint,
    weights: Weights,
    dtype: DType,
    device: &Device,
) -> Result<(ScoreNet<AnyNet>, ScoreModelConfig)> {
    let cfg: ScoreModelConfig = ckpt.meta("model")?;
    let (model, _) = load_frozen(ckpt, weights, dtype, device, "checkpoint", |vb| {
        cfg.build(vb)
    })?;
    Ok((model, cfg))
}

/// Rebuilds a network from `ckpt`'s `weights` section with frozen parameters (only
/// inputs are tracked by autograd, so guidance computes no weight gradients): `build`
/// constructs the network from a `VarBuilder` (called twice: once to create the
/// parameters the section is checked against, once on the frozen values). Returns the
/// network and its parameter count. `what` names the checkpoint in errors.
pub fn load_frozen<T>(
    ckpt: &Checkpoint,
    weights: Weights,
    dtype: DType,
    device: &Device,
    what: &str,
    build: impl Fn(&VarBuilder) -> Result<T>,
) -> Result<(T, usize)> {
    let store = ParamStore::new(0);
    build(&store.var_builder(dtype, device))?;
    let section = ckpt.section(weights.prefix());
    if section.is_empty() {
        bail!("{what} holds no `{}.*` tensors", weights.prefix());
    }
    store.assign(&section, &format!("{what}: `{}` weights", weights.prefix()))?;
    Ok((
        build(&store.frozen_var_builder(dtype, device)?)?,
        store.num_params(),
    ))
}
