//! Causal self-attention for training on the CPU as one graph node: rotary on queries and keys,
//! `softmax(scale·QKᵀ + mask)·V` per head with grouped-query sharing, heads merged back.
//!
//! As tensor ops this is some twenty nodes per layer (head reshapes and transposes, the rotary
//! arithmetic, two batched matmuls, the softmax, the merge), each of which costs candle's
//! backward a zero-filled buffer and an add. Here forward keeps only the attention weights `P`
//! (`[batch, heads, seq, seq]`, which the composite form keeps too) and backward recomputes the
//! rotated queries and keys from the op's inputs:
//!
//! - `dV = Pᵀ·dO`, summed over the query heads sharing a key/value head,
//! - `dS = scale · P ⊙ (dP − rowsum(dP ⊙ P))` with `dP = dO·Vᵀ`,
//! - `dQ = R⁻¹(dS·K)`, `dK = R⁻¹(Σ dSᵀ·Q)`, `R⁻¹` rotating back by the same angles.
//!
//! Work is split over (batch, key/value head) pairs on rayon's pool; the products inside a
//! pair run on its thread.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{matmul, matmul_acc, MatRef, Threads};
use super::softmax::softmax_in_place;
use super::{contiguous_slice, storage_slice, Float};

/// Added to the scores of keys a query may not see (as the composite attention does): finite,
/// so a query whose keys are all masked (a left-padding row) gets uniform weights, not NaN.
const MASKED: f64 = -1e9;

/// How many leading keys of query `i`'s row can carry weight: `i + 1` under the causal mask, as
/// the later keys' weights are exactly zero (`exp` of a masked score underflows), which halves
/// the softmax work; the whole row when the query sees no key at all (`first_key > i`), whose
/// softmax then spreads over every (equally masked) key, as the composite ops do.
fn causal_width(i: usize, first_key: usize, seq: usize) -> usize {
    if first_key <= i {
        i + 1
    } else {
        seq
    }
}

/// Head layout and rotary parameters of a [`causal_attention`] call.
#[derive(Debug, Clone)]
pub struct AttentionSpec {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads; query head `h` reads key/value head `h / (num_heads / num_kv_heads)`.
    pub num_kv_heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// Leading channels of each head that rotary rotates (the rest pass through).
    pub rotary_dim: usize,
    /// Rotary inverse frequencies, `rotary_dim / 2` of them.
    pub inv_freq: Vec<f32>,
    /// Score scaling, `1/√head_dim` normally.
    pub scale: f64,
}

impl AttentionSpec {
    /// Refuses an inconsistent head layout, and projections `q`, `k`, `v` that are not
    /// `[batch, seq, width]` with this layout's widths, f32/f64 CPU tensors of one dtype (`op`
    /// names the caller in the error).
    pub(crate) fn check_projections(
        &self,
        op: &str,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        (batch, seq): (usize, usize),
    ) -> Result<()> {
        if self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
            || self.rotary_dim > self.head_dim
            || !self.rotary_dim.is_multiple_of(2)
            || self.inv_freq.len() != self.rotary_dim / 2
        {
            candle_core::bail!("{op}: inconsistent head layout {self:?}");
        }
        let kv_width = self.num_kv_heads * self.head_dim;
        let shapes = [
            (
                "queries",
                q.dims3()?,
                (batch, seq, self.num_heads * self.head_dim),
            ),
            ("keys", k.dims3()?, (batch, seq, kv_width)),
            ("values", v.dims3()?, (batch, seq, kv_width)),
        ];
        for (name, got, want) in shapes {
            if got != want {
                candle_core::bail!("{op}: {name} are {got:?}, expected {want:?}");
            }
        }
        if !super::supported(q) || k.dtype() != q.dtype() || v.dtype() != q.dtype() {
            candle_core::bail!("{op} takes f32/f64 CPU tensors of one dtype");
        }
        Ok(())
    }

