//! The traffic-scene transformer of Gen-neG (App. B.2; SPEC §2): agents attend to each
//! other with relative-position (RPE) attention and to map tokens with cross-attention.
//!
//! Input `[B, A·F]` (A agents of F features, the first two the position), a noise
//! condition `[B]`, and each scene's map raster `[B, C, s, s]` as the context of its
//! [`Cond`], read as [`SceneMaps`]: tokens `[B, T, H]` from [`MapEncoder`] (a small CNN)
//! and, with a [`MapProbe`], the raster read around each agent. Per agent:
//! an MLP encoder (of the features, and optionally the probe's values and a sinusoidal
//! code of the position) to `hidden` plus a time embedding; then `blocks` × (RPE
//! self-attention, cross-attention to the map, MLP), each pre-norm and residual; a
//! 2-layer decoder to `out_per_agent` values per agent (`F` for a score, 1 for a
//! per-agent classifier).
//!
//! RPE attention (Shaw et al. 2018), per head, with e_ij an embedding of the pairwise
//! distance d_ij and the time:
//! a_ij = softmax_j((q_i + q^R_ij)·(k_j + k^R_ij)/√d), out_i = Σ_j a_ij (v_j + v^R_ij);
//! the block adds this to vanilla attention's output. Every op has a backward pass
//! (softmax and layer norm from basic ops), and nothing depends on agent order: permuting
//! the agents permutes the output.

use crate::embedding::SinusoidalEmbedding;
use crate::net::NoiseNet;
use candle_core::{bail, DType, Device, Result, Tensor, TensorId, D};
use candle_nn::{linear, VarBuilder};
use scoreguide_guidance::Cond;
use serde::{Deserialize, Serialize};
use std::sync::Mutex;

/// Shape of a [`SceneTransformer`] and its [`MapEncoder`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SceneTransformerConfig {
    pub agents: usize,
    pub features: usize,
    /// Values out per agent: `features` for a score network, 1 for a classifier.
    pub out_per_agent: usize,
    pub hidden: usize,
    pub heads: usize,
    pub blocks: usize,
    /// Side of the raster the map encoder's CNN takes; it halves it twice (to
    /// `(map_cells/4)²` tokens), so it must be a multiple of 4.
    pub map_cells: usize,
    /// Layers of the map input (1: the road only; see `scoreguide_data::MapLayers`).
    #[serde(default = "one_layer")]
    pub map_channels: usize,
    /// Side of the map input when finer than `map_cells` (a multiple of it): the encoder
    /// averages it down to `map_cells`, a [`MapProbe`] reads it at full resolution.
    /// `None`: the input is `map_cells` per side.
    #[serde(default)]
    pub map_input_cells: Option<usize>,
    pub time_embedding: SinusoidalEmbedding,
    /// Multiplies the noise condition before its embedding: VP's condition is 999 t, and
    /// the embedding's frequencies (1 … max_freq) suit a condition of order 1, so the
    /// traffic network uses 1e-3 (with EDM's ¼ ln σ it would be 1).
    pub time_scale: f64,
    /// Embedding of pairwise distances (in the network's input units).
    pub distance_embedding: SinusoidalEmbedding,
    /// Size of the pair features e_ij; each block maps them to q^R, k^R, v^R of one
    /// head's size, shared by the heads (as Shaw et al.), which keeps the pairwise work
    /// at `A² · relative_dim` rather than `A² · hidden`.
    pub relative_dim: usize,
    /// Road values read off the map raster around each agent, fed to its encoder beside
    /// its features (off by default; see [`MapProbe`]).
    #[serde(default)]
    pub map_probe: Option<MapProbe>,
    /// Sinusoidal embedding of each agent's x and y (input units) fed to its encoder:
    /// an MLP of raw coordinates varies slowly with position (spectral bias), so without
    /// it an agent can neither resolve lane-scale offsets nor match the map tokens'
    /// position encoding in cross-attention. Off by default.
    #[serde(default)]
    pub position_embedding: Option<SinusoidalEmbedding>,
}

fn one_layer() -> usize {
    1
}

/// Reads the map raster (bilinearly, cell centres at integer positions) on a
/// `side × side` grid of points around each agent, `spacing` cells apart, and gives the
/// values to the agent's encoder. The cross-attention to map tokens sees the road at
/// the tokens' coarse resolution only and must find the agent's own cell through
/// attention; the probe tells the agent directly how far the road reaches around it,
/// which is what staying on the road needs. The values are piecewise linear in the
/// agent's position, so the input gradient exists almost everywhere; points off the
/// map read 0 (not road).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MapProbe {
    /// Raster column and row of the input position (x, y):
    /// column = x · scale\[0\] + offset\[0\], row = y · scale\[1\] + offset\[1\].
    pub scale: [f64; 2],
    pub offset: [f64; 2],
    pub side: usize,
    pub spacing: f64,
}

