//! An MDM-style motion transformer (Tevet et al. 2023): frames as tokens behind one token
//! of the noise level and the action label, a transformer encoder with the padding
//! frames masked out of attention, and per-frame outputs (a score network) or the first
//! token's (a classifier of motions).
//!
//! Input `[B, T·F]` (T frames of F features), a noise condition `[B]`, and from the
//! [`Cond`]: `labels` `[B]` (the action; the value `labels` itself is "no label", what
//! classifier-free dropout trains on and an unconditional draw passes) and `mask`
//! `[B, T]` (1 for a real frame; all frames when absent). Per frame a linear map to
//! `hidden` plus a sinusoidal position code; the first token is an MLP of the sinusoidal
//! noise embedding plus the label's embedding (MDM's timestep embedder and its text
//! embedding); `blocks` × (pre-norm masked self-attention, MLP), residual; a final norm
//! and a linear map per frame to F values (padding frames output 0; with `input_skip`,
//! plus the frame's input through the identity and a learned linear correction), or
//! from the first token to `k` logits.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use scoreguide_guidance::Cond;
//! use scoreguide_nets::{MotionOutput, MotionTransformer, MotionTransformerConfig, NoiseNet, ParamStore};
//! let cfg = MotionTransformerConfig { frames: 5, features: 3, ..MotionTransformerConfig::small(6) };
//! let store = ParamStore::new(0);
//! let net = MotionTransformer::new(cfg, store.var_builder(DType::F32, &Device::Cpu))?;
//! let x = Tensor::ones((2, 15), DType::F32, &Device::Cpu)?;
//! let c = Tensor::new(&[10f32, 900.0], &Device::Cpu)?;
//! let mask = Tensor::new(&[[1f32, 1., 1., 0., 0.], [1., 1., 1., 1., 1.]], &Device::Cpu)?;
//! let cond = Cond::labels(Tensor::new(&[2u32, 6], &Device::Cpu)?).with_mask(mask);
//! let out = net.forward(&x, &c, &cond)?;
//! assert_eq!(out.dims(), &[2, 15]);
//! assert_eq!(out.get(0)?.narrow(0, 9, 6)?.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
//! # Ok::<(), candle_core::Error>(())
//! ```

use crate::embedding::SinusoidalEmbedding;
use crate::layers::{Dense, LayerNorm, Mlp};
use crate::net::NoiseNet;
use candle_core::{bail, DType, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};
use scoreguide_guidance::Cond;
use serde::{Deserialize, Serialize};

/// What a [`MotionTransformer`] outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MotionOutput {
    /// F values per frame: a score network.
    Frames,
    /// k values from the noise/label token: a classifier of whole motions.
    Pooled(usize),
}

/// Shape of a [`MotionTransformer`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MotionTransformerConfig {
    pub frames: usize,
    pub features: usize,
    pub hidden: usize,
    pub heads: usize,
    pub blocks: usize,
    /// Width of each block's MLP as a multiple of `hidden`.
    pub mlp_ratio: usize,
    /// Action labels the network embeds (0: none, no label branch).
    pub labels: usize,
    pub time_embedding: SinusoidalEmbedding,
    /// Multiplies the noise condition before its embedding (1e-3 for DDPM's step index
    /// 0–999; 1 for EDM's ¼ ln σ).
    pub time_scale: f64,
    pub output: MotionOutput,
    /// Each frame's input added to its output through the identity plus a learned
    /// linear map that starts at zero (`Frames` only): at high noise an ε-predicting
    /// network must return its input almost exactly (ε ≈ x_t there, and x̂0 = (x_t −
    /// √(1−ᾱ) ε̂)/√ᾱ multiplies the error by σ), which the token embedding, norms and
    /// readout pass only to ~1% (U-ViT's long skips answer the same need).
    #[serde(default)]
    pub input_skip: bool,
}

