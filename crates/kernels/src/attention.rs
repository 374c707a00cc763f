//! Multi-head attention on packed rows, one op each way: queries `[B, N, H]` attend to
//! keys and values packed per token (`[B, T, 2H]`: keys, then values), or a block's own
//! `[q | k | v]` rows (`[B, N, 3H]`), heads of `H / heads` values side by side, the
//! output `[B, N, H]` with the heads side by side again. Composed from candle's ops,
//! splitting and merging the heads and the two products took a dozen nodes, and candle's
//! backward pass accumulates each node's gradient into a fresh zeroed buffer; here the
//! graph holds one node, the softmax weights are kept from the forward pass, and no
//! intermediate larger than them exists. Off the CPU, for other dtypes and for
//! differentiable backward passes, the same formulas from candle's ops.

use crate::bmm::batched_matmul;
use crate::gemm::{matmul_serial, matmul_serial_into, View};
use crate::ops::{
    contiguous_data, fast_path, gradient_for, output_buffer, second_order, with_data,
};
use crate::simd::{softmax_rows_backward, softmax_rows_biased};
use crate::threads::per_batch2;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Device, Layout, Result, Shape, Tensor};
use std::sync::Mutex;

/// Multi-head attention of `q: [B, N, H]` over `kv: [B, T, 2H]` (each token's key, then
/// its value), `heads` heads of `H / heads` values: `[B, N, H]` with
/// out_i = Σ_j softmax_j(q_i·k_j / √d + bias_j) v_j per head. `key_bias: [B, T]` is added
/// to every score of key j (−1e9 masks a padding token out); it is a constant and gets no
/// gradient. Differentiable with respect to q and kv.
pub fn attention(
    q: &Tensor,
    kv: &Tensor,
    heads: usize,
    key_bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, n, hid) = q.dims3()?;
    let t = match kv.dims() {
        &[kb, t, h2] if kb == b && h2 == 2 * hid => t,
        dims => bail!(
            "attention: keys and values must be [{b}, T, {}] for queries {:?}, got {dims:?}",
            2 * hid,
            q.dims()
        ),
    };
    let d = head_size(hid, heads)?;
    let bias = key_bias_of(key_bias, b, t)?;
    let rows = AttentionRows {
        queries: n,
        keys: t,
        heads,
        d,
        q_stride: hid,
        q_offset: 0,
        kv_stride: 2 * hid,
        k_offset: 0,
        v_offset: hid,
        scale: 1.0 / (d as f32).sqrt(),
    };
    if second_order() || !fast_path(&[q, kv, &bias]) {
        let (k, v) = (kv.narrow(2, 0, hid)?, kv.narrow(2, hid, hid)?);
        return composed(q, &k, &v, key_bias, heads);
    }
    let op = Attention {
        rows,
        keep: q.track_op() || kv.track_op(),
        weights: Mutex::new(None),
    };
    q.contiguous()?
        .apply_op3_arc(&kv.contiguous()?, &bias, std::sync::Arc::new(Box::new(op)))
}

/// Self-attention of rows that pack each token's query, key and value
/// (`qkv: [B, N, 3H]`, as one dense layer gives them): [`attention`] of the queries over
/// the same tokens' keys and values, without slicing them apart.
pub fn self_attention(qkv: &Tensor, heads: usize, key_bias: Option<&Tensor>) -> Result<Tensor> {
    let (b, n, h3) = qkv.dims3()?;
    if h3 % 3 != 0 {
        bail!(
            "self-attention: rows must pack [q | k | v] (a multiple of 3 wide), got {:?}",
            qkv.dims()
        );
    }
    let hid = h3 / 3;
    let d = head_size(hid, heads)?;
    let bias = key_bias_of(key_bias, b, n)?;
    if second_order() || !fast_path(&[qkv, &bias]) {
        let [q, k, v] = [0, 1, 2].map(|i| qkv.narrow(2, i * hid, hid));
        return composed(&q?, &k?, &v?, key_bias, heads);
    }
    let op = Attention {
        rows: AttentionRows {
            queries: n,
            keys: n,
            heads,
            d,
            q_stride: h3,
            q_offset: 0,
            kv_stride: h3,
            k_offset: hid,
            v_offset: 2 * hid,
            scale: 1.0 / (d as f32).sqrt(),
        },
        keep: qkv.track_op(),
        weights: Mutex::new(None),
    };
    qkv.contiguous()?
        .apply_op2_arc(&bias, std::sync::Arc::new(Box::new(op)))
}

fn head_size(hid: usize, heads: usize) -> Result<usize> {
    if heads == 0 || hid == 0 || hid % heads != 0 {
        bail!("attention: {hid} values per token do not split into {heads} heads");
    }
    Ok(hid / heads)
}

/// The key bias as `[B, T]` (zeros for none), refused when it would need a gradient.
fn key_bias_of(key_bias: Option<&Tensor>, b: usize, t: usize) -> Result<Tensor> {
    match key_bias {
        None => Ok(Tensor::zeros(
            (b, t),
            candle_core::DType::F32,
            &Device::Cpu,
        )?),
        Some(kb) if kb.dims() != [b, t] => {
            bail!(
                "attention: the key bias must be [{b}, {t}], got {:?}",
                kb.dims()
            )
        }
        Some(kb) if kb.track_op() => {
            bail!("attention: the key bias is a constant (a mask) and gets no gradient; detach it")
        }
        Some(kb) => kb.contiguous(),
    }
}

