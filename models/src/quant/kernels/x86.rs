//! x86-64 kernels: AVX-512F (16 lanes; a 16-entry code table is one `vpermps`) and AVX2 + FMA
//! (8 lanes; the table is two 8-entry permutes and a blend).
//!
//! Each decodes a weight block into f32 registers once and multiplies it with up to
//! [`TILE`] activation rows, with one accumulator register per row (the tile size is a const
//! generic, so the accumulators stay in registers). Scales are applied per block to the block's
//! partial products; offsets (q4_1) are added at the end from the activations' block sums.
//!
//! Tried and dropped: for one activation row, computing four output rows together so that each
//! activation block is loaded once for all four. On SmolLM2-135M it decoded at 85 tokens/s
//! against 107 for one row at a time (more live registers and four weight streams at once).

use std::arch::x86_64::*;
use std::ops::Range;

use super::{Codes, Operands, Out, BLOCK, TILE};

/// The offsets' part of output row `j` for activation row `r` (`Σ_b offset_b · Σ x_block_b`).
fn offset_part(ops: &Operands<'_>, first: usize, blocks: usize, r: usize) -> f32 {
    match &ops.weight.offsets {
        Some(offsets) => offsets[first..first + blocks]
            .iter()
            .zip(&ops.sums[r * blocks..(r + 1) * blocks])
            .map(|(o, s)| o * s)
            .sum(),
        None => 0.0,
    }
}

macro_rules! rows_kernel {
    ($name:ident, $tile:ident, $features:literal) => {
        /// Output rows `rows` against activation rows `r0 .. r0 + T`, written into `y`.
        #[target_feature(enable = $features)]
        unsafe fn $name<const T: usize>(ops: &Operands<'_>, rows: Range<usize>, r0: usize, y: Out) {
            let n = ops.weight.rows;
            for j in rows {
                let mut out = [0f32; TILE];
                $tile::<T>(ops, j, r0, &mut out);
                for (r, v) in out[..T].iter().enumerate() {
                    y.write((r0 + r) * n + j, *v);
                }
            }
        }
    };
}

rows_kernel!(avx512_rows, avx512_tile, "avx512f");
rows_kernel!(avx2_rows, avx2_tile, "avx2,fma");

macro_rules! dispatch_tile {
    ($kernel:ident, $ops:expr, $rows:expr, $r0:expr, $t:expr, $y:expr) => {
        // SAFETY: the caller checked that the CPU has the kernel's target features
        // (`Isa::available`), `$r0 + $t` rows of activations exist and `$y` has room for every
        // row (`matmul_on`), and no other task writes these output rows.
        unsafe {
            match $t {
                1 => $kernel::<1>($ops, $rows, $r0, $y),
                2 => $kernel::<2>($ops, $rows, $r0, $y),
                3 => $kernel::<3>($ops, $rows, $r0, $y),
                4 => $kernel::<4>($ops, $rows, $r0, $y),
                5 => $kernel::<5>($ops, $rows, $r0, $y),
                6 => $kernel::<6>($ops, $rows, $r0, $y),
                7 => $kernel::<7>($ops, $rows, $r0, $y),
                _ => $kernel::<8>($ops, $rows, $r0, $y),
            }
        }
    };
}

/// AVX-512F: output rows `rows` against activation rows `r0 .. r0 + t` (`t <= TILE`).
pub(super) fn rows_avx512(ops: &Operands<'_>, rows: Range<usize>, r0: usize, t: usize, y: Out) {
    dispatch_tile!(avx512_rows, ops, rows, r0, t, y)
}

/// AVX2 + FMA: output rows `rows` against activation rows `r0 .. r0 + t` (`t <= TILE`).
pub(super) fn rows_avx2(ops: &Operands<'_>, rows: Range<usize>, r0: usize, t: usize, y: Out) {
    dispatch_tile!(avx2_rows, ops, rows, r0, t, y)
}

/// One block's 32 codes as values before scaling (`wv`, two registers of 16 in activation
/// order), scaled and offset into the decoded values (one FMA per register, so the offset of
/// affine formats costs nothing here), times block `b` of each of the `T` activation rows in
/// `x`, added to `acc` with two FMAs per row.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn avx512_block<const T: usize>(
    acc: &mut [__m512; T],
    x: &[f32],
    k: usize,
    b: usize,
    wv: [__m512; 2],
    scale: f32,
    offset: f32,
) {
    let (d, o) = (_mm512_set1_ps(scale), _mm512_set1_ps(offset));
    let (w_lo, w_hi) = (_mm512_fmadd_ps(d, wv[0], o), _mm512_fmadd_ps(d, wv[1], o));
    for (r, a) in acc.iter_mut().enumerate() {
        let xp = x.as_ptr().add(r * k + b * BLOCK);
        *a = _mm512_fmadd_ps(w_lo, _mm512_loadu_ps(xp), *a);
        *a = _mm512_fmadd_ps(w_hi, _mm512_loadu_ps(xp.add(16)), *a);
    }
}

