//! Layer norm and softmax over the last dimension as single ops with their own backward
//! passes (candle's fused versions have none, and its composed ones take a dozen
//! allocating passes each).

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
