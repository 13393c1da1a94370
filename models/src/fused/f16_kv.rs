//! A decoding step's products straight from an f16 KV cache: the query heads' scores against
//! the cached keys and the weighted sum of the cached values, each f16 widened in registers.
//!
//! Why: widening a head's keys and values into an f32 buffer before the products writes and
//! rereads twice what the cache holds; at batch 32 over a few hundred positions that pass cost
//! a fifth of every decoding step (measured on SmolLM2-135M), more than the halved reads saved.
//! Here each cached row is read once as f16 and used by every query head that shares it.
//!
//! x86-64 with AVX2, FMA and F16C only; [`available`] says whether this CPU has them, and
//! callers widen and use the general products otherwise.

/// Whether this CPU runs the kernels here.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Most query heads per key/value head the kernels take (their accumulators live in registers).
pub(crate) const MAX_GROUP: usize = 8;

/// `scores[j·n + r] = scale · q_j · k_r` for the `group` query rows `q` (`[group, head_dim]`)
/// and the `n` cached key rows `keys` (`[n, head_dim]`, f16). `None` when the shapes are not
/// the kernel's (`head_dim` a multiple of 8, at most [`MAX_GROUP`] rows) or the CPU lacks the
/// instructions: the caller takes the general path.
pub(crate) fn scores(
    q: &[f32],
    keys: &[half::f16],
    head_dim: usize,
    scale: f32,
) -> Option<Vec<f32>> {
    let group = shape_fits(q.len(), keys.len(), head_dim)?;
    let n = keys.len() / head_dim;
    let mut out = vec![0f32; group * n];
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `shape_fits` checked the CPU features and that every row read lies in `q` and
    // `keys` (whole rows of `head_dim`, a multiple of 8) and every write in `out`.
    unsafe {
        x86::scores(q, keys, head_dim, scale, &mut out);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = scale;
    Some(out)
}

/// `out[j] = Σ_r probs[j·n + r] · v_r` for the `group` probability rows `probs` (`[group, n]`)
/// and the `n` cached value rows `values` (`[n, head_dim]`, f16); `[group, head_dim]`. `None`
/// as for [`scores`].
pub(crate) fn weighted_values(
    probs: &[f32],
    values: &[half::f16],
    head_dim: usize,
) -> Option<Vec<f32>> {
    if head_dim == 0 || !values.len().is_multiple_of(head_dim) {
        return None;
    }
    let n = values.len() / head_dim;
    if n == 0 || !probs.len().is_multiple_of(n) {
        return None;
    }
    let group = shape_fits(probs.len() / n * head_dim, values.len(), head_dim)?;
    let mut out = vec![0f32; group * head_dim];
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as in `scores`; `probs` holds `group · n` values.
    unsafe {
        x86::weighted_values(probs, values, head_dim, &mut out);
    }
    Some(out)
}

/// The number of query rows when `queries` values of rows of `head_dim` against `cached`
/// values of the same rows fit the kernels on this CPU.
fn shape_fits(queries: usize, cached: usize, head_dim: usize) -> Option<usize> {
    if head_dim == 0
        || !head_dim.is_multiple_of(8)
        || !queries.is_multiple_of(head_dim)
        || !cached.is_multiple_of(head_dim)
    {
        return None;
    }
    let group = queries / head_dim;
    (1..=MAX_GROUP)
        .contains(&group)
        .then_some(group)
        .filter(|_| available())
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::MAX_GROUP;

    /// See [`super::scores`]. The query heads' dot products with one key row run side by side
    /// (one accumulator each), so the row is widened once and no head waits on another's sums.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn scores(
        q: &[f32],
        keys: &[half::f16],
        head_dim: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        let group = q.len() / head_dim;
        let n = keys.len() / head_dim;
        let chunks = head_dim / 8;
        let (q, keys) = (q.as_ptr(), keys.as_ptr().cast::<u16>());
        for r in 0..n {
            let row = keys.add(r * head_dim);
            let mut acc = [_mm256_setzero_ps(); MAX_GROUP];
            for c in 0..chunks {
                let k = _mm256_cvtph_ps(_mm_loadu_si128(row.add(c * 8).cast()));
                for (j, acc) in acc.iter_mut().enumerate().take(group) {
                    let qj = _mm256_loadu_ps(q.add(j * head_dim + c * 8));
                    *acc = _mm256_fmadd_ps(qj, k, *acc);
                }
            }
            for (j, acc) in acc.iter().enumerate().take(group) {
                out[j * n + r] = horizontal_sum(*acc) * scale;
            }
        }
    }

    /// See [`super::weighted_values`]: each value row is widened once and added to every
    /// query head's output row.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn weighted_values(
        probs: &[f32],
        values: &[half::f16],
        head_dim: usize,
        out: &mut [f32],
    ) {
        let n = values.len() / head_dim;
        let group = out.len() / head_dim;
        let chunks = head_dim / 8;
        let values = values.as_ptr().cast::<u16>();
        let o = out.as_mut_ptr();
        for r in 0..n {
            let row = values.add(r * head_dim);
            let mut weights = [_mm256_setzero_ps(); MAX_GROUP];
            let mut any = false;
            for (j, w) in weights.iter_mut().enumerate().take(group) {
                let p = probs[j * n + r];
                any |= p != 0.0;
                *w = _mm256_set1_ps(p);
            }
            // Masked keys (padding, the future) have weight exactly zero.
            if !any {
                continue;
            }
            for c in 0..chunks {
                let v = _mm256_cvtph_ps(_mm_loadu_si128(row.add(c * 8).cast()));
                for (j, w) in weights.iter().enumerate().take(group) {
                    let at = o.add(j * head_dim + c * 8);
                    _mm256_storeu_ps(at, _mm256_fmadd_ps(*w, v, _mm256_loadu_ps(at)));
                }
            }
        }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn horizontal_sum(x: __m256) -> f32 {
        let halves = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
        let pairs = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));
        _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2000) as f32
                    / 1000.0
                    - 1.0
            })
            .collect()
    }

    /// Both kernels against the plain sums over the widened values, for one to `MAX_GROUP`
    /// query heads; shapes the kernels do not take are declined.
    #[test]
    fn kernels_match_the_sums_over_widened_values() {
        if !available() {
            eprintln!("skipping: this CPU lacks AVX2/FMA/F16C");
            return;
        }
        let (head_dim, n) = (64, 37);
        let cached: Vec<half::f16> = values(n * head_dim, 7)
            .into_iter()
            .map(half::f16::from_f32)
            .collect();
        for group in 1..=MAX_GROUP {
            let q = values(group * head_dim, group as u32);
            let got = scores(&q, &cached, head_dim, 0.125).unwrap();
            for j in 0..group {
                for r in 0..n {
                    let want: f32 = (0..head_dim)
                        .map(|d| q[j * head_dim + d] * cached[r * head_dim + d].to_f32())
                        .sum::<f32>()
                        * 0.125;
                    let diff = (got[j * n + r] - want).abs();
                    assert!(diff < 1e-5, "scores, group {group}, ({j}, {r}): {diff}");
                }
            }
            let mut probs = values(group * n, 3);
            probs[0] = 0.0;
            let got = weighted_values(&probs, &cached, head_dim).unwrap();
            for j in 0..group {
                for d in 0..head_dim {
                    let want: f32 = (0..n)
                        .map(|r| probs[j * n + r] * cached[r * head_dim + d].to_f32())
                        .sum();
                    let diff = (got[j * head_dim + d] - want).abs();
                    assert!(diff < 1e-4, "values, group {group}, ({j}, {d}): {diff}");
                }
            }
        }
        let q = values(9 * head_dim, 1);
        assert!(scores(&q, &cached, head_dim, 1.0).is_none(), "9 heads");
        assert!(
            scores(&q[..60], &cached[..60], 60, 1.0).is_none(),
            "head_dim 60"
        );
    }
}
