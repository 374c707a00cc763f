//! Dense layers and SiLU as candle custom ops with their own backward passes.
//!
//! candle composes `silu(x Wᵀ + b)` from five ops, each allocating a buffer and making
//! a pass over it, and its backward pass from a dozen more (the bias gradient through a
//! slow leading-dimension sum). Here it is one GEMM and one fused pass forward, and one
//! fused pass, two GEMMs and a column sum backward, with the sigmoid kept from the
//! forward pass. f32 on the CPU takes this path; other dtypes and devices (CUDA) take
//! candle's own ops, so every function here works everywhere.

use crate::gemm::{matmul, View};
use crate::simd;
use crate::threads::chunk_len;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape,
    Storage, Tensor,
};
use rayon::prelude::*;
use std::sync::Mutex;

/// The activation after a dense layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    Identity,
    Silu,
}

/// Whether backward passes must themselves be differentiable: candle keeps the graph
/// of a backward pass only with `CANDLE_GRAD_DO_NOT_DETACH` (DLSM's second-order loss),
/// and then these ops take candle's own ops for their backward pass.
pub fn second_order() -> bool {
    thread_local! {
        static ON: bool = std::env::var("CANDLE_GRAD_DO_NOT_DETACH")
            .map(|s| !s.is_empty() && s != "0")
            .unwrap_or(false);
    }
    ON.with(|b| *b)
}

/// Whether every tensor is f32 on the CPU: the fused kernels' path.
pub(crate) fn fast_path(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32)
}

/// A buffer of `len` floats that the caller writes in full before reading (as candle's
/// own kernels do): zero-filling the outputs of GEMMs and element-wise passes cost 5% of
/// a training step.
pub(crate) fn output_buffer(len: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: f32 has no invalid bit patterns, and every caller overwrites all `len`
    // elements (a GEMM without accumulation, or an element-wise pass over the whole
    // buffer) before any is read.
    #[allow(clippy::uninit_vec)]
    unsafe {
        v.set_len(len)
    };
    v
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    Ok(&data[l.start_offset()..])
}

/// The elements of a contiguous f32 storage, refused with `what` when not contiguous.
pub(crate) fn contiguous_data<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    if !l.is_contiguous() {
        bail!("{what}: inputs must be contiguous");
    }
    Ok(&f32_slice(s, l)?[..l.shape().elem_count()])
}

/// `g` as the gradient of `t`, or none when `t` is not tracked.
pub(crate) fn gradient_for(t: &Tensor, g: Vec<f32>) -> Result<Option<Tensor>> {
    t.track_op()
        .then(|| Tensor::from_vec(g, t.shape(), &Device::Cpu))
        .transpose()
}

/// `[..., k]` data as a `[rows, k]` matrix: a matrix with its own strides, or a
/// contiguous tensor of any rank (its leading axes as rows, no reshape node needed).
fn rows_view<'a>(data: &'a [f32], l: &Layout) -> Result<View<'a>> {
    if l.dims().len() == 2 {
        return view(data, l);
    }
    let k = *l.dims().last().unwrap_or(&0);
    if !l.is_contiguous() || k == 0 {
        bail!(
            "fused dense: expected a contiguous input, got shape {:?}",
            l.dims()
        );
    }
    Ok(View::row_major(data, l.shape().elem_count() / k, k))
}

fn view<'a>(data: &'a [f32], l: &Layout) -> Result<View<'a>> {
    let (dims, stride) = (l.dims(), l.stride());
    if dims.len() != 2 {
        bail!("fused dense: expected a matrix, got shape {dims:?}");
    }
    Ok(View {
        data,
        offset: 0,
        rows: dims[0],
        cols: dims[1],
        rs: stride[0] as isize,
        cs: stride[1] as isize,
    })
}

/// Runs `f` on the contiguous f32 data of a CPU tensor.
pub(crate) fn with_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("fused kernels: expected a CPU tensor");
    };
    let data = cpu.as_slice::<f32>()?;
    let start = layout.start_offset();
    f(&data[start..start + layout.shape().elem_count()])
}