/// The same attention from candle's ops (other devices and dtypes, differentiable
/// backward passes).
fn composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_bias: Option<&Tensor>,
    heads: usize,
) -> Result<Tensor> {
    let split = |x: &Tensor| -> Result<Tensor> {
        let (b, n, h) = x.dims3()?;
        x.reshape((b, n, heads, h / heads))?.transpose(1, 2)
    };
    let (q, k, v) = (split(q)?, split(k)?, split(v)?);
    let scale = 1.0 / (q.dim(3)? as f64).sqrt();
    let mut scores = (batched_matmul(&q, &k.t()?)? * scale)?;
    if let Some(kb) = key_bias {
        let (b, t) = kb.dims2()?;
        scores = scores.broadcast_add(&kb.to_dtype(scores.dtype())?.reshape((b, 1, 1, t))?)?;
    }
    let w = crate::softmax_last_dim(&scores)?;
    let out = batched_matmul(&w, &v)?; // [B, heads, N, d]
    let (b, nh, n, d) = out.dims4()?;
    out.transpose(1, 2)?.reshape((b, n, nh * d))
}

/// Where one batch element's heads lie in its packed rows: query row i, head h at
/// `q[i·q_stride + q_offset + h·d ..][..d]`, key row j at
/// `kv[j·kv_stride + k_offset + h·d ..]`, value row j at `kv[j·kv_stride + v_offset + h·d ..]`.
#[derive(Clone, Copy, Debug)]
struct AttentionRows {
    queries: usize,
    keys: usize,
    heads: usize,
    d: usize,
    q_stride: usize,
    q_offset: usize,
    kv_stride: usize,
    k_offset: usize,
    v_offset: usize,
    scale: f32,
}

impl AttentionRows {
    /// Head h's columns of `rows` rows at `stride`, from `offset`.
    fn head<'a>(
        &self,
        data: &'a [f32],
        rows: usize,
        stride: usize,
        offset: usize,
        h: usize,
    ) -> View<'a> {
        View {
            data,
            offset: offset + h * self.d,
            rows,
            cols: self.d,
            rs: stride as isize,
            cs: 1,
        }
    }

    /// One batch element: the weights `w [heads, N, T]` and the output `out [N, heads·d]`
    /// (each head's products are small GEMMs on strided views of the packed rows).
    fn forward(&self, q: &[f32], kv: &[f32], bias: &[f32], w: &mut [f32], out: &mut [f32]) {
        let (n, t, hid) = (self.queries, self.keys, self.heads * self.d);
        for (h, wh) in w.chunks_exact_mut(n * t).enumerate() {
            let qh = self.head(q, n, self.q_stride, self.q_offset, h);
            let kh = self.head(kv, t, self.kv_stride, self.k_offset, h);
            matmul_serial(wh, qh, kh.t(), false);
            softmax_rows_biased(wh, bias, self.scale, t);
            let vh = self.head(kv, t, self.kv_stride, self.v_offset, h);
            matmul_serial_into(out, h * self.d, hid, View::row_major(wh, n, t), vh, false);
        }
    }

    /// The backward pass of [`Self::forward`] from its weights and the output gradient
    /// `go [N, heads·d]`: `gq [N, heads·d]` and `gkv [T, 2·heads·d]` (keys, then values),
    /// overwritten; `dw` is scratch of `N·T`.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        q: &[f32],
        kv: &[f32],
        w: &[f32],
        go: &[f32],
        gq: &mut [f32],
        gkv: &mut [f32],
        dw: &mut [f32],
    ) {
        let (n, t, d, hid) = (self.queries, self.keys, self.d, self.heads * self.d);
        for (h, wh) in w.chunks_exact(n * t).enumerate() {
            let wv = View::row_major(wh, n, t);
            let gh = self.head(go, n, hid, 0, h);
            let kh = self.head(kv, t, self.kv_stride, self.k_offset, h);
            let vh = self.head(kv, t, self.kv_stride, self.v_offset, h);
            let qh = self.head(q, n, self.q_stride, self.q_offset, h);
            // dL/dv = wᵀ g; dL/dw = g vᵀ, through the softmax to the scores.
            matmul_serial_into(gkv, hid + h * d, 2 * hid, wv.t(), gh, false);
            matmul_serial(dw, gh, vh.t(), false);
            softmax_rows_backward(wh, dw, self.scale, t);
            let ds = View::row_major(dw, n, t);
            matmul_serial_into(gq, h * d, hid, ds, kh, false);
            matmul_serial_into(gkv, h * d, 2 * hid, ds.t(), qh, false);
        }
    }
}

/// The op of [`attention`] (`q, kv, bias`) and [`self_attention`] (`qkv, bias`).
struct Attention {
    rows: AttentionRows,
    /// Whether a backward pass can follow (some input is tracked).
    keep: bool,
    /// The softmax weights `[B, heads, N, T]` of the forward pass.
    weights: Mutex<Option<Vec<f32>>>,
}

