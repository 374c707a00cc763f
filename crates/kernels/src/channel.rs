//! Per-channel scale, shift and sum over axis 1 of `[N, C, …]` tensors, as custom ops.
//!
//! Candle reduces over non-trailing axes (`sum((0, 2))`, and the backward pass of any
//! broadcast over them) one element at a time with an index division; in the composed
//! backward passes that second-order losses differentiate, those reductions took a
//! quarter of a DLSM classifier step. Here each image's channel plane is one contiguous
//! run, summed with the vectorised row sum, and the ops' backward passes are these ops
//! again, so the composed passes stay differentiable.

use crate::ops::{contiguous_data, fast_path, output_buffer};
use crate::simd;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use std::sync::Arc;

/// (images, channels, values per channel plane) of an `[N, C, …]` shape.
fn planes(dims: &[usize], what: &str) -> Result<(usize, usize, usize)> {
    if dims.len() < 2 {
        bail!("{what}: input must be [N, C, …], got {dims:?}");
    }
    Ok((dims[0], dims[1], dims[2..].iter().product()))
}

/// `[C]` as `[1, C, 1, …]`, broadcastable against a tensor of `rank` axes.
fn as_channels(t: &Tensor, rank: usize) -> Result<Tensor> {
    let mut dims = vec![1; rank];
    dims[1] = t.elem_count();
    t.reshape(dims)
}

struct ChannelSum;

impl CustomOp1 for ChannelSum {
    fn name(&self) -> &'static str {
        "channel-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_data(s, l, "channel sum")?;
        let (_, c, plane) = planes(l.dims(), "channel sum")?;
        let mut out = vec![0f32; c];
        if plane > 0 {
            simd::add_plane_sums(x, plane, &mut out);
        }
        Ok((CpuStorage::F32(out), Shape::from(c)))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(as_channels(g, x.rank())?.broadcast_as(x.shape())?))
    }
}

/// `t` summed over every axis but the channel axis 1: `[N, C, …]` → `[C]`.
pub(crate) fn channel_sum(t: &Tensor) -> Result<Tensor> {
    let dims = t.dims();
    planes(dims, "channel sum")?;
    if !fast_path(&[t]) || t.elem_count() == 0 {
        let axes: Vec<usize> = (0..dims.len()).filter(|&a| a != 1).collect();
        return t.sum(axes);
    }
    t.contiguous()?
        .apply_op1_arc(Arc::new(Box::new(ChannelSum)))
}

/// `x · v[c]` (scale) or `x + v[c]` (shift).
#[derive(Clone, Copy)]
enum PerChannel {
    Scale,
    Shift,
}

