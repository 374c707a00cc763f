//! The residual MLP of Gen-neG (App. B.1, Fig. 6).

use crate::embedding::SinusoidalEmbedding;
use crate::net::NoiseNet;
use candle_core::{bail, Result, Tensor};
use candle_nn::{linear, Linear, Module, VarBuilder};
use scoreguide_guidance::Cond;
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

/// A forward pass with what the hand-written backward pass needs.
struct Trace {
    out: Tensor,
    /// The residual stream after the last block.
    h: Tensor,
    /// Per block: the SiLU inputs (h + temb) and (W1 u + b1).
    blocks: Vec<(Tensor, Tensor)>,
}

impl ResMlp {
    fn trace(&self, x: &Tensor, c_noise: &Tensor) -> Result<Trace> {
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
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for b in &self.blocks {
            let z1 = (&h + &temb)?;
            let a = b.fc1.forward(&candle_nn::ops::silu(&z1)?)?;
            h = (h + b.fc2.forward(&candle_nn::ops::silu(&a)?)?)?;
            blocks.push((z1, a));
        }
        let out = self.output.forward(&candle_nn::ops::silu(&h)?)?;
        Ok(Trace { out, h, blocks })
    }
}

impl NoiseNet for ResMlp {
    fn forward(&self, x: &Tensor, c_noise: &Tensor, _cond: &Cond) -> Result<Tensor> {
        Ok(self.trace(x, c_noise)?.out)
    }

    fn out_dim(&self) -> usize {
        self.cfg.out_dim
    }
}

/// d silu(z)/dz = s (1 + z (1 − s)) with s = sigmoid(z).
fn silu_grad(z: &Tensor) -> Result<Tensor> {
    let s = candle_nn::ops::sigmoid(z)?;
    let one_minus = s.affine(-1.0, 1.0)?;
    s * ((z * one_minus)? + 1.0)?
}

impl ResMlp {
    /// The output F(x, c) and the input gradient Σ_k ∂L/∂F_k ∂F_k/∂x, where
    /// `upstream(F)` gives ∂L/∂F for a per-sample scalar L: a backward pass written out
    /// by hand (a few matmuls with transposed weights), several times cheaper than
    /// candle's autograd, which allocates a gradient for every node. Used by classifier
    /// guidance; `tests/gradients.rs` checks it against autograd.
    pub fn forward_with_input_grad(
        &self,
        x: &Tensor,
        c_noise: &Tensor,
        upstream: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let Trace { out, h, blocks } = self.trace(x, c_noise)?;
        let g_out = upstream(&out)?;
        if g_out.dims() != out.dims() {
            bail!(
                "residual MLP input gradient: upstream gradient {:?} does not match output {:?}",
                g_out.dims(),
                out.dims()
            );
        }
        let mut g_h = (g_out.matmul(self.output.weight())? * silu_grad(&h)?)?;
        for (b, (z1, a)) in self.blocks.iter().zip(&blocks).rev() {
            let g_a = (g_h.matmul(b.fc2.weight())? * silu_grad(a)?)?;
            let g_u = g_a.matmul(b.fc1.weight())?;
            g_h = (g_h + (g_u * silu_grad(z1)?)?)?;
        }
        let g_x = g_h.matmul(self.input.weight())?;
        Ok((out, g_x))
    }
}
