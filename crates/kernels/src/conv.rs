//! 2-D convolution as im2col + GEMM, forward and backward, with an optional
//! nearest-neighbour upsampling of the input folded into the im2col (a U-Net's "up"
//! convolution reads the small map directly, no upsampled copy).
//!
//! Three ops, each the others' derivative: the convolution `y = W ⊛ x + b`, its input
//! gradient `dx = Wᵀ ⊛ dy` and its weight gradient `dW = dy ⊛ xᵀ`. Each op's backward
//! pass is made of the three, so derivatives of any order stay on the fast path (DLSM
//! trains through the classifier's input gradient). candle's CPU conv2d backward, the
//! alternative, was slower than a whole transformer step here.

use crate::channel::channel_sum;
use crate::gemm::{matmul, matmul_serial, View};
use crate::ops::{
    contiguous_data, fast_path, gradient_for, output_buffer, second_order, with_data,
};
use crate::threads::{threads, PARALLEL_GEMM_FLOPS};
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// How a convolution reads its input: the input is first upsampled `upsample`× by
/// nearest neighbour, zero-padded by `padding` on every side, and read every `stride`
/// cells. `Conv2dSpec::default()` is stride 1, no padding, no upsampling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dSpec {
    pub stride: usize,
    pub padding: usize,
    pub upsample: usize,
}

impl Default for Conv2dSpec {
    fn default() -> Self {
        Self {
            stride: 1,
            padding: 0,
            upsample: 1,
        }
    }
}

impl Conv2dSpec {
    /// Stride 1, `padding` zeros: a `k × k` kernel with `padding = k / 2` keeps the size.
    pub fn same(padding: usize) -> Self {
        Self {
            padding,
            ..Self::default()
        }
    }

    /// Output side for an input side `n` and a kernel side `k`, or `None` when the
    /// kernel does not fit.
    pub fn output_side(&self, n: usize, k: usize) -> Option<usize> {
        let padded = n * self.upsample + 2 * self.padding;
        (padded >= k && k > 0).then(|| (padded - k) / self.stride + 1)
    }
}

/// Sizes of one convolution: input `[n, c, h, w]`, kernel `[o, c, kh, kw]`, output
/// `[n, o, ho, wo]`.
#[derive(Debug, Clone, Copy)]
struct Geom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    ho: usize,
    wo: usize,
    spec: Conv2dSpec,
}

impl Geom {
    fn new(x: &[usize], k: &[usize], spec: Conv2dSpec) -> Result<Self> {
        let (&[n, c, h, w], &[o, kc, kh, kw]) = (x, k) else {
            bail!(
                "conv2d: input must be [N, C, H, W] and kernel [O, C, kh, kw], got {x:?} and {k:?}"
            );
        };
        if kc != c {
            bail!("conv2d: the kernel {k:?} takes {kc} channels, the input {x:?} has {c}");
        }
        if spec.stride == 0 || spec.upsample == 0 {
            bail!("conv2d: stride and upsampling must be positive, got {spec:?}");
        }
        let (Some(ho), Some(wo)) = (spec.output_side(h, kh), spec.output_side(w, kw)) else {
            bail!("conv2d: a {kh}×{kw} kernel does not fit a {h}×{w} input with {spec:?}");
        };
        Ok(Self {
            n,
            c,
            h,
            w,
            o,
            kh,
            kw,
            ho,
            wo,
            spec,
        })
    }

    /// Rows of the im2col matrix: one per input channel and kernel cell.
    fn ck(&self) -> usize {
        self.c * self.kh * self.kw
    }

    fn out_plane(&self) -> usize {
        self.ho * self.wo
    }

    fn in_image(&self) -> usize {
        self.c * self.h * self.w
    }

    fn out_image(&self) -> usize {
        self.o * self.out_plane()
    }

    /// A 1×1 convolution that reads every cell once: the image is its own im2col.
    fn direct(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.spec == Conv2dSpec::default()
    }

    fn flops(&self) -> usize {
        2 * self.n * self.o * self.ck() * self.out_plane()
    }

    /// Output positions `lo..hi` along one axis whose input cell, for kernel offset
    /// `kj`, lies inside the (upsampled) input of side `len · upsample`.
    fn valid(&self, kj: usize, len: usize, out: usize) -> (usize, usize) {
        let (s, p) = (self.spec.stride, self.spec.padding);
        let virt = len * self.spec.upsample;
        // v = o·s + kj − p must satisfy 0 ≤ v < virt.
        let lo = p.saturating_sub(kj).div_ceil(s);
        let hi = if virt + p > kj {
            (virt + p - kj).div_ceil(s).min(out)
        } else {
            0
        };
        (lo.min(hi), hi)
    }

