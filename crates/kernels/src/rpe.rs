//! Relative-position attention (Shaw et al. 2018) with pair terms shared by the heads:
//! scores s_hij = scale · (q_hi + q^R_ij)·(k_hj + k^R_ij) and outputs
//! o_hi = Σ_j w_hij (v_hj + v^R_ij), each one op computed from its definition with its
//! own backward pass. The queries, keys and values are read from the packed rows one
//! dense layer gives (`[B, A, 3H]`, heads side by side), the per-pair terms from
//! `rel = [q^R | k^R | v^R]` (`[B, A, A, 3d]`, another dense layer's output), and the
//! output has the heads side by side again. Built from candle's ops these took two
//! dozen nodes (slicing and splitting the heads, four products, their transposes and
//! sums, three slices of `rel`); here no intermediate larger than the scores exists. Off the CPU, for other dtypes and for
//! differentiable backward passes, the same formulas from candle's ops.

use crate::bmm::batched_matmul;
use crate::ops::{
    contiguous_data, fast_path, gradient_for, output_buffer, second_order, with_data,
};

const WHAT: &str = "relative attention";
use crate::threads::{per_batch, per_batch2, per_batch3};
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};

/// Shapes: qkv `[B, A, 3H]` (each agent's query, key and value, `h` heads of d side by
/// side in each), rel `[B, A, A, 3d]`.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    a: usize,
    d: usize,
}

impl Dims {
    /// Values per agent row of qkv (3H).
    fn row(&self) -> usize {
        3 * self.h * self.d
    }

    /// Offsets in one batch element's qkv of agent i's query, key and value of head hh.
    fn q(&self, i: usize, hh: usize) -> usize {
        i * self.row() + hh * self.d
    }
    fn k(&self, j: usize, hh: usize) -> usize {
        self.q(j, hh) + self.h * self.d
    }
    fn v(&self, j: usize, hh: usize) -> usize {
        self.q(j, hh) + 2 * self.h * self.d
    }
}

fn dims_of(qkv: &[usize], rel: &[usize], heads: usize) -> Result<Dims> {
    match (qkv, rel) {
        (&[b, a, h3], &[rb, ri, rj, r3])
            if heads > 0 && h3 % (3 * heads) == 0 && rb == b && ri == a && rj == a && r3 == 3 * (h3 / (3 * heads)) =>
        {
            Ok(Dims { b, h: heads, a, d: h3 / (3 * heads) })
        }
        _ => bail!("relative attention: qkv must be [B, A, 3·heads·d] and rel [B, A, A, 3d] with {heads} heads, got {qkv:?} and {rel:?}"),
    }
}

/// Whether the work of a pass is large enough to split the batch between threads.
fn large(dims: Dims) -> bool {
    dims.b * dims.h * dims.a * dims.a * dims.d >= 1 << 20
}

/// Scores `[B, h, A, A]` from qkv and rel.
struct Scores {
    heads: usize,
    scale: f32,
}