fn with_view<R>(t: &Tensor, f: impl FnOnce(View) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("fused kernels: expected a CPU tensor");
    };
    let v = rows_view(f32_slice(cpu, layout)?, layout)?;
    f(v)
}

/// `v ← act(v + bias)` over rows of width `n`, in parallel chunks of whole rows; the
/// bias is one row (`[n]`) or one per row (as long as `v`). With `keep`, returns
/// sigmoid(z) for SiLU's derivative.
pub(crate) fn bias_act(
    v: &mut [f32],
    bias: &[f32],
    n: usize,
    act: Act,
    keep: bool,
) -> Option<Vec<f32>> {
    let per_row = bias.len() == v.len();
    let chunk = chunk_len(v.len(), n);
    let silu = act == Act::Silu;
    let pass = |i: usize, c: &mut [f32], s: Option<&mut [f32]>| {
        if per_row {
            simd::bias_elems(c, &bias[i * chunk..i * chunk + c.len()], silu, s)
        } else {
            simd::bias_rows(c, bias, silu, s)
        }
    };
    let serial = chunk >= v.len();
    if silu && keep {
        let mut s = output_buffer(v.len());
        if serial {
            pass(0, v, Some(&mut s));
        } else {
            v.par_chunks_mut(chunk)
                .zip(s.par_chunks_mut(chunk))
                .enumerate()
                .for_each(|(i, (c, sc))| pass(i, c, Some(sc)));
        }
        Some(s)
    } else {
        if serial {
            pass(0, v, None);
        } else {
            v.par_chunks_mut(chunk)
                .enumerate()
                .for_each(|(i, c)| pass(i, c, None));
        }
        None
    }
}

/// `g · SiLU'(z)` from the output y = SiLU(z) and s = sigmoid(z).
pub(crate) fn silu_grad_data(g: &[f32], y: &[f32], s: &[f32], n: usize) -> Vec<f32> {
    let mut out = output_buffer(g.len());
    let chunk = chunk_len(g.len(), n);
    if chunk >= g.len() {
        simd::silu_backward(g, y, s, &mut out);
    } else {
        out.par_chunks_mut(chunk)
            .zip(g.par_chunks(chunk))
            .zip(y.par_chunks(chunk).zip(s.par_chunks(chunk)))
            .for_each(|((o, g), (y, s))| simd::silu_backward(g, y, s, o));
    }
    out
}

pub(crate) fn column_sums(m: &[f32], n: usize) -> Vec<f32> {
    let mut acc = vec![0.0f32; n];
    simd::add_column_sums(m, &mut acc);
    acc
}

/// `g · SiLU'(z)` as a tensor of y's shape, from y = SiLU(z) and s = sigmoid(z).
fn silu_grad(g: &Tensor, y: &Tensor, s: &Tensor) -> Result<Tensor> {
    let n = *y.dims().last().unwrap_or(&1);
    let data = with_data(g, |g| {
        with_data(y, |y| with_data(s, |s| Ok(silu_grad_data(g, y, s, n))))
    })?;
    Tensor::from_vec(data, y.shape(), &Device::Cpu)
}

/// [`silu_grad`] with the sigmoid its op kept from the forward pass.
fn silu_grad_kept(
    g: &Tensor,
    y: &Tensor,
    saved: &Mutex<Option<Tensor>>,
    what: &str,
) -> Result<Tensor> {
    let guard = saved.lock().expect("sigmoid lock");
    let Some(s) = guard.as_ref() else {
        bail!("{what}: backward pass before the forward pass");
    };
    silu_grad(g, y, s)
}

fn keep(saved: &Mutex<Option<Tensor>>, s: Option<Vec<f32>>, shape: &Shape) -> Result<()> {
    if let Some(s) = s {
        *saved.lock().expect("sigmoid lock") = Some(Tensor::from_vec(s, shape, &Device::Cpu)?);
    }
    Ok(())
}