    /// The input cell read at output position `o` for kernel offset `kj` (inside
    /// `valid`'s range).
    fn source(&self, o: usize, kj: usize) -> usize {
        (o * self.spec.stride + kj - self.spec.padding) / self.spec.upsample
    }
}

impl Geom {
    /// Stride 1, no upsampling, output as wide as the input: each im2col row is the
    /// input plane shifted by a constant offset, copied in one block.
    fn shifted_copies(&self) -> bool {
        self.spec.stride == 1 && self.spec.upsample == 1 && self.wo == self.w
    }

    /// For [`Geom::shifted_copies`]: the im2col row's block `lo..hi` (output positions)
    /// and the input offset of its first element within the channel's plane; `None`
    /// when the kernel cell reads only padding.
    fn block(&self, ki: usize, kj: usize) -> Option<(usize, usize, usize)> {
        let (ylo, yhi) = self.valid(ki, self.h, self.ho);
        let (xlo, xhi) = self.valid(kj, self.w, self.wo);
        if ylo == yhi || xlo == xhi {
            return None;
        }
        let (lo, hi) = (ylo * self.w + xlo, (yhi - 1) * self.w + xhi);
        let src = (ylo + ki - self.spec.padding) * self.w + xlo + kj - self.spec.padding;
        Some((lo, hi, src))
    }

    /// Calls `f(range)` on the positions of `lo..hi` that lie outside the valid
    /// columns (the block's wrap-around between lines).
    fn wrapped(&self, kj: usize, lo: usize, hi: usize, mut f: impl FnMut(std::ops::Range<usize>)) {
        let (xlo, xhi) = self.valid(kj, self.w, self.wo);
        for line in (lo / self.w)..hi.div_ceil(self.w) {
            let start = line * self.w;
            let left = (start.max(lo))..(start + xlo).min(hi);
            let right = (start + xhi).max(lo)..(start + self.w).min(hi);
            for r in [left, right] {
                if r.start < r.end {
                    f(r);
                }
            }
        }
    }
}

impl Geom {
    /// For each kernel column, the input column read at each valid output column (the
    /// strided and upsampled paths' gather table: a division per element otherwise).
    fn source_columns(&self) -> Vec<Vec<usize>> {
        (0..self.kw)
            .map(|kj| {
                let (xlo, xhi) = self.valid(kj, self.w, self.wo);
                (xlo..xhi).map(|ox| self.source(ox, kj)).collect()
            })
            .collect()
    }

    /// For an upsampling convolution that keeps the upsampled size: the same
    /// convolution on the upsampled image, which [`Geom::shifted_copies`] handles.
    fn upsampled(&self) -> Option<Geom> {
        let u = self.spec.upsample;
        let up = Geom {
            h: self.h * u,
            w: self.w * u,
            spec: Conv2dSpec {
                upsample: 1,
                ..self.spec
            },
            ..*self
        };
        (u > 1 && up.shifted_copies()).then_some(up)
    }
}

/// Nearest-neighbour upsampling of one image by `g.spec.upsample`.
fn upsample_nearest(x: &[f32], g: &Geom, out: &mut [f32]) {
    let u = g.spec.upsample;
    let wide = g.w * u;
    for (plane, row) in x.chunks_exact(g.w).zip(out.chunks_exact_mut(wide * u)) {
        let (first, rest) = row.split_at_mut(wide);
        for (d, v) in first.chunks_exact_mut(u).zip(plane) {
            d.fill(*v);
        }
        for copy in rest.chunks_exact_mut(wide) {
            copy.copy_from_slice(first);
        }
    }
}

/// The adjoint of [`upsample_nearest`], added: each input cell gets the sum of its
/// `u × u` block.
fn upsample_nearest_adjoint_add(big: &[f32], g: &Geom, dx: &mut [f32]) {
    let u = g.spec.upsample;
    let wide = g.w * u;
    for (row, block) in dx.chunks_exact_mut(g.w).zip(big.chunks_exact(wide * u)) {
        for line in block.chunks_exact(wide) {
            for (d, cell) in row.iter_mut().zip(line.chunks_exact(u)) {
                *d += cell.iter().sum::<f32>();
            }
        }
    }
}

