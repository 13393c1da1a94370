//! The portable kernel: each weight block decoded to f32, then plain dot products.

use std::ops::Range;

use super::{Operands, Out, BLOCK, TILE};

/// Output rows `rows` against activation rows `r0 .. r0 + t` (`t <= TILE`), written into `y`.
pub(super) fn rows(ops: &Operands<'_>, rows: Range<usize>, r0: usize, t: usize, y: Out) {
    let n = ops.weight.rows;
    for j in rows {
        let mut out = [0f32; TILE];
        row_dot(ops, j, r0, t, &mut out);
        for (r, v) in out[..t].iter().enumerate() {
            // SAFETY: `matmul_on` sized `y` for every (row, output) pair and gives each task its
            // own output rows.
            unsafe { y.write((r0 + r) * n + j, *v) };
        }
    }
}

/// Output row `j` against activation rows `r0 .. r0 + t`, into `out[..t]`.
fn row_dot(ops: &Operands<'_>, j: usize, r0: usize, t: usize, out: &mut [f32; TILE]) {
    let w = ops.weight;
    let k = w.cols;
    let blocks = k / BLOCK;
    let first = j * blocks;
    out[..t].fill(0.0);
    for b in 0..blocks {
        let values = w.decode_block(first + b);
        for (r, acc) in out[..t].iter_mut().enumerate() {
            let x = &ops.x[(r0 + r) * k + b * BLOCK..(r0 + r) * k + (b + 1) * BLOCK];
            *acc += values.iter().zip(x).map(|(v, x)| v * x).sum::<f32>();
        }
    }
}