/// `act(x Wᵀ + b)` as one op.
struct DenseOp {
    act: Act,
    /// Whether a backward pass can follow (some input is tracked).
    keep: bool,
    /// sigmoid(z) of the forward pass, for SiLU's derivative.
    sigmoid: Mutex<Option<Tensor>>,
}

impl CustomOp3 for DenseOp {
    fn name(&self) -> &'static str {
        "fused-dense"
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
        let x = rows_view(f32_slice(s1, l1)?, l1)?;
        let w = view(f32_slice(s2, l2)?, l2)?;
        let bias = contiguous_data(s3, l3, "fused dense (bias)")?;
        let (rows, n) = (x.rows, w.rows);
        let mut out = output_buffer(rows * n);
        matmul(&mut out, x, w.t(), false);
        let mut dims = l1.dims().to_vec();
        *dims.last_mut().expect("a matrix or more") = n;
        let shape = Shape::from(dims);
        let s = bias_act(&mut out, bias, n, self.act, self.keep);
        keep(&self.sigmoid, s, &shape)?;
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if second_order() {
            return dense_backward_composed(x, w, b, self.act, g);
        }
        let n = w.dim(0)?;
        let rows = y.elem_count() / n.max(1);
        let g_z = match self.act {
            Act::Identity => g.contiguous()?,
            Act::Silu => silu_grad_kept(g, y, &self.sigmoid, "fused dense")?,
        };
        let k = w.dim(1)?;
        with_data(&g_z, |gz| {
            let gz_view = View::row_major(gz, rows, n);
            let gx = if x.track_op() {
                let mut gx = output_buffer(rows * k);
                with_view(w, |w| {
                    matmul(&mut gx, gz_view, w, false);
                    Ok(())
                })?;
                Some(Tensor::from_vec(gx, x.shape(), &Device::Cpu)?)
            } else {
                None
            };
            let gw = if w.track_op() {
                let mut gw = output_buffer(n * k);
                with_view(x, |x| {
                    matmul(&mut gw, gz_view.t(), x, false);
                    Ok(())
                })?;
                Some(Tensor::from_vec(gw, (n, k), &Device::Cpu)?)
            } else {
                None
            };
            let gb = if !b.track_op() {
                None
            } else if b.elem_count() == n {
                Some(Tensor::from_vec(
                    column_sums(gz, n),
                    b.shape(),
                    &Device::Cpu,
                )?)
            } else {
                Some(g_z.reshape(b.shape())?)
            };
            Ok((gx, gw, gb))
        })
    }
}

/// The backward pass of `act(x Wᵀ + b)` from candle's own ops, so that it can itself be
/// differentiated.
fn dense_backward_composed(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    act: Act,
    g: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let (n, k) = w.dims2()?;
    let x_shape = x.shape().clone();
    let rows = x.elem_count() / k.max(1);
    let (x, g) = (&x.reshape((rows, k))?, &g.reshape((rows, n))?);
    let g_z = match act {
        Act::Identity => g.clone(),
        Act::Silu => {
            let z = x
                .matmul(&w.t()?)?
                .broadcast_add(&b.reshape(bias_shape(b, n)?)?)?;
            (g * silu_derivative(&z)?)?
        }
    };
    let gx = x
        .track_op()
        .then(|| g_z.matmul(w)?.reshape(&x_shape))
        .transpose()?;
    let gw = w.track_op().then(|| g_z.t()?.matmul(x)).transpose()?;
    let gb = if !b.track_op() {
        None
    } else if b.elem_count() == n {
        Some(g_z.sum(0)?.reshape(b.shape())?)
    } else {
        Some(g_z.reshape(b.shape())?)
    };
    Ok((gx, gw, gb))
}

fn bias_shape(b: &Tensor, n: usize) -> Result<Shape> {
    Ok(if b.elem_count() == n {
        Shape::from((1, n))
    } else {
        Shape::from((b.elem_count() / n, n))
    })
}

/// SiLU'(z) = s (1 + z (1 − s)) from candle's ops.
pub fn silu_derivative(z: &Tensor) -> Result<Tensor> {
    let s = candle_nn::ops::sigmoid(z)?;
    &s * ((z * s.affine(-1.0, 1.0)?)? + 1.0)?
}

