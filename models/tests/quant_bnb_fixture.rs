//! NF4 against bitsandbytes itself: `fixtures/nf4_bnb.safetensors` was written by
//! `scripts/reference/nf4_bnb.py` with bitsandbytes' `quantize_4bit(..., quant_type="nf4",
//! blocksize=64, compress_statistics=True/False)` on a 40×448 Gaussian weight with an all-zero
//! block and an outlier block.

use candle_core::{DType, Device, Tensor};
use pipeline_models::quant::nf4::{dynamic_map, Nf4Absmax, Nf4Tensor, NF4_CODE};
use std::collections::HashMap;

fn fixture() -> HashMap<String, Tensor> {
    let p =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nf4_bnb.safetensors");
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

fn v32(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn v8(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

/// Byte range of the all-zero block (row 3, first 64 values) where bitsandbytes divides by zero.
const ZERO_BLOCK_BYTES: std::ops::Range<usize> = (3 * 448 / 2)..(3 * 448 / 2 + 32);

#[test]
fn code_tables_match_bitsandbytes() {
    let f = fixture();
    assert_eq!(v32(&f["nf4_code"]), NF4_CODE.to_vec());
    assert_eq!(v32(&f["dynamic_map_canonical"]), dynamic_map().to_vec());
    // The map bitsandbytes' CPU kernel used differs only in its first entry (forced to -1).
    let used = v32(&f["dynamic_map"]);
    assert_eq!(used[1..], dynamic_map()[1..]);
}

#[test]
fn single_quantization_matches_bitsandbytes_bit_for_bit() {
    let f = fixture();
    let q = Nf4Tensor::quantize(&f["input"], false).unwrap();
    let Nf4Absmax::F32(absmax) = q.absmax() else {
        panic!("single quantization")
    };
    assert_eq!(absmax, &v32(&f["absmax_single"]));
    let theirs = v8(&f["packed_single"]);
    let differing: Vec<usize> = (0..theirs.len())
        .filter(|i| q.packed()[*i] != theirs[*i] && !ZERO_BLOCK_BYTES.contains(i))
        .collect();
    assert!(differing.is_empty(), "packed bytes differ at {differing:?}");
    let ours = v32(&q.dequantize(DType::F32, &Device::Cpu).unwrap());
    let want = v32(&f["dequant_single"]);
    for (i, (a, b)) in ours.iter().zip(&want).enumerate() {
        if !(3 * 448..3 * 448 + 64).contains(&i) {
            assert_eq!(a, b, "dequantized element {i}");
        }
    }
}

#[test]
fn double_quantization_matches_bitsandbytes() {
    let f = fixture();
    let q = Nf4Tensor::quantize(&f["input"], true).unwrap();
    let Nf4Absmax::Double {
        codes,
        scales,
        offset,
    } = q.absmax()
    else {
        panic!("double quantization")
    };
    let off = v32(&f["absmax_offset"])[0];
    assert!(
        (offset - off).abs() <= 1e-6 * off.abs(),
        "offset {offset} vs {off}"
    );
    let want_scales = v32(&f["absmax_scales"]);
    assert_eq!(scales.len(), want_scales.len());
    for (a, b) in scales.iter().zip(&want_scales) {
        assert!(
            (a - b).abs() <= 1e-6 * b.abs(),
            "second-level scale {a} vs {b}"
        );
    }
    let want_codes = v8(&f["absmax_codes"]);
    let differing = codes
        .iter()
        .zip(&want_codes)
        .filter(|(a, b)| a != b)
        .count();
    assert!(
        differing <= 2,
        "{differing} of {} absmax codes differ",
        codes.len()
    );
    // Same 4-bit codes as bitsandbytes (codes are taken against the exact absmax).
    let theirs = v8(&f["packed"]);
    let bad = (0..theirs.len())
        .filter(|i| q.packed()[*i] != theirs[*i] && !ZERO_BLOCK_BYTES.contains(i))
        .count();
    assert_eq!(bad, 0);
    // Dequantized values agree to the precision of the 8-bit statistics.
    let ours = v32(&q.dequantize(DType::F32, &Device::Cpu).unwrap());
    let want = v32(&f["dequant"]);
    let input = v32(&f["input"]);
    let scale = input.iter().fold(0f32, |m, x| m.max(x.abs()));
    let worst = ours
        .iter()
        .zip(&want)
        .enumerate()
        .filter(|(i, _)| !(3 * 448..3 * 448 + 64).contains(i))
        .map(|(_, (a, b))| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("max |ours - bitsandbytes| = {worst:e} (weights up to {scale:e})");
    assert!(
        worst <= 1e-3 * scale,
        "dequantized values differ by {worst}"
    );
}
