//! Serializable model configurations: what a checkpoint records to rebuild a model.

use crate::mlp::{ResMlp, ResMlpConfig};
use crate::motion::{MotionOutput, MotionTransformer, MotionTransformerConfig};
use crate::net::NoiseNet;
use crate::precond::{Precond, ScoreNet};
use crate::resnet::{ResNet, ResNetConfig};
use crate::toy::{ToyMlp, ToyMlpConfig};
use crate::transformer::{SceneTransformer, SceneTransformerConfig};
use crate::unet::{UNet, UNetConfig, UNetOutput};
use candle_core::{bail, Result, Tensor};
use candle_nn::VarBuilder;
use scoreguide_guidance::Cond;
use serde::{Deserialize, Serialize};

/// A network architecture: every architecture a checkpoint can name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "arch", rename_all = "snake_case")]
pub enum NetConfig {
    ResMlp(ResMlpConfig),
    SceneTransformer(SceneTransformerConfig),
    /// DLSM's toy MLP (raw σ input), with [`crate::Precond::Identity`] as a score model.
    ToyMlp(ToyMlpConfig),
    /// An image U-Net (rows of `channels · size²` values).
    #[serde(rename = "unet")]
    UNet(UNetConfig),
    /// A ResNet image classifier (`classes` logits per row).
    #[serde(rename = "resnet")]
    ResNet(ResNetConfig),
    /// An MDM-style motion transformer (rows of `frames · features` values).
    MotionTransformer(MotionTransformerConfig),
}

impl NetConfig {
    pub fn build(&self, vb: &VarBuilder) -> Result<AnyNet> {
        Ok(match self {
            Self::ResMlp(c) => AnyNet::ResMlp(ResMlp::new(*c, vb.clone())?),
            Self::SceneTransformer(c) => {
                AnyNet::SceneTransformer(Box::new(SceneTransformer::new(*c, vb.clone())?))
            }
            Self::ToyMlp(c) => AnyNet::ToyMlp(c.build(vb)?),
            Self::UNet(c) => AnyNet::UNet(Box::new(UNet::new(c.clone(), vb.clone())?)),
            Self::ResNet(c) => AnyNet::ResNet(Box::new(ResNet::new(c.clone(), vb.clone())?)),
            Self::MotionTransformer(c) => {
                AnyNet::MotionTransformer(Box::new(MotionTransformer::new(*c, vb.clone())?))
            }
        })
    }

    /// Values per row of the input.
    pub fn in_dim(&self) -> usize {
        match self {
            Self::ResMlp(c) => c.in_dim,
            Self::SceneTransformer(c) => c.agents * c.features,
            Self::ToyMlp(c) => c.in_dim,
            Self::UNet(c) => c.in_dim(),
            Self::ResNet(c) => c.in_dim(),
            Self::MotionTransformer(c) => c.in_dim(),
        }
    }

    /// Values per row of the output.
    pub fn out_dim(&self) -> usize {
        match self {
            Self::ResMlp(c) => c.out_dim,
            Self::SceneTransformer(c) => c.agents * c.out_per_agent,
            Self::ToyMlp(c) => c.out_dim,
            Self::UNet(c) => c.out_dim(),
            Self::ResNet(c) => c.classes,
            Self::MotionTransformer(c) => c.out_dim(),
        }
    }

    /// The same architecture with `out` outputs per row (per agent for a scene
    /// transformer; pooled over positions for a U-Net): 1 for Gen-neG's classifier of a
    /// score model's architecture.
    pub fn with_outputs(&self, out: usize) -> Self {
        match self {
            Self::ResMlp(c) => Self::ResMlp(ResMlpConfig { out_dim: out, ..*c }),
            Self::SceneTransformer(c) => Self::SceneTransformer(SceneTransformerConfig {
                out_per_agent: out,
                ..*c
            }),
            Self::ToyMlp(c) => Self::ToyMlp(ToyMlpConfig { out_dim: out, ..*c }),
            Self::UNet(c) => Self::UNet(UNetConfig {
                output: UNetOutput::Pooled(out),
                ..c.clone()
            }),
            Self::ResNet(c) => Self::ResNet(ResNetConfig {
                classes: out,
                ..c.clone()
            }),
            Self::MotionTransformer(c) => Self::MotionTransformer(MotionTransformerConfig {
                output: MotionOutput::Pooled(out),
                ..*c
            }),
        }
    }
}

/// Every network architecture of this crate, as one type (what a checkpoint rebuilds).
pub enum AnyNet {
    ResMlp(ResMlp),
    SceneTransformer(Box<SceneTransformer>),
    ToyMlp(ToyMlp),
    UNet(Box<UNet>),
    ResNet(Box<ResNet>),
    MotionTransformer(Box<MotionTransformer>),
}

impl NoiseNet for AnyNet {
    fn forward(&self, x: &Tensor, c_noise: &Tensor, cond: &Cond) -> Result<Tensor> {
        match self {
            Self::ResMlp(n) => n.forward(x, c_noise, cond),
            Self::SceneTransformer(n) => NoiseNet::forward(n.as_ref(), x, c_noise, cond),
            Self::ToyMlp(n) => NoiseNet::forward(n, x, c_noise, cond),
            Self::UNet(n) => n.forward(x, c_noise, cond),
            Self::ResNet(n) => n.forward(x, c_noise, cond),
            Self::MotionTransformer(n) => n.forward(x, c_noise, cond),
        }
    }
    fn out_dim(&self) -> usize {
        match self {
            Self::ResMlp(n) => n.out_dim(),
            Self::SceneTransformer(n) => NoiseNet::out_dim(n.as_ref()),
            Self::ToyMlp(n) => NoiseNet::out_dim(n),
            Self::UNet(n) => n.out_dim(),
            Self::ResNet(n) => n.out_dim(),
            Self::MotionTransformer(n) => n.out_dim(),
        }
    }
}

/// A score model: architecture plus preconditioning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreModelConfig {
    pub net: NetConfig,
    pub precond: Precond,
}

impl ScoreModelConfig {
    /// Gen-neG's checkerboard baseline: the residual MLP under EDM preconditioning, σ_data = 1.
    pub fn checkerboard() -> Self {
        Self {
            net: NetConfig::ResMlp(ResMlpConfig::default()),
            precond: Precond::edm(),
        }
    }

    pub fn build(&self, vb: &VarBuilder) -> Result<ScoreNet<AnyNet>> {
        let net = self.net.build(vb)?;
        if net.out_dim() != self.net.in_dim() {
            bail!(
                "score model: network output dimension {} differs from its input dimension {}",
                net.out_dim(),
                self.net.in_dim()
            );
        }
        ScoreNet::new(net, self.precond.clone())
    }
}