/// One block's 32 codes (`wv`, as in [`avx512_block`]) times block `b` of one activation row
/// `x`, scaled and added to `acc`: the block's dot product first, then one FMA with the scale.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn avx512_block_single(acc: &mut __m512, x: &[f32], b: usize, wv: [__m512; 2], scale: f32) {
    let xp = x.as_ptr().add(b * BLOCK);
    let p = _mm512_mul_ps(wv[0], _mm512_loadu_ps(xp));
    let p = _mm512_fmadd_ps(wv[1], _mm512_loadu_ps(xp.add(16)), p);
    *acc = _mm512_fmadd_ps(_mm512_set1_ps(scale), p, *acc);
}

/// AVX-512F, one activation row: output row `j` against activation row `r0`.
///
/// Why a kernel of its own: with one row, [`avx512_tile`] adds every block into a single
/// accumulator, so each block waits for the previous block's FMAs (latency, not throughput,
/// bounds it). Here even and odd blocks go to two accumulators, and each block's product is
/// formed apart from them, so consecutive blocks overlap; the scale is applied once per block
/// instead of to both halves of the decoded weight.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn avx512_single(ops: &Operands<'_>, j: usize, r0: usize) -> f32 {
    let w = ops.weight;
    let k = w.cols;
    let blocks = k / BLOCK;
    let first = j * blocks;
    let scales = &w.scales[first..first + blocks];
    let x = &ops.x[r0 * k..(r0 + 1) * k];
    let mut even = _mm512_setzero_ps();
    let mut odd = _mm512_setzero_ps();
    match &w.codes {
        Codes::Nibbles { bytes, table } => {
            let codes = &bytes[first * 16..(first + blocks) * 16];
            let lut = _mm512_loadu_ps(table.as_ptr());
            let mask = _mm_set1_epi8(0x0f);
            let decode = |b: usize| {
                let q = _mm_loadu_si128(codes.as_ptr().add(b * 16).cast());
                let lo = _mm_and_si128(q, mask);
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), mask);
                [
                    _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(lo), lut),
                    _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(hi), lut),
                ]
            };
            let mut b = 0;
            while b + 1 < blocks {
                avx512_block_single(&mut even, x, b, decode(b), scales[b]);
                avx512_block_single(&mut odd, x, b + 1, decode(b + 1), scales[b + 1]);
                b += 2;
            }
            if b < blocks {
                avx512_block_single(&mut even, x, b, decode(b), scales[b]);
            }
        }
        Codes::Bytes(codes) => {
            let codes = &codes[first * BLOCK..(first + blocks) * BLOCK];
            let decode = |b: usize| {
                let cp = codes.as_ptr().add(b * BLOCK);
                [
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(cp.cast()))),
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(cp.add(16).cast()))),
                ]
            };
            let mut b = 0;
            while b + 1 < blocks {
                avx512_block_single(&mut even, x, b, decode(b), scales[b]);
                avx512_block_single(&mut odd, x, b + 1, decode(b + 1), scales[b + 1]);
                b += 2;
            }
            if b < blocks {
                avx512_block_single(&mut even, x, b, decode(b), scales[b]);
            }
        }
    }
    _mm512_reduce_add_ps(_mm512_add_ps(even, odd)) + offset_part(ops, first, blocks, r0)
}

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn avx512_tile<const T: usize>(
    ops: &Operands<'_>,
    j: usize,
    r0: usize,
    out: &mut [f32; TILE],
) {
    if T == 1 {
        out[0] = avx512_single(ops, j, r0);
        return;
    }
    let w = ops.weight;
    let k = w.cols;
    let blocks = k / BLOCK;
    let first = j * blocks;
    let scales = &w.scales[first..first + blocks];
    let offsets = w.offsets.as_ref().map(|o| &o[first..first + blocks]);
    let x = &ops.x[r0 * k..(r0 + T) * k];
    // Even and odd blocks add into separate accumulators: with few rows, one accumulator per
    // row would make every block wait for the previous block's FMAs.
    let mut even = [_mm512_setzero_ps(); T];
    let mut odd = [_mm512_setzero_ps(); T];
    match &w.codes {
        Codes::Nibbles { bytes, table } => {
            let codes = &bytes[first * 16..(first + blocks) * 16];
            let lut = _mm512_loadu_ps(table.as_ptr());
            let mask = _mm_set1_epi8(0x0f);
            let decode = |b: usize| {
                let q = _mm_loadu_si128(codes.as_ptr().add(b * 16).cast());
                let lo = _mm_and_si128(q, mask);
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), mask);
                [
                    _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(lo), lut),
                    _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(hi), lut),
                ]
            };
            let offset = |b: usize| offsets.map_or(0.0, |o| o[b]);
            let mut b = 0;
            while b + 1 < blocks {
                avx512_block(&mut even, x, k, b, decode(b), scales[b], offset(b));
                avx512_block(
                    &mut odd,
                    x,
                    k,
                    b + 1,
                    decode(b + 1),
                    scales[b + 1],
                    offset(b + 1),
                );
                b += 2;
            }
            if b < blocks {
                avx512_block(&mut even, x, k, b, decode(b), scales[b], offset(b));
            }
        }
        Codes::Bytes(codes) => {
            let codes = &codes[first * BLOCK..(first + blocks) * BLOCK];
            let decode = |b: usize| {
                let cp = codes.as_ptr().add(b * BLOCK);
                [
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(cp.cast()))),
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(cp.add(16).cast()))),
                ]
            };
            let mut b = 0;
            while b + 1 < blocks {
                avx512_block(&mut even, x, k, b, decode(b), scales[b], 0.0);
                avx512_block(&mut odd, x, k, b + 1, decode(b + 1), scales[b + 1], 0.0);
                b += 2;
            }
            if b < blocks {
                avx512_block(&mut even, x, k, b, decode(b), scales[b], 0.0);
            }
        }
    }
    for r in 0..T {
        out[r] = _mm512_reduce_add_ps(_mm512_add_ps(even[r], odd[r]));
    }
}

