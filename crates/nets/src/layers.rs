//! Layers of the attention networks, from basic ops only (every op has a backward pass:
//! candle's fused softmax and layer norm drop gradients), shaped for a fast CPU backward:
//! biases and broadcasts as matmuls, relative-position attention without `[B, heads, A,
//! A, d]` intermediates.

use candle_core::{Result, Tensor, D};
use candle_nn::{linear, VarBuilder};
use scoreguide_kernels::{batched_matmul, dense, Act};

/// A linear layer on `scoreguide_kernels::dense`: the GEMM, bias and activation in one
/// op whose backward pass sums the bias gradient over rows directly (candle's backward
/// of a broadcast bias, a leading-dimension sum with a division per element, was most
/// of a training step here).
pub(crate) struct Dense {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
}

impl Dense {
    pub(crate) fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        let l = linear(in_dim, out_dim, vb)?;
        Ok(Self {
            weight: l.weight().clone(),
            bias: l.bias().expect("linear layers have a bias").clone(),
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        dense(x, &self.weight, &self.bias, Act::Identity)
    }

    /// `SiLU(x Wᵀ + b)` in one op.
    pub(crate) fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        dense(x, &self.weight, &self.bias, Act::Silu)
    }
}

/// `[B, n]` → `[B·times, n]`, row b repeated `times` times, by `index_select` (whose
/// backward is a scatter-add, unlike a broadcast's strided reduction).
pub(crate) fn repeat_rows(t: &Tensor, times: usize) -> Result<Tensor> {
    let b = t.dim(0)?;
    let idx: Vec<u32> = (0..b as u32)
        .flat_map(|i| std::iter::repeat_n(i, times))
        .collect();
    t.index_select(&Tensor::from_vec(idx, b * times, t.device())?, 0)
}

/// Layer norm (`scoreguide_kernels::layer_norm`: one op with its own backward pass;
/// candle's fused one drops gradients).
pub(crate) struct LayerNorm {
    pub(crate) gain: Tensor,
    pub(crate) bias: Tensor,
}

impl LayerNorm {
    pub(crate) fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            gain: vb.get_with_hints(dim, "gain", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        scoreguide_kernels::layer_norm(x, &self.gain, &self.bias)
    }
}

/// Splits `[B, N, H]` into heads `[B, heads, N, H/heads]`.
pub(crate) fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, h) = x.dims3()?;
    x.reshape((b, n, heads, h / heads))?.transpose(1, 2)
}

/// Inverse of [`split_heads`].
pub(crate) fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, nh, n, dh) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, n, nh * dh))
}

/// Multi-head attention of `queries` over `keys` (vanilla).
pub(crate) fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let scores = (batched_matmul(q, &k.t()?)? * scale)?;
    batched_matmul(&scoreguide_kernels::softmax_last_dim(&scores)?, v)
}

pub(crate) struct SelfAttention {
    pub(crate) norm: LayerNorm,
    pub(crate) qkv: Dense,
    /// e_ij → q^R, k^R, v^R (one head's size each, shared by the heads).
    pub(crate) rel: Dense,
    pub(crate) out: Dense,
}

impl SelfAttention {
    /// `h: [B, A, H]`, `e: [B, A, A, relative_dim]`.
    pub(crate) fn forward(&self, h: &Tensor, e: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, a, hid) = h.dims3()?;
        let dh = hid / heads;
        let qkv = self.qkv.forward(&self.norm.forward(h)?)?;
        let [q, k, v] = [0, 1, 2].map(|i| qkv.narrow(2, i * hid, hid));
        let (q, k, v) = (
            split_heads(&q?, heads)?,
            split_heads(&k?, heads)?,
            split_heads(&v?, heads)?,
        );
        let vanilla = attention(&q, &k, &v)?;
        let rel = self.rel.forward(e)?;
        let pair = |i: usize| rel.narrow(3, i * dh, dh);
        let relative = relative_attention(&q, &k, &v, &pair(0)?, &pair(1)?, &pair(2)?)?;
        debug_assert_eq!(relative.dims(), &[b, heads, a, dh]);
        self.out.forward(&merge_heads(&(vanilla + relative)?)?)
    }
}

