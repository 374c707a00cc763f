//! Layer norm and softmax over the last dimension, and group norm (with an optional
//! SiLU) over channel groups, as single ops with their own backward passes (candle's
//! fused versions have none, and its composed ones take a dozen allocating passes each).

use crate::channel::{channel_affine, channel_sum};
use crate::ops::{
    contiguous_data, fast_path, gradient_for, output_buffer, second_order, with_data,
};
use crate::simd;
use crate::threads::chunk_len;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp3, Device, Layout, Result, Shape, Tensor, D,
};
use rayon::prelude::*;

const EPS: f32 = 1e-5;

/// Runs `f(chunk index, rows)` over whole rows of width `n`, in parallel when large.
fn rows_par(out: &mut [f32], n: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let chunk = chunk_len(out.len(), n);
    if chunk >= out.len() {
        f(0, out);
    } else {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i * chunk, c));
    }
}

struct LayerNormOp;

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_data(s1, l1, "layer norm")?;
        let (g, b) = (
            contiguous_data(s2, l2, "layer norm")?,
            contiguous_data(s3, l3, "layer norm")?,
        );
        let n = g.len();
        let mut out = output_buffer(x.len());
        rows_par(&mut out, n, |start, o| {
            simd::layer_norm_rows(&x[start..start + o.len()], g, b, EPS, o)
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gain: &Tensor,
        bias: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if second_order() {
            let (gx, gg, gb) = layer_norm_backward_composed(x, gain, gy)?;
            return Ok((
                Some(gx),
                gain.track_op().then_some(gg),
                bias.track_op().then_some(gb),
            ));
        }
        let n = gain.elem_count();
        let rows = x.elem_count() / n;
        let mut gx = output_buffer(x.elem_count());
        let (mut gg, mut gb) = (vec![0f32; n], vec![0f32; n]);
        with_data(x, |x| {
            with_data(gain, |g| {
                with_data(gy, |gy| {
                    rows_par(&mut gx, n, |start, o| {
                        let r = start..start + o.len();
                        simd::layer_norm_backward_rows(&x[r.clone()], g, &gy[r], EPS, o)
                    });
                    for r in 0..rows {
                        let (xrow, grow) = (&x[r * n..(r + 1) * n], &gy[r * n..(r + 1) * n]);
                        let (mean, rstd) = simd::moments(xrow, EPS);
                        for i in 0..n {
                            gb[i] += grow[i];
                            gg[i] += grow[i] * (xrow[i] - mean) * rstd;
                        }
                    }
                    Ok(())
                })
            })
        })?;
        Ok((
            gradient_for(x, gx)?,
            gradient_for(gain, gg)?,
            gradient_for(bias, gb)?,
        ))
    }
}

fn layer_norm_composed(x: &Tensor, gain: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let normed =
        centred.broadcast_div(&(centred.sqr()?.mean_keepdim(D::Minus1)? + EPS as f64)?.sqrt()?)?;
    normed.broadcast_mul(gain)?.broadcast_add(bias)
}

fn layer_norm_backward_composed(
    x: &Tensor,
    gain: &Tensor,
    gy: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let n = gain.elem_count();
    let x2 = x.reshape(((), n))?;
    let gy2 = gy.reshape(((), n))?;
    let centred = x2.broadcast_sub(&x2.mean_keepdim(1)?)?;
    let rstd = (centred.sqr()?.mean_keepdim(1)? + EPS as f64)?
        .sqrt()?
        .recip()?;
    let xh = centred.broadcast_mul(&rstd)?;
    let d = gy2.broadcast_mul(&gain.reshape((1, n))?)?;
    let m1 = d.mean_keepdim(1)?;
    let m2 = (&d * &xh)?.mean_keepdim(1)?;
    let gx = d
        .broadcast_sub(&m1)?
        .sub(&xh.broadcast_mul(&m2)?)?
        .broadcast_mul(&rstd)?;
    let gg = (&gy2 * &xh)?.sum(0)?.reshape(gain.shape())?;
    let gb = gy2.sum(0)?.reshape(gain.shape())?;
    Ok((gx.reshape(x.shape())?, gg, gb))
}

/// Layer norm over the last dimension (ε = 1e-5) with gain and bias `[n]`,
/// differentiable with respect to all three.
pub fn layer_norm(x: &Tensor, gain: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let n = *x.dims().last().unwrap_or(&0);
    if gain.dims() != [n] || bias.dims() != [n] {
        bail!(
            "layer norm: gain and bias must be [{n}] for input {:?}, got {:?} and {:?}",
            x.dims(),
            gain.dims(),
            bias.dims()
        );
    }
    if n == 0 || !fast_path(&[x, gain, bias]) {
        return layer_norm_composed(x, gain, bias);
    }
    x.contiguous()?.apply_op3_arc(
        &gain.contiguous()?,
        &bias.contiguous()?,
        std::sync::Arc::new(Box::new(LayerNormOp)),
    )
}

