//! The single-precision matrix product of the CPU convolution, with AVX-512 kernels.
//!
//! A convolution's products have one small side (16–512 output channels, 27–4,608 unfolded
//! rows) and are called once per image; the general `gemm` crate packs both operands on every
//! call and, on stable Rust, runs 256-bit kernels. These kernels read the operands where they
//! lie, since every product here has a side that is already contiguous:
//!
//! * [`gemm_nn`]: `C (m×n) = A (m×k) · B (k×n)` with B's rows contiguous, as in `W · cols` and
//!   `Wᵀ · dY`. A tile of up to 12 rows × 32 columns of C lives in 24 registers; each step of
//!   k loads two vectors of one B row and broadcasts one A element per C row.
//!   The weight gradient is computed in the same form, as `dWᵀ = cols · dYᵀ`. When C is at
//!   most 16 columns wide (16 output channels), tiles are 24 rows × 1 vector instead.
//!
//! * [`gemm_rows`]: the same product with each row of B anywhere in one slice (a table of
//!   offsets), for the implicit-GEMM convolution.
//!
//! Both run the sum over k in blocks of 256 terms, row tiles outside and column tiles inside:
//! a row tile of A stays in L1 while it meets every column tile, and the block's rows of B
//! stay in L2. Without the blocking, a 9.4 MB weight (A) was read from memory once per column
//! tile. Each C value is still one chain of multiply-adds in the order of k, so the blocking
//! changes no result.
//!
//! Without AVX-512 (checked once at run time) it falls back to the `gemm` crate, so results
//! match to rounding on every machine. Column remainders use masked loads and stores.

#[cfg(test)]
thread_local! {
    /// Set by tests on a thread (and on a test pool's threads) to run the portable path on a
    /// machine with AVX-512; per thread, so tests running alongside are not switched.
    pub(crate) static PORTABLE_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the AVX-512 kernels can run here.
fn has_avx512() -> bool {
    #[cfg(test)]
    if PORTABLE_ONLY.with(|p| p.get()) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `C = A·B` (or `C += A·B` when `accumulate`), single-threaded. A is read at
/// `a[i·a_rs + p·a_cs]`, B at `b[p·ldb + j]`, C at `c[i·ldc + j]`.
///
/// # Panics
/// If a slice is too short for the shapes and strides given.
#[allow(clippy::too_many_arguments)]
pub fn gemm_nn(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        k == 0 || a.len() > (m - 1) * a_rs + (k - 1) * a_cs,
        "gemm_nn: A too short"
    );
    assert!(
        k == 0 || b.len() >= (k - 1) * ldb + n,
        "gemm_nn: B too short"
    );
    assert!(c.len() >= (m - 1) * ldc + n, "gemm_nn: C too short");
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: AVX-512F is present; the bounds were checked above.
        unsafe { avx512::nn(m, n, k, a, a_rs, a_cs, b, ldb, c, ldc, accumulate) };
        return;
    }
    // SAFETY: the bounds were checked above; C does not overlap A or B (borrow rules).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            1,
            ldb as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// [`gemm_nn`] with B's rows anywhere in `b`: row p is `b[rows[p]..rows[p] + n]` (the
/// implicit-GEMM convolution points them into shifted, zero-padded copies of an image, so the
/// unfolded matrix is never written). `rows.len()` is k.
///
/// # Panics
/// If a slice is too short for the shapes and strides given.
#[allow(clippy::too_many_arguments)]
pub fn gemm_rows(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    rows: &[usize],
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert_eq!(rows.len(), k, "gemm_rows: one row offset per k");
    assert!(
        k == 0 || a.len() > (m - 1) * a_rs + (k - 1) * a_cs,
        "gemm_rows: A too short"
    );
    assert!(
        rows.iter().all(|&r| r + n <= b.len()),
        "gemm_rows: a row of B runs past its end"
    );
    assert!(c.len() >= (m - 1) * ldc + n, "gemm_rows: C too short");
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: AVX-512F is present; the bounds were checked above.
        unsafe {
            avx512::nn_rows(m, n, k, a, a_rs, a_cs, b, rows, c, ldc, accumulate);
        }
        return;
    }
    // Portable: gather the rows, then the plain product.
    let mut packed = Vec::with_capacity(k * n);
    for &r in rows {
        packed.extend_from_slice(&b[r..r + n]);
    }
    gemm_nn((m, n, k), a, (a_rs, a_cs), &packed, n, c, ldc, accumulate);
}

