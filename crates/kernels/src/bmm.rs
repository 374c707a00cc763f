//! Batched matrix products of small matrices (attention's per-head products), with
//! any strides: one single-threaded GEMM per matrix, the batch split between threads
//! only when the work is large. candle's batched matmul wants contiguous inputs (so
//! every transposed view was first copied) and hands each tiny product to gemm's own
//! threading, which made two threads slower than one for the scene transformer.

use crate::gemm::{matmul, View};
use crate::ops::{fast_path, output_buffer};
use crate::threads::threads;
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Fewest flops for which the batch is split between threads.
const PARALLEL_FLOPS: usize = 1 << 21;

/// Element offsets of each matrix of a layout whose last two dimensions are the matrix.
fn matrix_offsets(l: &Layout) -> Vec<usize> {
    let dims = l.dims();
    let stride = l.stride();
    let batch_dims = &dims[..dims.len() - 2];
    let count: usize = batch_dims.iter().product();
    let mut offsets = Vec::with_capacity(count);
    let mut idx = vec![0usize; batch_dims.len()];
    for _ in 0..count {
        offsets.push(l.start_offset() + idx.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>());
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < batch_dims[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    offsets
}

struct BatchedMatmul;

impl CustomOp2 for BatchedMatmul {
    fn name(&self) -> &'static str {
        "batched-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (s1.as_slice::<f32>()?, s2.as_slice::<f32>()?);
        let (da, db) = (l1.dims(), l2.dims());
        let r = da.len();
        let (m, k, n) = (da[r - 2], da[r - 1], db[r - 1]);
        let (sa, sb) = (l1.stride(), l2.stride());
        let (oa, ob) = (matrix_offsets(l1), matrix_offsets(l2));
        let mut out = output_buffer(oa.len() * m * n);
        let product = |i: usize, dst: &mut [f32]| {
            let av = View {
                data: a,
                offset: oa[i],
                rows: m,
                cols: k,
                rs: sa[r - 2] as isize,
                cs: sa[r - 1] as isize,
            };
            let bv = View {
                data: b,
                offset: ob[i],
                rows: k,
                cols: n,
                rs: sb[r - 2] as isize,
                cs: sb[r - 1] as isize,
            };
            matmul(dst, av, bv, false);
        };
        let t = threads();
        if m * n == 0 {
        } else if t > 1 && 2 * m * n * k * oa.len() >= PARALLEL_FLOPS {
            let per = oa.len().div_ceil(t);
            out.par_chunks_mut(per * m * n)
                .enumerate()
                .for_each(|(c, chunk)| {
                    for (j, dst) in chunk.chunks_mut(m * n).enumerate() {
                        product(c * per + j, dst);
                    }
                });
        } else {
            for (i, dst) in out.chunks_mut(m * n).enumerate() {
                product(i, dst);
            }
        }
        let mut shape = da.to_vec();
        shape[r - 1] = n;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let r = a.rank();
        let ga = a
            .track_op()
            .then(|| batched_matmul(g, &b.transpose(r - 2, r - 1)?))
            .transpose()?;
        let gb = b
            .track_op()
            .then(|| batched_matmul(&a.transpose(r - 2, r - 1)?, g))
            .transpose()?;
        Ok((ga, gb))
    }
}

/// `a · b` over matching batch dimensions: a `[..., m, k]`, b `[..., k, n]` →
/// `[..., m, n]`, differentiable; any strides (transposed views need no copy). candle's
/// matmul off the CPU or for other dtypes.
pub fn batched_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (da, db) = (a.dims(), b.dims());
    let r = da.len();
    if r < 2 || db.len() != r || da[..r - 2] != db[..r - 2] || da[r - 1] != db[r - 2] {
        bail!("batched matmul: cannot multiply {da:?} by {db:?}");
    }
    if !fast_path(&[a, b]) {
        return a.contiguous()?.matmul(&b.contiguous()?);
    }
    a.apply_op2_arc(b, std::sync::Arc::new(Box::new(BatchedMatmul)))
}
