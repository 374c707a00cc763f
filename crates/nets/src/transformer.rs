//! The traffic-scene transformer of Gen-neG (App. B.2): agents attend to each
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
use crate::layers::{repeat_rows, CrossAttention, Dense, LayerNorm, Mlp, SelfAttention};
use crate::maps::{MapEncoder, MapProbe, SceneMaps};
use crate::net::NoiseNet;
use candle_core::{bail, DType, Result, Tensor, TensorId, D};
use candle_nn::VarBuilder;
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

struct Block {
    self_attention: SelfAttention,
    cross_attention: CrossAttention,
    mlp: Mlp,
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
        let keys_values = self
            .blocks
            .iter()
            .map(|b| b.cross_attention.keys_values(&tokens))
            .collect::<Result<_>>()?;
        let raster = match self.cfg.map_probe {
            Some(_) => Some(maps.flatten_from(1)?),
            None => None,
        };
        Ok(SceneMaps {
            tokens,
            keys_values,
            raster,
        })
    }

    /// `x: [B, A·F]`, `c_noise: [B]`, `maps` of B scenes → `[B, A·out_per_agent]`.
    pub fn forward_maps(&self, x: &Tensor, c_noise: &Tensor, maps: &SceneMaps) -> Result<Tensor> {
        let (a, f, h) = (self.cfg.agents, self.cfg.features, self.cfg.hidden);
        let b = match x.dims() {
            &[b, d] if d == a * f => b,
            dims => bail!("scene transformer: input must be [batch, {}] ({a} agents × {f} features), got {dims:?}", a * f),
        };
        let tokens = &maps.tokens;
        let t = match tokens.dims() {
            &[tb, t, th] if tb == b && th == h => t,
            dims => bail!("scene transformer: map tokens must be [{b}, T, {h}], got {dims:?}"),
        };
        if !maps.keys_values.is_empty()
            && (maps.keys_values.len() != self.blocks.len()
                || maps.keys_values.iter().any(|kv| kv.dims() != [b, t, 2 * h]))
        {
            bail!(
                "scene transformer: the maps' keys and values must be {} tensors [{b}, {t}, {}] (one per block), got {:?}",
                self.blocks.len(),
                2 * h,
                maps.keys_values.iter().map(|kv| kv.dims().to_vec()).collect::<Vec<_>>()
            );
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
        let enc = self.encoder1.forward_silu(&encoder_in)?;
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
        // The time term is one row per scene, broadcast over its pairs.
        let t_pair = self.distance_time.forward(&temb)?.unsqueeze(1)?; // [B, 1, R]
        let r = self.cfg.relative_dim;
        let e = scoreguide_kernels::add_silu(
            &self.distance.forward(&demb)?.reshape((b, a * a, r))?,
            &t_pair,
        )?
        .reshape((b, a, a, r))?;

        for (i, block) in self.blocks.iter().enumerate() {
            let kv = match maps.keys_values.get(i) {
                Some(kv) => kv.clone(),
                None => block.cross_attention.keys_values(tokens)?,
            };
            hs = (&hs + block.self_attention.forward(&hs, &e, self.cfg.heads)?)?;
            hs = (&hs + block.cross_attention.forward(&hs, &kv, self.cfg.heads)?)?;
            hs = (&hs + block.mlp.forward(&hs)?)?;
        }
        let out = self.decoder1.forward_silu(&self.final_norm.forward(&hs)?)?;
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
        if !self.map.is_frozen() {
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