/// Checks and flattens `act(x Wᵀ + b)`'s arguments: x `[..., k]` → `[rows, k]`, and the
/// bias `[n]` or one row per input row (`[..., n]`) → as stored.
fn dense_args(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<(Tensor, Vec<usize>)> {
    let (n, k) = w.dims2().map_err(|_| {
        candle_core::Error::msg(format!(
            "dense layer: weight must be [out, in], got {:?}",
            w.dims()
        ))
    })?;
    let dims = x.dims();
    if dims.is_empty() || dims[dims.len() - 1] != k {
        bail!("dense layer: input {dims:?} does not end in the weight's input size {k}");
    }
    let rows = x.elem_count() / k.max(1);
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("rank >= 1") = n;
    if b.dims() != [n] && b.dims() != out_dims.as_slice() {
        bail!(
            "dense layer: bias must be [{n}] or {out_dims:?} (one row per input row), got {:?}",
            b.dims()
        );
    }
    Ok((x.reshape((rows, k))?, out_dims))
}

/// `act(x Wᵀ + b)` for x `[..., k]`, W `[n, k]` and b `[n]` (or one bias row per input
/// row, `[..., n]`), differentiable with respect to all three.
pub fn dense(x: &Tensor, w: &Tensor, b: &Tensor, act: Act) -> Result<Tensor> {
    let (x2, out_dims) = dense_args(x, w, b)?;
    if fast_path(&[x, w, b]) {
        let op = DenseOp {
            act,
            keep: [x, w, b].iter().any(|t| t.track_op()),
            sigmoid: Mutex::new(None),
        };
        // The op reads a contiguous input of any rank as rows: no reshape nodes, whose
        // gradients candle would accumulate into fresh zeroed buffers.
        let x = match x.rank() {
            2 => x.clone(),
            _ => x.contiguous()?,
        };
        return x.apply_op3_arc(w, &b.contiguous()?, std::sync::Arc::new(Box::new(op)));
    }
    let y = {
        let n = w.dim(0)?;
        let z = x2
            .matmul(&w.t()?)?
            .broadcast_add(&b.reshape(bias_shape(b, n)?)?)?;
        match act {
            Act::Identity => z,
            Act::Silu => candle_nn::ops::silu(&z)?,
        }
    };
    y.reshape(out_dims)
}

/// `SiLU(h + t)` with t of h's shape, one row `[n]` broadcast over h's rows, or one row
/// per group `[G, 1, n]` broadcast over the rows of h `[G, m, n]`.
struct AddSiluOp {
    keep: bool,
    sigmoid: Mutex<Option<Tensor>>,
}

impl CustomOp2 for AddSiluOp {
    fn name(&self) -> &'static str {
        "fused-add-silu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let mut v = contiguous_data(s1, l1, "fused add-silu")?.to_vec();
        let t = contiguous_data(s2, l2, "fused add-silu")?;
        let len = v.len();
        let n = *l1.dims().last().unwrap_or(&1);
        let groups = t.len() / n.max(1);
        let s = if groups > 1 && t.len() != len {
            // One row of t per group of consecutive rows of h.
            let per = len / groups;
            let mut s = self.keep.then(|| output_buffer(len));
            for g in 0..groups {
                let part = &mut v[g * per..(g + 1) * per];
                let kept = bias_act(part, &t[g * n..(g + 1) * n], n, Act::Silu, self.keep);
                if let (Some(s), Some(k)) = (s.as_mut(), kept) {
                    s[g * per..(g + 1) * per].copy_from_slice(&k);
                }
            }
            s
        } else {
            bias_act(&mut v, t, n, Act::Silu, self.keep)
        };
        keep(&self.sigmoid, s, l1.shape())?;
        Ok((CpuStorage::F32(v), l1.shape().clone()))
    }

    fn bwd(
        &self,
        h: &Tensor,
        t: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = *h.dims().last().unwrap_or(&1);
        let g_z = if second_order() {
            let z = h.broadcast_add(t)?;
            (g * silu_derivative(&z)?)?
        } else {
            silu_grad_kept(g, y, &self.sigmoid, "fused add-silu")?
        };
        let gt = if !t.track_op() {
            None
        } else if t.dims() == h.dims() {
            Some(g_z.clone())
        } else if second_order() {
            let groups = t.elem_count() / n.max(1);
            Some(g_z.reshape((groups, (), n))?.sum(1)?.reshape(t.shape())?)
        } else {
            let groups = t.elem_count() / n.max(1);
            let sums = with_data(&g_z, |gz| {
                let per = gz.len() / groups.max(1);
                Ok(gz
                    .chunks(per.max(1))
                    .flat_map(|part| column_sums(part, n))
                    .collect::<Vec<f32>>())
            })?;
            Some(Tensor::from_vec(sums, t.shape(), &Device::Cpu)?)
        };
        Ok((h.track_op().then_some(g_z), gt))
    }
}

