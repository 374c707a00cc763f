//! What the scene transformer reads of a map: [`MapEncoder`] tokens for cross-attention
//! and a [`MapProbe`] reading the raster around each agent.

use crate::layers::{Dense, LayerNorm};
use crate::transformer::SceneTransformerConfig;
use candle_core::{bail, DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use scoreguide_kernels::space_to_depth;
use serde::{Deserialize, Serialize};

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
        let f = self.conv1.forward_silu(&space_to_depth(&x, 2)?)?;
        let f = self.conv2.forward_silu(&space_to_depth(&f, 2)?)?; // [M, c/4, c/4, H]
        let side = cells / 4;
        let tokens = f.reshape((m, side * side, self.hidden))?;
        let pos = position_encoding_2d(side, side, self.hidden, maps.dtype(), maps.device())?;
        self.norm.forward(&tokens.broadcast_add(&pos)?)
    }

    /// Whether the weights are frozen tensors, not `Var`s (so they cannot change).
    pub(crate) fn is_frozen(&self) -> bool {
        !self.conv1.weight.is_variable()
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

/// A batch's maps as a [`SceneTransformer`](crate::SceneTransformer) reads them ([`SceneTransformer::encode_maps`](crate::SceneTransformer::encode_maps)):
/// the encoder's tokens `[B, T, H]`, each block's cross-attention keys and values of
/// them (`[B, T, 2H]`; empty: computed in the forward pass), and, for a [`MapProbe`],
/// the rasters `[B, C·s²]`.
#[derive(Debug, Clone)]
pub struct SceneMaps {
    pub tokens: Tensor,
    pub keys_values: Vec<Tensor>,
    pub raster: Option<Tensor>,
}

impl SceneMaps {
    /// Scenes `start .. start + len`.
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        Ok(Self {
            tokens: self.tokens.narrow(0, start, len)?,
            keys_values: self
                .keys_values
                .iter()
                .map(|kv| kv.narrow(0, start, len))
                .collect::<Result<_>>()?,
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
            keys_values: self
                .keys_values
                .iter()
                .map(|kv| kv.to_dtype(dtype))
                .collect::<Result<_>>()?,
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
}
