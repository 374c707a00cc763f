//! Layers of the attention and image networks, on `scoreguide_kernels`' fused ops (every
//! op has a backward pass: candle's fused softmax and layer norm drop gradients), shaped
//! for a fast CPU backward: biases and broadcasts as matmuls, relative-position
//! attention without `[B, heads, A, A, d]` intermediates, convolutions as im2col + GEMM.

use candle_core::{Result, Tensor};
use candle_nn::{linear, Init, VarBuilder};
use scoreguide_kernels::{
    attention, conv2d, dense, group_norm, relative_attention, self_attention, Act, Conv2dSpec,
};

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

    /// Weights and bias initialised to zero (a correction that starts as nothing).
    pub(crate) fn zeros(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints((out_dim, in_dim), "weight", candle_nn::Init::Const(0.0))?,
            bias: vb.get_with_hints(out_dim, "bias", candle_nn::Init::Const(0.0))?,
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
        let qkv = self.qkv.forward(&self.norm.forward(h)?)?;
        let vanilla = self_attention(&qkv, heads, None)?; // [B, A, H]
        let rel = self.rel.forward(e)?; // [B, A, A, 3 d]: q^R, k^R, v^R of each pair
        let relative = relative_attention(&qkv, &rel, heads)?;
        self.out.forward(&(vanilla + relative)?)
    }
}

pub(crate) struct CrossAttention {
    pub(crate) norm: LayerNorm,
    pub(crate) q: Dense,
    pub(crate) kv: Dense,
    pub(crate) out: Dense,
}

impl CrossAttention {
    /// Keys and values of the map tokens `[B, T, H]` → `[B, T, 2H]`: the same at every
    /// step of a sampler, so a frozen network computes them once per batch of maps.
    pub(crate) fn keys_values(&self, tokens: &Tensor) -> Result<Tensor> {
        self.kv.forward(tokens)
    }

    /// `h: [B, A, H]` attends to the map tokens through their keys and values `kv`.
    pub(crate) fn forward(&self, h: &Tensor, kv: &Tensor, heads: usize) -> Result<Tensor> {
        let q = self.q.forward(&self.norm.forward(h)?)?;
        self.out.forward(&attention(&q, kv, heads, None)?)
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

/// A convolution's parameters and how it reads its input (the image networks').
pub(crate) struct Conv {
    pub(crate) weight: Tensor,
    bias: Option<Tensor>,
    spec: Conv2dSpec,
}

impl Conv {
    /// DDPM++'s initialisation: uniform with variance scaled by the mean of fan-in and
    /// fan-out, or zeros (`zero`, the last convolution of each residual branch).
    pub(crate) fn new(
        cin: usize,
        cout: usize,
        k: usize,
        spec: Conv2dSpec,
        zero: bool,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let init = if zero {
            Init::Const(0.0)
        } else {
            let bound = (6.0 / ((cin + cout) * k * k) as f64).sqrt();
            Init::Uniform {
                lo: -bound,
                up: bound,
            }
        };
        Ok(Self {
            weight: vb.get_with_hints((cout, cin, k, k), "weight", init)?,
            bias: match bias {
                true => Some(vb.get_with_hints(cout, "bias", Init::Const(0.0))?),
                false => None,
            },
            spec,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        conv2d(x, &self.weight, self.bias.as_ref(), self.spec)
    }

    /// With a bias per image (`[B, cout]`) in place of the layer's own.
    pub(crate) fn forward_with_bias(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        conv2d(x, &self.weight, Some(bias), self.spec)
    }
}

/// Group norm (ε = 1e-6, as DDPM++), optionally followed by SiLU in the same op.
pub(crate) struct GroupNorm {
    gain: Tensor,
    bias: Tensor,
    groups: usize,
}

impl GroupNorm {
    pub(crate) fn new(c: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            gain: vb.get_with_hints(c, "gain", Init::Const(1.0))?,
            bias: vb.get_with_hints(c, "bias", Init::Const(0.0))?,
            groups,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        group_norm(x, self.groups, &self.gain, &self.bias, 1e-6, silu)
    }
}

/// Group-norm groups for `c` channels: the largest count up to `most` that divides `c`
/// and leaves at least 4 channels per group (DDPM++'s min(C/4, 32)).
pub(crate) fn groups_for(c: usize, most: usize) -> usize {
    (1..=most.min(c / 4).max(1))
        .rev()
        .find(|g| c % g == 0)
        .unwrap_or(1)
}

/// `x` (`[B, C·S·S]` rows or `[B, C, S, S]`) as `[B, C, S, S]` images, after checking it
/// and the noise condition `[B]`; `who` names the network in errors.
pub(crate) fn image_input(
    x: &Tensor,
    c_noise: &Tensor,
    (c, s): (usize, usize),
    who: &str,
) -> Result<Tensor> {
    let b = x.dim(0)?;
    let image = match x.dims() {
        &[_, d] if d == c * s * s => x.reshape((b, c, s, s))?,
        &[_, xc, xh, xw] if (xc, xh, xw) == (c, s, s) => x.clone(),
        dims => candle_core::bail!(
            "{who}: input must be [batch, {}] or [batch, {c}, {s}, {s}], got {dims:?}",
            c * s * s
        ),
    };
    if c_noise.dims() != [b] {
        candle_core::bail!(
            "{who}: noise condition must be [{b}], got {:?}",
            c_noise.dims()
        );
    }
    Ok(image)
}