impl MapProbe {
    pub fn points(&self) -> usize {
        self.side * self.side
    }

    /// `[side²]` column and row offsets of the grid, centred on the agent.
    fn offsets(&self) -> (Vec<f32>, Vec<f32>) {
        let centre = (self.side as f64 - 1.0) / 2.0;
        let (mut dc, mut dr) = (Vec::new(), Vec::new());
        for r in 0..self.side {
            for c in 0..self.side {
                dc.push(((c as f64 - centre) * self.spacing) as f32);
                dr.push(((r as f64 - centre) * self.spacing) as f32);
            }
        }
        (dc, dr)
    }

    /// Map values `[B, A, channels · side²]` (channel-major) at the grid around `pos:
    /// [B, A, 2]` on `raster: [B, channels · cells²]` (each channel row-major, one map
    /// per scene).
    pub fn read(&self, pos: &Tensor, raster: &Tensor, cells: usize) -> Result<Tensor> {
        let (b, a, _) = pos.dims3()?;
        let plane = cells * cells;
        let channels = raster.dim(1)? / plane;
        if channels == 0 || raster.dims() != [b, channels * plane] {
            bail!(
                "map probe: raster must be [{b}, channels · {plane}], got {:?}",
                raster.dims()
            );
        }
        let k = self.points();
        let (dev, dtype) = (pos.device(), pos.dtype());
        let (dc, dr) = self.offsets();
        let dc = Tensor::from_vec(dc, (1, 1, k), dev)?.to_dtype(dtype)?;
        let dr = Tensor::from_vec(dr, (1, 1, k), dev)?.to_dtype(dtype)?;
        let col = pos
            .narrow(2, 0, 1)?
            .affine(self.scale[0], self.offset[0])?
            .broadcast_add(&dc)?;
        let row = pos
            .narrow(2, 1, 1)?
            .affine(self.scale[1], self.offset[1])?
            .broadcast_add(&dr)?;
        let last = (cells - 1) as f64;
        let within = |t: &Tensor| -> Result<Tensor> {
            t.ge(0.0)?
                .to_dtype(dtype)?
                .mul(&t.le(last)?.to_dtype(dtype)?)
        };
        let inside = within(&col)?.mul(&within(&row)?)?;
        // The cell's corner by a detached floor; the fractions carry the gradient.
        let col = col.clamp(0.0, last - 1e-3)?;
        let row = row.clamp(0.0, last - 1e-3)?;
        let (c0, r0) = (col.detach().floor()?, row.detach().floor()?);
        let (fc, fr) = ((&col - &c0)?, (&row - &r0)?);
        let corner = (r0.affine(cells as f64, 0.0)? + c0)?
            .to_dtype(DType::U32)?
            .reshape((b, a * k))?;
        let raster = raster.to_dtype(dtype)?;
        let (gc, gr) = (fc.affine(-1.0, 1.0)?, fr.affine(-1.0, 1.0)?);
        // One gather for the four corners of every channel (gather wants the whole,
        // contiguous raster): index layout [B, channel, corner, A·k].
        let mut shifts = Vec::with_capacity(4 * channels);
        for ch in 0..channels {
            let base = (ch * plane) as u32;
            for corner_shift in [0, 1, cells as u32, cells as u32 + 1] {
                shifts.push((&corner + Tensor::full(base + corner_shift, (b, a * k), dev)?)?);
            }
        }
        let v = raster
            .gather(&Tensor::cat(&shifts, 1)?, 1)?
            .reshape((b, channels, 4, a, k))?;
        let at = |i: usize| v.narrow(2, i, 1)?.squeeze(2); // [B, C, A, k]
        let (gc, fc, gr, fr) = (
            gc.unsqueeze(1)?,
            fc.unsqueeze(1)?,
            gr.unsqueeze(1)?,
            fr.unsqueeze(1)?,
        );
        let top = (at(0)?.broadcast_mul(&gc)? + at(1)?.broadcast_mul(&fc)?)?;
        let bottom = (at(2)?.broadcast_mul(&gc)? + at(3)?.broadcast_mul(&fc)?)?;
        let values = (top.broadcast_mul(&gr)? + bottom.broadcast_mul(&fr)?)?
            .broadcast_mul(&inside.unsqueeze(1)?)?; // [B, C, A, k]
        values
            .permute((0, 2, 1, 3))?
            .contiguous()?
            .reshape((b, a, channels * k))
    }
}

