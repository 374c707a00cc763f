//! The residual MLP of Gen-neG (App. B.1, Fig. 6).

use crate::embedding::SinusoidalEmbedding;
use crate::net::NoiseNet;
use candle_core::{bail, DType, Result, Tensor};
use candle_nn::{linear, Linear, VarBuilder};
use scoreguide_guidance::Cond;
use scoreguide_kernels::{add_silu, dense, manual, res_mlp, second_order, silu, Act, ResMlpShape};
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
/// output `W_out SiLU(h)`. Built from `scoreguide_kernels`' fused layers, which carry
/// their own backward passes (and fall back to candle's ops off the CPU).
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

impl ResMlp {
    /// W_t emb(c) + b_t: `[B, hidden]`, or `[hidden]` when every row has the same noise
    /// level (a sampler's step), computed once and broadcast.
    fn time_embedding(&self, c_noise: &Tensor, dtype: DType) -> Result<Tensor> {
        let (c, shared) = shared_noise(c_noise, dtype)?;
        let (w, b) = linear_parts(&self.time)?;
        let t = dense(&self.cfg.embedding.forward(&c)?, w, b, Act::Identity)?;
        if shared {
            t.squeeze(0)
        } else {
            Ok(t)
        }
    }

    fn output(&self, x: &Tensor, c_noise: &Tensor) -> Result<Tensor> {
        if x.rank() != 2 || x.dim(1)? != self.cfg.in_dim {
            bail!(
                "residual MLP: input must be [batch, {}], got {:?}",
                self.cfg.in_dim,
                x.dims()
            );
        }
        if x.device().is_cpu() && x.dtype() == DType::F32 && !second_order() {
            return self.output_fused(x, c_noise);
        }
        let temb = self.time_embedding(c_noise, x.dtype())?;
        let (w, b) = linear_parts(&self.input)?;
        let mut h = dense(x, w, b, Act::Identity)?.broadcast_add(&temb)?;
        for blk in &self.blocks {
            let u = add_silu(&h, &temb)?;
            let (w1, b1) = linear_parts(&blk.fc1)?;
            let (w2, b2) = linear_parts(&blk.fc2)?;
            let a = dense(&u, w1, b1, Act::Silu)?;
            h = (h + dense(&a, w2, b2, Act::Identity)?)?;
        }
        let (w, b) = linear_parts(&self.output)?;
        dense(&silu(&h)?, w, b, Act::Identity)
    }
}

impl ResMlp {
    /// The whole network as one op (`scoreguide_kernels::res_mlp`) on the CPU in f32:
    /// the parameters packed in one tensor (whose gradient candle splits back), the
    /// noise embedding one row when every row has the same noise level (the op
    /// broadcasts a one-row embedding).
    fn output_fused(&self, x: &Tensor, c_noise: &Tensor) -> Result<Tensor> {
        let (c, _) = shared_noise(c_noise, x.dtype())?;
        let emb = self.cfg.embedding.forward(&c)?;
        let mut layers = vec![&self.input, &self.time];
        for blk in &self.blocks {
            layers.extend([&blk.fc1, &blk.fc2]);
        }
        layers.push(&self.output);
        let mut parts = Vec::with_capacity(2 * layers.len());
        for l in layers {
            let (w, b) = linear_parts(l)?;
            parts.push(w.flatten_all()?);
            parts.push(b.clone());
        }
        let params = Tensor::cat(&parts, 0)?;
        let shape = ResMlpShape {
            in_dim: self.cfg.in_dim,
            hidden: self.cfg.hidden,
            embedding: self.cfg.embedding.dim,
            out_dim: self.cfg.out_dim,
            blocks: self.cfg.blocks,
        };
        res_mlp(x, &emb, &params, shape)
    }
}