// Register tiles are indexed by row and column, as in the algebra they implement.
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Calls `$tile::<R>($args)` for the runtime row count `$rows` (one of the listed
    /// constants, else 1): register tiles need the row count at compile time.
    macro_rules! seq {
        ($rows:expr; $tile:ident; $args:expr; $($r:literal),*) => {
            match $rows {
                $($r => $tile::<$r, R>($args),)*
                _ => $tile::<1, R>($args),
            }
        };
    }

    /// Lanes of a 512-bit f32 vector.
    const V: usize = 16;

    /// Where row p of B starts, as an offset from B's base: a fixed stride, or a table.
    pub(super) trait Rows: Copy {
        /// # Safety
        /// `p` is below k (the table, when there is one, has k entries).
        unsafe fn at(self, p: usize) -> usize;
        /// The rows from row `p0` on: the rows' new numbering, and how far B's base moves.
        ///
        /// # Safety
        /// `p0` is at most k.
        unsafe fn from(self, p0: usize) -> (Self, usize);
    }

    /// Row p at `p · ldb`.
    #[derive(Clone, Copy)]
    pub(super) struct Strided(pub usize);

    impl Rows for Strided {
        #[inline(always)]
        unsafe fn at(self, p: usize) -> usize {
            p * self.0
        }
        #[inline(always)]
        unsafe fn from(self, p0: usize) -> (Self, usize) {
            (self, p0 * self.0)
        }
    }

    /// Row p at `table[p]`.
    #[derive(Clone, Copy)]
    pub(super) struct Table(pub *const usize);

    impl Rows for Table {
        #[inline(always)]
        unsafe fn at(self, p: usize) -> usize {
            // SAFETY: the caller keeps p below the table's length.
            unsafe { *self.0.add(p) }
        }
        #[inline(always)]
        unsafe fn from(self, p0: usize) -> (Self, usize) {
            // SAFETY: the caller keeps p0 within the table.
            (Table(unsafe { self.0.add(p0) }), 0)
        }
    }
    /// Columns of C per `nn` tile (two vectors).
    const NR: usize = 2 * V;

    /// Terms of the sum over k per pass over C (see `nn_with`).
    const KC: usize = 256;

    /// The load/store mask for `cols` (≤ 16) valid lanes.
    #[inline]
    fn mask(cols: usize) -> __mmask16 {
        if cols >= V {
            0xffff
        } else {
            ((1u32 << cols) - 1) as __mmask16
        }
    }

    /// See [`super::gemm_nn`]; the caller has checked the bounds and AVX-512F.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn nn(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        a_rs: usize,
        a_cs: usize,
        b: &[f32],
        ldb: usize,
        c: &mut [f32],
        ldc: usize,
        acc: bool,
    ) {
        // SAFETY: as the caller's.
        unsafe { nn_with(m, n, k, a, a_rs, a_cs, b, Strided(ldb), c, ldc, acc) }
    }

    /// See [`super::gemm_rows`]; the caller has checked the bounds and AVX-512F.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn nn_rows(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        a_rs: usize,
        a_cs: usize,
        b: &[f32],
        rows: &[usize],
        c: &mut [f32],
        ldc: usize,
        acc: bool,
    ) {
        // SAFETY: as the caller's; the table has k entries.
        unsafe { nn_with(m, n, k, a, a_rs, a_cs, b, Table(rows.as_ptr()), c, ldc, acc) }
    }

    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn nn_with<R: Rows>(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        a_rs: usize,
        a_cs: usize,
        b: &[f32],
        ldb: R,
        c: &mut [f32],
        ldc: usize,
        acc: bool,
    ) {
        let (a, b, c) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
        // The sum over k runs in blocks of KC: within a block, each row tile of A (at most
        // 24 × KC values) stays in L1 while it meets every column tile, and the block's rows
        // of B (KC × n) stay in L2 while every row tile passes. Each C value is still one
        // chain of fused multiply-adds in the order of p, stored and reloaded between blocks,
        // so the blocking changes no bit of the result.
        let mut p0 = 0;
        loop {
            let kb = KC.min(k - p0);
            // SAFETY: p0 ≤ k; the block's rows of A and B lie inside the checked bounds.
            let (rows, shift) = unsafe { ldb.from(p0) };
            // SAFETY: the block's first column of A and first row of B are inside the checked
            // bounds (or one past their end when the block is empty, k = 0).
            let (ab, bb) = unsafe { (a.add(p0 * a_cs), b.add(shift)) };
            // SAFETY: as the caller's, for the block.
            unsafe { block_nn(m, n, kb, ab, a_rs, a_cs, bb, rows, c, ldc, acc || p0 > 0) };
            p0 += kb;
            if p0 >= k {
                break;
            }
        }
    }

    /// One block of `nn_with`'s sum (k = `kb`), every tile of C.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn block_nn<R: Rows>(
        m: usize,
        n: usize,
        k: usize,
        a: *const f32,
        a_rs: usize,
        a_cs: usize,
        b: *const f32,
        ldb: R,
        c: *mut f32,
        ldc: usize,
        acc: bool,
    ) {
        if n <= V {
            // One vector per row of C: up to 24 rows per tile keep the FMA units busy.
            let m0 = mask(n);
            let mut i = 0;
            while i < m {
                let rows = (m - i).min(24);
                // SAFETY (all arms): the tile lies inside the checked bounds.
                unsafe {
                    let args = (
                        a.add(i * a_rs),
                        a_rs,
                        a_cs,
                        b,
                        ldb,
                        c.add(i * ldc),
                        ldc,
                        k,
                        m0,
                        0,
                        acc,
                    );
                    seq!(rows; tile_nn1; args; 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2);
                }
                i += rows;
            }
            return;
        }
        let mut i = 0;
        while i < m {
            let rows = (m - i).min(12);
            let mut j = 0;
            while j < n {
                let cols = (n - j).min(NR);
                let (m0, m1) = (mask(cols), mask(cols.saturating_sub(V)));
                // SAFETY (all arms): the tile lies inside the checked bounds.
                unsafe {
                    let (ap, bp, cp) = (a.add(i * a_rs), b.add(j), c.add(i * ldc + j));
                    let args = (ap, a_rs, a_cs, bp, ldb, cp, ldc, k, m0, m1, acc);
                    seq!(rows; tile_nn; args; 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2);
                }
                j += cols;
            }
            i += rows;
        }
    }

    type NnArgs<R> = (
        *const f32,
        usize,
        usize,
        *const f32,
        R,
        *mut f32,
        usize,
        usize,
        __mmask16,
        __mmask16,
        bool,
    );

    /// One `MR × 16` tile of C (columns past the mask untouched).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_nn1<const MR: usize, R: Rows>(
        (a, a_rs, a_cs, b, ldb, c, ldc, k, m0, _, acc): NnArgs<R>,
    ) {
        // SAFETY: as in `tile_nn`, for one vector per row.
        unsafe {
            let mut r0 = [_mm512_setzero_ps(); MR];
            if acc {
                for r in 0..MR {
                    r0[r] = _mm512_maskz_loadu_ps(m0, c.add(r * ldc));
                }
            }
            for p in 0..k {
                let b0 = _mm512_maskz_loadu_ps(m0, b.add(ldb.at(p)));
                let ap = a.add(p * a_cs);
                for r in 0..MR {
                    r0[r] = _mm512_fmadd_ps(_mm512_set1_ps(*ap.add(r * a_rs)), b0, r0[r]);
                }
            }
            for r in 0..MR {
                _mm512_mask_storeu_ps(c.add(r * ldc), m0, r0[r]);
            }
        }
    }

    /// One `MR × 32` tile of C (columns past the masks untouched).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_nn<const MR: usize, R: Rows>(
        (a, a_rs, a_cs, b, ldb, c, ldc, k, m0, m1, acc): NnArgs<R>,
    ) {
        // SAFETY: every address below is inside the tile the caller checked; masked lanes are
        // neither read nor written.
        unsafe {
            let mut r0 = [_mm512_setzero_ps(); MR];
            let mut r1 = [_mm512_setzero_ps(); MR];
            if acc {
                for r in 0..MR {
                    r0[r] = _mm512_maskz_loadu_ps(m0, c.add(r * ldc));
                    r1[r] = _mm512_maskz_loadu_ps(m1, c.add(r * ldc + V));
                }
            }
            for p in 0..k {
                let bp = b.add(ldb.at(p));
                let b0 = _mm512_maskz_loadu_ps(m0, bp);
                let b1 = _mm512_maskz_loadu_ps(m1, bp.add(V));
                let ap = a.add(p * a_cs);
                for r in 0..MR {
                    let av = _mm512_set1_ps(*ap.add(r * a_rs));
                    r0[r] = _mm512_fmadd_ps(av, b0, r0[r]);
                    r1[r] = _mm512_fmadd_ps(av, b1, r1[r]);
                }
            }
            for r in 0..MR {
                _mm512_mask_storeu_ps(c.add(r * ldc), m0, r0[r]);
                _mm512_mask_storeu_ps(c.add(r * ldc + V), m1, r1[r]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32)
            .map(|i| {
                ((i.wrapping_mul(2654435761).wrapping_add(seed * 97)) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// The product equals a plain triple loop (f64 accumulation) over shapes that exercise
    /// every row count of the tiles, masked column tails and strided A; with the AVX-512
    /// kernels (where the CPU has them) and with the portable fallback.
    #[test]
    fn products_match_naive_loops() {
        check_products();
        PORTABLE_ONLY.with(|p| p.set(true));
        check_products();
        PORTABLE_ONLY.with(|p| p.set(false));
    }

    /// `c` (m×n) equals `c0 + Σ_p a(i, p)·b(p, j)` summed in f64, within f32 rounding.
    fn assert_naive(
        what: &str,
        (m, n, k): (usize, usize, usize),
        a: impl Fn(usize, usize) -> f32,
        b: impl Fn(usize, usize) -> f32,
        c0: impl Fn(usize, usize) -> f32,
        c: &[f32],
    ) {
        for i in 0..m {
            for j in 0..n {
                let mut s = c0(i, j) as f64;
                for p in 0..k {
                    s += a(i, p) as f64 * b(p, j) as f64;
                }
                let got = c[i * n + j] as f64;
                assert!(
                    (got - s).abs() <= 1e-5 * (1.0 + s.abs()) * (k as f64).sqrt(),
                    "{what} {m}x{n}x{k} at ({i},{j}): {got} vs {s}"
                );
            }
        }
    }

    fn check_products() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (16, 1024, 144),
            (13, 37, 5),
            (25, 70, 33),
            (3, 16, 17),
            (12, 32, 64),
            (7, 49, 300),
            // Sums longer than a block of the k loop (KC = 256), one vector wide and wider.
            (24, 16, 600),
            (5, 3, 512),
            (13, 40, 513),
            (4, 40, 0),
        ] {
            for transposed_a in [false, true] {
                let a = values(m * k, 1);
                let (a_rs, a_cs) = if transposed_a { (1, m) } else { (k, 1) };
                let b = values(k * n, 2);
                let c0 = values(m * n, 3);
                for accumulate in [false, true] {
                    let mut c = c0.clone();
                    gemm_nn((m, n, k), &a, (a_rs, a_cs), &b, n, &mut c, n, accumulate);
                    let a_at = |i: usize, p: usize| a[i * a_rs + p * a_cs];
                    let c0_at = |i: usize, j: usize| if accumulate { c0[i * n + j] } else { 0.0 };
                    assert_naive("nn", (m, n, k), a_at, |p, j| b[p * n + j], c0_at, &c);
                    // The same with B's rows scattered (overlapping, out of order) in a pool.
                    let pool = values(k * n + 3 * n + 7, 4);
                    let rows: Vec<usize> = (0..k)
                        .map(|p| (p * 7919 + 5) % (pool.len() - n + 1))
                        .collect();
                    let mut c = c0.clone();
                    gemm_rows(
                        (m, n, k),
                        &a,
                        (a_rs, a_cs),
                        &pool,
                        &rows,
                        &mut c,
                        n,
                        accumulate,
                    );
                    let b_at = |p: usize, j: usize| pool[rows[p] + j];
                    assert_naive("rows", (m, n, k), a_at, b_at, c0_at, &c);
                }
            }
        }
    }
}
