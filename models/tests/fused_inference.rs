//! The inference path (nothing records a backward: fused rms_norm, rope and softmax kernels)
//! computes what the training path (composite ops with a backward) computes.

use candle_core::{DType, Device, Tensor, Var};
use pipeline_models::layers::{Attention, AttentionShape, Dense, RmsNorm, Rotary};
use pipeline_models::{KvCache, LinearLayer};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The same values as a tensor that records a backward (a `Var`) and one that does not.
fn tracked(t: &Tensor) -> Var {
    let v = Var::from_tensor(t).unwrap();
    assert!(v.as_tensor().track_op());
    assert!(!t.track_op());
    v
}

#[test]
fn rms_norm_fused_matches_composite() {
    let x = randn(&[2, 5, 16], 1);
    let norm = RmsNorm::new((randn(&[16], 2) + 1.0).unwrap(), 1e-5).unwrap();
    let fused = norm.forward(&x).unwrap();
    let composite = norm.forward(tracked(&x).as_tensor()).unwrap();
    assert!(composite.track_op());
    let diff = max_abs_diff(&fused, &composite);
    assert!(diff < 1e-5, "max |diff| {diff}");
}

#[test]
fn rope_fused_matches_composite() {
    let rotary = Rotary::new(8, 8, 10_000.0).unwrap();
    let q = randn(&[2, 4, 3, 8], 3);
    let k = randn(&[2, 2, 3, 8], 4);
    // Left-padded rows have different positions per row.
    let pos = Tensor::new(&[[0u32, 0, 1], [5, 6, 7]], &Device::Cpu).unwrap();
    let (fq, fk) = rotary.apply_qk(&q, &k, &pos, DType::F32).unwrap();
    let (cq, ck) = rotary
        .apply_qk(
            tracked(&q).as_tensor(),
            tracked(&k).as_tensor(),
            &pos,
            DType::F32,
        )
        .unwrap();
    assert!(cq.track_op() && ck.track_op());
    assert!(max_abs_diff(&fq, &cq) < 1e-6);
    assert!(max_abs_diff(&fk, &ck) < 1e-6);
}

#[test]
fn grouped_query_attention_fused_matches_composite() {
    let shape = AttentionShape {
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
    };
    let dense = |o: usize, i: usize, seed: u64| -> Box<dyn LinearLayer> {
        Box::new(Dense::new((randn(&[o, i], seed) * 0.3).unwrap(), None).unwrap())
    };
    let attn = Attention::new(
        dense(32, 32, 10),
        dense(16, 32, 11),
        dense(16, 32, 12),
        dense(32, 32, 13),
        shape,
        Rotary::new(8, 8, 10_000.0).unwrap(),
    )
    .unwrap();
    let x = randn(&[2, 5, 32], 5);
    let pos = Tensor::new(&[[0u32, 0, 0, 1, 2], [0, 1, 2, 3, 4]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[0u8, 0, 1, 1, 1], [1, 1, 1, 1, 1]], &Device::Cpu).unwrap();
    let fused = attn.forward(&x, &pos, &mask, None).unwrap();
    let composite = attn
        .forward(tracked(&x).as_tensor(), &pos, &mask, None)
        .unwrap();
    assert!(composite.track_op());
    let diff = max_abs_diff(&fused, &composite);
    assert!(diff < 1e-5, "max |diff| {diff}");

    // Through the cache, one position at a time, the rows match the full pass.
    let mut cache = KvCache::new(1);
    let mut rows = Vec::new();
    for t in 0..5 {
        let step = attn
            .forward(
                &x.narrow(1, t, 1).unwrap(),
                &pos.narrow(1, t, 1).unwrap(),
                &mask.narrow(1, 0, t + 1).unwrap(),
                Some((&mut cache, 0)),
            )
            .unwrap();
        rows.push(step);
    }
    let stepped = Tensor::cat(&rows, 1).unwrap();
    // Padding queries see no key; only compare the real positions.
    let diff = max_abs_diff(
        &stepped.narrow(1, 2, 3).unwrap(),
        &fused.narrow(1, 2, 3).unwrap(),
    );
    assert!(diff < 1e-5, "cached max |diff| {diff}");
}

/// Generation's attention over the KV cache (`fused::cached_attention`, taken when nothing
/// records a graph) against the composite ops over the same kind of cache (taken for inputs
/// that record one): grouped-query heads, partial rotary, a left-padded row whose first queries
/// see no key, chunks of several sizes, and enough positions that the cache grows past its
/// first capacity.
#[test]
fn cached_attention_matches_the_composite_ops_chunk_by_chunk() {
    let outputs = attend_in_chunks(None);
    for (start, len, fused, composite) in &outputs {
        let diff = max_abs_diff(fused, composite);
        assert!(diff < 1e-5, "chunk at {start} (+{len}): max |diff| {diff}");
    }
}

