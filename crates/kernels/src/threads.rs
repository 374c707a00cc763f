//! One thread pool, and threads only where they pay.
//!
//! Every parallel kernel of this crate runs on rayon's global pool, and only when the
//! work is large enough for a second thread to win: on two cores a 256 × 256 matmul at
//! batch 1000 gains from two threads, an element-wise pass over 16k floats loses
//! (waking a thread costs more than the pass). candle's own element-wise kernels use a
//! second, spinning pool; [`configure`] gives it one thread so the two never compete.

use rayon::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};

static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Fewest flops (2·m·n·k) for which a GEMM is split across threads.
pub const PARALLEL_GEMM_FLOPS: usize = 1 << 22;
/// Fewest elements for which an element-wise pass is split across threads.
pub const PARALLEL_ELEMENTS: usize = 1 << 15;

/// Sets the thread count of this crate's kernels and of candle's CPU backend, and keeps
/// candle's spinning element-wise pool at one thread. Call before any tensor work
/// (candle and rayon read their settings once). Returns the count in force.
pub fn configure(threads: usize) -> usize {
    let n = threads.max(1);
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    THREADS.store(n, Ordering::Relaxed);
    n
}

/// Runs `f` on a thread of rayon's global pool and returns its result. Parallel kernels
/// called from a pool thread run their first block on that thread and hand the rest to
/// the others; called from outside, they wake the pool's threads and the caller sleeps,
/// which cost about 15% of a two-thread training step here. Binaries run their work
/// through this (`scoreguide_experiments::runtime::on_compute_threads`); a no-op inside
/// the pool.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    rayon::scope(|_| f())
}

/// The thread count in force: [`configure`]'s, else `RAYON_NUM_THREADS`, else rayon's.
pub fn threads() -> usize {
    match THREADS.load(Ordering::Relaxed) {
        0 => std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|n| *n > 0)
            .unwrap_or_else(rayon::current_num_threads),
        n => n,
    }
}

/// Threads for a GEMM of `m × k` by `k × n`.
pub fn gemm_threads(m: usize, n: usize, k: usize) -> usize {
    if 2 * m * n * k >= PARALLEL_GEMM_FLOPS {
        threads()
    } else {
        1
    }
}

/// Splits `len` items into per-thread chunks of whole rows of `row` items when the pass
/// is large enough; one chunk otherwise.
pub fn chunk_len(len: usize, row: usize) -> usize {
    let t = threads();
    if t <= 1 || len < PARALLEL_ELEMENTS || row == 0 {
        return len.max(1);
    }
    let rows = len / row;
    rows.div_ceil(t).max(1) * row
}

/// Runs `f(batch index, its block of out)` over the batch, in parallel when large.
pub(crate) fn per_batch(
    out: &mut [f32],
    b: usize,
    work: usize,
    f: impl Fn(usize, &mut [f32]) + Sync,
) {
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
pub(crate) fn per_batch2(
    bufs: [&mut [f32]; 2],
    sizes: [usize; 2],
    large: bool,
    body: impl Fn(usize, &mut [f32], &mut [f32]) + Sync,
) {
    let [x, y] = bufs;
    let blocks = x.len() / sizes[0].max(1);
    if threads() > 1 && large && blocks > 1 {
        x.par_chunks_mut(sizes[0])
            .zip(y.par_chunks_mut(sizes[1]))
            .enumerate()
            .for_each(|(i, (x, y))| body(i, x, y));
    } else {
        for (i, (x, y)) in x
            .chunks_mut(sizes[0])
            .zip(y.chunks_mut(sizes[1]))
            .enumerate()
        {
            body(i, x, y);
        }
    }
}

/// [`per_batch2`] for three buffers.
pub(crate) fn per_batch3(
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