impl MotionTransformerConfig {
    /// A CPU-sized score network over `labels` actions: hidden 128, 4 heads, 4 blocks.
    pub fn small(labels: usize) -> Self {
        Self {
            frames: 60,
            features: HUMANML3D_FEATURES,
            hidden: 128,
            heads: 4,
            blocks: 4,
            mlp_ratio: 2,
            labels,
            time_embedding: SinusoidalEmbedding {
                dim: 64,
                max_freq: 1000.0,
            },
            time_scale: 1e-3,
            output: MotionOutput::Frames,
            input_skip: false,
        }
    }

    pub fn in_dim(&self) -> usize {
        self.frames * self.features
    }

    pub fn out_dim(&self) -> usize {
        match self.output {
            MotionOutput::Frames => self.in_dim(),
            MotionOutput::Pooled(k) => k,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.frames == 0 || self.features == 0 || self.blocks == 0 || self.mlp_ratio == 0 {
            bail!("motion transformer: frames, features, blocks and mlp_ratio must be positive, got {self:?}");
        }
        if self.heads == 0 || self.hidden == 0 || self.hidden % self.heads != 0 {
            bail!("motion transformer: hidden must be a positive multiple of heads, got {self:?}");
        }
        if self.input_skip && self.output != MotionOutput::Frames {
            bail!("motion transformer: input_skip needs per-frame output");
        }
        if self.output == MotionOutput::Pooled(0) {
            bail!("motion transformer: a pooled output needs at least one value");
        }
        if !(self.time_scale > 0.0 && self.time_scale.is_finite()) {
            bail!(
                "motion transformer: time_scale must be positive, got {}",
                self.time_scale
            );
        }
        self.time_embedding.validate()
    }
}

/// Features per frame of `scoreguide_oracles::motion`'s layout (root velocities and
/// height, 21 joint positions, 4 contacts).
const HUMANML3D_FEATURES: usize = 4 + 3 * 21 + 4;

struct Block {
    norm: LayerNorm,
    qkv: Dense,
    out: Dense,
    mlp: Mlp,
}

/// See the module documentation.
pub struct MotionTransformer {
    cfg: MotionTransformerConfig,
    input: Dense,
    time1: Dense,
    time2: Dense,
    label: Option<Tensor>,
    blocks: Vec<Block>,
    final_norm: LayerNorm,
    output: Dense,
    skip: Option<Dense>,
}

impl MotionTransformer {
    pub fn new(cfg: MotionTransformerConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let h = cfg.hidden;
        let blocks = (0..cfg.blocks)
            .map(|i| {
                let vb = vb.pp(format!("block{i}"));
                Ok(Block {
                    norm: LayerNorm::new(h, vb.pp("norm"))?,
                    qkv: Dense::new(h, 3 * h, vb.pp("qkv"))?,
                    out: Dense::new(h, h, vb.pp("out"))?,
                    mlp: Mlp {
                        norm: LayerNorm::new(h, vb.pp("mlp.norm"))?,
                        fc1: Dense::new(h, cfg.mlp_ratio * h, vb.pp("mlp.fc1"))?,
                        fc2: Dense::new(cfg.mlp_ratio * h, h, vb.pp("mlp.fc2"))?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let label = match cfg.labels {
            0 => None,
            k => Some(vb.get_with_hints(
                (k + 1, h),
                "label",
                Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            )?),
        };
        let out_dim = match cfg.output {
            MotionOutput::Frames => cfg.features,
            MotionOutput::Pooled(k) => k,
        };
        Ok(Self {
            input: Dense::new(cfg.features, h, vb.pp("input"))?,
            time1: Dense::new(cfg.time_embedding.dim, h, vb.pp("time1"))?,
            time2: Dense::new(h, h, vb.pp("time2"))?,
            label,
            blocks,
            final_norm: LayerNorm::new(h, vb.pp("final_norm"))?,
            output: Dense::new(h, out_dim, vb.pp("output"))?,
            skip: match cfg.input_skip {
                true => Some(Dense::zeros(cfg.features, cfg.features, vb.pp("skip"))?),
                false => None,
            },
            cfg,
        })
    }

    pub fn config(&self) -> &MotionTransformerConfig {
        &self.cfg
    }

    /// `[T, hidden]` sinusoidal codes of the frame index (Vaswani et al.).
    fn positions(&self, dtype: DType, device: &candle_core::Device) -> Result<Tensor> {
        let (t, h) = (self.cfg.frames, self.cfg.hidden);
        let mut p = vec![0f32; t * h];
        for pos in 0..t {
            for i in 0..h / 2 {
                let f = (pos as f64) / 10_000f64.powf(2.0 * i as f64 / h as f64);
                p[pos * h + 2 * i] = f.sin() as f32;
                p[pos * h + 2 * i + 1] = f.cos() as f32;
            }
        }
        Tensor::from_vec(p, (t, h), device)?.to_dtype(dtype)
    }

    /// The frame mask `[B, T]` of `cond`, checked (all ones when absent).
    fn mask(&self, cond: &Cond, b: usize, x: &Tensor) -> Result<Tensor> {
        let t = self.cfg.frames;
        match &cond.mask {
            Some(m) if m.dims() == [b, t] => m.to_dtype(x.dtype()),
            Some(m) => bail!(
                "motion transformer: the frame mask must be [{b}, {t}], got {:?}",
                m.dims()
            ),
            None => Tensor::ones((b, t), x.dtype(), x.device()),
        }
    }
}

impl MotionTransformer {
    /// The normalised tokens `[B, T+1, hidden]` (the noise/label token first) and the
    /// frame mask `[B, T]`.
    fn encode(&self, x: &Tensor, c_noise: &Tensor, cond: &Cond) -> Result<(Tensor, Tensor)> {
        let MotionTransformerConfig {
            frames: t,
            features: f,
            heads,
            ..
        } = self.cfg;
        let b = match x.dims() {
            &[b, d] if d == t * f => b,
            dims => bail!(
                "motion transformer: input must be [batch, {}] ({t} frames × {f} features), got {dims:?}",
                t * f
            ),
        };
        let mask = self.mask(cond, b, x)?;
        let frames = self
            .input
            .forward(&x.reshape((b, t, f))?)?
            .broadcast_add(&self.positions(x.dtype(), x.device())?)?;
        let temb = self
            .cfg
            .time_embedding
            .forward(&(c_noise.to_dtype(x.dtype())? * self.cfg.time_scale)?)?;
        let mut token = self.time2.forward(&self.time1.forward_silu(&temb)?)?; // [B, H]
        if let Some(table) = &self.label {
            let labels = match &cond.labels {
                Some(l) if l.dims() == [b] => l.clone(),
                Some(l) => bail!(
                    "motion transformer: labels must be [{b}], got {:?}",
                    l.dims()
                ),
                // No label: the classifier-free "null" row.
                None => Tensor::full(self.cfg.labels as u32, b, x.device())?,
            };
            let max = labels.max(0)?.to_scalar::<u32>()?;
            if max as usize > self.cfg.labels {
                bail!(
                    "motion transformer: label {max} out of range (labels 0..{}, {} for none)",
                    self.cfg.labels,
                    self.cfg.labels
                );
            }
            token = (token + table.index_select(&labels, 0)?)?;
        }
        let mut hs = Tensor::cat(&[token.unsqueeze(1)?, frames], 1)?; // [B, T+1, H]
                                                                      // Padding frames get −∞ (here −1e9) before the softmax, as keys of every query.
        let keep = Tensor::cat(
            &[Tensor::ones((b, 1), x.dtype(), x.device())?, mask.clone()],
            1,
        )?;
        let bias = ((keep - 1.0)? * 1e9)?.detach(); // [B, T+1]
        for block in &self.blocks {
            let qkv = block.qkv.forward(&block.norm.forward(&hs)?)?;
            let attended = scoreguide_kernels::self_attention(&qkv, heads, Some(&bias))?;
            hs = (&hs + block.out.forward(&attended)?)?;
            hs = (&hs + block.mlp.forward(&hs)?)?;
        }
        Ok((self.final_norm.forward(&hs)?, mask))
    }

    /// The normalised noise/label token `[B, hidden]`: what a pooled output reads (a
    /// classifier's penultimate features, e.g. for FID).
    pub fn pooled_features(&self, x: &Tensor, c_noise: &Tensor, cond: &Cond) -> Result<Tensor> {
        self.encode(x, c_noise, cond)?.0.narrow(1, 0, 1)?.squeeze(1)
    }
}

impl NoiseNet for MotionTransformer {
    fn forward(&self, x: &Tensor, c_noise: &Tensor, cond: &Cond) -> Result<Tensor> {
        let (hs, mask) = self.encode(x, c_noise, cond)?;
        let (b, t, f) = (x.dim(0)?, self.cfg.frames, self.cfg.features);
        match self.cfg.output {
            MotionOutput::Frames => {
                let mut out = self.output.forward(&hs.narrow(1, 1, t)?)?;
                if let Some(skip) = &self.skip {
                    let x = x.reshape((b, t, f))?;
                    out = ((out + skip.forward(&x)?)? + x)?;
                }
                out.broadcast_mul(&mask.unsqueeze(D::Minus1)?)?
                    .reshape((b, t * f))
            }
            MotionOutput::Pooled(_) => self.output.forward(&hs.narrow(1, 0, 1)?.squeeze(1)?),
        }
    }

    fn out_dim(&self) -> usize {
        self.cfg.out_dim()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ParamStore;
    use candle_core::Device;

    fn net(output: MotionOutput) -> (MotionTransformer, ParamStore) {
        let cfg = MotionTransformerConfig {
            frames: 6,
            features: 4,
            hidden: 16,
            heads: 2,
            blocks: 2,
            output,
            ..MotionTransformerConfig::small(3)
        };
        let store = ParamStore::new(1);
        let n = MotionTransformer::new(cfg, store.var_builder(DType::F32, &Device::Cpu)).unwrap();
        (n, store)
    }

    fn input(seed: u64) -> Tensor {
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
        scoreguide_sde::randn(&mut rng, &[2, 24], &Device::Cpu).unwrap()
    }

    #[test]
    fn padding_frames_change_nothing() {
        let (net, _) = net(MotionOutput::Pooled(1));
        let mask = Tensor::new(
            &[[1f32, 1., 1., 1., 0., 0.], [1., 1., 1., 1., 1., 1.]],
            &Device::Cpu,
        )
        .unwrap();
        let cond = Cond::labels(Tensor::new(&[0u32, 1], &Device::Cpu).unwrap()).with_mask(mask);
        let c = Tensor::new(&[3f32, 500.0], &Device::Cpu).unwrap();
        let x = input(0);
        // Row 0's frames 4 and 5 replaced: its output must not move; row 1's must.
        let mut other: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        for i in (16..24).chain(40..48) {
            other[i] += 3.0;
        }
        let y = Tensor::from_vec(other, (2, 24), &Device::Cpu).unwrap();
        let a: Vec<Vec<f32>> = net.forward(&x, &c, &cond).unwrap().to_vec2().unwrap();
        let b: Vec<Vec<f32>> = net.forward(&y, &c, &cond).unwrap().to_vec2().unwrap();
        assert!((a[0][0] - b[0][0]).abs() < 1e-5, "{a:?} {b:?}");
        assert!((a[1][0] - b[1][0]).abs() > 1e-4);
    }

    #[test]
    fn input_skip_starts_as_the_identity_on_real_frames_and_is_refused_for_a_pooled_output() {
        let (plain, _) = net(MotionOutput::Frames);
        let cfg = MotionTransformerConfig {
            input_skip: true,
            ..*plain.config()
        };
        let store = ParamStore::new(1);
        let skip =
            MotionTransformer::new(cfg, store.var_builder(DType::F32, &Device::Cpu)).unwrap();
        // Two parameters more, the correction, at zero; the others drawn as the plain
        // network's: the difference is the input on real frames, 0 on padding.
        assert_eq!(store.len(), 2 + plain_params());
        let mask = Tensor::new(
            &[[1f32, 1., 1., 1., 1., 0.], [1., 1., 1., 1., 1., 1.]],
            &Device::Cpu,
        )
        .unwrap();
        let cond = Cond::labels(Tensor::new(&[0u32, 1], &Device::Cpu).unwrap()).with_mask(mask);
        let c = Tensor::new(&[3f32, 500.0], &Device::Cpu).unwrap();
        let x = input(4);
        let d: Vec<f32> = (skip.forward(&x, &c, &cond).unwrap()
            - plain.forward(&x, &c, &cond).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
        let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        for (i, (d, x)) in d.iter().zip(&xs).enumerate() {
            let want = if (20..24).contains(&i) { 0.0 } else { *x };
            assert!((d - want).abs() < 1e-5, "value {i}: {d} vs {want}");
        }
        let pooled = MotionTransformerConfig {
            output: MotionOutput::Pooled(1),
            ..cfg
        };
        let e = pooled.validate().unwrap_err().to_string();
        assert!(e.contains("input_skip"), "{e}");
        // Configurations written before the option read as without it.
        let mut json = serde_json::to_value(plain.config()).unwrap();
        json.as_object_mut().unwrap().remove("input_skip");
        let back: MotionTransformerConfig = serde_json::from_value(json).unwrap();
        assert_eq!(&back, plain.config());
    }

    fn plain_params() -> usize {
        let (_, store) = net(MotionOutput::Frames);
        store.len()
    }

    #[test]
    fn labels_matter_and_out_of_range_ones_are_refused() {
        let (net, _) = net(MotionOutput::Frames);
        let c = Tensor::new(&[3f32, 3.0], &Device::Cpu).unwrap();
        let x = input(1);
        let run = |l: [u32; 2]| {
            net.forward(
                &x,
                &c,
                &Cond::labels(Tensor::new(&l, &Device::Cpu).unwrap()),
            )
        };
        let a = run([0, 3]).unwrap();
        let b = run([1, 3]).unwrap();
        let d: Vec<f32> = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .sum(1)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(d[0] > 1e-3 && d[1] == 0.0, "{d:?}");
        let e = run([4, 0]).unwrap_err().to_string();
        assert!(e.contains("label 4"), "{e}");
    }

    #[test]
    fn input_gradient_matches_finite_differences() {
        let (net, _) = net(MotionOutput::Pooled(1));
        let c = Tensor::new(&[3f32, 700.0], &Device::Cpu).unwrap();
        let cond = Cond::none();
        let x = input(2).to_dtype(DType::F64).unwrap();
        // The network in f64 through its own parameters' f64 copies.
        let store = ParamStore::new(1);
        let net64 =
            MotionTransformer::new(*net.config(), store.var_builder(DType::F64, &Device::Cpu))
                .unwrap();
        let var = candle_core::Var::from_tensor(&x).unwrap();
        let c64 = c.to_dtype(DType::F64).unwrap();
        let out = net64
            .forward(var.as_tensor(), &c64, &cond)
            .unwrap()
            .sum_all()
            .unwrap();
        let g: Vec<Vec<f64>> = out
            .backward()
            .unwrap()
            .get(var.as_tensor())
            .unwrap()
            .to_vec2()
            .unwrap();
        let xs: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        for i in [0usize, 5, 23, 30, 47] {
            let f = |d: f64| {
                let mut v = xs.clone();
                v[i] += d;
                let t = Tensor::from_vec(v, (2, 24), &Device::Cpu).unwrap();
                net64
                    .forward(&t, &c64, &cond)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let fd = (f(1e-5) - f(-1e-5)) / 2e-5;
            let an = g[i / 24][i % 24];
            assert!(
                (fd - an).abs() < 1e-6 * (1.0 + fd.abs()),
                "x[{i}]: {fd} vs {an}"
            );
        }
    }
}