impl CustomOp2 for Scores {
    fn name(&self) -> &'static str {
        "rpe-scores"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = dims_of(l1.dims(), l2.dims(), self.heads)?;
        let Dims { b, h, a, d } = dims;
        let (qkv, rel) = (
            contiguous_data(s1, l1, WHAT)?,
            contiguous_data(s2, l2, WHAT)?,
        );
        let mut out = output_buffer(b * h * a * a);
        per_batch(&mut out, b, b * h * a * a * d, |bi, o| {
            let x = &qkv[bi * a * dims.row()..][..a * dims.row()];
            for i in 0..a {
                for j in 0..a {
                    let r = &rel[((bi * a + i) * a + j) * 3 * d..][..2 * d];
                    let (qr, kr) = r.split_at(d);
                    for hh in 0..h {
                        let qi = &x[dims.q(i, hh)..][..d];
                        let kj = &x[dims.k(j, hh)..][..d];
                        let mut acc = 0f32;
                        for t in 0..d {
                            acc += (qi[t] + qr[t]) * (kj[t] + kr[t]);
                        }
                        o[(hh * a + i) * a + j] = self.scale * acc;
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, h, a, a))))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        rel: &Tensor,
        _s: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if second_order() {
            // `relative_attention` takes candle's ops when backward passes must be
            // differentiable; a graph built before the switch lands here.
            bail!("relative attention scores: second-order gradients are not supported")
        }
        let dims = dims_of(qkv.dims(), rel.dims(), self.heads)?;
        let Dims { b, h, a, d } = dims;
        // The values' part of qkv gets no gradient from the scores.
        let (mut gqkv, mut grel) = (
            vec![0f32; b * a * dims.row()],
            vec![0f32; b * a * a * 3 * d],
        );
        with_data(qkv, |x| {
            with_data(rel, |rel| {
                with_data(g, |g| {
                    let body = |bi: usize, gx: &mut [f32], gr: &mut [f32]| {
                        let x = &x[bi * a * dims.row()..][..a * dims.row()];
                        let mut qq = vec![0f32; d];
                        let mut kk = vec![0f32; d];
                        for i in 0..a {
                            for j in 0..a {
                                let r = &rel[((bi * a + i) * a + j) * 3 * d..][..2 * d];
                                let (qr, kr) = r.split_at(d);
                                let grr = &mut gr[(i * a + j) * 3 * d..][..2 * d];
                                for hh in 0..h {
                                    let gs = self.scale * g[((bi * h + hh) * a + i) * a + j];
                                    let qi = &x[dims.q(i, hh)..][..d];
                                    let kj = &x[dims.k(j, hh)..][..d];
                                    for t in 0..d {
                                        qq[t] = qi[t] + qr[t];
                                        kk[t] = kj[t] + kr[t];
                                    }
                                    for (gq, k) in gx[dims.q(i, hh)..][..d].iter_mut().zip(&kk) {
                                        *gq += gs * k;
                                    }
                                    for (gk, q) in gx[dims.k(j, hh)..][..d].iter_mut().zip(&qq) {
                                        *gk += gs * q;
                                    }
                                    let (gqr, gkr) = grr.split_at_mut(d);
                                    for t in 0..d {
                                        gqr[t] += gs * kk[t];
                                        gkr[t] += gs * qq[t];
                                    }
                                }
                            }
                        }
                    };
                    let sizes = [a * dims.row(), a * a * 3 * d];
                    per_batch2([&mut gqkv, &mut grel], sizes, large(dims), body);
                    Ok(())
                })
            })
        })?;
        Ok((gradient_for(qkv, gqkv)?, gradient_for(rel, grel)?))
    }
}

/// Outputs `[B, A, H]` (heads side by side) from the weights, qkv and rel.
struct Outputs {
    heads: usize,
}

