//! Relative-position attention (Shaw et al. 2018) with pair terms shared by the heads:
//! scores s_hij = scale · (q_hi + q^R_ij)·(k_hj + k^R_ij) and outputs
//! o_hi = Σ_j w_hij (v_hj + v^R_ij), each one op computed from its definition with its
//! own backward pass. The per-pair terms come packed as `rel = [q^R | k^R | v^R]`
//! (`[B, A, A, 3d]`, one dense layer's output). Built from candle's ops these took a
//! dozen nodes (four products, their transposes and sums, three slices of `rel`); here
//! no intermediate larger than the scores exists. Off the CPU, for other dtypes and for
//! differentiable backward passes, the same formulas from candle's ops.

use crate::bmm::batched_matmul;
use crate::ops::{
    contiguous_data, fast_path, gradient_for, output_buffer, second_order, with_data,
};

const WHAT: &str = "relative attention";
use crate::threads::threads;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Shapes: q, k, v `[B, h, A, d]`, rel `[B, A, A, 3d]`.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    a: usize,
    d: usize,
}

fn dims_of(q: &[usize], rel: &[usize]) -> Result<Dims> {
    match (q, rel) {
        (&[b, h, a, d], &[rb, ri, rj, r3]) if rb == b && ri == a && rj == a && r3 == 3 * d => {
            Ok(Dims { b, h, a, d })
        }
        _ => bail!("relative attention: q/k/v must be [B, h, A, d] and rel [B, A, A, 3d], got {q:?} and {rel:?}"),
    }
}

