//! A noise-conditioned ResNet classifier for images (DLSM's classifier: ResNet-18 or -34
//! whose every residual block also reads an embedding of the noise level), or the same
//! without the noise branch (the classifier of clean images that CAS trains). Pre-
//! activation blocks (He et al. 2016, "Identity mappings") with group norm and SiLU: smooth in its input,
//! so ∇x log p(y | x) for guidance and its derivatives for the DLSM loss are well
//! defined, and independent of the batch (a batch norm would couple the rows of a
//! guidance batch). A CIFAR-style stem (one 3 × 3 convolution, no pooling), stages of
//! width w, 2w, 4w, 8w (the first at stride 1, the others halving the resolution),
//! global average pooling and a linear head to `classes` logits.

use crate::embedding::SinusoidalEmbedding;
use crate::layers::{groups_for, image_input, Conv, Dense, GroupNorm};
use crate::net::NoiseNet;
use candle_core::{bail, Result, Tensor};
use candle_nn::VarBuilder;
use scoreguide_guidance::Cond;
use scoreguide_kernels::Conv2dSpec;
use serde::{Deserialize, Serialize};

/// Shape of a [`ResNet`]; the constructor's arguments are the config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResNetConfig {
    /// Image channels and side (square images).
    pub channels: usize,
    pub size: usize,
    /// Residual blocks per stage: `[2, 2, 2, 2]` is ResNet-18, `[3, 4, 6, 3]` ResNet-34.
    pub blocks: Vec<usize>,
    /// Channels of the first stage (64 in the paper's ResNets); each stage doubles them.
    pub width: usize,
    pub classes: usize,
    /// The noise level's embedding, added to every block; `None`: a classifier of
    /// clean images that ignores the noise condition.
    pub noise_embedding: Option<SinusoidalEmbedding>,
    /// Most group-norm groups (each layer uses the largest count up to this that
    /// divides its channels and leaves at least 4 per group).
    pub groups: usize,
}

impl ResNetConfig {
    /// ResNet-18 of `width` for `classes` classes of `channels × size × size` images,
    /// noise-conditioned.
    pub fn resnet18(channels: usize, size: usize, classes: usize, width: usize) -> Self {
        Self {
            channels,
            size,
            blocks: vec![2, 2, 2, 2],
            width,
            classes,
            noise_embedding: Some(SinusoidalEmbedding {
                dim: 64,
                max_freq: 1000.0,
            }),
            groups: 32,
        }
    }

    /// ResNet-34 (blocks 3, 4, 6, 3), otherwise as [`ResNetConfig::resnet18`].
    pub fn resnet34(channels: usize, size: usize, classes: usize, width: usize) -> Self {
        Self {
            blocks: vec![3, 4, 6, 3],
            ..Self::resnet18(channels, size, classes, width)
        }
    }

    /// The same network without the noise branch (CAS's classifier of clean images).
    pub fn noise_free(self) -> Self {
        Self {
            noise_embedding: None,
            ..self
        }
    }

    pub fn in_dim(&self) -> usize {
        self.channels * self.size * self.size
    }

    fn groups_for(&self, c: usize) -> usize {
        groups_for(c, self.groups)
    }

    pub fn validate(&self) -> Result<()> {
        if self.channels == 0 || self.size == 0 || self.width == 0 || self.classes == 0 {
            bail!("ResNet: channels, size, width and classes must be positive, got {self:?}");
        }
        if self.blocks.is_empty() || self.blocks.contains(&0) {
            bail!(
                "ResNet: every stage needs at least one block, got {:?}",
                self.blocks
            );
        }
        if self.groups == 0 {
            bail!("ResNet: groups must be positive");
        }
        match &self.noise_embedding {
            Some(e) => e.validate(),
            None => Ok(()),
        }
    }
}

/// A pre-activation basic block: SiLU(GN(x)) → 3×3 conv (stride s) + the noise
/// embedding's bias → SiLU(GN) → 3×3 conv, plus the shortcut (a strided 1×1 conv of the
/// activated input where the shape changes).
struct Block {
    norm1: GroupNorm,
    conv1: Conv,
    embedding: Option<Dense>,
    norm2: GroupNorm,
    conv2: Conv,
    shortcut: Option<Conv>,
}