/// RPE attention: `q, k, v: [B, heads, A, d]`, `qr, kr, vr: [B, A, A, d]` (pair (i, j)
/// at `[b, i, j]`, shared by the heads) → `[B, heads, A, d]` with
/// a_ij = softmax_j((q_i + q^R_ij)·(k_j + k^R_ij)/√d), out_i = Σ_j a_ij (v_j + v^R_ij).
///
/// The products are expanded into batched matmuls — q_i·k_j, q_i·k^R_ij (batched over
/// i), q^R_ij·k_j (batched over j), q^R_ij·k^R_ij (head-free) — so no `[B, heads, A, A,
/// d]` tensor is ever built: its backward pass was most of a training step.
pub(crate) fn relative_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    qr: &Tensor,
    kr: &Tensor,
    vr: &Tensor,
) -> Result<Tensor> {
    let d = q.dim(D::Minus1)?;
    let qk = batched_matmul(q, &k.t()?)?; // [B, h, i, j]
    let q_by_i = q.transpose(1, 2)?; // [B, i, h, d]
    let q_kr = batched_matmul(&q_by_i, &kr.transpose(2, 3)?)? // [B, i, h, j]
        .transpose(1, 2)?;
    let qr_by_j = qr.transpose(1, 2)?; // [B, j, i, d]
    let k_by_j = k.permute((0, 2, 3, 1))?; // [B, j, d, h]
    let qr_k = batched_matmul(&qr_by_j, &k_by_j)?.permute((0, 3, 2, 1))?; // [B, h, i, j]
    let qr_kr = (qr * kr)?.sum(D::Minus1)?.unsqueeze(1)?; // [B, 1, i, j]
    let scores = ((qk + q_kr)? + qr_k)?.broadcast_add(&qr_kr)?;
    let weights = scoreguide_kernels::softmax_last_dim(&(scores / (d as f64).sqrt())?)?;
    let from_v = batched_matmul(&weights, v)?;
    let from_vr = batched_matmul(&weights.transpose(1, 2)?, vr)? // [B, i, h, d]
        .transpose(1, 2)?;
    from_v + from_vr
}

pub(crate) struct CrossAttention {
    pub(crate) norm: LayerNorm,
    pub(crate) q: Dense,
    pub(crate) kv: Dense,
    pub(crate) out: Dense,
}

impl CrossAttention {
    /// `h: [B, A, H]` attends to `tokens: [B, T, H]`.
    pub(crate) fn forward(&self, h: &Tensor, tokens: &Tensor, heads: usize) -> Result<Tensor> {
        let hid = h.dim(2)?;
        let q = split_heads(&self.q.forward(&self.norm.forward(h)?)?, heads)?;
        let kv = self.kv.forward(tokens)?;
        let k = split_heads(&kv.narrow(2, 0, hid)?, heads)?;
        let v = split_heads(&kv.narrow(2, hid, hid)?, heads)?;
        self.out.forward(&merge_heads(&attention(&q, &k, &v)?)?)
    }
}

pub(crate) struct Mlp {
    pub(crate) norm: LayerNorm,
    pub(crate) fc1: Dense,
    pub(crate) fc2: Dense,
}

impl Mlp {
    pub(crate) fn forward(&self, h: &Tensor) -> Result<Tensor> {
        self.fc2
            .forward(&self.fc1.forward_silu(&self.norm.forward(h)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The definition, term by term, on `[B, heads, A, A, d]` tensors.
    fn relative_attention_reference(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        qr: &Tensor,
        kr: &Tensor,
        vr: &Tensor,
    ) -> Result<Tensor> {
        let d = q.dim(D::Minus1)?;
        let (qr, kr, vr) = (qr.unsqueeze(1)?, kr.unsqueeze(1)?, vr.unsqueeze(1)?);
        let qi = q.unsqueeze(3)?.broadcast_add(&qr)?;
        let kj = k.unsqueeze(2)?.broadcast_add(&kr)?;
        let scores = ((qi * kj)?.sum(D::Minus1)? / (d as f64).sqrt())?;
        let weights = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let values = v.unsqueeze(2)?.broadcast_add(&vr)?;
        weights.unsqueeze(4)?.broadcast_mul(&values)?.sum(3)
    }

    #[test]
    fn expanded_relative_attention_matches_the_definition() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, a, d) = (2, 3, 5, 4);
        let r = |shape: &[usize]| Tensor::randn(0f64, 1.0, shape, &dev);
        let (q, k, v) = (r(&[b, h, a, d])?, r(&[b, h, a, d])?, r(&[b, h, a, d])?);
        let (qr, kr, vr) = (r(&[b, a, a, d])?, r(&[b, a, a, d])?, r(&[b, a, a, d])?);
        let fast = relative_attention(&q, &k, &v, &qr, &kr, &vr)?;
        let reference = relative_attention_reference(&q, &k, &v, &qr, &kr, &vr)?;
        let diff = (fast - reference)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "max difference {diff}");
        Ok(())
    }
}
