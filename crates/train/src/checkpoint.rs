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
    let section = ckpt.section(weights.prefix());
    if section.is_empty() {
        bail!("{what} holds no `{}.*` tensors", weights.prefix());
    }
    // The architecture comes from the file's metadata: checked against the stored
    // tensors as it is built, it cannot allocate more than they hold.
    let store = ParamStore::expecting(0, &section);
    build(&store.var_builder(dtype, device))
        .map_err(|e| candle_core::Error::msg(format!("{what}: {e}")))?;
    store.assign(&section, &format!("{what}: `{}` weights", weights.prefix()))?;
    Ok((
        build(&store.frozen_var_builder(dtype, device)?)?,
        store.num_params(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use scoreguide_nets::{NetConfig, ResMlpConfig, ScoreModelConfig};

    /// A small residual MLP's checkpoint (its weights as `ema.*`), with `net` written into
    /// its metadata in place of the real one.
    fn saved_as(net: ResMlpConfig) -> Checkpoint {
        let real = ScoreModelConfig {
            net: NetConfig::ResMlp(ResMlpConfig {
                hidden: 16,
                blocks: 1,
                ..ResMlpConfig::default()
            }),
            ..ScoreModelConfig::checkerboard()
        };
        let store = ParamStore::new(0);
        real.build(&store.var_builder(DType::F32, &Device::Cpu))
            .unwrap();
        let mut c = Checkpoint::new();
        c.insert_section("ema", &store.tensors().unwrap());
        c.set_meta(
            "model",
            &ScoreModelConfig {
                net: NetConfig::ResMlp(net),
                ..real
            },
        )
        .unwrap();
        c
    }

    #[test]
    fn metadata_cannot_ask_for_more_than_the_file_holds() {
        let base = ResMlpConfig {
            hidden: 16,
            blocks: 1,
            ..ResMlpConfig::default()
        };
        assert!(load_score_model(&saved_as(base), Weights::Ema, DType::F32, &Device::Cpu).is_ok());
        // Neither builds a block of the absurd size or count: both fail at the first
        // parameter the file does not hold.
        for (net, says) in [
            (
                ResMlpConfig {
                    hidden: 1_000_000,
                    ..base
                },
                "[1000000",
            ),
            (
                ResMlpConfig {
                    blocks: 100_000_000,
                    ..base
                },
                "block1.",
            ),
        ] {
            let e = load_score_model(&saved_as(net), Weights::Ema, DType::F32, &Device::Cpu)
                .err()
                .expect("refused")
                .to_string();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn weights_of_other_dtypes_are_refused_by_name() {
        let base = ResMlpConfig {
            hidden: 16,
            blocks: 1,
            ..ResMlpConfig::default()
        };
        let mut c = saved_as(base);
        let name = c.tensors.keys().next().unwrap().clone();
        let t = c.tensors[&name].to_dtype(DType::BF16).unwrap();
        c.tensors.insert(name.clone(), t);
        let e = load_score_model(&c, Weights::Ema, DType::F32, &Device::Cpu)
            .err()
            .expect("refused")
            .to_string();
        assert!(
            e.contains("BF16") && e.contains(name.trim_start_matches("ema.")),
            "{e}"
        );
    }
}