/// One block's 32 weight values (`wv`, four registers of 8 in activation order) times block
/// `b` of each of the `T` activation rows in `x`, scaled and added to `acc`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_block<const T: usize>(
    acc: &mut [__m256; T],
    x: &[f32],
    k: usize,
    b: usize,
    wv: [__m256; 4],
    scale: f32,
) {
    let d = _mm256_set1_ps(scale);
    for (r, a) in acc.iter_mut().enumerate() {
        let xp = x.as_ptr().add(r * k + b * BLOCK);
        let mut p = _mm256_mul_ps(wv[0], _mm256_loadu_ps(xp));
        p = _mm256_fmadd_ps(wv[1], _mm256_loadu_ps(xp.add(8)), p);
        p = _mm256_fmadd_ps(wv[2], _mm256_loadu_ps(xp.add(16)), p);
        p = _mm256_fmadd_ps(wv[3], _mm256_loadu_ps(xp.add(24)), p);
        *a = _mm256_fmadd_ps(d, p, *a);
    }
}

/// Sum of the 8 lanes.
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// `table[idx]` for 8 indices in 0..16 (`lut_lo` = entries 0..8, `lut_hi` = 8..16).
#[target_feature(enable = "avx2,fma")]
unsafe fn lookup8(idx: __m256i, lut_lo: __m256, lut_hi: __m256) -> __m256 {
    let lo = _mm256_permutevar8x32_ps(lut_lo, idx);
    let hi = _mm256_permutevar8x32_ps(lut_hi, idx);
    let upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7)));
    _mm256_blendv_ps(lo, hi, upper)
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_tile<const T: usize>(
    ops: &Operands<'_>,
    j: usize,
    r0: usize,
    out: &mut [f32; TILE],
) {
    let w = ops.weight;
    let k = w.cols;
    let blocks = k / BLOCK;
    let first = j * blocks;
    let scales = &w.scales[first..first + blocks];
    let x = &ops.x[r0 * k..(r0 + T) * k];
    let mut acc = [_mm256_setzero_ps(); T];
    match &w.codes {
        Codes::Nibbles { bytes, table } => {
            let codes = &bytes[first * 16..(first + blocks) * 16];
            let lut_lo = _mm256_loadu_ps(table.as_ptr());
            let lut_hi = _mm256_loadu_ps(table.as_ptr().add(8));
            let mask = _mm_set1_epi8(0x0f);
            for (b, &scale) in scales.iter().enumerate() {
                let q = _mm_loadu_si128(codes.as_ptr().add(b * 16).cast());
                let lo = _mm_and_si128(q, mask);
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), mask);
                let wv = [
                    lookup8(_mm256_cvtepu8_epi32(lo), lut_lo, lut_hi),
                    lookup8(
                        _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(lo)),
                        lut_lo,
                        lut_hi,
                    ),
                    lookup8(_mm256_cvtepu8_epi32(hi), lut_lo, lut_hi),
                    lookup8(
                        _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(hi)),
                        lut_lo,
                        lut_hi,
                    ),
                ];
                avx2_block(&mut acc, x, k, b, wv, scale);
            }
        }
        Codes::Bytes(codes) => {
            let codes = &codes[first * BLOCK..(first + blocks) * BLOCK];
            for (b, &scale) in scales.iter().enumerate() {
                let cp = codes.as_ptr().add(b * BLOCK);
                let q0 = _mm_loadu_si128(cp.cast());
                let q1 = _mm_loadu_si128(cp.add(16).cast());
                let wv = [
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q0)),
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(q0))),
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q1)),
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(q1))),
                ];
                avx2_block(&mut acc, x, k, b, wv, scale);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        out[r] = hsum256(*a) + offset_part(ops, first, blocks, r0 + r);
    }
}