impl CustomOp2 for PerChannel {
    fn name(&self) -> &'static str {
        match self {
            PerChannel::Scale => "channel-scale",
            PerChannel::Shift => "channel-shift",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_data(s1, l1, self.name())?;
        let v = contiguous_data(s2, l2, self.name())?;
        let (_, c, plane) = planes(l1.dims(), self.name())?;
        let mut out = output_buffer(x.len());
        if plane > 0 {
            for (i, (o, xs)) in out
                .chunks_exact_mut(plane)
                .zip(x.chunks_exact(plane))
                .enumerate()
            {
                let a = v[i % c];
                match self {
                    PerChannel::Scale => o.iter_mut().zip(xs).for_each(|(o, x)| *o = x * a),
                    PerChannel::Shift => o.iter_mut().zip(xs).for_each(|(o, x)| *o = x + a),
                }
            }
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        v: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // The per-channel values' gradient only where something asks for it.
        let dv = |t: &Tensor| v.track_op().then(|| channel_sum(t)).transpose();
        Ok(match self {
            PerChannel::Scale => (Some(per_channel(*self, g, v)?), dv(&(g * x)?)?),
            PerChannel::Shift => (Some(g.clone()), dv(g)?),
        })
    }
}

fn per_channel(op: PerChannel, x: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (_, c, _) = planes(x.dims(), op.name())?;
    if v.dims() != [c] {
        bail!("{}: expected [{c}] values, got {:?}", op.name(), v.dims());
    }
    if !fast_path(&[x, v]) || x.elem_count() == 0 {
        let v = as_channels(v, x.rank())?;
        return match op {
            PerChannel::Scale => x.broadcast_mul(&v),
            PerChannel::Shift => x.broadcast_add(&v),
        };
    }
    x.contiguous()?
        .apply_op2_arc(&v.contiguous()?, Arc::new(Box::new(op)))
}

/// `x · gain[c] + bias[c]` over the channel axis 1 of `x: [N, C, …]`.
pub(crate) fn channel_affine(x: &Tensor, gain: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = per_channel(PerChannel::Scale, x, gain)?;
    match bias {
        Some(b) => per_channel(PerChannel::Shift, &y, b),
        None => Ok(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn fill(dims: &[usize], seed: f32) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i as f32 * 0.618 + seed).fract() - 0.5) * 2.0)
            .collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    fn close(a: &Tensor, b: &Tensor) {
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
        let d = d.max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-5, "{a} vs {b}");
    }

    #[test]
    fn matches_candle_forward_and_backward() {
        for dims in [&[2usize, 3, 4, 5][..], &[3, 4, 7], &[1, 2], &[2, 3, 1, 1]] {
            let c = dims[1];
            let x = Var::from_tensor(&fill(dims, 0.1)).unwrap();
            let g = Var::from_tensor(&fill(&[c], 0.3)).unwrap();
            let b = Var::from_tensor(&fill(&[c], 0.7)).unwrap();
            let r = fill(dims, 0.9);
            let ours = channel_affine(x.as_tensor(), g.as_tensor(), Some(b.as_tensor())).unwrap();
            let theirs = x
                .as_tensor()
                .broadcast_mul(&as_channels(g.as_tensor(), dims.len()).unwrap())
                .unwrap()
                .broadcast_add(&as_channels(b.as_tensor(), dims.len()).unwrap())
                .unwrap();
            close(&ours, &theirs);
            let axes: Vec<usize> = (0..dims.len()).filter(|&a| a != 1).collect();
            close(
                &channel_sum(&ours).unwrap(),
                &theirs.sum(axes.clone()).unwrap(),
            );
            let grads = |y: &Tensor| {
                let gs = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                [&x, &g, &b].map(|v| gs.get(v.as_tensor()).unwrap().clone())
            };
            for (a, e) in grads(&ours).iter().zip(&grads(&theirs)) {
                close(a, e);
            }
            let s = channel_sum(x.as_tensor()).unwrap();
            let gs = (&s * &fill(&[c], 0.2)).unwrap().sum_all().unwrap();
            let gx = gs.backward().unwrap();
            let expected = fill(&[c], 0.2);
            let expected = as_channels(&expected, dims.len())
                .unwrap()
                .broadcast_as(dims)
                .unwrap();
            close(gx.get(x.as_tensor()).unwrap(), &expected);
            let total = x.as_tensor().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!((s.sum_all().unwrap().to_scalar::<f32>().unwrap() - total).abs() < 1e-4);
        }
    }

    #[test]
    fn non_contiguous_inputs_and_bad_shapes() {
        let x = fill(&[3, 2, 4], 0.4).transpose(0, 2).unwrap(); // [4, 2, 3], strided
        let g = fill(&[2], 0.5);
        let ours = channel_affine(&x, &g, None).unwrap();
        let theirs = x.broadcast_mul(&g.reshape((1, 2, 1)).unwrap()).unwrap();
        close(&ours, &theirs);
        close(&channel_sum(&x).unwrap(), &x.sum((0, 2)).unwrap());
        let err = channel_affine(&x, &fill(&[3], 0.1), None).unwrap_err();
        assert!(err.to_string().contains("expected [2] values"), "{err}");
        let err = channel_sum(&fill(&[4], 0.1)).unwrap_err();
        assert!(err.to_string().contains("[N, C, …]"), "{err}");
    }
}