/// Runs `f(batch index, its block of out)` over the batch, in parallel when large.
fn per_batch(out: &mut [f32], b: usize, work: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let per = out.len() / b.max(1);
    if threads() > 1 && work >= 1 << 20 && b > 1 {
        out.par_chunks_mut(per)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    } else {
        out.chunks_mut(per).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// Runs `body(batch, block of each buffer)` over the batch, the buffers split into
/// blocks of the given sizes (one per batch element), in parallel when `large`.
fn per_batch3(
    bufs: [&mut [f32]; 3],
    sizes: [usize; 3],
    large: bool,
    body: impl Fn(usize, &mut [f32], &mut [f32], &mut [f32]) + Sync,
) {
    let [x, y, z] = bufs;
    let blocks = x.len() / sizes[0].max(1);
    if threads() > 1 && large && blocks > 1 {
        x.par_chunks_mut(sizes[0])
            .zip(y.par_chunks_mut(sizes[1]))
            .zip(z.par_chunks_mut(sizes[2]))
            .enumerate()
            .for_each(|(i, ((x, y), z))| body(i, x, y, z));
    } else {
        for (i, ((x, y), z)) in x
            .chunks_mut(sizes[0])
            .zip(y.chunks_mut(sizes[1]))
            .zip(z.chunks_mut(sizes[2]))
            .enumerate()
        {
            body(i, x, y, z);
        }
    }
}

struct Scores {
    scale: f32,
}

impl CustomOp3 for Scores {
    fn name(&self) -> &'static str {
        "rpe-scores"
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
        let Dims { b, h, a, d } = dims_of(l1.dims(), l3.dims())?;
        let (q, k, rel) = (
            contiguous_data(s1, l1, WHAT)?,
            contiguous_data(s2, l2, WHAT)?,
            contiguous_data(s3, l3, WHAT)?,
        );
        let mut out = output_buffer(b * h * a * a);
        per_batch(&mut out, b, b * h * a * a * d, |bi, o| {
            for i in 0..a {
                for j in 0..a {
                    let r = &rel[((bi * a + i) * a + j) * 3 * d..][..2 * d];
                    let (qr, kr) = r.split_at(d);
                    for hh in 0..h {
                        let qi = &q[((bi * h + hh) * a + i) * d..][..d];
                        let kj = &k[((bi * h + hh) * a + j) * d..][..d];
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
        q: &Tensor,
        k: &Tensor,
        rel: &Tensor,
        _s: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if second_order() {
            // `relative_attention` takes candle's ops when backward passes must be
            // differentiable; a graph built before the switch lands here.
            bail!("relative attention scores: second-order gradients are not supported")
        }
        let Dims { b, h, a, d } = dims_of(q.dims(), rel.dims())?;
        let (mut gq, mut gk, mut grel) = (
            vec![0f32; b * h * a * d],
            vec![0f32; b * h * a * d],
            vec![0f32; b * a * a * 3 * d],
        );
        with_data(q, |q| {
            with_data(k, |k| {
                with_data(rel, |rel| {
                    with_data(g, |g| {
                        let per_q = h * a * d;
                        let per_rel = a * a * 3 * d;
                        let body = |bi: usize, gq: &mut [f32], gk: &mut [f32], gr: &mut [f32]| {
                            let mut qq = vec![0f32; d];
                            let mut kk = vec![0f32; d];
                            for i in 0..a {
                                for j in 0..a {
                                    let r = &rel[((bi * a + i) * a + j) * 3 * d..][..2 * d];
                                    let (qr, kr) = r.split_at(d);
                                    let grr = &mut gr[(i * a + j) * 3 * d..][..2 * d];
                                    for hh in 0..h {
                                        let gs = self.scale * g[((bi * h + hh) * a + i) * a + j];
                                        let qi = &q[((bi * h + hh) * a + i) * d..][..d];
                                        let kj = &k[((bi * h + hh) * a + j) * d..][..d];
                                        for t in 0..d {
                                            qq[t] = qi[t] + qr[t];
                                            kk[t] = kj[t] + kr[t];
                                        }
                                        let gqi = &mut gq[(hh * a + i) * d..][..d];
                                        for t in 0..d {
                                            gqi[t] += gs * kk[t];
                                        }
                                        let gkj = &mut gk[(hh * a + j) * d..][..d];
                                        for t in 0..d {
                                            gkj[t] += gs * qq[t];
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
                        let parallel = b * h * a * a * d >= 1 << 20;
                        per_batch3(
                            [&mut gq, &mut gk, &mut grel],
                            [per_q, per_q, per_rel],
                            parallel,
                            body,
                        );
                        Ok(())
                    })
                })
            })
        })?;
        Ok((
            gradient_for(q, gq)?,
            gradient_for(k, gk)?,
            gradient_for(rel, grel)?,
        ))
    }
}

struct Outputs;

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
        let Dims { b, h, a, d } = dims_of(l2.dims(), l3.dims())?;
        let (w, v, rel) = (
            contiguous_data(s1, l1, WHAT)?,
            contiguous_data(s2, l2, WHAT)?,
            contiguous_data(s3, l3, WHAT)?,
        );
        let mut out = vec![0f32; b * h * a * d];
        per_batch(&mut out, b, b * h * a * a * d, |bi, o| {
            for hh in 0..h {
                for i in 0..a {
                    let oi = &mut o[(hh * a + i) * d..][..d];
                    for j in 0..a {
                        let wij = w[((bi * h + hh) * a + i) * a + j];
                        let vj = &v[((bi * h + hh) * a + j) * d..][..d];
                        let vr = &rel[((bi * a + i) * a + j) * 3 * d + 2 * d..][..d];
                        for t in 0..d {
                            oi[t] += wij * (vj[t] + vr[t]);
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, h, a, d))))
    }

    fn bwd(
        &self,
        w: &Tensor,
        v: &Tensor,
        rel: &Tensor,
        _o: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if second_order() {
            bail!("relative attention outputs: second-order gradients are not supported")
        }
        let Dims { b, h, a, d } = dims_of(v.dims(), rel.dims())?;
        let (mut gw, mut gv, mut grel) = (
            output_buffer(b * h * a * a),
            vec![0f32; b * h * a * d],
            vec![0f32; b * a * a * 3 * d],
        );
        with_data(w, |w| {
            with_data(v, |v| {
                with_data(rel, |rel| {
                    with_data(g, |g| {
                        let body = |bi: usize, gw: &mut [f32], gv: &mut [f32], gr: &mut [f32]| {
                            for hh in 0..h {
                                for i in 0..a {
                                    let go = &g[((bi * h + hh) * a + i) * d..][..d];
                                    for j in 0..a {
                                        let wij = w[((bi * h + hh) * a + i) * a + j];
                                        let vj = &v[((bi * h + hh) * a + j) * d..][..d];
                                        let base = (i * a + j) * 3 * d + 2 * d;
                                        let vr = &rel[bi * a * a * 3 * d + base..][..d];
                                        let mut acc = 0f32;
                                        for t in 0..d {
                                            acc += go[t] * (vj[t] + vr[t]);
                                        }
                                        gw[(hh * a + i) * a + j] = acc;
                                        let gvj = &mut gv[(hh * a + j) * d..][..d];
                                        for t in 0..d {
                                            gvj[t] += wij * go[t];
                                        }
                                        let gvr = &mut gr[base..][..d];
                                        for t in 0..d {
                                            gvr[t] += wij * go[t];
                                        }
                                    }
                                }
                            }
                        };
                        let (pw, pv, pr) = (h * a * a, h * a * d, a * a * 3 * d);
                        let parallel = b * h * a * a * d >= 1 << 20;
                        per_batch3([&mut gw, &mut gv, &mut grel], [pw, pv, pr], parallel, body);
                        Ok(())
                    })
                })
            })
        })?;
        Ok((
            gradient_for(w, gw)?,
            gradient_for(v, gv)?,
            gradient_for(rel, grel)?,
        ))
    }
}

/// The scores from candle's ops, expanded into batched products (no `[B, h, A, A, d]`
/// tensor): q·k, q·k^R (batched over i), q^R·k (batched over j) and q^R·k^R.
fn scores_composed(q: &Tensor, k: &Tensor, rel: &Tensor, scale: f64) -> Result<Tensor> {
    let d = q.dim(D::Minus1)?;
    let (qr, kr) = (rel.narrow(3, 0, d)?, rel.narrow(3, d, d)?);
    let qk = batched_matmul(q, &k.t()?)?; // [B, h, i, j]
    let q_kr = batched_matmul(&q.transpose(1, 2)?, &kr.transpose(2, 3)?)?.transpose(1, 2)?;
    let qr_k =
        batched_matmul(&qr.transpose(1, 2)?, &k.permute((0, 2, 3, 1))?)?.permute((0, 3, 2, 1))?;
    let qr_kr = (&qr * &kr)?.sum(D::Minus1)?.unsqueeze(1)?;
    ((qk + q_kr)? + qr_k)?.broadcast_add(&qr_kr)? * scale
}

fn outputs_composed(w: &Tensor, v: &Tensor, rel: &Tensor) -> Result<Tensor> {
    let d = v.dim(D::Minus1)?;
    let vr = rel.narrow(3, 2 * d, d)?;
    let from_v = batched_matmul(w, v)?;
    let from_vr = batched_matmul(&w.transpose(1, 2)?, &vr)?.transpose(1, 2)?;
    from_v + from_vr
}

/// Relative-position attention: q, k, v `[B, h, A, d]`, rel `[B, A, A, 3d]` packing
/// q^R, k^R, v^R per pair (shared by the heads) → `[B, h, A, d]` with
/// a_ij = softmax_j((q_i + q^R_ij)·(k_j + k^R_ij)/√d), out_i = Σ_j a_ij (v_j + v^R_ij).
/// Differentiable with respect to all four.
pub fn relative_attention(q: &Tensor, k: &Tensor, v: &Tensor, rel: &Tensor) -> Result<Tensor> {
    dims_of(q.dims(), rel.dims())?;
    if k.dims() != q.dims() || v.dims() != q.dims() {
        bail!(
            "relative attention: q, k and v must have one shape, got {:?}, {:?} and {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    if second_order() || !fast_path(&[q, k, v, rel]) {
        let w = candle_nn::ops::softmax(&scores_composed(q, k, rel, scale)?, D::Minus1)?;
        return outputs_composed(&w, v, rel);
    }
    let (q, k, v, rel) = (
        q.contiguous()?,
        k.contiguous()?,
        v.contiguous()?,
        rel.contiguous()?,
    );
    let s = q.apply_op3_arc(
        &k,
        &rel,
        std::sync::Arc::new(Box::new(Scores {
            scale: scale as f32,
        })),
    )?;
    let w = crate::softmax_last_dim(&s)?;
    w.apply_op3_arc(&v, &rel, std::sync::Arc::new(Box::new(Outputs)))
}