/// A cache stored as f16 (`KvCache::store_as`) is read by the cached attention as the composite
/// ops read it (widened back to f32), and its outputs stay within a stated distance of the f32
/// cache's: keys and values rounded to 11 significant bits.
#[test]
fn an_f16_cache_is_read_as_the_composite_ops_read_it_and_stays_near_the_f32_cache() {
    let exact = attend_in_chunks(None);
    let half = attend_in_chunks(Some(DType::F16));
    let mut largest_rounding = 0f32;
    for ((start, len, fused, composite), (_, _, exact_fused, _)) in half.iter().zip(&exact) {
        // The two paths rotate the keys in a different order of operations before rounding
        // them to f16, so an element may round one f16 step apart: hence 1e-4, not 1e-5.
        let diff = max_abs_diff(fused, composite);
        assert!(
            diff < 1e-4,
            "f16 cache, chunk at {start} (+{len}): max |diff| {diff}"
        );
        // Measured: at most 2.9e-4 on outputs of magnitude ~1.
        let rounding = max_abs_diff(fused, exact_fused);
        assert!(
            rounding < 1e-3,
            "f16 against f32 cache, chunk at {start} (+{len}): max |diff| {rounding}"
        );
        largest_rounding = largest_rounding.max(rounding);
    }
    // The cache really stored f16 (otherwise the two runs would be identical).
    assert!(largest_rounding > 0.0, "the f16 cache changed nothing");
}

/// Runs a grouped-query attention block over 300 positions in chunks of 5/1/1/250/1/2/40, once
/// through the cached attention and once through the composite ops, each with its own cache
/// stored as `storage`; returns (chunk start, chunk length, cached output, composite output).
fn attend_in_chunks(storage: Option<DType>) -> Vec<(usize, usize, Tensor, Tensor)> {
    let shape = AttentionShape {
        num_heads: 6,
        num_kv_heads: 2,
        head_dim: 8,
    };
    let dense = |o: usize, i: usize, seed: u64| -> Box<dyn LinearLayer> {
        Box::new(Dense::new((randn(&[o, i], seed) * 0.3).unwrap(), None).unwrap())
    };
    let attn = Attention::new(
        dense(48, 24, 20),
        dense(16, 24, 21),
        dense(16, 24, 22),
        dense(24, 48, 23),
        shape,
        Rotary::new(8, 4, 10_000.0).unwrap(),
    )
    .unwrap();
    let total = 300;
    let pad = 3;
    let x = randn(&[2, total, 24], 6);
    let positions: Vec<u32> = (0..total as u32)
        .map(|i| i.saturating_sub(pad as u32))
        .chain(0..total as u32)
        .collect();
    let positions = Tensor::from_vec(positions, (2, total), &Device::Cpu).unwrap();
    let mask: Vec<u8> = (0..total)
        .map(|i| u8::from(i >= pad))
        .chain(std::iter::repeat_n(1, total))
        .collect();
    let mask = Tensor::from_vec(mask, (2, total), &Device::Cpu).unwrap();
    let (mut fused_cache, mut composite_cache) = (KvCache::new(1), KvCache::new(1));
    if let Some(dtype) = storage {
        fused_cache.store_as(dtype).unwrap();
        composite_cache.store_as(dtype).unwrap();
    }
    let mut outputs = Vec::new();
    let mut start = 0;
    for len in [5, 1, 1, 250, 1, 2, 40] {
        let chunk = x.narrow(1, start, len).unwrap();
        let pos = positions.narrow(1, start, len).unwrap();
        let keys = mask.narrow(1, 0, start + len).unwrap();
        let fused = attn
            .forward(&chunk, &pos, &keys, Some((&mut fused_cache, 0)))
            .unwrap();
        let composite = attn
            .forward(
                tracked(&chunk).as_tensor(),
                &pos,
                &keys,
                Some((&mut composite_cache, 0)),
            )
            .unwrap();
        assert!(!fused.track_op() && composite.track_op());
        outputs.push((start, len, fused, composite.detach()));
        start += len;
        assert_eq!(fused_cache.seq_len(), start);
        assert_eq!(composite_cache.seq_len(), start);
    }
    assert_eq!(start, total);
    assert_eq!(fused_cache.storage_dtype(), storage);
    outputs
}

/// The cache's dtype is chosen before anything is cached, or refused.
#[test]
fn a_cache_refuses_a_new_storage_dtype_once_it_holds_positions() {
    let mut cache = KvCache::new(1);
    let k = randn(&[1, 2, 3, 8], 40);
    cache.append(0, &k, &k).unwrap();
    let err = cache.store_as(DType::F16).unwrap_err().to_string();
    assert!(err.contains("before the first append"), "{err}");
    cache.store_as(DType::F32).unwrap();
}
