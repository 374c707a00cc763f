//! A U-Net for images in the style of DDPM++ / NCSN++ (Song et al. 2021) and ADM:
//! residual blocks that take the noise-level embedding, self-attention at the low
//! resolutions, stride-2 convolutions down and nearest-upsampling convolutions up, skip
//! connections from every encoder block to the decoder, skip rescaling by 1/√2. With
//! [`UNetOutput::Pooled`] only the encoder half and the middle are built and pooled to
//! a few values per image: a noise-conditioned classifier of the same architecture (as
//! ADM's classifier). Convolutions and group norms run on `scoreguide_kernels`' fused
//! CPU ops (candle's own kernels off the CPU).
//!
//! Rows in, rows out: `x: [B, C·S·S]` (or `[B, C, S, S]`) and the output has `x`'s shape
//! (an image network) or is `[B, n]` (pooled), so the samplers, losses and
//! preconditioning that work on rows take images unchanged.

use crate::embedding::SinusoidalEmbedding;
use crate::layers::{groups_for, image_input, Conv, Dense, GroupNorm};
use crate::net::NoiseNet;
use candle_core::{bail, DType, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use scoreguide_guidance::Cond;
use scoreguide_kernels::{batched_matmul, softmax_last_dim, Conv2dSpec};
use serde::{Deserialize, Serialize};

/// What a [`UNet`] outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UNetOutput {
    /// An image of the input's shape (a score, ε or x0 network).
    #[default]
    Image,
    /// `n` values per image from the encoder half, averaged over positions (a
    /// classifier of the U-Net's architecture).
    Pooled(usize),
}

/// Shape of a [`UNet`]; the constructor's arguments are the config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    /// Image channels (1 grey, 3 colour).
    pub channels: usize,
    /// Side of the (square) images: a multiple of 2^(levels − 1).
    pub size: usize,
    /// Feature channels of the first level.
    pub base_channels: usize,
    /// Channels of each level as multiples of `base_channels`; every level after the
    /// first halves the resolution.
    pub multipliers: Vec<usize>,
    pub blocks_per_level: usize,
    /// Sides at which each residual block is followed by self-attention (the middle
    /// always has one).
    pub attention_resolutions: Vec<usize>,
    pub heads: usize,
    /// Dropout in every residual block while training (weights that are `Var`s).
    pub dropout: f64,
    /// Most group-norm groups: a layer of C channels uses the largest count up to this
    /// that divides C and leaves at least 4 channels per group (DDPM++'s min(C/4, 32)).
    pub groups: usize,
    pub embedding: SinusoidalEmbedding,
    /// Class labels embedded beside the noise level (0: unconditional); the labels come
    /// in the condition's `labels`.
    #[serde(default)]
    pub classes: usize,
    #[serde(default)]
    pub output: UNetOutput,
}

impl UNetConfig {
    /// A CPU-sized DDPM++ for 28 × 28 grey images (Fashion-MNIST, MNIST): 32 channels,
    /// levels ×1, ×2, ×2 (28, 14, 7), 2 blocks per level, attention at 7 × 7.
    pub fn small_grey() -> Self {
        Self {
            channels: 1,
            size: 28,
            base_channels: 32,
            multipliers: vec![1, 2, 2],
            blocks_per_level: 2,
            attention_resolutions: vec![7],
            heads: 1,
            dropout: 0.1,
            groups: 32,
            embedding: SinusoidalEmbedding {
                dim: 64,
                max_freq: 1000.0,
            },
            classes: 0,
            output: UNetOutput::Image,
        }
    }

    /// DDPM++ for 32 × 32 colour images (CIFAR-10/100) at CPU size: 64 channels, levels
    /// ×1, ×2, ×2, ×2 (32 … 4), 2 blocks per level, attention at 16 and 8. The paper's
    /// model has 128 channels and 4 blocks per level.
    pub fn small_colour() -> Self {
        Self {
            channels: 3,
            size: 32,
            base_channels: 64,
            multipliers: vec![1, 2, 2, 2],
            attention_resolutions: vec![16, 8],
            ..Self::small_grey()
        }
    }

    pub fn levels(&self) -> usize {
        self.multipliers.len()
    }

    /// Values per image in.
    pub fn in_dim(&self) -> usize {
        self.channels * self.size * self.size
    }

    pub fn out_dim(&self) -> usize {
        match self.output {
            UNetOutput::Image => self.in_dim(),
            UNetOutput::Pooled(n) => n,
        }
    }

    /// Group-norm groups for `c` channels.
    fn groups_for(&self, c: usize) -> usize {
        groups_for(c, self.groups)
    }