const WHAT: &str = "attention";

impl Attention {
    /// Floats per batch element of the query rows and of the key/value rows.
    fn blocks(&self) -> (usize, usize) {
        let r = &self.rows;
        (r.queries * r.q_stride, r.keys * r.kv_stride)
    }

    /// Whether a pass over `b` batch elements is worth splitting between threads.
    fn large(&self, b: usize) -> bool {
        let r = &self.rows;
        b * r.heads * r.queries * r.keys * r.d >= 1 << 19
    }

    fn forward(
        &self,
        q: &[f32],
        kv: &[f32],
        bias: &[f32],
        b: usize,
    ) -> Result<(CpuStorage, Shape)> {
        let r = self.rows;
        let (q_block, kv_block) = self.blocks();
        let (hid, w_block) = (r.heads * r.d, r.heads * r.queries * r.keys);
        if q.len() != b * q_block || kv.len() != b * kv_block || bias.len() != b * r.keys {
            bail!("{WHAT}: inputs do not match their shapes");
        }
        let mut out = output_buffer(b * r.queries * hid);
        let mut w = output_buffer(b * w_block);
        let body = |bi: usize, o: &mut [f32], wb: &mut [f32]| {
            r.forward(
                &q[bi * q_block..][..q_block],
                &kv[bi * kv_block..][..kv_block],
                &bias[bi * r.keys..][..r.keys],
                wb,
                o,
            )
        };
        per_batch2(
            [&mut out, &mut w],
            [r.queries * hid, w_block],
            self.large(b),
            body,
        );
        if self.keep {
            *self.weights.lock().expect("attention weights lock") = Some(w);
        }
        Ok((CpuStorage::F32(out), Shape::from((b, r.queries, hid))))
    }

    /// Gradients of the queries `[B, N, H]` and of the keys and values `[B, T, 2H]`.
    fn backward(&self, q: &Tensor, kv: &Tensor, g: &Tensor) -> Result<(Vec<f32>, Vec<f32>)> {
        if second_order() {
            // The public functions take candle's ops when backward passes must be
            // differentiable; a graph built before the switch lands here.
            bail!("{WHAT}: second-order gradients are not supported by the fused op");
        }
        let r = self.rows;
        let b = g.dim(0)?;
        let (q_block, kv_block) = self.blocks();
        let hid = r.heads * r.d;
        let (gq_block, gkv_block) = (r.queries * hid, r.keys * 2 * hid);
        let w_block = r.heads * r.queries * r.keys;
        let guard = self.weights.lock().expect("attention weights lock");
        let Some(w) = guard.as_ref() else {
            bail!("{WHAT}: backward pass without a kept forward pass");
        };
        let mut gq = output_buffer(b * gq_block);
        let mut gkv = output_buffer(b * gkv_block);
        with_data(q, |q| {
            with_data(kv, |kv| {
                with_data(g, |g| {
                    let body = |bi: usize, gq: &mut [f32], gkv: &mut [f32]| {
                        let mut dw = output_buffer(r.queries * r.keys);
                        r.backward(
                            &q[bi * q_block..][..q_block],
                            &kv[bi * kv_block..][..kv_block],
                            &w[bi * w_block..][..w_block],
                            &g[bi * gq_block..][..gq_block],
                            gq,
                            gkv,
                            &mut dw,
                        )
                    };
                    per_batch2(
                        [&mut gq, &mut gkv],
                        [gq_block, gkv_block],
                        self.large(b),
                        body,
                    );
                    Ok(())
                })
            })
        })?;
        Ok((gq, gkv))
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
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
        let q = contiguous_data(s1, l1, WHAT)?;
        let kv = contiguous_data(s2, l2, WHAT)?;
        let bias = contiguous_data(s3, l3, WHAT)?;
        self.forward(q, kv, bias, l1.dims()[0])
    }

    fn bwd(
        &self,
        q: &Tensor,
        kv: &Tensor,
        _bias: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gq, gkv) = self.backward(q, kv, g)?;
        Ok((gradient_for(q, gq)?, gradient_for(kv, gkv)?, None))
    }
}

impl CustomOp2 for Attention {
    fn name(&self) -> &'static str {
        "self-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let qkv = contiguous_data(s1, l1, WHAT)?;
        let bias = contiguous_data(s2, l2, WHAT)?;
        self.forward(qkv, qkv, bias, l1.dims()[0])
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        _bias: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (gq, gkv) = self.backward(qkv, qkv, g)?;
        // Each row of the packed gradient: the query's part, then the key's and value's.
        let r = self.rows;
        let hid = r.heads * r.d;
        let mut out = output_buffer(gq.len() + gkv.len());
        for ((row, a), c) in out
            .chunks_exact_mut(3 * hid)
            .zip(gq.chunks_exact(hid))
            .zip(gkv.chunks_exact(2 * hid))
        {
            row[..hid].copy_from_slice(a);
            row[hid..].copy_from_slice(c);
        }
        Ok((gradient_for(qkv, out)?, None))
    }
}
