//! The whole residual MLP of Gen-neG (App. B.1) as one op with its own backward pass:
//! `h = W_in x + b_in + t`, t = W_t e + b_t; per block `h ← h + W2 SiLU(W1 SiLU(h + t) +
//! b1) + b2`; output `W_out SiLU(h) + b_out`. Layer by layer, candle's backward pass
//! spends a zeroed buffer and an addition on every gradient it accumulates (about a
//! fifth of a training step once the layers were fused); here the backward pass runs
//! over the kept activations in one place, the parameters enter packed in one tensor
//! (their gradients leave the same way, and candle's `cat` hands each its slice), and
//! no activation gradient goes through candle at all.

use crate::gemm::{matmul, View};
use crate::ops::{
    bias_act, column_sums, contiguous_data, gradient_for, output_buffer, silu_grad_data, with_data,
    Act,
};
use candle_core::{bail, CpuStorage, CustomOp3, Device, Layout, Result, Shape, Tensor};
use std::sync::Mutex;

/// Sizes of a residual MLP; the parameters are packed in the order of [`ResMlpShape::parameter_shapes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResMlpShape {
    pub in_dim: usize,
    pub hidden: usize,
    pub embedding: usize,
    pub out_dim: usize,
    pub blocks: usize,
}

impl ResMlpShape {
    /// (rows, cols) of each packed parameter (a bias has cols = 1): input W and b, time
    /// W and b, per block fc1 W and b and fc2 W and b, output W and b.
    pub fn parameter_shapes(&self) -> Vec<(usize, usize)> {
        let (h, e) = (self.hidden, self.embedding);
        let mut v = vec![(h, self.in_dim), (h, 1), (h, e), (h, 1)];
        for _ in 0..self.blocks {
            v.extend([(h, h), (h, 1), (h, h), (h, 1)]);
        }
        v.extend([(self.out_dim, h), (self.out_dim, 1)]);
        v
    }

    fn offsets(&self) -> Vec<usize> {
        let mut off = vec![0];
        for (r, c) in self.parameter_shapes() {
            off.push(off.last().unwrap() + r * c);
        }
        off
    }
}

/// What the backward pass reads, per block: u = SiLU(z1), its sigmoid, a = SiLU(W1 u +
/// b1), its sigmoid; and SiLU(h) with its sigmoid before the output layer.
struct Kept {
    temb_rows: usize,
    blocks: Vec<[Vec<f32>; 4]>,
    hs: Vec<f32>,
    s_hs: Vec<f32>,
}

struct ResMlpOp {
    shape: ResMlpShape,
    keep: bool,
    kept: Mutex<Option<Kept>>,
}

fn mat(data: &[f32], rows: usize, cols: usize) -> View<'_> {
    View::row_major(data, rows, cols)
}

/// `dst[rows, n] = a[rows, k] · W[n, k]ᵀ`.
fn times_wt(a: &[f32], rows: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    let mut out = output_buffer(rows * n);
    matmul(&mut out, mat(a, rows, k), mat(w, n, k).t(), false);
    out
}

/// `dst[rows, k] = g[rows, n] · W[n, k]`.
fn times_w(g: &[f32], rows: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    let mut out = output_buffer(rows * k);
    matmul(&mut out, mat(g, rows, n), mat(w, n, k), false);
    out
}

/// `dst[n, k] = g[rows, n]ᵀ · x[rows, k]`, written into `dst`.
fn weight_grad(dst: &mut [f32], g: &[f32], rows: usize, n: usize, x: &[f32], k: usize) {
    matmul(dst, mat(g, rows, n).t(), mat(x, rows, k), false);
}

fn add_into(acc: &mut [f32], v: &[f32]) {
    for (a, b) in acc.iter_mut().zip(v) {
        *a += b;
    }
}

