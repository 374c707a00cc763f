//! Moving values between space and channels in channels-last images, as ops whose
//! backward passes are each other (so they differentiate to any order). Composed from
//! candle's ops a block rearrangement is a reshape, a permutation, a copy and a reshape:
//! four nodes of the whole image, each of whose gradients candle accumulates into a
//! fresh zeroed buffer.

use crate::ops::{contiguous_data, fast_path, output_buffer};
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use std::sync::Arc;

/// `[M, r, c, C]` → `[M, r/b, c/b, b·b·C]`: each output cell holds its `b × b` block of
/// input cells, row by row, each cell's C channels together (a convolution with kernel =
/// stride = b is then one dense layer over the cells).
pub fn space_to_depth(x: &Tensor, block: usize) -> Result<Tensor> {
    let (m, r, c, ch) = x.dims4()?;
    if block == 0 || r % block != 0 || c % block != 0 {
        bail!("space to depth: a {r} × {c} image does not split into {block} × {block} blocks");
    }
    if !fast_path(&[x]) {
        return x
            .reshape((m, r / block, block, c / block, block, ch))?
            .permute((0, 1, 3, 2, 4, 5))?
            .contiguous()?
            .reshape((m, r / block, c / block, block * block * ch));
    }
    x.contiguous()?.apply_op1_arc(Arc::new(Box::new(Blocks {
        block,
        to_depth: true,
    })))
}

/// The inverse of [`space_to_depth`]: `[M, r, c, b·b·C]` → `[M, r·b, c·b, C]`.
pub fn depth_to_space(x: &Tensor, block: usize) -> Result<Tensor> {
    let (m, r, c, depth) = x.dims4()?;
    if block == 0 || depth % (block * block) != 0 {
        bail!("depth to space: {depth} channels do not split into {block} × {block} blocks");
    }
    let ch = depth / (block * block);
    if !fast_path(&[x]) {
        return x
            .reshape((m, r, c, block, block, ch))?
            .permute((0, 1, 3, 2, 4, 5))?
            .contiguous()?
            .reshape((m, r * block, c * block, ch));
    }
    x.contiguous()?.apply_op1_arc(Arc::new(Box::new(Blocks {
        block,
        to_depth: false,
    })))
}

struct Blocks {
    block: usize,
    /// [`space_to_depth`], else [`depth_to_space`].
    to_depth: bool,
}

impl CustomOp1 for Blocks {
    fn name(&self) -> &'static str {
        match self.to_depth {
            true => "space-to-depth",
            false => "depth-to-space",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_data(s, l, self.name())?;
        let &[m, r, c, d] = l.dims() else {
            bail!(
                "{}: input must be [M, rows, cols, channels], got {:?}",
                self.name(),
                l.dims()
            );
        };
        let b = self.block;
        // In space's layout: m, row (i·b + di), column (j·b + dj), channel; a run of
        // b·C values (dj, channel) is contiguous in both layouts.
        let (rows, cols, ch, shape) = match self.to_depth {
            true => (r, c, d, Shape::from((m, r / b, c / b, b * b * d))),
            false => (
                r * b,
                c * b,
                d / (b * b),
                Shape::from((m, r * b, c * b, d / (b * b))),
            ),
        };
        let run = b * ch;
        let mut out = output_buffer(x.len());
        for mi in 0..m {
            for i in 0..rows / b {
                for di in 0..b {
                    for j in 0..cols / b {
                        let space = ((mi * rows + i * b + di) * cols + j * b) * ch;
                        let depth = ((mi * (rows / b) + i) * (cols / b) + j) * b * run + di * run;
                        let (src, dst) = match self.to_depth {
                            true => (space, depth),
                            false => (depth, space),
                        };
                        out[dst..dst + run].copy_from_slice(&x[src..src + run]);
                    }
                }
            }
        }
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(match self.to_depth {
            true => depth_to_space(g, self.block)?,
            false => space_to_depth(g, self.block)?,
        }))
    }
}