    pub fn validate(&self) -> Result<()> {
        let levels = self.levels();
        if self.channels == 0 || self.base_channels == 0 || levels == 0 || self.heads == 0 {
            bail!("U-Net: channels, base_channels, multipliers and heads must be non-empty and positive, got {self:?}");
        }
        if self.multipliers.contains(&0) {
            bail!(
                "U-Net: channel multipliers must be positive, got {:?}",
                self.multipliers
            );
        }
        let factor = 1usize << (levels - 1);
        if self.size == 0 || self.size % factor != 0 {
            bail!(
                "U-Net: the image side ({}) must be a positive multiple of {factor} for {levels} levels",
                self.size
            );
        }
        for m in &self.multipliers {
            let c = m * self.base_channels;
            if c % self.heads != 0 {
                bail!(
                    "U-Net: {c} channels do not split into {} attention heads",
                    self.heads
                );
            }
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("U-Net: dropout must be in [0, 1), got {}", self.dropout);
        }
        if self.groups == 0 {
            bail!("U-Net: groups must be positive");
        }
        if let UNetOutput::Pooled(0) = self.output {
            bail!("U-Net: a pooled output needs at least one value");
        }
        self.embedding.validate()
    }
}

const SKIP_SCALE: f64 = std::f64::consts::FRAC_1_SQRT_2;

struct ResBlock {
    norm1: GroupNorm,
    conv1: Conv,
    /// The noise embedding → a bias per image and channel of `conv1`.
    embedding: Dense,
    norm2: GroupNorm,
    conv2: Conv,
    skip: Option<Conv>,
}

impl ResBlock {
    fn new(cfg: &UNetConfig, cin: usize, cout: usize, emb: usize, vb: VarBuilder) -> Result<Self> {
        let same = Conv2dSpec::same(1);
        Ok(Self {
            norm1: GroupNorm::new(cin, cfg.groups_for(cin), vb.pp("norm1"))?,
            conv1: Conv::new(cin, cout, 3, same, false, false, vb.pp("conv1"))?,
            embedding: Dense::new(emb, cout, vb.pp("embedding"))?,
            norm2: GroupNorm::new(cout, cfg.groups_for(cout), vb.pp("norm2"))?,
            conv2: Conv::new(cout, cout, 3, same, true, true, vb.pp("conv2"))?,
            skip: match cin == cout {
                true => None,
                false => Some(Conv::new(
                    cin,
                    cout,
                    1,
                    Conv2dSpec::default(),
                    false,
                    true,
                    vb.pp("skip"),
                )?),
            },
        })
    }