impl CustomOp3 for ResMlpOp {
    fn name(&self) -> &'static str {
        "fused-residual-mlp"
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
        let sh = self.shape;
        let (h, e) = (sh.hidden, sh.embedding);
        let what = "fused residual MLP";
        let x = contiguous_data(s1, l1, what)?;
        let emb = contiguous_data(s2, l2, what)?;
        let p = contiguous_data(s3, l3, what)?;
        let off = sh.offsets();
        let prm = |i: usize| &p[off[i]..off[i + 1]];
        let rows = l1.dims()[0];
        let temb_rows = l2.dims()[0];
        // t = W_t e + b_t: one row per input row, or one row for all (a shared σ).
        let mut temb = times_wt(emb, temb_rows, prm(2), h, e);
        bias_act(&mut temb, prm(3), h, Act::Identity, false);
        let mut hid = times_wt(x, rows, prm(0), h, sh.in_dim);
        bias_act(&mut hid, prm(1), h, Act::Identity, false);
        bias_act(&mut hid, &temb, h, Act::Identity, false);
        let mut blocks = Vec::with_capacity(sh.blocks);
        for blk in 0..sh.blocks {
            let base = 4 + 4 * blk;
            let mut u = hid.clone();
            let su = bias_act(&mut u, &temb, h, Act::Silu, true).expect("kept");
            let mut a = times_wt(&u, rows, prm(base), h, h);
            let sa = bias_act(&mut a, prm(base + 1), h, Act::Silu, true).expect("kept");
            let mut r = times_wt(&a, rows, prm(base + 2), h, h);
            bias_act(&mut r, prm(base + 3), h, Act::Identity, false);
            add_into(&mut hid, &r);
            if self.keep {
                blocks.push([u, su, a, sa]);
            }
        }
        let nb = 4 + 4 * sh.blocks;
        let mut hs = hid;
        let s_hs = bias_act(&mut hs, &vec![0.0; h], h, Act::Silu, true).expect("kept");
        let mut out = times_wt(&hs, rows, prm(nb), sh.out_dim, h);
        bias_act(&mut out, prm(nb + 1), sh.out_dim, Act::Identity, false);
        if self.keep {
            *self.kept.lock().expect("kept lock") = Some(Kept {
                temb_rows,
                blocks,
                hs,
                s_hs,
            });
        }
        Ok((CpuStorage::F32(out), Shape::from((rows, sh.out_dim))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        emb: &Tensor,
        params: &Tensor,
        _out: &Tensor,
        g_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let sh = self.shape;
        let (h, e, o) = (sh.hidden, sh.embedding, sh.out_dim);
        // Kept until the graph is dropped, so a second backward pass over it works too.
        let guard = self.kept.lock().expect("kept lock");
        let Some(kept) = guard.as_ref() else {
            bail!("fused residual MLP: backward pass without a kept forward pass");
        };
        let rows = x.dim(0)?;
        let off = sh.offsets();
        let mut gp = vec![
            0f32;
            if params.track_op() {
                *off.last().unwrap()
            } else {
                0
            }
        ];
        let (want_x, want_emb, want_p) = (x.track_op(), emb.track_op(), params.track_op());
        let (g_x, g_emb) = with_data(params, |p| {
            let prm = |i: usize| &p[off[i]..off[i + 1]];
            with_data(g_out, |go| {
                with_data(x, |x| {
                    with_data(emb, |emb| {
                        let at = |i: usize| off[i]..off[i + 1];
                        let nb = 4 + 4 * sh.blocks;
                        // Output layer.
                        if want_p {
                            weight_grad(&mut gp[at(nb)], go, rows, o, &kept.hs, h);
                            gp[at(nb + 1)].copy_from_slice(&column_sums(go, o));
                        }
                        let g_hs = times_w(go, rows, prm(nb), o, h);
                        let mut g_h = silu_grad_data(&g_hs, &kept.hs, &kept.s_hs, h);
                        let mut g_t = vec![0f32; rows * h];
                        for blk in (0..sh.blocks).rev() {
                            let base = 4 + 4 * blk;
                            let [u, su, a, sa] = &kept.blocks[blk];
                            if want_p {
                                weight_grad(&mut gp[at(base + 2)], &g_h, rows, h, a, h);
                                gp[at(base + 3)].copy_from_slice(&column_sums(&g_h, h));
                            }
                            let g_av = times_w(&g_h, rows, prm(base + 2), h, h);
                            let g_a = silu_grad_data(&g_av, a, sa, h);
                            if want_p {
                                weight_grad(&mut gp[at(base)], &g_a, rows, h, u, h);
                                gp[at(base + 1)].copy_from_slice(&column_sums(&g_a, h));
                            }
                            let g_u = times_w(&g_a, rows, prm(base), h, h);
                            let g_z = silu_grad_data(&g_u, u, su, h);
                            add_into(&mut g_h, &g_z);
                            add_into(&mut g_t, &g_z);
                        }
                        add_into(&mut g_t, &g_h);
                        // Input layer.
                        if want_p {
                            weight_grad(&mut gp[at(0)], &g_h, rows, h, x, sh.in_dim);
                            gp[at(1)].copy_from_slice(&column_sums(&g_h, h));
                        }
                        let g_x = want_x.then(|| times_w(&g_h, rows, prm(0), h, sh.in_dim));
                        // Time layer; a shared row collects every row's gradient.
                        let g_t = if kept.temb_rows == 1 && rows > 1 {
                            column_sums(&g_t, h)
                        } else {
                            g_t
                        };
                        if want_p {
                            weight_grad(&mut gp[at(2)], &g_t, kept.temb_rows, h, emb, e);
                            gp[at(3)].copy_from_slice(&column_sums(&g_t, h));
                        }
                        let g_emb = want_emb.then(|| times_w(&g_t, kept.temb_rows, prm(2), h, e));
                        Ok((g_x, g_emb))
                    })
                })
            })
        })?;
        let dev = Device::Cpu;
        Ok((
            g_x.map(|v| Tensor::from_vec(v, x.shape(), &dev))
                .transpose()?,
            g_emb
                .map(|v| Tensor::from_vec(v, emb.shape(), &dev))
                .transpose()?,
            gradient_for(params, gp)?,
        ))
    }
}

/// The residual MLP on `x: [B, in]` and the noise embedding `emb: [B, E]` (or `[1, E]`
/// shared by every row), with `params` the packed parameters (in the order of
/// [`ResMlpShape::parameter_shapes`], each flattened) → `[B, out]`. Differentiable with
/// respect to all three; f32 on the CPU only (the caller takes its layers elsewhere).
pub fn res_mlp(x: &Tensor, emb: &Tensor, params: &Tensor, shape: ResMlpShape) -> Result<Tensor> {
    let total: usize = shape.parameter_shapes().iter().map(|(r, c)| r * c).sum();
    let rows = x.dim(0)?;
    if x.dims() != [rows, shape.in_dim]
        || emb.rank() != 2
        || emb.dim(1)? != shape.embedding
        || !(emb.dim(0)? == rows || emb.dim(0)? == 1)
        || params.dims() != [total]
    {
        bail!(
            "fused residual MLP {shape:?}: got x {:?}, embedding {:?}, {} parameters",
            x.dims(),
            emb.dims(),
            params.elem_count()
        );
    }
    let op = ResMlpOp {
        shape,
        keep: x.track_op() || emb.track_op() || params.track_op(),
        kept: Mutex::new(None),
    };
    x.contiguous()?.apply_op3_arc(
        &emb.contiguous()?,
        &params.contiguous()?,
        std::sync::Arc::new(Box::new(op)),
    )
}