/// `cols[(c, ki, kj), (oy, ox)] = x[c, iy, ix]` of one image (zero outside the input).
fn im2col(x: &[f32], g: &Geom, cols: &mut [f32]) {
    let plane = g.out_plane();
    if let Some(up) = g.upsampled() {
        // The upsampled image once, then block copies (a gather per element otherwise).
        let mut big = output_buffer(g.c * up.h * up.w);
        upsample_nearest(x, g, &mut big);
        return im2col(&big, &up, cols);
    }
    if g.shifted_copies() {
        let in_plane = g.h * g.w;
        for c in 0..g.c {
            for ki in 0..g.kh {
                for kj in 0..g.kw {
                    let row = (c * g.kh + ki) * g.kw + kj;
                    let dst = &mut cols[row * plane..(row + 1) * plane];
                    let Some((lo, hi, src)) = g.block(ki, kj) else {
                        dst.fill(0.0);
                        continue;
                    };
                    let src = &x[c * in_plane + src..][..hi - lo];
                    dst[..lo].fill(0.0);
                    dst[lo..hi].copy_from_slice(src);
                    dst[hi..].fill(0.0);
                    g.wrapped(kj, lo, hi, |r| dst[r].fill(0.0));
                }
            }
        }
        return;
    }
    let sources = g.source_columns();
    for c in 0..g.c {
        for ki in 0..g.kh {
            let (ylo, yhi) = g.valid(ki, g.h, g.ho);
            for (kj, source) in sources.iter().enumerate() {
                let (xlo, xhi) = g.valid(kj, g.w, g.wo);
                let row = (c * g.kh + ki) * g.kw + kj;
                let dst = &mut cols[row * plane..(row + 1) * plane];
                dst[..ylo * g.wo].fill(0.0);
                dst[yhi * g.wo..].fill(0.0);
                for oy in ylo..yhi {
                    let src = &x[(c * g.h + g.source(oy, ki)) * g.w..][..g.w];
                    let line = &mut dst[oy * g.wo..(oy + 1) * g.wo];
                    line[..xlo].fill(0.0);
                    line[xhi..].fill(0.0);
                    for (d, &ix) in line[xlo..xhi].iter_mut().zip(source) {
                        *d = src[ix];
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: `dx[c, iy, ix] += cols[(c, ki, kj), (oy, ox)]`. May
/// overwrite the entries of `cols` that correspond to padding.
fn col2im_add(cols: &mut [f32], g: &Geom, dx: &mut [f32]) {
    let plane = g.out_plane();
    if let Some(up) = g.upsampled() {
        let mut big = vec![0f32; g.c * up.h * up.w];
        col2im_add(cols, &up, &mut big);
        upsample_nearest_adjoint_add(&big, g, dx);
        return;
    }
    if g.shifted_copies() {
        let in_plane = g.h * g.w;
        for c in 0..g.c {
            for ki in 0..g.kh {
                for kj in 0..g.kw {
                    let row = (c * g.kh + ki) * g.kw + kj;
                    let Some((lo, hi, src)) = g.block(ki, kj) else {
                        continue;
                    };
                    let line = &mut cols[row * plane..(row + 1) * plane];
                    // Padding reads contribute nothing: zero them, then add the block.
                    g.wrapped(kj, lo, hi, |r| line[r].fill(0.0));
                    let dst = &mut dx[c * in_plane + src..][..hi - lo];
                    for (d, s) in dst.iter_mut().zip(&line[lo..hi]) {
                        *d += s;
                    }
                }
            }
        }
        return;
    }
    let sources = g.source_columns();
    for c in 0..g.c {
        for ki in 0..g.kh {
            let (ylo, yhi) = g.valid(ki, g.h, g.ho);
            for (kj, source) in sources.iter().enumerate() {
                let (xlo, xhi) = g.valid(kj, g.w, g.wo);
                let row = (c * g.kh + ki) * g.kw + kj;
                let src = &cols[row * plane..(row + 1) * plane];
                for oy in ylo..yhi {
                    let dst = &mut dx[(c * g.h + g.source(oy, ki)) * g.w..][..g.w];
                    let line = &src[oy * g.wo..(oy + 1) * g.wo];
                    for (s, &ix) in line[xlo..xhi].iter().zip(source) {
                        dst[ix] += s;
                    }
                }
            }
        }
    }
}

/// Runs `f(first_image, images_out)` over the output split into blocks of whole images,
/// one block per thread when the convolution is large enough; each block gets its own
/// scratch buffer of `scratch` floats. Returns whether the blocks ran on several
/// threads (then `f` must use single-threaded GEMMs).
fn per_images(
    out: &mut [f32],
    image: usize,
    g: &Geom,
    scratch: usize,
    f: impl Fn(usize, &mut [f32], &mut Vec<f32>, bool) + Sync,
) {
    let t = threads();
    if t > 1 && g.n > 1 && g.flops() >= PARALLEL_GEMM_FLOPS {
        let per = g.n.div_ceil(t);
        out.par_chunks_mut(per * image)
            .enumerate()
            .for_each(|(i, block)| f(i * per, block, &mut output_buffer(scratch), true));
    } else {
        f(0, out, &mut output_buffer(scratch), false);
    }
}

fn gemm(dst: &mut [f32], a: View, b: View, accumulate: bool, serial: bool) {
    if serial {
        matmul_serial(dst, a, b, accumulate)
    } else {
        matmul(dst, a, b, accumulate)
    }
}

fn conv_forward(x: &[f32], k: &[f32], bias: Option<&[f32]>, g: &Geom) -> Vec<f32> {
    let mut y = output_buffer(g.n * g.out_image());
    let (plane, ck) = (g.out_plane(), g.ck());
    let scratch = if g.direct() { 0 } else { ck * plane };
    per_images(
        &mut y,
        g.out_image(),
        g,
        scratch,
        |first, ys, cols, serial| {
            for (i, y_img) in ys.chunks_mut(g.out_image()).enumerate() {
                let x_img = &x[(first + i) * g.in_image()..][..g.in_image()];
                let source = if g.direct() {
                    View::row_major(x_img, g.c, plane)
                } else {
                    im2col(x_img, g, cols);
                    View::row_major(cols, ck, plane)
                };
                gemm(y_img, View::row_major(k, g.o, ck), source, false, serial);
                if let Some(b) = bias {
                    // One bias per channel, or one per image and channel.
                    let b = match b.len() == g.o {
                        true => b,
                        false => &b[(first + i) * g.o..(first + i + 1) * g.o],
                    };
                    for (row, &bv) in y_img.chunks_mut(plane).zip(b) {
                        row.iter_mut().for_each(|v| *v += bv);
                    }
                }
            }
        },
    );
    y
}

fn conv_input_grad(dy: &[f32], k: &[f32], g: &Geom) -> Vec<f32> {
    let mut dx = output_buffer(g.n * g.in_image());
    let (plane, ck) = (g.out_plane(), g.ck());
    let scratch = if g.direct() { 0 } else { ck * plane };
    let kt = View::row_major(k, g.o, ck).t();
    per_images(
        &mut dx,
        g.in_image(),
        g,
        scratch,
        |first, dxs, cols, serial| {
            for (i, dx_img) in dxs.chunks_mut(g.in_image()).enumerate() {
                let dy_img = View::row_major(
                    &dy[(first + i) * g.out_image()..][..g.out_image()],
                    g.o,
                    plane,
                );
                if g.direct() {
                    gemm(dx_img, kt, dy_img, false, serial);
                } else {
                    gemm(cols, kt, dy_img, false, serial);
                    dx_img.fill(0.0);
                    col2im_add(cols, g, dx_img);
                }
            }
        },
    );
    dx
}

fn conv_weight_grad(x: &[f32], dy: &[f32], g: &Geom) -> Vec<f32> {
    let (plane, ck) = (g.out_plane(), g.ck());
    let t = threads();
    let blocks = if t > 1 && g.n > 1 && g.flops() >= PARALLEL_GEMM_FLOPS {
        t.min(g.n)
    } else {
        1
    };
    let per = g.n.div_ceil(blocks);
    // One partial gradient per block of images, summed at the end. Each is dWᵀ =
    // cols · dyᵀ ([ck, o]): with the im2col matrix as the left operand the GEMM runs at
    // full speed (dy · colsᵀ, reading the im2col matrix transposed, ran at 60–90% of it).
    let partial = |b: usize| -> Vec<f32> {
        let mut dkt = vec![0f32; ck * g.o];
        let mut cols = output_buffer(if g.direct() { 0 } else { ck * plane });
        for img in b * per..((b + 1) * per).min(g.n) {
            let x_img = &x[img * g.in_image()..][..g.in_image()];
            let source = if g.direct() {
                View::row_major(x_img, g.c, plane)
            } else {
                im2col(x_img, g, &mut cols);
                View::row_major(&cols, ck, plane)
            };
            let dy_img = View::row_major(&dy[img * g.out_image()..][..g.out_image()], g.o, plane);
            gemm(&mut dkt, source, dy_img.t(), true, blocks > 1);
        }
        dkt
    };
    let dkt = match blocks {
        1 => partial(0),
        _ => {
            let parts: Vec<Vec<f32>> = (0..blocks).into_par_iter().map(partial).collect();
            let mut sum = parts[0].clone();
            for p in &parts[1..] {
                sum.iter_mut().zip(p).for_each(|(a, b)| *a += b);
            }
            sum
        }
    };
    let mut dk = output_buffer(g.o * ck);
    for (r, row) in dkt.chunks_exact(g.o).enumerate() {
        for (o, v) in row.iter().enumerate() {
            dk[o * ck + r] = *v;
        }
    }
    dk
}

/// `y = W ⊛ x (+ b)`: a CustomOp2 without bias, a CustomOp3 with.
struct Conv {
    spec: Conv2dSpec,
}

impl Conv {
    fn run(
        &self,
        x: (&CpuStorage, &Layout),
        k: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geom::new(x.1.dims(), k.1.dims(), self.spec)?;
        let xs = contiguous_data(x.0, x.1, "conv2d")?;
        let ks = contiguous_data(k.0, k.1, "conv2d")?;
        let bs = b
            .map(|(s, l)| contiguous_data(s, l, "conv2d"))
            .transpose()?;
        let y = conv_forward(xs, ks, bs, &g);
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.o, g.ho, g.wo))))
    }

    fn grads(
        &self,
        x: &Tensor,
        k: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, _, h, w) = x.dims4()?;
        let (_, _, kh, kw) = k.dims4()?;
        let dx = x
            .track_op()
            .then(|| input_grad(g, k, self.spec, (h, w)))
            .transpose()?;
        let dk = k
            .track_op()
            .then(|| weight_grad(x, g, self.spec, (kh, kw)))
            .transpose()?;
        Ok((dx, dk))
    }
}

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        k: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.grads(x, k, g)
    }
}