impl SceneTransformerConfig {
    /// Our CPU-sized traffic network: hidden 64, 4 heads, 2 blocks, 32 × 32 maps.
    pub fn traffic(out_per_agent: usize) -> Self {
        Self {
            agents: 12,
            features: 7,
            out_per_agent,
            hidden: 64,
            heads: 4,
            blocks: 2,
            map_cells: 32,
            map_channels: 1,
            map_input_cells: None,
            time_embedding: SinusoidalEmbedding {
                dim: 64,
                max_freq: 1000.0,
            },
            time_scale: 1e-3,
            distance_embedding: SinusoidalEmbedding {
                dim: 32,
                max_freq: 100.0,
            },
            relative_dim: 32,
            map_probe: None,
            position_embedding: None,
        }
    }

    /// Inputs of the agent encoder: the features, the probe's values and the position
    /// embedding, if any.
    fn encoder_inputs(&self) -> usize {
        self.features
            + self.map_probe.map_or(0, |p| p.points() * self.map_channels)
            + self.position_embedding.map_or(0, |e| 2 * e.dim)
    }

    /// Side of the map input (`[M, map_channels, side, side]`).
    pub fn map_input_side(&self) -> usize {
        self.map_input_cells.unwrap_or(self.map_cells)
    }

    pub fn validate(&self) -> Result<()> {
        if self.agents == 0 || self.features < 2 || self.out_per_agent == 0 {
            bail!("scene transformer: need agents > 0, features >= 2 (x, y first) and out_per_agent > 0, got {self:?}");
        }
        if self.heads == 0
            || self.hidden == 0
            || self.hidden % self.heads != 0
            || self.relative_dim == 0
        {
            bail!("scene transformer: hidden must be a positive multiple of heads, got {self:?}");
        }
        if self.map_cells < 4 || self.map_cells % 4 != 0 {
            bail!(
                "scene transformer: map_cells must be a multiple of 4, got {}",
                self.map_cells
            );
        }
        let input = self.map_input_side();
        if self.map_channels == 0 || input % self.map_cells != 0 {
            bail!(
                "scene transformer: need map_channels > 0 and a map input side ({input}) that is a multiple of map_cells ({}), got {} channels",
                self.map_cells,
                self.map_channels
            );
        }
        if !(self.time_scale > 0.0 && self.time_scale.is_finite()) {
            bail!(
                "scene transformer: time_scale must be positive, got {}",
                self.time_scale
            );
        }
        if let Some(p) = &self.map_probe {
            let finite = p.scale.iter().chain(&p.offset).all(|v| v.is_finite());
            if p.side == 0 || !finite || !(p.spacing.is_finite() && p.spacing >= 0.0) {
                bail!("scene transformer: bad map probe {p:?}");
            }
        }
        if let Some(e) = &self.position_embedding {
            e.validate()?;
        }
        self.time_embedding.validate()?;
        self.distance_embedding.validate()
    }
}

/// A linear layer whose bias enters through a rank-1 matmul (`1 · bᵀ`) instead of a
/// broadcast: candle's CPU backward of a broadcast sums over leading dimensions with a
/// division per element, which made bias gradients most of a training step here.
struct Dense {
    weight: Tensor,
    bias: Tensor,
}