/// The noise condition in `dtype`, cut to its first row when every row has the same
/// one (a sampler's step, on the CPU: the check reads the values), so the embedding is
/// computed once and broadcast; and whether it was cut.
fn shared_noise(c_noise: &Tensor, dtype: DType) -> Result<(Tensor, bool)> {
    let c = c_noise.to_dtype(dtype)?;
    if c.device().is_cpu() && c.dim(0)? > 1 {
        let v = c.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        if v.iter().all(|&e| e.to_bits() == v[0].to_bits()) {
            return Ok((c.narrow(0, 0, 1)?, true));
        }
    }
    Ok((c, false))
}

fn linear_parts(l: &Linear) -> Result<(&Tensor, &Tensor)> {
    match l.bias() {
        Some(b) => Ok((l.weight(), b)),
        None => bail!("residual MLP: every layer has a bias"),
    }
}

impl NoiseNet for ResMlp {
    fn forward(&self, x: &Tensor, c_noise: &Tensor, _cond: &Cond) -> Result<Tensor> {
        self.output(x, c_noise)
    }

    fn out_dim(&self) -> usize {
        self.cfg.out_dim
    }
}

impl ResMlp {
    /// The output F(x, c) and the input gradient Σ_k ∂L/∂F_k ∂F_k/∂x, where
    /// `upstream(F)` gives ∂L/∂F for a per-sample scalar L (classifier guidance): a
    /// backward pass written out by hand on `scoreguide_kernels::manual` (the forward
    /// keeps each SiLU's sigmoid; the backward is a few GEMMs with the weights and one
    /// fused pass per SiLU). No graph is built and no weight gradient computed, so the
    /// result is not differentiable with respect to the weights; `tests/gradients.rs`
    /// checks it against autograd.
    pub fn forward_with_input_grad(
        &self,
        x: &Tensor,
        c_noise: &Tensor,
        upstream: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        if x.rank() != 2 || x.dim(1)? != self.cfg.in_dim {
            bail!(
                "residual MLP: input must be [batch, {}], got {:?}",
                self.cfg.in_dim,
                x.dims()
            );
        }
        let x = x.detach();
        let temb = self.time_embedding(c_noise, x.dtype())?.detach();
        let (w, b) = linear_parts(&self.input)?;
        let mut h = manual::dense(&x, w, b, Act::Identity)?
            .0
            .broadcast_add(&temb)?;
        let mut kept = Vec::with_capacity(self.blocks.len());
        for blk in &self.blocks {
            let (u, su) = manual::add_silu(&h, &temb)?;
            let (w1, b1) = linear_parts(&blk.fc1)?;
            let (w2, b2) = linear_parts(&blk.fc2)?;
            let (a, sa) = manual::dense(&u, w1, b1, Act::Silu)?;
            let sa = sa.expect("SiLU keeps its sigmoid");
            h = (h + manual::dense(&a, w2, b2, Act::Identity)?.0)?;
            kept.push((u, su, a, sa));
        }
        let (hs, sh) = manual::silu(&h)?;
        let (w, b) = linear_parts(&self.output)?;
        let out = manual::dense(&hs, w, b, Act::Identity)?.0;
        let g_out = upstream(&out)?;
        if g_out.dims() != out.dims() {
            bail!(
                "residual MLP input gradient: upstream gradient {:?} does not match output {:?}",
                g_out.dims(),
                out.dims()
            );
        }
        let g = manual::matmul(&g_out, &w.detach())?;
        let mut g_h = manual::silu_backward(&g, &hs, &sh, None)?;
        for (blk, (u, su, a, sa)) in self.blocks.iter().zip(&kept).rev() {
            let g_v = manual::matmul(&g_h, &blk.fc2.weight().detach())?;
            let g_a = manual::silu_backward(&g_v, a, sa, None)?;
            let g_u = manual::matmul(&g_a, &blk.fc1.weight().detach())?;
            g_h = manual::silu_backward(&g_u, u, su, Some(&g_h))?;
        }
        let g_x = manual::matmul(&g_h, &self.input.weight().detach())?;
        Ok((out, g_x))
    }
}