impl CustomOp3 for Conv {
    fn name(&self) -> &'static str {
        "conv2d-bias"
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
        self.run((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        k: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dk) = self.grads(x, k, g)?;
        let db = match b.track_op() {
            false => None,
            true if second_order() => Some(match b.rank() {
                1 => channel_sum(g)?,
                _ => g.sum((2, 3))?,
            }),
            // candle's strided sum over (0, 2, 3) cost as much as one of the GEMMs.
            true => with_data(g, |g| {
                let len = b.elem_count();
                let plane = g.len() / (x.dim(0)? * k.dim(0)?);
                let mut db = vec![0f32; len];
                for (i, row) in g.chunks_exact(plane).enumerate() {
                    db[i % len] += row.iter().sum::<f32>();
                }
                gradient_for(b, db)
            })?,
        };
        Ok((dx, dk, db))
    }
}

/// `dx = Wᵀ ⊛ dy` for an input of side `(h, w)`.
struct InputGrad {
    spec: Conv2dSpec,
    input: (usize, usize),
}

impl InputGrad {
    fn geom(&self, dy: &[usize], k: &[usize]) -> Result<Geom> {
        let (&[n, o, _, _], &[ko, c, _, _]) = (dy, k) else {
            bail!("conv2d input gradient: expected 4-d gradient and kernel, got {dy:?} and {k:?}");
        };
        if o != ko {
            bail!("conv2d input gradient: {dy:?} does not match the kernel {k:?}");
        }
        let g = Geom::new(&[n, c, self.input.0, self.input.1], k, self.spec)?;
        if dy != [n, o, g.ho, g.wo] {
            bail!(
                "conv2d input gradient: expected [{n}, {o}, {}, {}], got {dy:?}",
                g.ho,
                g.wo
            );
        }
        Ok(g)
    }
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geom(l1.dims(), l2.dims())?;
        let dy = contiguous_data(s1, l1, "conv2d input gradient")?;
        let k = contiguous_data(s2, l2, "conv2d input gradient")?;
        let dx = conv_input_grad(dy, k, &g);
        Ok((CpuStorage::F32(dx), Shape::from((g.n, g.c, g.h, g.w))))
    }

    /// Linear in each argument: ⟨G, Wᵀ ⊛ dy⟩ = ⟨W ⊛ G, dy⟩ = ⟨W, dy ⊛ Gᵀ⟩.
    fn bwd(
        &self,
        dy: &Tensor,
        k: &Tensor,
        _dx: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, _, kh, kw) = k.dims4()?;
        let ddy = dy
            .track_op()
            .then(|| conv_raw(g, k, self.spec))
            .transpose()?;
        let dk = k
            .track_op()
            .then(|| weight_grad(g, dy, self.spec, (kh, kw)))
            .transpose()?;
        Ok((ddy, dk))
    }
}