/// `SiLU(h + t)` for t of h's shape, one row `[n]` over h `[..., n]`, or one row per
/// group, `[G, 1, n]` over h `[G, m, n]`; differentiable with respect to both.
pub fn add_silu(h: &Tensor, t: &Tensor) -> Result<Tensor> {
    let n = *h.dims().last().unwrap_or(&0);
    let grouped = h.rank() == 3 && t.dims() == [h.dims()[0], 1, n];
    if t.dims() != h.dims() && t.dims() != [n] && !grouped {
        bail!(
            "add-silu: the added term must be {:?}, [{n}] or [{}, 1, {n}], got {:?}",
            h.dims(),
            h.dims().first().copied().unwrap_or(0),
            t.dims()
        );
    }
    if fast_path(&[h, t]) {
        let op = AddSiluOp {
            keep: h.track_op() || t.track_op(),
            sigmoid: Mutex::new(None),
        };
        h.contiguous()?
            .apply_op2_arc(&t.contiguous()?, std::sync::Arc::new(Box::new(op)))
    } else {
        candle_nn::ops::silu(&h.broadcast_add(t)?)
    }
}

/// SiLU as one op with the sigmoid kept for its backward pass.
struct SiluOp {
    sigmoid: Mutex<Option<Tensor>>,
}

impl CustomOp1 for SiluOp {
    fn name(&self) -> &'static str {
        "fused-silu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let z = contiguous_data(s, l, "fused silu")?;
        let len = z.len();
        let mut y = output_buffer(len);
        let mut sg = output_buffer(len);
        let n = *l.dims().last().unwrap_or(&1);
        let chunk = chunk_len(len, n);
        if chunk >= len {
            simd::silu(z, &mut y, &mut sg);
        } else {
            y.par_chunks_mut(chunk)
                .zip(sg.par_chunks_mut(chunk))
                .zip(z.par_chunks(chunk))
                .for_each(|((y, s), z)| simd::silu(z, y, s));
        }
        keep(&self.sigmoid, Some(sg), l.shape())?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, z: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        if second_order() {
            return Ok(Some((g * silu_derivative(z)?)?));
        }
        Ok(Some(silu_grad_kept(g, y, &self.sigmoid, "fused silu")?))
    }
}

/// SiLU, differentiable, fused on the CPU.
pub fn silu(z: &Tensor) -> Result<Tensor> {
    if fast_path(&[z]) {
        let op = SiluOp {
            sigmoid: Mutex::new(None),
        };
        z.contiguous()?
            .apply_op1_arc(std::sync::Arc::new(Box::new(op)))
    } else {
        candle_nn::ops::silu(z)
    }
}

/// Hand-written backward passes (no autograd): the forward halves keep sigmoid(z), the
/// backward halves apply SiLU's derivative in one pass, and [`matmul`](manual::matmul) multiplies with
/// this crate's GEMM. A network's input gradient written with these skips candle's
/// graph and its per-node gradient buffers (`ResMlp::forward_with_input_grad`).
pub mod manual {
    use super::*;