    fn forward(&self, x: &Tensor, emb: &Tensor, dropout: &Dropout) -> Result<Tensor> {
        let h = self.norm1.forward(x, true)?;
        let h = self
            .conv1
            .forward_with_bias(&h, &self.embedding.forward(emb)?)?;
        let h = dropout.apply(&self.norm2.forward(&h, true)?)?;
        let h = self.conv2.forward(&h)?;
        let skip = match &self.skip {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        (skip + h)? * SKIP_SCALE
    }
}

/// Multi-head self-attention over the positions of a feature map.
struct Attention {
    norm: GroupNorm,
    qkv: Conv,
    out: Conv,
    heads: usize,
}

impl Attention {
    fn new(cfg: &UNetConfig, c: usize, vb: VarBuilder) -> Result<Self> {
        let one = Conv2dSpec::default();
        Ok(Self {
            norm: GroupNorm::new(c, cfg.groups_for(c), vb.pp("norm"))?,
            qkv: Conv::new(c, 3 * c, 1, one, false, true, vb.pp("qkv"))?,
            out: Conv::new(c, c, 1, one, true, true, vb.pp("out"))?,
            heads: cfg.heads,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let (heads, dh) = (self.heads, c / self.heads);
        let qkv =
            self.qkv
                .forward(&self.norm.forward(x, false)?)?
                .reshape((b, 3 * heads, dh, h * w))?;
        let q = qkv.narrow(1, 0, heads)?;
        let k = qkv.narrow(1, heads, heads)?;
        let v = qkv.narrow(1, 2 * heads, heads)?;
        // scores[i, j] = q_i · k_j / √d over positions i, j.
        let scores = (batched_matmul(&q.transpose(2, 3)?, &k)? * (1.0 / (dh as f64).sqrt()))?;
        let attn = softmax_last_dim(&scores)?; // [B, heads, HW, HW]
        let out = batched_matmul(&v, &attn.transpose(2, 3)?)?.reshape((b, c, h, w))?;
        (x + self.out.forward(&out)?)? * SKIP_SCALE
    }
}

/// Dropout whose masks are a function of the batch (a hash of its noise levels and a
/// few input values) and the layer: deterministic by seed and exact on resume, with no
/// generator state to checkpoint (candle's CPU generator cannot be seeded).
struct Dropout {
    p: f64,
    seed: Option<u64>,
    layer: std::cell::Cell<u64>,
}

impl Dropout {
    fn off() -> Self {
        Self {
            p: 0.0,
            seed: None,
            layer: std::cell::Cell::new(0),
        }
    }

    fn for_batch(p: f64, x: &Tensor, c_noise: &Tensor) -> Result<Self> {
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        let mut feed = |v: f32| {
            hash ^= v.to_bits() as u64;
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        };
        c_noise
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .into_iter()
            .for_each(&mut feed);
        let flat = x.flatten_all()?;
        let n = flat.elem_count().min(64);
        flat.narrow(0, 0, n)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .into_iter()
            .for_each(&mut feed);
        Ok(Self {
            p,
            seed: Some(hash),
            layer: std::cell::Cell::new(0),
        })
    }

    fn apply(&self, h: &Tensor) -> Result<Tensor> {
        let Some(seed) = self.seed.filter(|_| self.p > 0.0) else {
            return Ok(h.clone());
        };
        let layer = self.layer.get();
        self.layer.set(layer + 1);
        let mut state = seed ^ layer.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let keep = 1.0 / (1.0 - self.p) as f32;
        let threshold = (self.p * (u32::MAX as f64)) as u32;
        let mask: Vec<f32> = (0..h.elem_count())
            .map(|_| {
                // splitmix64
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                if ((z >> 32) as u32) < threshold {
                    0.0
                } else {
                    keep
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, h.shape(), h.device())?.to_dtype(h.dtype())?;
        h * mask
    }
}

enum Stage {
    Block(Box<(ResBlock, Option<Attention>)>),
    Down(Conv),
    Up(Conv),
}

impl Stage {
    /// Block `i` of a level, `cin → cout` channels at side `side`, followed by attention
    /// where the configuration asks for it there.
    fn block(
        cfg: &UNetConfig,
        (cin, cout, emb): (usize, usize, usize),
        side: usize,
        i: usize,
        vb: &VarBuilder,
    ) -> Result<Self> {
        let block = ResBlock::new(cfg, cin, cout, emb, vb.pp(format!("block{i}")))?;
        let attn = match cfg.attention_resolutions.contains(&side) {
            true => Some(Attention::new(cfg, cout, vb.pp(format!("attn{i}")))?),
            false => None,
        };
        Ok(Self::Block(Box::new((block, attn))))
    }

    fn forward(&self, h: &Tensor, emb: &Tensor, dropout: &Dropout) -> Result<Tensor> {
        match self {
            Self::Block(b) => {
                let (block, attn) = b.as_ref();
                let h = block.forward(h, emb, dropout)?;
                match attn {
                    Some(a) => a.forward(&h),
                    None => Ok(h),
                }
            }
            Self::Down(conv) | Self::Up(conv) => conv.forward(h),
        }
    }
}

/// See the module documentation and [`UNetConfig`].
pub struct UNet {
    cfg: UNetConfig,
    input: Conv,
    embed1: Dense,
    embed2: Dense,
    labels: Option<Tensor>,
    down: Vec<Stage>,
    middle: (ResBlock, Attention, ResBlock),
    up: Vec<Stage>,
    out_norm: GroupNorm,
    out: OutputHead,
}

enum OutputHead {
    Image(Conv),
    Pooled(Dense),
}

impl UNet {
    pub fn new(cfg: UNetConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let base = cfg.base_channels;
        let emb = 4 * base;
        let same = Conv2dSpec::same(1);
        let input = Conv::new(cfg.channels, base, 3, same, false, true, vb.pp("input"))?;
        let mut down = Vec::new();
        // Channels of every encoder output the decoder takes as a skip connection.
        let mut skips = vec![base];
        let (mut ch, mut side) = (base, cfg.size);
        for (level, &m) in cfg.multipliers.iter().enumerate() {
            let vb = vb.pp(format!("down{level}"));
            for i in 0..cfg.blocks_per_level {
                down.push(Stage::block(&cfg, (ch, m * base, emb), side, i, &vb)?);
                ch = m * base;
                skips.push(ch);
            }
            if level + 1 < cfg.levels() {
                let spec = Conv2dSpec {
                    stride: 2,
                    padding: 1,
                    upsample: 1,
                };
                down.push(Stage::Down(Conv::new(
                    ch,
                    ch,
                    3,
                    spec,
                    false,
                    true,
                    vb.pp("downsample"),
                )?));
                skips.push(ch);
                side /= 2;
            }
        }
        let middle = (
            ResBlock::new(&cfg, ch, ch, emb, vb.pp("middle.block0"))?,
            Attention::new(&cfg, ch, vb.pp("middle.attn"))?,
            ResBlock::new(&cfg, ch, ch, emb, vb.pp("middle.block1"))?,
        );
        let mut up = Vec::new();
        if cfg.output == UNetOutput::Image {
            for (level, &m) in cfg.multipliers.iter().enumerate().rev() {
                let vb = vb.pp(format!("up{level}"));
                for i in 0..=cfg.blocks_per_level {
                    let skip = skips.pop().expect("one skip per encoder output");
                    up.push(Stage::block(
                        &cfg,
                        (ch + skip, m * base, emb),
                        side,
                        i,
                        &vb,
                    )?);
                    ch = m * base;
                }
                if level > 0 {
                    let spec = Conv2dSpec {
                        stride: 1,
                        padding: 1,
                        upsample: 2,
                    };
                    up.push(Stage::Up(Conv::new(
                        ch,
                        ch,
                        3,
                        spec,
                        false,
                        true,
                        vb.pp("upsample"),
                    )?));
                    side *= 2;
                }
            }
        }
        let out_norm = GroupNorm::new(ch, cfg.groups_for(ch), vb.pp("out_norm"))?;
        let out = match cfg.output {
            UNetOutput::Image => OutputHead::Image(Conv::new(
                ch,
                cfg.channels,
                3,
                same,
                true,
                true,
                vb.pp("out"),
            )?),
            UNetOutput::Pooled(n) => OutputHead::Pooled(Dense::new(ch, n, vb.pp("out"))?),
        };
        let labels = match cfg.classes {
            0 => None,
            k => Some(vb.get_with_hints(
                (k, emb),
                "label_embedding",
                Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            )?),
        };
        Ok(Self {
            embed1: Dense::new(cfg.embedding.dim, emb, vb.pp("embed1"))?,
            embed2: Dense::new(emb, emb, vb.pp("embed2"))?,
            cfg,
            input,
            labels,
            down,
            middle,
            up,
            out_norm,
            out,
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }

    fn training(&self) -> bool {
        self.input.weight.is_variable()
    }

    /// SiLU of the noise (and label) embedding, `[B, 4·base]`: what every block reads.
    fn embedding(&self, c_noise: &Tensor, cond: &Cond, dtype: DType) -> Result<Tensor> {
        let e = self.cfg.embedding.forward(&c_noise.to_dtype(dtype)?)?;
        let e = self.embed1.forward_silu(&e)?;
        let e = self.embed2.forward(&e)?;
        let e = match (&self.labels, &cond.labels) {
            (None, _) => e,
            (Some(table), Some(labels)) => {
                if labels.dims() != [e.dim(0)?] {
                    bail!(
                        "U-Net: labels must be [{}], got {:?}",
                        e.dim(0)?,
                        labels.dims()
                    );
                }
                let max = labels.max(0)?.to_dtype(DType::U32)?.to_scalar::<u32>()? as usize;
                if max >= self.cfg.classes {
                    bail!(
                        "U-Net: label {max} out of range for {} classes",
                        self.cfg.classes
                    );
                }
                (e + table.index_select(labels, 0)?)?
            }
            (Some(_), None) => {
                bail!("U-Net: a class-conditional network needs the labels in its condition")
            }
        };
        scoreguide_kernels::silu(&e)
    }
}

impl NoiseNet for UNet {
    fn forward(&self, x: &Tensor, c_noise: &Tensor, cond: &Cond) -> Result<Tensor> {
        let image = image_input(x, c_noise, (self.cfg.channels, self.cfg.size), "U-Net")?;
        let emb = self.embedding(c_noise, cond, x.dtype())?;
        let dropout = match self.training() && self.cfg.dropout > 0.0 {
            true => Dropout::for_batch(self.cfg.dropout, x, c_noise)?,
            false => Dropout::off(),
        };
        let mut h = self.input.forward(&image)?;
        let mut skips = vec![h.clone()];
        for stage in &self.down {
            h = stage.forward(&h, &emb, &dropout)?;
            skips.push(h.clone());
        }
        h = self.middle.0.forward(&h, &emb, &dropout)?;
        h = self.middle.1.forward(&h)?;
        h = self.middle.2.forward(&h, &emb, &dropout)?;
        for stage in &self.up {
            // Every decoder block reads its encoder output beside the features.
            if let Stage::Block(_) = stage {
                let skip = skips.pop().expect("one skip per encoder output");
                h = Tensor::cat(&[&h, &skip], 1)?;
            }
            h = stage.forward(&h, &emb, &dropout)?;
        }
        let h = self.out_norm.forward(&h, true)?;
        match &self.out {
            OutputHead::Image(conv) => conv.forward(&h)?.reshape(x.shape()),
            OutputHead::Pooled(dense) => dense.forward(&h.mean((2, 3))?),
        }
    }

    fn out_dim(&self) -> usize {
        self.cfg.out_dim()
    }
}