impl Dense {
    fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        let l = linear(in_dim, out_dim, vb)?;
        Ok(Self {
            weight: l.weight().clone(),
            bias: l.bias().expect("linear layers have a bias").clone(),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (in_dim, lead) = (dims[dims.len() - 1], dims[..dims.len() - 1].to_vec());
        let rows: usize = lead.iter().product();
        let x2 = x.reshape((rows, in_dim))?;
        let out = self.bias.dim(0)?;
        let y = (x2.matmul(&self.weight.t()?)? + row_broadcast(&self.bias, rows)?)?;
        let mut shape = lead;
        shape.push(out);
        y.reshape(shape)
    }
}

/// `v: [n]` repeated over `rows` rows, `[rows, n]`, as a matmul (`1 · vᵀ`) so that the
/// backward pass is a matmul too.
fn row_broadcast(v: &Tensor, rows: usize) -> Result<Tensor> {
    let ones = Tensor::ones((rows, 1), v.dtype(), v.device())?;
    ones.matmul(&v.unsqueeze(0)?)
}

/// `[B, n]` → `[B·times, n]`, row b repeated `times` times, by `index_select` (whose
/// backward is a scatter-add, unlike a broadcast's strided reduction).
fn repeat_rows(t: &Tensor, times: usize) -> Result<Tensor> {
    let b = t.dim(0)?;
    let idx: Vec<u32> = (0..b as u32)
        .flat_map(|i| std::iter::repeat_n(i, times))
        .collect();
    t.index_select(&Tensor::from_vec(idx, b * times, t.device())?, 0)
}

/// Layer norm from basic ops (candle's fused one drops gradients), its gain and bias
/// applied through [`row_broadcast`].
struct LayerNorm {
    gain: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            gain: vb.get_with_hints(dim, "gain", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = x.dim(D::Minus1)?;
        let rows = x.elem_count() / h;
        let x2 = x.reshape((rows, h))?;
        let centred = x2.broadcast_sub(&x2.mean_keepdim(1)?)?;
        let normed = centred.broadcast_div(&(centred.sqr()?.mean_keepdim(1)? + 1e-5)?.sqrt()?)?;
        let y = ((normed * row_broadcast(&self.gain, rows)?)? + row_broadcast(&self.bias, rows)?)?;
        y.reshape(x.shape())
    }
}

/// Splits `[B, N, H]` into heads `[B, heads, N, H/heads]`.
fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, h) = x.dims3()?;
    x.reshape((b, n, heads, h / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// Inverse of [`split_heads`].
fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, nh, n, dh) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, n, nh * dh))
}

/// Multi-head attention of `queries` over `keys` (vanilla).
fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
    candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&v.contiguous()?)
}

struct SelfAttention {
    norm: LayerNorm,
    qkv: Dense,
    /// e_ij → q^R, k^R, v^R (one head's size each, shared by the heads).
    rel: Dense,
    out: Dense,
}

impl SelfAttention {
    /// `h: [B, A, H]`, `e: [B, A, A, relative_dim]`.
    fn forward(&self, h: &Tensor, e: &Tensor, heads: usize) -> Result<Tensor> {
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
        let pair = |i: usize| rel.narrow(3, i * dh, dh)?.contiguous();
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
fn relative_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    qr: &Tensor,
    kr: &Tensor,
    vr: &Tensor,
) -> Result<Tensor> {
    let d = q.dim(D::Minus1)?;
    let qk = q.matmul(&k.t()?.contiguous()?)?; // [B, h, i, j]
    let q_by_i = q.transpose(1, 2)?.contiguous()?; // [B, i, h, d]
    let q_kr = q_by_i
        .matmul(&kr.transpose(2, 3)?.contiguous()?)? // [B, i, h, j]
        .transpose(1, 2)?;
    let qr_by_j = qr.transpose(1, 2)?.contiguous()?; // [B, j, i, d]
    let k_by_j = k.permute((0, 2, 3, 1))?.contiguous()?; // [B, j, d, h]
    let qr_k = qr_by_j.matmul(&k_by_j)?.permute((0, 3, 2, 1))?; // [B, h, i, j]
    let qr_kr = (qr * kr)?.sum(D::Minus1)?.unsqueeze(1)?; // [B, 1, i, j]
    let scores = ((qk + q_kr)? + qr_k)?.broadcast_add(&qr_kr)?;
    let weights = candle_nn::ops::softmax(&(scores / (d as f64).sqrt())?, D::Minus1)?;
    let from_v = weights.matmul(&v.contiguous()?)?;
    let from_vr = weights
        .transpose(1, 2)?
        .contiguous()?
        .matmul(vr)? // [B, i, h, d]
        .transpose(1, 2)?;
    from_v + from_vr
}

struct CrossAttention {
    norm: LayerNorm,
    q: Dense,
    kv: Dense,
    out: Dense,
}

impl CrossAttention {
    /// `h: [B, A, H]` attends to `tokens: [B, T, H]`.
    fn forward(&self, h: &Tensor, tokens: &Tensor, heads: usize) -> Result<Tensor> {
        let hid = h.dim(2)?;
        let q = split_heads(&self.q.forward(&self.norm.forward(h)?)?, heads)?;
        let kv = self.kv.forward(tokens)?;
        let k = split_heads(&kv.narrow(2, 0, hid)?, heads)?;
        let v = split_heads(&kv.narrow(2, hid, hid)?, heads)?;
        self.out.forward(&merge_heads(&attention(&q, &k, &v)?)?)
    }
}

struct Mlp {
    norm: LayerNorm,
    fc1: Dense,
    fc2: Dense,
}

impl Mlp {
    fn forward(&self, h: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&candle_nn::ops::silu(
            &self.fc1.forward(&self.norm.forward(h)?)?,
        )?)
    }
}