    fn sigmoid_of(saved: Mutex<Option<Tensor>>, what: &str) -> Result<Tensor> {
        match saved.into_inner().expect("sigmoid lock") {
            Some(s) => Ok(s),
            None => bail!("{what}: the forward pass kept no sigmoid"),
        }
    }

    /// `(act(x Wᵀ + b), sigmoid(z) for SiLU)` for 2-D x, without a graph.
    pub fn dense(x: &Tensor, w: &Tensor, b: &Tensor, act: Act) -> Result<(Tensor, Option<Tensor>)> {
        let (x2, out_dims) = dense_args(x, w, b)?;
        if out_dims.len() != 2 {
            bail!(
                "dense layer (hand-written backward): input must be a matrix, got {:?}",
                x.dims()
            );
        }
        if fast_path(&[x, w, b]) {
            let op = DenseOp {
                act,
                keep: true,
                sigmoid: Mutex::new(None),
            };
            let y = x2.apply_op3_no_bwd(w, &b.contiguous()?, &op)?;
            let s = match act {
                Act::Silu => Some(sigmoid_of(op.sigmoid, "dense layer")?),
                Act::Identity => None,
            };
            return Ok((y, s));
        }
        let n = w.dim(0)?;
        let z = x2
            .matmul(&w.t()?)?
            .broadcast_add(&b.reshape(bias_shape(b, n)?)?)?
            .detach();
        Ok(match act {
            Act::Identity => (z, None),
            Act::Silu => {
                let s = candle_nn::ops::sigmoid(&z)?;
                ((&z * &s)?, Some(s))
            }
        })
    }

    /// `(SiLU(h + t), sigmoid(h + t))`, t of h's shape or one row, without a graph.
    pub fn add_silu(h: &Tensor, t: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = *h.dims().last().unwrap_or(&0);
        if t.dims() != h.dims() && t.dims() != [n] {
            bail!(
                "add-silu: the added term must be {:?} or [{n}], got {:?}",
                h.dims(),
                t.dims()
            );
        }
        if fast_path(&[h, t]) {
            let op = AddSiluOp {
                keep: true,
                sigmoid: Mutex::new(None),
            };
            let y = h.contiguous()?.apply_op2_no_bwd(&t.contiguous()?, &op)?;
            return Ok((y, sigmoid_of(op.sigmoid, "add-silu")?));
        }
        let z = h.broadcast_add(t)?.detach();
        let s = candle_nn::ops::sigmoid(&z)?;
        Ok(((&z * &s)?, s))
    }

    /// `(SiLU(z), sigmoid(z))` without a graph.
    pub fn silu(z: &Tensor) -> Result<(Tensor, Tensor)> {
        if fast_path(&[z]) {
            let op = SiluOp {
                sigmoid: Mutex::new(None),
            };
            let y = z.contiguous()?.apply_op1_no_bwd(&op)?;
            return Ok((y, sigmoid_of(op.sigmoid, "silu")?));
        }
        let z = z.detach();
        let s = candle_nn::ops::sigmoid(&z)?;
        Ok(((&z * &s)?, s))
    }

    /// `g · SiLU'(z)` from y = SiLU(z) and s = sigmoid(z), plus `acc` if given.
    pub fn silu_backward(
        g: &Tensor,
        y: &Tensor,
        s: &Tensor,
        acc: Option<&Tensor>,
    ) -> Result<Tensor> {
        if g.dims() != y.dims() || s.dims() != y.dims() || acc.is_some_and(|a| a.dims() != y.dims())
        {
            bail!(
                "silu backward: gradient {:?}, output {:?} and sigmoid {:?} must have one shape",
                g.dims(),
                y.dims(),
                s.dims()
            );
        }
        let mut ts = vec![g, y, s];
        ts.extend(acc);
        if !fast_path(&ts) {
            let d = (g * (s + (y * s.affine(-1.0, 1.0)?)?)?)?;
            return match acc {
                Some(a) => d + a,
                None => Ok(d),
            };
        }
        let n = *y.dims().last().unwrap_or(&1);
        let mut out = with_data(g, |g| {
            with_data(y, |y| with_data(s, |s| Ok(silu_grad_data(g, y, s, n))))
        })?;
        if let Some(a) = acc {
            with_data(a, |a| {
                for (o, a) in out.iter_mut().zip(a) {
                    *o += a;
                }
                Ok(())
            })?;
        }
        Tensor::from_vec(out, y.shape(), &Device::Cpu)
    }