/// `dW = dy ⊛ xᵀ` for a kernel of side `(kh, kw)`.
struct WeightGrad {
    spec: Conv2dSpec,
    kernel: (usize, usize),
}

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "conv2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (xd, dyd) = (l1.dims(), l2.dims());
        let (&[_, c, _, _], &[_, o, _, _]) = (xd, dyd) else {
            bail!(
                "conv2d weight gradient: expected 4-d input and gradient, got {xd:?} and {dyd:?}"
            );
        };
        let g = Geom::new(xd, &[o, c, self.kernel.0, self.kernel.1], self.spec)?;
        if dyd != [g.n, o, g.ho, g.wo] {
            bail!(
                "conv2d weight gradient: expected [{}, {o}, {}, {}], got {dyd:?}",
                g.n,
                g.ho,
                g.wo
            );
        }
        let x = contiguous_data(s1, l1, "conv2d weight gradient")?;
        let dy = contiguous_data(s2, l2, "conv2d weight gradient")?;
        let dk = conv_weight_grad(x, dy, &g);
        Ok((CpuStorage::F32(dk), Shape::from((o, c, g.kh, g.kw))))
    }

    /// ⟨G, dy ⊛ xᵀ⟩ = ⟨Gᵀ ⊛ dy, x⟩ = ⟨G ⊛ x, dy⟩.
    fn bwd(
        &self,
        x: &Tensor,
        dy: &Tensor,
        _dk: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, _, h, w) = x.dims4()?;
        let dx = x
            .track_op()
            .then(|| input_grad(dy, g, self.spec, (h, w)))
            .transpose()?;
        let ddy = dy
            .track_op()
            .then(|| conv_raw(x, g, self.spec))
            .transpose()?;
        Ok((dx, ddy))
    }
}

