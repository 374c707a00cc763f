//! The residual MLP of Gen-neG (App. B.1, Fig. 6).

use crate::embedding::SinusoidalEmbedding;
use crate::precond::NoiseNet;
use candle_core::{bail, Result, Tensor};
use candle_nn::{linear, Linear, Module, VarBuilder};
use serde::{Deserialize, Serialize};

/// Shape of a [`ResMlp`]. Defaults are the paper's checkerboard network.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ResMlpConfig {
    pub in_dim: usize,
    /// `in_dim` for a score network, 1 for a binary classifier, K for K classes.
    pub out_dim: usize,
    pub hidden: usize,
    pub blocks: usize,
    pub embedding: SinusoidalEmbedding,
}

impl Default for ResMlpConfig {
    fn default() -> Self {
        Self {
            in_dim: 2,
            out_dim: 2,
            hidden: 256,
            blocks: 2,
            embedding: SinusoidalEmbedding::default(),
        }
    }
}

impl ResMlpConfig {
    pub fn validate(&self) -> Result<()> {
        if self.in_dim == 0 || self.out_dim == 0 || self.hidden == 0 {
            bail!("residual MLP: in_dim, out_dim and hidden must be positive, got {self:?}");
        }
        self.embedding.validate()
    }
}

struct ResBlock {
    fc1: Linear,
    fc2: Linear,
}

/// `h = W_in x + W_t emb(c)`; each block `h ← h + W2 SiLU(W1 SiLU(h + W_t emb(c)))`;
/// output `W_out SiLU(h)`. Every op has a backward pass (no fused kernels).
pub struct ResMlp {
    cfg: ResMlpConfig,
    input: Linear,
    time: Linear,
    blocks: Vec<ResBlock>,
    output: Linear,
}

impl ResMlp {
    pub fn new(cfg: ResMlpConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let h = cfg.hidden;
        let blocks = (0..cfg.blocks)
            .map(|i| {
                let vb = vb.pp(format!("block{i}"));
                Ok(ResBlock {
                    fc1: linear(h, h, vb.pp("fc1"))?,
                    fc2: linear(h, h, vb.pp("fc2"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg,
            input: linear(cfg.in_dim, h, vb.pp("input"))?,
            time: linear(cfg.embedding.dim, h, vb.pp("time"))?,
            blocks,
            output: linear(h, cfg.out_dim, vb.pp("output"))?,
        })
    }

    pub fn config(&self) -> &ResMlpConfig {
        &self.cfg
    }
}

impl NoiseNet for ResMlp {
    fn forward(&self, x: &Tensor, c_noise: &Tensor) -> Result<Tensor> {
        if x.rank() != 2 || x.dim(1)? != self.cfg.in_dim {
            bail!(
                "residual MLP: input must be [batch, {}], got {:?}",
                self.cfg.in_dim,
                x.dims()
            );
        }
        let temb = self
            .time
            .forward(&self.cfg.embedding.forward(&c_noise.to_dtype(x.dtype())?)?)?;
        let mut h = (self.input.forward(x)? + &temb)?;
        for b in &self.blocks {
            let u = candle_nn::ops::silu(&(&h + &temb)?)?;
            let u = b.fc2.forward(&candle_nn::ops::silu(&b.fc1.forward(&u)?)?)?;
            h = (h + u)?;
        }
        self.output.forward(&candle_nn::ops::silu(&h)?)
    }

    fn out_dim(&self) -> usize {
        self.cfg.out_dim
    }
}