    /// `a · b` for matrices, without a graph, on this crate's GEMM (candle's elsewhere).
    pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let ((m, k), (k2, n)) = (a.dims2()?, b.dims2()?);
        if k != k2 {
            bail!(
                "matmul: {:?} · {:?}: inner dimensions differ",
                a.dims(),
                b.dims()
            );
        }
        if !fast_path(&[a, b]) {
            return a.matmul(b)?.detach().contiguous();
        }
        let mut out = output_buffer(m * n);
        with_view(a, |av| {
            with_view(b, |bv| {
                crate::gemm::matmul(&mut out, av, bv, false);
                Ok(())
            })
        })?;
        Tensor::from_vec(out, (m, n), &Device::Cpu)
    }
}

/// `[cos(f c), sin(f c)]` per element of c, as one op with its own backward pass.
struct SinusoidalOp {
    freqs: Vec<f32>,
}

impl CustomOp1 for SinusoidalOp {
    fn name(&self) -> &'static str {
        "fused-sinusoidal"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let c = contiguous_data(s, l, "sinusoidal embedding")?;
        let n = c.len();
        let width = 2 * self.freqs.len();
        let mut out = output_buffer(n * width);
        let chunk = chunk_len(out.len(), width);
        if chunk >= out.len() {
            simd::sinusoidal(c, &self.freqs, &mut out);
        } else {
            out.par_chunks_mut(chunk)
                .zip(c.par_chunks(chunk / width))
                .for_each(|(o, c)| simd::sinusoidal(c, &self.freqs, o));
        }
        Ok((CpuStorage::F32(out), Shape::from((n, width))))
    }

    fn bwd(&self, c: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        if second_order() {
            return Ok(Some(sinusoidal_backward_composed(c, g, &self.freqs)?));
        }
        let n = c.elem_count();
        let mut out = output_buffer(n);
        with_data(g, |g| {
            with_data(y, |y| {
                simd::sinusoidal_backward(g, y, &self.freqs, &mut out);
                Ok(())
            })
        })?;
        Ok(Some(Tensor::from_vec(out, c.shape(), &Device::Cpu)?))
    }
}

fn freq_row(freqs: &[f32], like: &Tensor) -> Result<Tensor> {
    Tensor::from_slice(freqs, (1, freqs.len()), like.device())?.to_dtype(like.dtype())
}

fn sinusoidal_backward_composed(c: &Tensor, g: &Tensor, freqs: &[f32]) -> Result<Tensor> {
    let k = freqs.len();
    let f = freq_row(freqs, c)?;
    let arg = c.unsqueeze(1)?.broadcast_mul(&f)?;
    let (gc, gs) = (g.narrow(1, 0, k)?, g.narrow(1, k, k)?);
    let d = ((gs * arg.cos()?)? - (gc * arg.sin()?)?)?;
    d.broadcast_mul(&f)?.sum(1)
}

/// `c: [N]` → `[N, 2K]` rows `[cos(f_k c), sin(f_k c)]`, differentiable with respect to
/// c; vectorised on the CPU in f32 (candle's ops elsewhere).
pub fn sinusoidal(c: &Tensor, freqs: &[f32]) -> Result<Tensor> {
    if c.rank() != 1 {
        bail!(
            "sinusoidal embedding: input must be [N], got {:?}",
            c.dims()
        );
    }
    if fast_path(&[c]) {
        let op = SinusoidalOp {
            freqs: freqs.to_vec(),
        };
        return c
            .contiguous()?
            .apply_op1_arc(std::sync::Arc::new(Box::new(op)));
    }
    let arg = c.unsqueeze(1)?.broadcast_mul(&freq_row(freqs, c)?)?;
    Tensor::cat(&[arg.cos()?, arg.sin()?], 1)
}