fn conv_raw(x: &Tensor, k: &Tensor, spec: Conv2dSpec) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2_arc(&k.contiguous()?, Arc::new(Box::new(Conv { spec })))
}

fn input_grad(dy: &Tensor, k: &Tensor, spec: Conv2dSpec, input: (usize, usize)) -> Result<Tensor> {
    dy.contiguous()?.apply_op2_arc(
        &k.contiguous()?,
        Arc::new(Box::new(InputGrad { spec, input })),
    )
}

fn weight_grad(
    x: &Tensor,
    dy: &Tensor,
    spec: Conv2dSpec,
    kernel: (usize, usize),
) -> Result<Tensor> {
    x.contiguous()?.apply_op2_arc(
        &dy.contiguous()?,
        Arc::new(Box::new(WeightGrad { spec, kernel })),
    )
}

/// `y = W ⊛ x + b`: x `[N, C, H, W]`, kernel `[O, C, kh, kw]`, bias `[O]` or one per
/// image `[N, O]` (a U-Net block's noise embedding rides on it), read as `spec` says (cross-correlation, as candle's and PyTorch's conv2d). Differentiable to
/// any order. Off the CPU or for other dtypes, candle's conv2d (after candle's
/// upsampling when `spec.upsample > 1`).
pub fn conv2d(
    x: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    spec: Conv2dSpec,
) -> Result<Tensor> {
    let g = Geom::new(x.dims(), kernel.dims(), spec)?;
    if let Some(b) = bias {
        if b.dims() != [g.o] && b.dims() != [g.n, g.o] {
            bail!(
                "conv2d: bias must be [{o}] or [{n}, {o}] (one per image), got {:?}",
                b.dims(),
                o = g.o,
                n = g.n
            );
        }
    }
    let mut ts = vec![x, kernel];
    ts.extend(bias);
    if !fast_path(&ts) {
        let x = match spec.upsample {
            1 => x.clone(),
            u => x.upsample_nearest2d(g.h * u, g.w * u)?,
        };
        let y = x.conv2d(kernel, spec.padding, spec.stride, 1, 1)?;
        return match bias {
            Some(b) => y.broadcast_add(&b.reshape((b.elem_count() / g.o, g.o, 1, 1))?),
            None => Ok(y),
        };
    }
    match bias {
        Some(b) => x.contiguous()?.apply_op3_arc(
            &kernel.contiguous()?,
            &b.contiguous()?,
            Arc::new(Box::new(Conv { spec })),
        ),
        None => conv_raw(x, kernel, spec),
    }
}