impl Block {
    fn new(
        cfg: &ResNetConfig,
        cin: usize,
        cout: usize,
        stride: usize,
        emb: Option<usize>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let spec = Conv2dSpec {
            stride,
            padding: 1,
            upsample: 1,
        };
        Ok(Self {
            norm1: GroupNorm::new(cin, cfg.groups_for(cin), vb.pp("norm1"))?,
            conv1: Conv::new(cin, cout, 3, spec, false, emb.is_none(), vb.pp("conv1"))?,
            embedding: emb
                .map(|e| Dense::new(e, cout, vb.pp("embedding")))
                .transpose()?,
            norm2: GroupNorm::new(cout, cfg.groups_for(cout), vb.pp("norm2"))?,
            conv2: Conv::new(
                cout,
                cout,
                3,
                Conv2dSpec::same(1),
                false,
                true,
                vb.pp("conv2"),
            )?,
            shortcut: match stride == 1 && cin == cout {
                true => None,
                false => {
                    let spec = Conv2dSpec {
                        stride,
                        ..Conv2dSpec::default()
                    };
                    Some(Conv::new(
                        cin,
                        cout,
                        1,
                        spec,
                        false,
                        true,
                        vb.pp("shortcut"),
                    )?)
                }
            },
        })
    }

    fn forward(&self, x: &Tensor, emb: Option<&Tensor>) -> Result<Tensor> {
        let a = self.norm1.forward(x, true)?;
        let h = match (&self.embedding, emb) {
            (Some(d), Some(e)) => self.conv1.forward_with_bias(&a, &d.forward(e)?)?,
            _ => self.conv1.forward(&a)?,
        };
        let h = self.conv2.forward(&self.norm2.forward(&h, true)?)?;
        let shortcut = match &self.shortcut {
            Some(c) => c.forward(&a)?,
            None => x.clone(),
        };
        shortcut + h
    }
}

/// See the module documentation and [`ResNetConfig`]: `x: [B, C·S·S]` (or `[B, C, S,
/// S]`) and the noise condition `[B]` → logits `[B, classes]`.
pub struct ResNet {
    cfg: ResNetConfig,
    stem: Conv,
    embed: Option<(Dense, Dense)>,
    blocks: Vec<Block>,
    out_norm: GroupNorm,
    head: Dense,
}

impl ResNet {
    pub fn new(cfg: ResNetConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let w = cfg.width;
        let emb = cfg.noise_embedding.map(|_| 4 * w);
        let embed = match (&cfg.noise_embedding, emb) {
            (Some(e), Some(d)) => Some((
                Dense::new(e.dim, d, vb.pp("embed1"))?,
                Dense::new(d, d, vb.pp("embed2"))?,
            )),
            _ => None,
        };
        let stem = Conv::new(
            cfg.channels,
            w,
            3,
            Conv2dSpec::same(1),
            false,
            true,
            vb.pp("stem"),
        )?;
        let mut blocks = Vec::new();
        let mut ch = w;
        for (stage, &n) in cfg.blocks.iter().enumerate() {
            let cout = w << stage;
            for i in 0..n {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                blocks.push(Block::new(
                    &cfg,
                    ch,
                    cout,
                    stride,
                    emb,
                    vb.pp(format!("stage{stage}.block{i}")),
                )?);
                ch = cout;
            }
        }
        Ok(Self {
            out_norm: GroupNorm::new(ch, cfg.groups_for(ch), vb.pp("out_norm"))?,
            head: Dense::new(ch, cfg.classes, vb.pp("head"))?,
            cfg,
            stem,
            embed,
            blocks,
        })
    }

    pub fn config(&self) -> &ResNetConfig {
        &self.cfg
    }

    /// The pooled features before the head, `[B, w·2^(stages−1)]` (8w for ResNet-18; a domain feature network for a
    /// quick FID of images: the noise-free classifier's penultimate layer).
    pub fn features(&self, x: &Tensor, c_noise: &Tensor) -> Result<Tensor> {
        let image = image_input(x, c_noise, (self.cfg.channels, self.cfg.size), "ResNet")?;
        let emb = match &self.embed {
            Some((e1, e2)) => {
                let e = self
                    .cfg
                    .noise_embedding
                    .expect("an embedding for the layers")
                    .forward(&c_noise.to_dtype(x.dtype())?)?;
                Some(scoreguide_kernels::silu(
                    &e2.forward(&e1.forward_silu(&e)?)?,
                )?)
            }
            None => None,
        };
        let mut h = self.stem.forward(&image)?;
        for block in &self.blocks {
            h = block.forward(&h, emb.as_ref())?;
        }
        self.out_norm.forward(&h, true)?.mean((2, 3))
    }
}

impl NoiseNet for ResNet {
    fn forward(&self, x: &Tensor, c_noise: &Tensor, _cond: &Cond) -> Result<Tensor> {
        self.head.forward(&self.features(x, c_noise)?)
    }

    fn out_dim(&self) -> usize {
        self.cfg.classes
    }
}