struct Block {
    self_attention: SelfAttention,
    cross_attention: CrossAttention,
    mlp: Mlp,
}

/// The map encoder: a two-layer CNN whose convolutions have kernel = stride = 2
/// (non-overlapping 2×2 patches, each layer a matmul over patches — candle's CPU conv2d
/// backward pass cost more than the whole transformer), SiLU after each, from a
/// `[M, C, c, c]` raster (averaged down first from a finer input) to `(c/4)²` tokens of
/// `hidden` values, plus a fixed 2-D sinusoidal position encoding, then a layer norm.
pub struct MapEncoder {
    conv1: Dense,
    conv2: Dense,
    norm: LayerNorm,
    cells: usize,
    channels: usize,
    input: usize,
    hidden: usize,
}

/// `[M, r, c, C]` → `[M, r/2, c/2, 4C]`: each output cell holds its 2×2 input patch.
fn patches_2x2(x: &Tensor) -> Result<Tensor> {
    let (m, r, c, ch) = x.dims4()?;
    x.reshape((m, r / 2, 2, c / 2, 2, ch))?
        .permute((0, 1, 3, 2, 4, 5))?
        .contiguous()?
        .reshape((m, r / 2, c / 2, 4 * ch))
}

impl MapEncoder {
    pub fn new(cfg: &SceneTransformerConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            conv1: Dense::new(4 * cfg.map_channels, cfg.hidden / 2, vb.pp("conv1"))?,
            conv2: Dense::new(4 * (cfg.hidden / 2), cfg.hidden, vb.pp("conv2"))?,
            norm: LayerNorm::new(cfg.hidden, vb.pp("norm"))?,
            cells: cfg.map_cells,
            channels: cfg.map_channels,
            input: cfg.map_input_side(),
            hidden: cfg.hidden,
        })
    }

    /// `[M, C, s, s]` maps (s the input side) → `[M, (c/4)², hidden]` tokens.
    pub fn forward(&self, maps: &Tensor) -> Result<Tensor> {
        let (m, ch, rows, cols) = maps.dims4()?;
        if (ch, rows, cols) != (self.channels, self.input, self.input) {
            bail!(
                "map encoder: maps must be [M, {}, {s}, {s}], got {:?}",
                self.channels,
                maps.dims(),
                s = self.input
            );
        }
        let (cells, factor) = (self.cells, self.input / self.cells);
        let pooled = if factor > 1 {
            maps.reshape((m, ch, cells, factor, cells, factor))?
                .mean(5)?
                .mean(3)?
        } else {
            maps.clone()
        };
        let x = pooled.permute((0, 2, 3, 1))?.contiguous()?; // [M, c, c, C]
        let f = candle_nn::ops::silu(&self.conv1.forward(&patches_2x2(&x)?)?)?;
        let f = candle_nn::ops::silu(&self.conv2.forward(&patches_2x2(&f)?)?)?; // [M, c/4, c/4, H]
        let side = cells / 4;
        let tokens = f.reshape((m, side * side, self.hidden))?;
        let pos = position_encoding_2d(side, side, self.hidden, maps.dtype(), maps.device())?;
        self.norm.forward(&tokens.broadcast_add(&pos)?)
    }

    pub fn tokens(&self) -> usize {
        (self.cells / 4).pow(2)
    }

    pub fn hidden(&self) -> usize {
        self.hidden
    }
}

/// `[rows·cols, dim]`: half the channels encode the row, half the column, each as
/// sines and cosines at geometric frequencies.
fn position_encoding_2d(
    rows: usize,
    cols: usize,
    dim: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let quarter = (dim / 4).max(1);
    let mut v = vec![0f32; rows * cols * dim];
    for r in 0..rows {
        for c in 0..cols {
            let row = &mut v[(r * cols + c) * dim..(r * cols + c + 1) * dim];
            for k in 0..quarter {
                let freq = 1.0 / 10f64.powf(k as f64 / quarter as f64);
                let (a, b) = (r as f64 * freq, c as f64 * freq);
                for (slot, val) in [
                    (k, a.sin()),
                    (quarter + k, a.cos()),
                    (2 * quarter + k, b.sin()),
                    (3 * quarter + k, b.cos()),
                ] {
                    if slot < dim {
                        row[slot] = val as f32;
                    }
                }
            }
        }
    }
    Tensor::from_vec(v, (rows * cols, dim), device)?.to_dtype(dtype)
}

