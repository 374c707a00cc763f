//! Serializable model configurations: what a checkpoint records to rebuild a model.

use crate::mlp::{ResMlp, ResMlpConfig};
use crate::precond::{AnyNet, NoiseNet, Precond, ScoreNet};
use candle_core::{bail, Result};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// A network architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "arch", rename_all = "snake_case")]
pub enum NetConfig {
    ResMlp(ResMlpConfig),
}

impl NetConfig {
    pub fn build(&self, vb: &VarBuilder) -> Result<AnyNet> {
        match self {
            Self::ResMlp(c) => Ok(AnyNet::ResMlp(ResMlp::new(*c, vb.clone())?)),
        }
    }

    pub fn in_dim(&self) -> usize {
        match self {
            Self::ResMlp(c) => c.in_dim,
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