    /// Rotary tables `(cos, sin)`, `[positions, rotary_dim / 2]` each, with the same angles and
    /// f32 precision as the composite rotary (and HF).
    pub(crate) fn rotary_tables(&self, positions: &[u32]) -> (Vec<f32>, Vec<f32>) {
        let half = self.rotary_dim / 2;
        let (mut cos, mut sin) = (
            Vec::with_capacity(positions.len() * half),
            Vec::with_capacity(positions.len() * half),
        );
        for &p in positions {
            for &f in &self.inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        (cos, sin)
    }
}

/// Rotates `[rows, head_dim]` rows in place by the rotary angles of `tables` (row `i` by the
/// `half` angles at `tables.0[i * half..]`, its first `2 · half` channels; `inverse`: by minus
/// the angles, which is also the transpose, for gradients).
pub(crate) fn rotate_rows<T: Float>(
    rows: &mut [T],
    (head_dim, half): (usize, usize),
    (cos, sin): (&[f32], &[f32]),
    inverse: bool,
) {
    for (i, row) in rows.chunks_mut(head_dim).enumerate() {
        for c in 0..half {
            let cos = T::from_f64(f64::from(cos[i * half + c]));
            let sin = T::from_f64(f64::from(sin[i * half + c]));
            let sin = if inverse { T::from_f64(0.0) - sin } else { sin };
            let (x1, x2) = (row[c], row[c + half]);
            row[c] = x1 * cos - x2 * sin;
            row[c + half] = x2 * cos + x1 * sin;
        }
    }
}

/// Attention over queries `[batch, seq, heads·head_dim]` and keys and values `[batch, seq,
/// kv_heads·head_dim]` (the projections' outputs), at rotary `positions` `[batch, seq]` (u32),
/// with `key_mask` `[batch, seq]` (u8, 1 = attend) on top of the causal mask. Returns `[batch,
/// seq, heads·head_dim]`, the output projection's input, and records gradients for all three.
///
/// CPU, f32 or f64 (see [`super::supported`]), no KV cache: this is the training path.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    positions: &Tensor,
    key_mask: &Tensor,
    spec: &AttentionSpec,
) -> Result<Tensor> {
    let (b, t, _) = q.dims3()?;
    spec.check_projections("fused attention", (q, k, v), (b, t))?;
    if positions.dims() != [b, t] || key_mask.dims() != [b, t] {
        candle_core::bail!(
            "fused attention: positions {:?} and key mask {:?} must be [{b}, {t}]",
            positions.dims(),
            key_mask.dims()
        );
    }
    let positions = positions
        .to_dtype(DType::U32)?
        .flatten_all()?
        .to_vec1::<u32>()?;
    let key_mask = key_mask
        .to_dtype(DType::U8)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    let (cos, sin) = spec.rotary_tables(&positions);
    let op = Attention {
        spec: spec.clone(),
        batch: b,
        seq: t,
        cos,
        sin,
        key_mask,
        probs: Mutex::new(None),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

struct Attention {
    spec: AttentionSpec,
    batch: usize,
    seq: usize,
    /// `[batch, seq, rotary_dim / 2]` rotary tables.
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// `[batch, seq]`, nonzero = the key may be attended to.
    key_mask: Vec<u8>,
    /// The attention weights `[batch, heads, seq, seq]`, from forward for backward.
    probs: Mutex<Option<Tensor>>,
}

impl Attention {
    /// Channels per token of queries and of keys/values.
    fn widths(&self) -> (usize, usize) {
        let s = &self.spec;
        (s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim)
    }

    /// Query heads per key/value head.
    fn group(&self) -> usize {
        self.spec.num_heads / self.spec.num_kv_heads
    }

    /// Head `head` of batch row `bi` of `x` (`[batch, seq, width]`) as `[seq, head_dim]`.
    fn head_rows<T: Float>(&self, x: &[T], width: usize, bi: usize, head: usize) -> Vec<T> {
        let (t, hd) = (self.seq, self.spec.head_dim);
        let mut out = Vec::with_capacity(t * hd);
        for i in 0..t {
            out.extend_from_slice(&x[(bi * t + i) * width + head * hd..][..hd]);
        }
        out
    }

    /// The same head as a strided view, no copy.
    fn head_view<'a, T>(
        &self,
        x: &'a [T],
        width: usize,
        bi: usize,
        head: usize,
    ) -> Result<MatRef<'a, T>> {
        let (t, hd) = (self.seq, self.spec.head_dim);
        MatRef::strided(&x[bi * t * width + head * hd..], t, hd, width, 1)
    }

    /// Rotates `[seq, head_dim]` rows of batch row `bi` in place by the rotary angles
    /// (`inverse`: by minus the angles, which is also the transpose, for gradients).
    fn rotate<T: Float>(&self, rows: &mut [T], bi: usize, inverse: bool) {
        let half = self.spec.rotary_dim / 2;
        let rows_here = rows.len() / self.spec.head_dim.max(1);
        let at = bi * self.seq * half..(bi * self.seq + rows_here) * half;
        let tables = (&self.cos[at.clone()], &self.sin[at]);
        rotate_rows(rows, (self.spec.head_dim, half), tables, inverse);
    }

    /// Writes `[seq, head_dim]` rows into head `head` of batch row `bi` of `dst` (`[batch, seq,
    /// width]`).
    fn scatter<T: Copy>(&self, dst: &mut [T], width: usize, bi: usize, head: usize, rows: &[T]) {
        let (t, hd) = (self.seq, self.spec.head_dim);
        for i in 0..t {
            dst[(bi * t + i) * width + head * hd..][..hd].copy_from_slice(&rows[i * hd..][..hd]);
        }
    }

    fn forward<T: Float>(&self, q: &[T], k: &[T], v: &[T]) -> Result<(Vec<T>, Vec<T>)> {
        let (b, t, hd) = (self.batch, self.seq, self.spec.head_dim);
        let (qw, kvw) = self.widths();
        let (nkv, group) = (self.spec.num_kv_heads, self.group());
        let scale = T::from_f64(self.spec.scale);
        let mut probs = vec![T::from_f64(0.0); b * self.spec.num_heads * t * t];
        // One task per (batch row, key/value head): its query heads' weights are contiguous.
        let outputs: Vec<Result<Vec<T>>> = probs
            .par_chunks_mut(group * t * t)
            .enumerate()
            .map(|(task, probs)| {
                let (bi, g) = (task / nkv, task % nkv);
                let mut k_rot = self.head_rows(k, kvw, bi, g);
                self.rotate(&mut k_rot, bi, false);
                let k_rot = MatRef::new(&k_rot, t, hd)?;
                let v_head = self.head_view(v, kvw, bi, g)?;
                let mut out = Vec::with_capacity(group * t * hd);
                for (j, p) in probs.chunks_mut(t * t).enumerate() {
                    let mut q_rot = self.head_rows(q, qw, bi, g * group + j);
                    self.rotate(&mut q_rot, bi, false);
                    matmul_acc(
                        p,
                        MatRef::new(&q_rot, t, hd)?,
                        k_rot.t(),
                        scale,
                        Threads::One,
                    )?;
                    self.masked_softmax(p, bi);
                    out.extend(matmul(MatRef::new(p, t, t)?, v_head, T::ONE, Threads::One)?);
                }
                Ok(out)
            })
            .collect();
        let mut merged = vec![T::from_f64(0.0); b * t * qw];
        for (task, heads) in outputs.into_iter().enumerate() {
            let (bi, g) = (task / nkv, task % nkv);
            for (j, rows) in heads?.chunks(t * hd).enumerate() {
                self.scatter(&mut merged, qw, bi, g * group + j, rows);
            }
        }
        Ok((merged, probs))
    }

    /// Row-wise softmax of `scores + mask` in place (`[seq, seq]` of batch row `bi`).
    fn masked_softmax<T: Float>(&self, scores: &mut [T], bi: usize) {
        let t = self.seq;
        let masked = T::from_f64(MASKED);
        let keys = &self.key_mask[bi * t..][..t];
        let first_key = self.first_key(bi);
        for (i, row) in scores.chunks_mut(t).enumerate() {
            let (row, future) = row.split_at_mut(causal_width(i, first_key, t));
            for (j, s) in row.iter_mut().enumerate() {
                if j > i || keys[j] == 0 {
                    *s += masked;
                }
            }
            softmax_in_place(row);
            future.fill(T::from_f64(0.0));
        }
    }

    /// The first key batch row `bi` attends to (`seq` when it is all padding).
    fn first_key(&self, bi: usize) -> usize {
        let t = self.seq;
        self.key_mask[bi * t..][..t]
            .iter()
            .position(|&k| k != 0)
            .unwrap_or(t)
    }

    #[allow(clippy::type_complexity)]
    fn backward<T: Float>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        probs: &[T],
        grad: &[T],
    ) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
        let (b, t, hd) = (self.batch, self.seq, self.spec.head_dim);
        let (qw, kvw) = self.widths();
        let (nkv, group) = (self.spec.num_kv_heads, self.group());
        let scale = T::from_f64(self.spec.scale);
        let zero = T::from_f64(0.0);
        // Per task: the group's query-head gradients, then the key's, then the value's.
        let parts: Vec<Result<(Vec<T>, Vec<T>, Vec<T>)>> = probs
            .par_chunks(group * t * t)
            .enumerate()
            .map(|(task, probs)| {
                let (bi, g) = (task / nkv, task % nkv);
                let mut k_rot = self.head_rows(k, kvw, bi, g);
                self.rotate(&mut k_rot, bi, false);
                let k_mat = MatRef::new(&k_rot, t, hd)?;
                let v_head = self.head_view(v, kvw, bi, g)?;
                let mut dq = Vec::with_capacity(group * t * hd);
                let mut dk = vec![zero; t * hd];
                let mut dv = vec![zero; t * hd];
                for (j, p) in probs.chunks(t * t).enumerate() {
                    let head = g * group + j;
                    let p_mat = MatRef::new(p, t, t)?;
                    let d_out = self.head_view(grad, qw, bi, head)?;
                    matmul_acc(&mut dv, p_mat.t(), d_out, T::ONE, Threads::One)?;
                    let mut ds = matmul(d_out, v_head.t(), T::ONE, Threads::One)?;
                    let first_key = self.first_key(bi);
                    for (i, (ds, p)) in ds.chunks_mut(t).zip(p.chunks(t)).enumerate() {
                        let (ds, future) = ds.split_at_mut(causal_width(i, first_key, t));
                        let dot = ds.iter().zip(p).fold(zero, |acc, (&d, &p)| acc + d * p);
                        for (d, &p) in ds.iter_mut().zip(p) {
                            *d = p * (*d - dot);
                        }
                        future.fill(zero);
                    }
                    let ds = MatRef::new(&ds, t, t)?;
                    let mut dq_head = matmul(ds, k_mat, scale, Threads::One)?;
                    self.rotate(&mut dq_head, bi, true);
                    dq.extend(dq_head);
                    let mut q_rot = self.head_rows(q, qw, bi, head);
                    self.rotate(&mut q_rot, bi, false);
                    matmul_acc(
                        &mut dk,
                        ds.t(),
                        MatRef::new(&q_rot, t, hd)?,
                        scale,
                        Threads::One,
                    )?;
                }
                self.rotate(&mut dk, bi, true);
                Ok((dq, dk, dv))
            })
            .collect();
        let mut dq = vec![zero; b * t * qw];
        let mut dk = vec![zero; b * t * kvw];
        let mut dv = vec![zero; b * t * kvw];
        for (task, part) in parts.into_iter().enumerate() {
            let (bi, g) = (task / nkv, task % nkv);
            let (dq_heads, dk_head, dv_head) = part?;
            for (j, rows) in dq_heads.chunks(t * hd).enumerate() {
                self.scatter(&mut dq, qw, bi, g * group + j, rows);
            }
            self.scatter(&mut dk, kvw, bi, g, &dk_head);
            self.scatter(&mut dv, kvw, bi, g, &dv_head);
        }
        Ok((dq, dk, dv))
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = Shape::from((self.batch, self.seq, self.widths().0));
        let (out, probs) = match q.dtype() {
            DType::F32 => {
                let (out, probs) = self.forward::<f32>(
                    contiguous_slice(q, q_layout)?,
                    contiguous_slice(k, k_layout)?,
                    contiguous_slice(v, v_layout)?,
                )?;
                (
                    CpuStorage::F32(out),
                    Tensor::from_vec(probs, probs_len(self), &Device::Cpu)?,
                )
            }
            DType::F64 => {
                let (out, probs) = self.forward::<f64>(
                    contiguous_slice(q, q_layout)?,
                    contiguous_slice(k, k_layout)?,
                    contiguous_slice(v, v_layout)?,
                )?;
                (
                    CpuStorage::F64(out),
                    Tensor::from_vec(probs, probs_len(self), &Device::Cpu)?,
                )
            }
            other => candle_core::bail!("fused attention supports f32 and f64, not {other:?}"),
        };
        *self
            .probs
            .lock()
            .map_err(|_| candle_core::Error::Msg("fused attention lock poisoned".into()))? =
            Some(probs);
        Ok((out, shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let probs = self
            .probs
            .lock()
            .map_err(|_| candle_core::Error::Msg("fused attention lock poisoned".into()))?
            .clone()
            .ok_or_else(|| {
                candle_core::Error::Msg("fused attention: backward before forward".into())
            })?;
        fn run<T: Float>(
            op: &Attention,
            [q, k, v, probs, grad]: [&Tensor; 5],
        ) -> Result<(Tensor, Tensor, Tensor)> {
            let grad = grad.to_dtype(T::DTYPE)?.contiguous()?;
            let (qs, ql) = q.storage_and_layout();
            let (ks, kl) = k.storage_and_layout();
            let (vs, vl) = v.storage_and_layout();
            let (ps, pl) = probs.storage_and_layout();
            let (gs, gl) = grad.storage_and_layout();
            let (dq, dk, dv) = op.backward::<T>(
                storage_slice(&qs, ql)?,
                storage_slice(&ks, kl)?,
                storage_slice(&vs, vl)?,
                storage_slice(&ps, pl)?,
                storage_slice(&gs, gl)?,
            )?;
            Ok((
                Tensor::from_vec(dq, q.shape(), &Device::Cpu)?,
                Tensor::from_vec(dk, k.shape(), &Device::Cpu)?,
                Tensor::from_vec(dv, v.shape(), &Device::Cpu)?,
            ))
        }
        let tensors = [q, k, v, &probs, grad];
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => run::<f32>(self, tensors)?,
            DType::F64 => run::<f64>(self, tensors)?,
            other => candle_core::bail!("fused attention supports f32 and f64, not {other:?}"),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

fn probs_len(op: &Attention) -> usize {
    op.batch * op.spec.num_heads * op.seq * op.seq
}

#[cfg(test)]
mod tests {
    use super::super::testing::{max_abs_diff, random};
    use super::*;
    use crate::layers::Rotary;
    use candle_core::{Var, D};

    /// The same attention from tensor ops: rotary, repeated key/value heads, scores, additive
    /// mask, softmax, merge.
    fn composite(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        positions: &Tensor,
        key_mask: &[[u8; 5]; 2],
        spec: &AttentionSpec,
        rotary: &Rotary,
    ) -> Result<Tensor> {
        let (b, t, _) = q.dims3()?;
        let hd = spec.head_dim;
        let heads = |x: &Tensor, n: usize| x.reshape((b, t, n, hd))?.transpose(1, 2);
        let (cos, sin) = rotary.cos_sin(positions, DType::F64)?;
        let q = rotary.apply(&heads(q, spec.num_heads)?, &cos, &sin)?;
        let k = rotary.apply(&heads(k, spec.num_kv_heads)?, &cos, &sin)?;
        let v = heads(v, spec.num_kv_heads)?;
        let rep = spec.num_heads / spec.num_kv_heads;
        let repeat = |x: Tensor| -> Result<Tensor> {
            let (b, n, t, d) = x.dims4()?;
            x.unsqueeze(2)?
                .expand((b, n, rep, t, d))?
                .reshape((b, n * rep, t, d))
        };
        let (k, v) = (repeat(k)?, repeat(v)?);
        let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * spec.scale)?;
        let bias: Vec<f64> = (0..b * t * t)
            .map(|n| {
                let (bi, i, j) = (n / (t * t), (n / t) % t, n % t);
                if j > i || key_mask[bi][j] == 0 {
                    MASKED
                } else {
                    0.0
                }
            })
            .collect();
        let bias = Tensor::from_vec(bias, (b, 1, t, t), &Device::Cpu)?;
        let probs = candle_nn::ops::softmax(&scores.broadcast_add(&bias)?, D::Minus1)?;
        probs
            .matmul(&v.contiguous()?)?
            .transpose(1, 2)?
            .reshape((b, t, spec.num_heads * hd))
    }

    /// Values and q/k/v gradients against the composite attention in f64, with grouped-query
    /// heads, partial rotary at shifted positions, a padded key and a query that sees no key
    /// at all (a left-padding row).
    #[test]
    fn matches_the_composite_attention_and_its_gradients() {
        let (b, t, hd) = (2, 5, 8);
        let rotary = Rotary::new(hd, 4, 10_000.0).unwrap();
        let spec = AttentionSpec {
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: hd,
            rotary_dim: 4,
            inv_freq: rotary.inv_freq().to_vec(),
            scale: 1.0 / (hd as f64).sqrt(),
        };
        let q = Var::from_tensor(&random(&[b, t, 4 * hd], 1)).unwrap();
        let k = Var::from_tensor(&random(&[b, t, 2 * hd], 2)).unwrap();
        let v = Var::from_tensor(&random(&[b, t, 2 * hd], 3)).unwrap();
        let positions = Tensor::new(&[[0u32, 1, 2, 3, 4], [0, 0, 1, 2, 3]], &Device::Cpu).unwrap();
        let key_mask = [[1u8, 1, 1, 0, 1], [0, 1, 1, 1, 1]];
        let mask_tensor = Tensor::new(&key_mask, &Device::Cpu).unwrap();
        let probe = random(&[b, t, 4 * hd], 4);
        let grads = |y: &Tensor| {
            let g = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            [q.as_tensor(), k.as_tensor(), v.as_tensor()].map(|x| g.get(x).unwrap().clone())
        };
        let fused = causal_attention(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            &positions,
            &mask_tensor,
            &spec,
        )
        .unwrap();
        let reference = composite(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            &positions,
            &key_mask,
            &spec,
            &rotary,
        )
        .unwrap();
        assert!(max_abs_diff(&fused, &reference) < 1e-12);
        for (g_fused, g_ref) in grads(&fused).iter().zip(grads(&reference).iter()) {
            assert!(
                max_abs_diff(g_fused, g_ref) < 1e-12,
                "{}",
                max_abs_diff(g_fused, g_ref)
            );
            let total = g_fused.abs().unwrap().sum_all().unwrap();
            assert!(
                total.to_scalar::<f64>().unwrap() > 0.0,
                "a gradient is all zero"
            );
        }
    }

    #[test]
    fn refuses_inconsistent_shapes() {
        let spec = AttentionSpec {
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
            rotary_dim: 4,
            inv_freq: vec![1.0, 0.1],
            scale: 0.3,
        };
        let q = random(&[1, 3, 32], 1);
        let kv = random(&[1, 3, 8], 2);
        let positions = Tensor::new(&[[0u32, 1, 2]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[1u8, 1, 1]], &Device::Cpu).unwrap();
        let err = causal_attention(&q, &kv, &kv, &positions, &mask, &spec).unwrap_err();
        assert!(err.to_string().contains("keys are"), "{err}");
    }
}
