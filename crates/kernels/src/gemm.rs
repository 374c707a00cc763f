//! `gemm` on strided row-major views, with the thread policy of [`crate::threads`].

use crate::threads::gemm_threads;

/// A read-only matrix view: `data[offset + i·rs + j·cs]` for `i < rows`, `j < cols`.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub rs: isize,
    pub cs: isize,
}

impl<'a> View<'a> {
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            offset: 0,
            rows,
            cols,
            rs: cols as isize,
            cs: 1,
        }
    }

    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Index of the last element read, to check the view lies inside `data`.
    fn last(&self) -> isize {
        let span = |n: usize, s: isize| (n.saturating_sub(1)) as isize * s;
        self.offset as isize + span(self.rows, self.rs) + span(self.cols, self.cs)
    }

    fn check(&self) {
        assert!(
            self.rs >= 0 && self.cs >= 0,
            "negative strides are not supported"
        );
        assert!(
            self.rows == 0 || self.cols == 0 || (self.last() as usize) < self.data.len(),
            "matrix view outside its buffer"
        );
    }
}

/// `dst[m × n] (row-major) = a · b`, or `+=` with `accumulate`. Every element of `dst` is
/// written, so it may start uninitialised (see [`crate::ops`]' buffers).
///
/// With several threads the columns of `dst` are split between them, each running the
/// single-threaded kernel on its block (and packing only its block of `b`): `gemm`'s
/// own splitting did not scale for the shapes of these networks (a
/// `[1000, 256] · [256, 256]` product ran no faster on two threads than on one), and
/// splitting rows instead made every thread pack all of `b`.
pub fn matmul(dst: &mut [f32], a: View, b: View, accumulate: bool) {
    if !has_work(dst, a, b, accumulate) {
        return;
    }
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let threads = gemm_threads(m, n, k).min(n);
    let dst = Dst(dst.as_mut_ptr());
    if threads <= 1 {
        // SAFETY: dst holds m × n elements, and the views were checked.
        unsafe { serial(dst, n, a, b, accumulate) };
        return;
    }
    let cols = n.div_ceil(threads);
    rayon::scope(|s| {
        for j0 in (0..n).step_by(cols) {
            let b = View {
                offset: b.offset + j0 * b.cs as usize,
                cols: cols.min(n - j0),
                ..b
            };
            // SAFETY: the blocks' columns are disjoint, so no element of dst is written
            // by two threads; each block lies inside dst's m × n, and `b`'s sub-view
            // inside `b`.
            s.spawn(move |_| unsafe { serial(dst.offset(j0), n, a, b, accumulate) });
        }
    });
}

/// [`matmul`] on the calling thread only (for callers that split the work themselves).
pub fn matmul_serial(dst: &mut [f32], a: View, b: View, accumulate: bool) {
    if has_work(dst, a, b, accumulate) {
        // SAFETY: dst holds m × n elements, and the views were checked.
        unsafe { serial(Dst(dst.as_mut_ptr()), b.cols, a, b, accumulate) }
    }
}

/// [`matmul_serial`] into a block of a larger buffer: row i of the `m × n` product goes
/// to `dst[offset + i·rs ..][..n]` (e.g. one head's columns of packed rows).
pub fn matmul_serial_into(
    dst: &mut [f32],
    offset: usize,
    rs: usize,
    a: View,
    b: View,
    accumulate: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "inner dimensions differ");
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        rs >= n && offset + (m - 1) * rs + n <= dst.len(),
        "destination block outside its buffer"
    );
    a.check();
    b.check();
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[offset + i * rs..][..n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: the block's m rows of n elements at stride rs lie inside dst (checked
    // above), and the views were checked.
    unsafe { serial(Dst(dst.as_mut_ptr().add(offset)), rs, a, b, accumulate) }
}

/// Checks the shapes and views; handles the empty products (nothing to write, or
/// `k = 0`: zeros). Returns whether a GEMM remains to be run.
fn has_work(dst: &mut [f32], a: View, b: View, accumulate: bool) -> bool {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "inner dimensions differ");
    assert_eq!(dst.len(), m * n, "destination size");
    a.check();
    b.check();
    if k == 0 && !accumulate {
        dst.fill(0.0);
    }
    m > 0 && n > 0 && k > 0
}

/// The destination pointer, shared by the threads that write its disjoint blocks.
#[derive(Clone, Copy)]
struct Dst(*mut f32);

// SAFETY: only ever used to write disjoint column blocks of one buffer (see `matmul`).
unsafe impl Send for Dst {}
// SAFETY: as above.
unsafe impl Sync for Dst {}

impl Dst {
    /// # Safety
    /// `j` must lie inside the buffer.
    unsafe fn offset(self, j: usize) -> Self {
        Dst(self.0.add(j))
    }
}

/// `dst (row stride dst_rs) = a · b` on the calling thread.
///
/// # Safety
/// `dst` must be valid for writes of `a.rows` rows of `b.cols` elements at row stride
/// `dst_rs`, and the views must lie inside their buffers.
unsafe fn serial(dst: Dst, dst_rs: usize, a: View, b: View, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    gemm::gemm(
        m,
        n,
        k,
        dst.0,
        1,
        dst_rs as isize,
        accumulate,
        a.data.as_ptr().add(a.offset),
        a.cs,
        a.rs,
        b.data.as_ptr().add(b.offset),
        b.cs,
        b.rs,
        1.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}