struct SoftmaxOp;

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_data(s, l, "softmax")?;
        let n = *l.dims().last().unwrap_or(&1);
        let mut out = output_buffer(x.len());
        rows_par(&mut out, n, |start, o| {
            simd::softmax_rows(&x[start..start + o.len()], o, n)
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        if second_order() {
            let dot = (g * y)?.sum_keepdim(D::Minus1)?;
            return Ok(Some((y * g.broadcast_sub(&dot)?)?));
        }
        let n = *y.dims().last().unwrap_or(&1);
        let mut gx = output_buffer(y.elem_count());
        with_data(y, |y| {
            with_data(g, |g| {
                rows_par(&mut gx, n, |start, o| {
                    for ((orow, yrow), grow) in o
                        .chunks_exact_mut(n)
                        .zip(y[start..].chunks_exact(n))
                        .zip(g[start..].chunks_exact(n))
                    {
                        let dot: f32 = yrow.iter().zip(grow).map(|(a, b)| a * b).sum();
                        for i in 0..n {
                            orow[i] = yrow[i] * (grow[i] - dot);
                        }
                    }
                });
                Ok(())
            })
        })?;
        Ok(Some(Tensor::from_vec(gx, y.shape(), &Device::Cpu)?))
    }
}

/// Softmax over the last dimension, differentiable (candle's `softmax_last_dim` drops
/// gradients).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.rank() == 0 || !fast_path(&[x]) {
        return candle_nn::ops::softmax(x, D::Minus1);
    }
    x.contiguous()?
        .apply_op1_arc(std::sync::Arc::new(Box::new(SoftmaxOp)))
}

/// Group norm with its SiLU: `[N, C, …]` normalised per image over each group of
/// `C / groups` channels, then a per-channel gain and bias.
struct GroupNormOp {
    groups: usize,
    eps: f32,
    silu: bool,
}