/// See the module documentation.
pub struct SceneTransformer {
    cfg: SceneTransformerConfig,
    encoder1: Dense,
    encoder2: Dense,
    time: Dense,
    distance: Dense,
    distance_time: Dense,
    blocks: Vec<Block>,
    final_norm: LayerNorm,
    decoder1: Dense,
    decoder2: Dense,
    map: MapEncoder,
    /// The last context encoded by a frozen network, by tensor id: a sampler passes the
    /// same maps at every step, so they are encoded once per batch.
    memo: Mutex<Option<(TensorId, DType, SceneMaps)>>,
}

impl SceneTransformer {
    pub fn new(cfg: SceneTransformerConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let h = cfg.hidden;
        let blocks = (0..cfg.blocks)
            .map(|i| {
                let vb = vb.pp(format!("block{i}"));
                Ok(Block {
                    self_attention: SelfAttention {
                        norm: LayerNorm::new(h, vb.pp("self.norm"))?,
                        qkv: Dense::new(h, 3 * h, vb.pp("self.qkv"))?,
                        rel: Dense::new(cfg.relative_dim, 3 * (h / cfg.heads), vb.pp("self.rel"))?,
                        out: Dense::new(h, h, vb.pp("self.out"))?,
                    },
                    cross_attention: CrossAttention {
                        norm: LayerNorm::new(h, vb.pp("cross.norm"))?,
                        q: Dense::new(h, h, vb.pp("cross.q"))?,
                        kv: Dense::new(h, 2 * h, vb.pp("cross.kv"))?,
                        out: Dense::new(h, h, vb.pp("cross.out"))?,
                    },
                    mlp: Mlp {
                        norm: LayerNorm::new(h, vb.pp("mlp.norm"))?,
                        fc1: Dense::new(h, 2 * h, vb.pp("mlp.fc1"))?,
                        fc2: Dense::new(2 * h, h, vb.pp("mlp.fc2"))?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            encoder1: Dense::new(cfg.encoder_inputs(), h, vb.pp("encoder1"))?,
            encoder2: Dense::new(h, h, vb.pp("encoder2"))?,
            time: Dense::new(cfg.time_embedding.dim, h, vb.pp("time"))?,
            distance: Dense::new(
                cfg.distance_embedding.dim,
                cfg.relative_dim,
                vb.pp("distance"),
            )?,
            distance_time: Dense::new(
                cfg.time_embedding.dim,
                cfg.relative_dim,
                vb.pp("distance_time"),
            )?,
            blocks,
            final_norm: LayerNorm::new(h, vb.pp("final_norm"))?,
            decoder1: Dense::new(h, h, vb.pp("decoder1"))?,
            decoder2: Dense::new(h, cfg.out_per_agent, vb.pp("decoder2"))?,
            map: MapEncoder::new(&cfg, vb.pp("map"))?,
            memo: Mutex::new(None),
            cfg,
        })
    }

    pub fn config(&self) -> &SceneTransformerConfig {
        &self.cfg
    }

    /// The map encoder (tokens only; [`SceneTransformer::encode_maps`] gives all the
    /// network reads of a map).
    pub fn map_encoder(&self) -> &MapEncoder {
        &self.map
    }

    /// What the network reads of the maps `[B, C, s, s]` (see
    /// [`SceneTransformerConfig::map_input_side`]): run once per batch of maps and reuse.
    pub fn encode_maps(&self, maps: &Tensor) -> Result<SceneMaps> {
        let tokens = self.map.forward(maps)?;
        let raster = match self.cfg.map_probe {
            Some(_) => Some(maps.flatten_from(1)?),
            None => None,
        };
        Ok(SceneMaps { tokens, raster })
    }

    /// `x: [B, A·F]`, `c_noise: [B]`, `maps` of B scenes → `[B, A·out_per_agent]`.
    pub fn forward_maps(&self, x: &Tensor, c_noise: &Tensor, maps: &SceneMaps) -> Result<Tensor> {
        let (a, f, h) = (self.cfg.agents, self.cfg.features, self.cfg.hidden);
        let b = match x.dims() {
            &[b, d] if d == a * f => b,
            dims => bail!("scene transformer: input must be [batch, {}] ({a} agents × {f} features), got {dims:?}", a * f),
        };
        let tokens = &maps.tokens;
        match tokens.dims() {
            &[tb, _, th] if tb == b && th == h => {}
            dims => bail!("scene transformer: map tokens must be [{b}, T, {h}], got {dims:?}"),
        }
        let agents = x.reshape((b, a, f))?;
        let temb = self
            .cfg
            .time_embedding
            .forward(&(c_noise.to_dtype(x.dtype())? * self.cfg.time_scale)?)?; // [B, E]
        let t_agent = repeat_rows(&self.time.forward(&temb)?, a)?.reshape((b, a, h))?;
        let mut encoder_in = vec![agents.clone()];
        match (&self.cfg.map_probe, &maps.raster) {
            (None, _) => {}
            (Some(probe), Some(raster)) => {
                let cells = self.cfg.map_input_side();
                let values = self.cfg.map_channels * cells * cells;
                if raster.dims() != [b, values] {
                    bail!(
                        "scene transformer: map raster must be [{b}, {values}], got {:?}",
                        raster.dims()
                    );
                }
                encoder_in.push(probe.read(&agents.narrow(2, 0, 2)?, raster, cells)?);
            }
            (Some(_), None) => {
                bail!("scene transformer: the map probe needs the raster (use `encode_maps`)")
            }
        }
        if let Some(pe) = &self.cfg.position_embedding {
            for axis in 0..2 {
                let coord = agents.narrow(2, axis, 1)?.flatten_all()?;
                encoder_in.push(pe.forward(&coord)?.reshape((b, a, pe.dim))?);
            }
        }
        let encoder_in = Tensor::cat(&encoder_in, 2)?;
        let enc = candle_nn::ops::silu(&self.encoder1.forward(&encoder_in)?)?;
        let mut hs = (self.encoder2.forward(&enc)? + t_agent)?;

        // Pairwise distances, smoothed at 0 so the diagonal has a finite gradient.
        let pos = agents.narrow(2, 0, 2)?;
        let diff = pos.unsqueeze(2)?.broadcast_sub(&pos.unsqueeze(1)?)?; // [B, A, A, 2]
        let dist = (diff.sqr()?.sum(D::Minus1)? + 1e-4)?.sqrt()?; // [B, A, A]
        let demb = self
            .cfg
            .distance_embedding
            .forward(&dist.flatten_all()?)?
            .reshape((b, a, a, self.cfg.distance_embedding.dim))?;
        let t_pair = repeat_rows(&self.distance_time.forward(&temb)?, a * a)?.reshape((
            b,
            a,
            a,
            self.cfg.relative_dim,
        ))?;
        let e = candle_nn::ops::silu(&(self.distance.forward(&demb)? + t_pair)?)?;

        for block in &self.blocks {
            hs = (&hs + block.self_attention.forward(&hs, &e, self.cfg.heads)?)?;
            hs = (&hs + block.cross_attention.forward(&hs, tokens, self.cfg.heads)?)?;
            hs = (&hs + block.mlp.forward(&hs)?)?;
        }
        let out = candle_nn::ops::silu(&self.decoder1.forward(&self.final_norm.forward(&hs)?)?)?;
        self.decoder2
            .forward(&out)?
            .reshape((b, a * self.cfg.out_per_agent))
    }

    /// What the network reads of `cond`'s context (maps `[B, C, s, s]`) in `dtype`.
    /// A network whose weights are frozen (not `Var`s, so they cannot change between
    /// calls) keeps the last encoding and reuses it for the same context tensor.
    fn encode_context(&self, cond: &Cond, dtype: DType) -> Result<SceneMaps> {
        let Some(maps) = &cond.context else {
            bail!("scene transformer: needs the scenes' maps as the condition's context, got none");
        };
        if self.map.conv1.weight.is_variable() {
            return self.encode_maps(&maps.to_dtype(dtype)?);
        }
        let mut memo = self.memo.lock().expect("the memo lock is never poisoned");
        if let Some((id, dt, encoded)) = memo.as_ref() {
            if *id == maps.id() && *dt == dtype {
                return Ok(encoded.clone());
            }
        }
        let encoded = self.encode_maps(&maps.to_dtype(dtype)?)?;
        *memo = Some((maps.id(), dtype, encoded.clone()));
        Ok(encoded)
    }
}

/// The network on the maps in the condition's context: `F(x, c_noise, maps)`.
impl NoiseNet for SceneTransformer {
    fn forward(&self, x: &Tensor, c_noise: &Tensor, cond: &Cond) -> Result<Tensor> {
        let maps = self.encode_context(cond, x.dtype())?;
        self.forward_maps(x, c_noise, &maps)
    }

    fn out_dim(&self) -> usize {
        self.cfg.agents * self.cfg.out_per_agent
    }
}

/// A batch's maps as a [`SceneTransformer`] reads them ([`SceneTransformer::encode_maps`]):
/// the encoder's tokens `[B, T, H]` and, for a [`MapProbe`], the rasters `[B, C·s²]`.
#[derive(Debug, Clone)]
pub struct SceneMaps {
    pub tokens: Tensor,
    pub raster: Option<Tensor>,
}

impl SceneMaps {
    /// Scenes `start .. start + len`.
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        Ok(Self {
            tokens: self.tokens.narrow(0, start, len)?,
            raster: match &self.raster {
                Some(r) => Some(r.narrow(0, start, len)?),
                None => None,
            },
        })
    }

    /// The same in `dtype` (no copy if already so).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(Self {
            tokens: self.tokens.to_dtype(dtype)?,
            raster: match &self.raster {
                Some(r) => Some(r.to_dtype(dtype)?),
                None => None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_probe_reads_the_raster_bilinearly() -> Result<()> {
        // One layer, and two (the second an affine function of the first: -3 v + 5).
        for channels in [1, 2] {
            probe_check(channels)?;
        }
        Ok(())
    }

    fn probe_check(channels: usize) -> Result<()> {
        let dev = Device::Cpu;
        let cells = 8;
        let plane = cells * cells;
        // value = column + 10 · row: bilinear interpolation reproduces it exactly.
        let linear = |k: usize| (k % cells) as f64 + 10.0 * (k / cells) as f64;
        let layer = |ch: usize, value: f64| if ch == 0 { value } else { -3.0 * value + 5.0 };
        let v: Vec<f64> = (0..channels * plane)
            .map(|i| layer(i / plane, linear(i % plane)))
            .collect();
        let raster = Tensor::from_vec(v, (1, channels * plane), &dev)?;
        let probe = MapProbe {
            scale: [2.0, 1.0],
            offset: [1.0, 3.0],
            side: 3,
            spacing: 0.5,
        };
        // The second agent's grid sticks out of the map at the right and the top.
        let agents = [(1.2, 0.7), (3.1, -2.9)];
        let flat: Vec<f64> = agents.iter().flat_map(|&(x, y)| [x, y]).collect();
        let pos = candle_core::Var::from_vec(flat, (1, 2, 2), &dev)?;
        let read = probe.read(pos.as_tensor(), &raster, cells)?;
        assert_eq!(read.dims(), &[1, 2, channels * 9]);
        let got = read.flatten_all()?.to_vec1::<f64>()?;
        let mut inside_per_agent = [0.0; 2];
        for (a, &(x, y)) in agents.iter().enumerate() {
            for r in 0..3 {
                for c in 0..3 {
                    let col = x * 2.0 + 1.0 + (c as f64 - 1.0) * 0.5;
                    let row = y + 3.0 + (r as f64 - 1.0) * 0.5;
                    let inside = (0.0..=7.0).contains(&col) && (0.0..=7.0).contains(&row);
                    inside_per_agent[a] += f64::from(u8::from(inside));
                    for ch in 0..channels {
                        let want = if inside {
                            layer(ch, col + 10.0 * row)
                        } else {
                            0.0
                        };
                        let k = (a * channels + ch) * 9 + r * 3 + c;
                        assert!(
                            (got[k] - want).abs() < 1e-9,
                            "agent {a}, channel {ch}, point ({r}, {c}): {} vs {want}",
                            got[k]
                        );
                    }
                }
            }
        }
        assert!(inside_per_agent[1] > 0.0 && inside_per_agent[1] < 9.0);
        // d value / d x = 2 (scale) · 1 (per column), d value / d y = 1 · 10, inside
        // only; the second layer's derivatives are −3 times those.
        let per_layer: f64 = (0..channels)
            .map(|ch| if ch == 0 { 1.0 } else { -3.0 })
            .sum();
        let grads = read.sum_all()?.backward()?;
        let g = grads
            .get(pos.as_tensor())
            .expect("position gradient")
            .flatten_all()?
            .to_vec1::<f64>()?;
        for a in 0..2 {
            let want = per_layer * inside_per_agent[a];
            assert!((g[2 * a] - 2.0 * want).abs() < 1e-9, "{g:?}");
            assert!((g[2 * a + 1] - 10.0 * want).abs() < 1e-9, "{g:?}");
        }
        Ok(())
    }

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