impl CustomOp3 for Outputs {
    fn name(&self) -> &'static str {
        "rpe-outputs"
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
        let dims = dims_of(l2.dims(), l3.dims(), self.heads)?;
        let Dims { b, h, a, d } = dims;
        let (w, qkv, rel) = (
            contiguous_data(s1, l1, WHAT)?,
            contiguous_data(s2, l2, WHAT)?,
            contiguous_data(s3, l3, WHAT)?,
        );
        let mut out = vec![0f32; b * a * h * d];
        per_batch(&mut out, b, b * h * a * a * d, |bi, o| {
            let x = &qkv[bi * a * dims.row()..][..a * dims.row()];
            for hh in 0..h {
                for i in 0..a {
                    let oi = &mut o[(i * h + hh) * d..][..d];
                    for j in 0..a {
                        let wij = w[((bi * h + hh) * a + i) * a + j];
                        let vj = &x[dims.v(j, hh)..][..d];
                        let vr = &rel[((bi * a + i) * a + j) * 3 * d + 2 * d..][..d];
                        for t in 0..d {
                            oi[t] += wij * (vj[t] + vr[t]);
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, a, h * d))))
    }

    fn bwd(
        &self,
        w: &Tensor,
        qkv: &Tensor,
        rel: &Tensor,
        _o: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if second_order() {
            bail!("relative attention outputs: second-order gradients are not supported")
        }
        let dims = dims_of(qkv.dims(), rel.dims(), self.heads)?;
        let Dims { b, h, a, d } = dims;
        // Only the values' part of qkv gets a gradient from the outputs.
        let (mut gw, mut gqkv, mut grel) = (
            output_buffer(b * h * a * a),
            vec![0f32; b * a * dims.row()],
            vec![0f32; b * a * a * 3 * d],
        );
        with_data(w, |w| {
            with_data(qkv, |x| {
                with_data(rel, |rel| {
                    with_data(g, |g| {
                        let body = |bi: usize, gw: &mut [f32], gx: &mut [f32], gr: &mut [f32]| {
                            let x = &x[bi * a * dims.row()..][..a * dims.row()];
                            for hh in 0..h {
                                for i in 0..a {
                                    let go = &g[((bi * a + i) * h + hh) * d..][..d];
                                    for j in 0..a {
                                        let wij = w[((bi * h + hh) * a + i) * a + j];
                                        let vj = &x[dims.v(j, hh)..][..d];
                                        let base = (i * a + j) * 3 * d + 2 * d;
                                        let vr = &rel[bi * a * a * 3 * d + base..][..d];
                                        let mut acc = 0f32;
                                        for t in 0..d {
                                            acc += go[t] * (vj[t] + vr[t]);
                                        }
                                        gw[(hh * a + i) * a + j] = acc;
                                        for (gv, gt) in gx[dims.v(j, hh)..][..d].iter_mut().zip(go)
                                        {
                                            *gv += wij * gt;
                                        }
                                        for (gv, gt) in gr[base..][..d].iter_mut().zip(go) {
                                            *gv += wij * gt;
                                        }
                                    }
                                }
                            }
                        };
                        let sizes = [h * a * a, a * dims.row(), a * a * 3 * d];
                        per_batch3([&mut gw, &mut gqkv, &mut grel], sizes, large(dims), body);
                        Ok(())
                    })
                })
            })
        })?;
        Ok((
            gradient_for(w, gw)?,
            gradient_for(qkv, gqkv)?,
            gradient_for(rel, grel)?,
        ))
    }
}

/// The relative attention from candle's ops, on heads split out of qkv and expanded
/// into batched products (no `[B, h, A, A, d]` tensor): q·k, q·k^R (batched over i),
/// q^R·k (batched over j) and q^R·k^R, then w·v and w·v^R.
fn composed(qkv: &Tensor, rel: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let (b, a, h3) = qkv.dims3()?;
    let hid = h3 / 3;
    let d = hid / heads;
    let split = |i: usize| -> Result<Tensor> {
        qkv.narrow(2, i * hid, hid)?
            .reshape((b, a, heads, d))?
            .transpose(1, 2)
    };
    let (q, k, v) = (split(0)?, split(1)?, split(2)?);
    let (qr, kr, vr) = (
        rel.narrow(3, 0, d)?,
        rel.narrow(3, d, d)?,
        rel.narrow(3, 2 * d, d)?,
    );
    let qk = batched_matmul(&q, &k.t()?)?; // [B, h, i, j]
    let q_kr = batched_matmul(&q.transpose(1, 2)?, &kr.transpose(2, 3)?)?.transpose(1, 2)?;
    let qr_k =
        batched_matmul(&qr.transpose(1, 2)?, &k.permute((0, 2, 3, 1))?)?.permute((0, 3, 2, 1))?;
    let qr_kr = (&qr * &kr)?.sum(D::Minus1)?.unsqueeze(1)?;
    let scores = (((qk + q_kr)? + qr_k)?.broadcast_add(&qr_kr)? * scale)?;
    let w = crate::softmax_last_dim(&scores)?;
    let from_v = batched_matmul(&w, &v)?;
    let from_vr = batched_matmul(&w.transpose(1, 2)?, &vr)?.transpose(1, 2)?;
    (from_v + from_vr)?.transpose(1, 2)?.reshape((b, a, hid))
}

/// Relative-position self-attention of rows that pack each agent's query, key and
/// value (`qkv: [B, A, 3H]`, `heads` heads of d = H / heads side by side in each), with
/// `rel: [B, A, A, 3d]` packing q^R, k^R, v^R per pair (shared by the heads):
/// `[B, A, H]` with, per head, a_ij = softmax_j((q_i + q^R_ij)·(k_j + k^R_ij)/√d) and
/// out_i = Σ_j a_ij (v_j + v^R_ij). Differentiable with respect to both.
pub fn relative_attention(qkv: &Tensor, rel: &Tensor, heads: usize) -> Result<Tensor> {
    let Dims { d, .. } = dims_of(qkv.dims(), rel.dims(), heads)?;
    let scale = 1.0 / (d as f64).sqrt();
    if second_order() || !fast_path(&[qkv, rel]) {
        return composed(qkv, rel, heads, scale);
    }
    let (qkv, rel) = (qkv.contiguous()?, rel.contiguous()?);
    let s = qkv.apply_op2_arc(
        &rel,
        std::sync::Arc::new(Box::new(Scores {
            heads,
            scale: scale as f32,
        })),
    )?;
    let w = crate::softmax_last_dim(&s)?;
    w.apply_op3_arc(&qkv, &rel, std::sync::Arc::new(Box::new(Outputs { heads })))
}