impl GroupNormOp {
    /// (images, channels, values per group slab).
    fn sizes(&self, x: &[usize]) -> (usize, usize, usize) {
        let (n, c) = (x[0], x[1]);
        let per_image: usize = x[1..].iter().product();
        (n, c, per_image / self.groups)
    }
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "fused-group-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_data(s1, l1, "group norm")?;
        let g = contiguous_data(s2, l2, "group norm")?;
        let b = contiguous_data(s3, l3, "group norm")?;
        let (_, c, slab) = self.sizes(l1.dims());
        let cg = c / self.groups;
        let mut out = output_buffer(x.len());
        rows_par(&mut out, slab, |start, o| {
            for (i, os) in o.chunks_exact_mut(slab).enumerate() {
                let s = start / slab + i;
                let ch = (s % self.groups) * cg..(s % self.groups + 1) * cg;
                let xs = &x[s * slab..(s + 1) * slab];
                simd::group_norm_slab(xs, &g[ch.clone()], &b[ch], self.eps, self.silu, os);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gain: &Tensor,
        bias: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if second_order() {
            let (gx, gg, gb) = group_norm_backward_composed(self, x, gain, bias, gy)?;
            return Ok((
                x.track_op().then_some(gx),
                gain.track_op().then_some(gg),
                bias.track_op().then_some(gb),
            ));
        }
        let (n, c, slab) = self.sizes(x.dims());
        let cg = c / self.groups;
        let mut gx = output_buffer(x.elem_count());
        // Per image and channel, summed over the images below.
        let (mut gg_part, mut gb_part) = (vec![0f32; n * c], vec![0f32; n * c]);
        with_data(x, |x| {
            with_data(gain, |g| {
                with_data(bias, |b| {
                    with_data(gy, |gy| {
                        let slab_grad =
                            |s: usize, gxs: &mut [f32], ggs: &mut [f32], gbs: &mut [f32]| {
                                let ch = (s % self.groups) * cg..(s % self.groups + 1) * cg;
                                let r = s * slab..(s + 1) * slab;
                                simd::group_norm_backward_slab(
                                    &x[r.clone()],
                                    (&g[ch.clone()], &b[ch]),
                                    &gy[r],
                                    self.eps,
                                    self.silu,
                                    gxs,
                                    (ggs, gbs),
                                );
                            };
                        let slabs = gx
                            .chunks_mut(slab)
                            .zip(gg_part.chunks_mut(cg))
                            .zip(gb_part.chunks_mut(cg))
                            .enumerate();
                        if chunk_len(x.len(), slab) >= x.len() {
                            slabs.for_each(|(s, ((a, b), c))| slab_grad(s, a, b, c));
                        } else {
                            slabs
                                .collect::<Vec<_>>()
                                .into_par_iter()
                                .for_each(|(s, ((a, b), c))| slab_grad(s, a, b, c));
                        }
                        Ok(())
                    })
                })
            })
        })?;
        let sum_images = |part: Vec<f32>| -> Vec<f32> {
            let mut acc = vec![0f32; c];
            simd::add_column_sums(&part, &mut acc);
            acc
        };
        Ok((
            gradient_for(x, gx)?,
            gradient_for(gain, sum_images(gg_part))?,
            gradient_for(bias, sum_images(gb_part))?,
        ))
    }
}

/// `[N, C, S]` and `[N, G, C/G · S]` views of an `[N, C, …]` tensor.
fn group_views(x: &Tensor, groups: usize) -> Result<(Tensor, Tensor)> {
    let (n, c) = (x.dim(0)?, x.dim(1)?);
    let per_channel = x.elem_count() / (n * c).max(1);
    Ok((x.reshape((n, c, per_channel))?, x.reshape((n, groups, ()))?))
}

/// x̂ `[N, C, S]` and 1/σ `[N, G, 1]`.
fn group_normalised(x: &Tensor, groups: usize, eps: f32) -> Result<(Tensor, Tensor)> {
    let (by_channel, by_group) = group_views(x, groups)?;
    let centred = by_group.broadcast_sub(&by_group.mean_keepdim(2)?)?;
    let rstd = (centred.sqr()?.mean_keepdim(2)? + eps as f64)?
        .sqrt()?
        .recip()?;
    let xh = centred.broadcast_mul(&rstd)?.reshape(by_channel.shape())?;
    Ok((xh, rstd))
}

fn per_channel(t: &Tensor) -> Result<Tensor> {
    t.reshape((1, t.elem_count(), 1))
}

fn group_norm_composed(
    op: &GroupNormOp,
    x: &Tensor,
    gain: &Tensor,
    bias: &Tensor,
) -> Result<Tensor> {
    let (xh, _) = group_normalised(x, op.groups, op.eps)?;
    let z = xh
        .broadcast_mul(&per_channel(gain)?)?
        .broadcast_add(&per_channel(bias)?)?;
    let y = if op.silu {
        candle_nn::ops::silu(&z)?
    } else {
        z
    };
    y.reshape(x.shape())
}

/// The backward pass in candle's ops, so that it can itself be differentiated.
fn group_norm_backward_composed(
    op: &GroupNormOp,
    x: &Tensor,
    gain: &Tensor,
    bias: &Tensor,
    gy: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (xh, rstd) = group_normalised(x, op.groups, op.eps)?;
    let gy = gy.reshape(xh.shape())?;
    let dz = if op.silu {
        let z = channel_affine(&xh, gain, Some(bias))?;
        (gy * crate::ops::silu_derivative(&z)?)?
    } else {
        gy
    };
    let gg = channel_sum(&(&dz * &xh)?)?;
    let gb = channel_sum(&dz)?;
    let d = channel_affine(&dz, gain, None)?;
    let (n, groups) = (x.dim(0)?, op.groups);
    let d = d.reshape((n, groups, ()))?;
    let xh = xh.reshape((n, groups, ()))?;
    let m1 = d.mean_keepdim(2)?;
    let m2 = (&d * &xh)?.mean_keepdim(2)?;
    let gx = d
        .broadcast_sub(&m1)?
        .sub(&xh.broadcast_mul(&m2)?)?
        .broadcast_mul(&rstd)?;
    Ok((gx.reshape(x.shape())?, gg, gb))
}

/// Group norm of `x: [N, C, …]` over `groups` groups of channels (each image and group
/// normalised by its own mean and variance, ε added to the variance), then a gain and
/// bias per channel (`[C]`), then SiLU when `silu` (the U-Net's and ResNet's "norm,
/// act" in one pass). Differentiable in all three; candle's ops off the CPU.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    gain: &Tensor,
    bias: &Tensor,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 || groups == 0 || dims[1] % groups != 0 {
        bail!("group norm: input must be [N, C, …] with C a multiple of the {groups} groups, got {dims:?}");
    }
    let c = dims[1];
    if gain.dims() != [c] || bias.dims() != [c] {
        bail!(
            "group norm: gain and bias must be [{c}], got {:?} and {:?}",
            gain.dims(),
            bias.dims()
        );
    }
    if !(eps > 0.0 && eps.is_finite()) {
        bail!("group norm: ε must be positive, got {eps}");
    }
    let op = GroupNormOp {
        groups,
        eps: eps as f32,
        silu,
    };
    if x.elem_count() == 0 || !fast_path(&[x, gain, bias]) {
        return group_norm_composed(&op, x, gain, bias);
    }
    x.contiguous()?.apply_op3_arc(
        &gain.contiguous()?,
        &bias.contiguous()?,
        std::sync::Arc::new(Box::new(op)),
    )
}
