//! NF4 / double quantization and ggml round trips.

use candle_core::{DType, Device, Tensor};
use pipeline_models::quant::{
    ggml::{GgmlFormat, GgmlQuantized},
    nf4::{self, dynamic_map, Nf4Absmax, Nf4Tensor, BLOCK_SIZE, NF4_CODE},
    reconstruction_error, QuantError,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Gaussian-ish weights (sum of uniforms) with a deterministic seed.
fn weights(n: usize, seed: u64, std: f32) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let s: f32 = (0..12).map(|_| rng.random::<f32>()).sum::<f32>() - 6.0;
            s * std
        })
        .collect()
}

#[test]
fn code_table_is_sorted_with_exact_zero_and_unit_ends() {
    assert!(NF4_CODE.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(NF4_CODE[0], -1.0);
    assert_eq!(NF4_CODE[7], 0.0);
    assert_eq!(NF4_CODE[15], 1.0);
    let map = dynamic_map();
    assert!(
        map.windows(2).all(|w| w[0] < w[1]),
        "dynamic map strictly increasing"
    );
    assert_eq!(map[255], 1.0);
    assert!(map.contains(&0.0));
    assert!(
        (map[0] + 0.9928).abs() < 1e-3,
        "most negative code {}",
        map[0]
    );
}

#[test]
fn code_values_quantize_exactly() {
    // Every block holds ±1 so its absmax is 1 and the code values map to themselves.
    let mut v = Vec::new();
    for b in 0..4 {
        for i in 0..BLOCK_SIZE {
            v.push(NF4_CODE[(i + b) % 16]);
        }
    }
    let t = Tensor::from_vec(v.clone(), (4, BLOCK_SIZE), &Device::Cpu).unwrap();
    for double in [false, true] {
        let q = Nf4Tensor::quantize(&t, double).unwrap();
        for (i, x) in v.iter().enumerate() {
            let code = q.code(i).unwrap();
            assert_eq!(NF4_CODE[code as usize], *x, "element {i} (double={double})");
        }
        let d = q
            .dequantize(DType::F32, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap();
        assert_eq!(d.to_vec1::<f32>().unwrap(), v);
    }
    // The packing puts the first element of each pair in the high nibble.
    let q = Nf4Tensor::quantize(&t, false).unwrap();
    assert_eq!(q.packed()[0], 0x01, "codes 0 and 1 packed high then low");
}

#[test]
fn scaled_code_values_round_trip_within_float_rounding() {
    let absmax = [0.5f32, 3.0, 0.01, 7.25];
    let mut v = Vec::new();
    for (b, s) in absmax.iter().enumerate() {
        for i in 0..BLOCK_SIZE {
            v.push(NF4_CODE[(i * 7 + b) % 16] * s);
        }
    }
    let t = Tensor::from_vec(v.clone(), v.len(), &Device::Cpu).unwrap();
    let q = Nf4Tensor::quantize(&t, false).unwrap();
    for (i, x) in v.iter().enumerate() {
        let s = absmax[i / BLOCK_SIZE];
        assert_eq!(NF4_CODE[q.code(i).unwrap() as usize] * s, *x);
    }
}

#[test]
fn round_trip_error_is_bounded() {
    let n = 256 * 96;
    let v = weights(n, 1, 0.02);
    let t = Tensor::from_vec(v.clone(), (96, 256), &Device::Cpu).unwrap();
    let q = nf4::quantize(&t).unwrap();
    assert_eq!(q.shape(), &[96, 256]);
    let d = nf4::dequantize(&q, DType::F32, &Device::Cpu).unwrap();
    let err = reconstruction_error(&t, &d).unwrap();
    eprintln!(
        "NF4+DQ on N(0, 0.02²): {err}, {:.3} bits/weight",
        q.bits_per_element()
    );
    // Largest NF4 gap is -0.696 - (-1) = 0.304 of the absmax, so the worst error is under half that.
    let vals = d.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (b, (orig, deq)) in v
        .chunks(BLOCK_SIZE)
        .zip(vals.chunks(BLOCK_SIZE))
        .enumerate()
    {
        let am = orig.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (x, y) in orig.iter().zip(deq) {
            assert!(
                (x - y).abs() <= 0.1520 * am * 1.01 + 1e-7,
                "block {b}: {x} vs {y}"
            );
        }
    }
    // Typical 4-bit normal-float error on Gaussian data is ~10% relative.
    assert!(err.relative < 0.12, "relative error {}", err.relative);
    assert!(
        err.relative > 0.03,
        "suspiciously small error {}",
        err.relative
    );
    assert!(
        q.bits_per_element() < 4.13,
        "bits/weight {}",
        q.bits_per_element()
    );
    // bf16 output agrees with f32 output to bf16 precision.
    let d16 = nf4::dequantize(&q, DType::BF16, &Device::Cpu).unwrap();
    assert_eq!(d16.dtype(), DType::BF16);
    let e16 = reconstruction_error(&d, &d16).unwrap();
    assert!(e16.relative < 5e-3);
}

#[test]
fn double_quantization_costs_little_accuracy() {
    let v = weights(64 * 1024, 2, 0.05);
    let t = Tensor::from_vec(v, (64, 1024), &Device::Cpu).unwrap();
    let single = Nf4Tensor::quantize(&t, false).unwrap();
    let double = Nf4Tensor::quantize(&t, true).unwrap();
    assert!(matches!(single.absmax(), Nf4Absmax::F32(_)));
    assert!(matches!(double.absmax(), Nf4Absmax::Double { .. }));
    let es =
        reconstruction_error(&t, &single.dequantize(DType::F32, &Device::Cpu).unwrap()).unwrap();
    let ed =
        reconstruction_error(&t, &double.dequantize(DType::F32, &Device::Cpu).unwrap()).unwrap();
    eprintln!("single: {es}\ndouble: {ed}");
    assert!(
        ed.rmse <= es.rmse * 1.02,
        "double-quant RMSE {} vs single {}",
        ed.rmse,
        es.rmse
    );
    assert!(double.size_bytes() < single.size_bytes());
    // Decoded absmax values stay close to the true ones.
    let (a, b) = (
        single.absmax().decode().unwrap(),
        double.absmax().decode().unwrap(),
    );
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() <= 0.01 * x.abs() + 1e-6,
            "absmax {x} decoded as {y}"
        );
    }
}

#[test]
fn partial_last_blocks_and_zero_blocks() {
    // 2 × 100 = 200 elements: 3 full blocks and one of 8; 4 absmax values in one partial DQ block.
    let mut v = weights(200, 3, 1.0);
    for x in &mut v[64..128] {
        *x = 0.0;
    }
    let t = Tensor::from_vec(v.clone(), (2, 100), &Device::Cpu).unwrap();
    let q = nf4::quantize(&t).unwrap();
    assert_eq!(q.absmax().len(), 4);
    let d = q
        .dequantize(DType::F32, &Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap();
    let d = d.to_vec1::<f32>().unwrap();
    assert_eq!(d.len(), 200);
    assert!(
        d[64..128].iter().all(|x| x.abs() < 1e-2),
        "zero block decodes near zero"
    );
    let err = reconstruction_error(&t, &Tensor::from_vec(d, (2, 100), &Device::Cpu).unwrap());
    assert!(err.unwrap().relative < 0.15);
}

#[test]
fn odd_and_empty_sizes_are_rejected_clearly() {
    let t = Tensor::zeros((3, 5), DType::F32, &Device::Cpu).unwrap();
    let e = nf4::quantize(&t).unwrap_err();
    assert!(matches!(e, QuantError::Unsupported { .. }));
    let msg = e.to_string();
    assert!(msg.contains("[3, 5]") && msg.contains("even"), "{msg}");
    let empty = Tensor::zeros((0, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(nf4::quantize(&empty)
        .unwrap_err()
        .to_string()
        .contains("empty"));
    let nan = Tensor::new(&[1f32, f32::NAN], &Device::Cpu).unwrap();
    assert!(nf4::quantize(&nan).unwrap_err().to_string().contains("NaN"));
    let ints = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
    assert!(nf4::quantize(&ints).is_err());
    // from_parts refuses inconsistent sizes.
    assert!(Nf4Tensor::from_parts(vec![4], vec![0; 3], Nf4Absmax::F32(vec![1.0])).is_err());
    assert!(Nf4Tensor::from_parts(vec![4], vec![0; 2], Nf4Absmax::F32(vec![1.0])).is_ok());
}

#[test]
fn ggml_formats_round_trip_with_expected_error_order() {
    let v = weights(8 * 512, 4, 0.02);
    let t = Tensor::from_vec(v, (8, 512), &Device::Cpu).unwrap();
    let mut errs = Vec::new();
    for f in [
        GgmlFormat::Q8_0,
        GgmlFormat::Q4K,
        GgmlFormat::Q4_1,
        GgmlFormat::Q4_0,
    ] {
        let q = GgmlQuantized::quantize(&t, f).unwrap();
        assert_eq!(q.shape(), &[8, 512]);
        let d = q.dequantize(DType::F32, &Device::Cpu).unwrap();
        let e = reconstruction_error(&t, &d).unwrap();
        eprintln!("{}: {e} ({} bytes)", f.name(), q.size_bytes());
        errs.push(e.relative);
    }
    assert!(errs[0] < 0.01, "q8_0 relative error {}", errs[0]);
    for e in &errs[1..] {
        assert!(*e > errs[0] && *e < 0.2, "4-bit relative error {e}");
    }
    assert!("Q4_K".parse::<GgmlFormat>().unwrap() == GgmlFormat::Q4K);
    assert!("q3".parse::<GgmlFormat>().is_err());
}

#[test]
fn ggml_rejects_rows_not_a_multiple_of_the_block() {
    let t = Tensor::zeros((4, 96), DType::F32, &Device::Cpu).unwrap();
    let e = GgmlQuantized::quantize(&t, GgmlFormat::Q4K)
        .unwrap_err()
        .to_string();
    assert!(e.contains("256") && e.contains("96"), "{e}");
    assert!(GgmlQuantized::quantize(&t, GgmlFormat::Q4_0).is_ok());
}

#[test]
fn nf4_round_trips_through_safetensors() {
    let t = Tensor::from_vec(weights(64 * 10, 5, 0.1), (10, 64), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.safetensors");
    for double in [false, true] {
        let q = Nf4Tensor::quantize(&t, double).unwrap();
        let named: std::collections::HashMap<String, Tensor> =
            q.to_tensors("layer.w").unwrap().into_iter().collect();
        candle_core::safetensors::save(&named, &path).unwrap();
        let back = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        assert_eq!(Nf4Tensor::from_tensors(&back, "layer.w").unwrap(), q);
        assert!(Nf4Tensor::from_tensors(&back, "other").is_err());
    }
}

#[test]
fn tensor_op_decoding_equals_the_host_decoder() {
    // 2 × 100: three full blocks and a partial one; both statistic formats.
    for (shape, double) in [
        ((2usize, 100usize), true),
        ((4, 64), false),
        ((1, 10), true),
    ] {
        let n = shape.0 * shape.1;
        let t = Tensor::from_vec(weights(n, 6, 0.3), shape, &Device::Cpu).unwrap();
        let q = Nf4Tensor::quantize(&t, double).unwrap();
        let host = q.dequantize(DType::F32, &Device::Cpu).unwrap();
        let ops = q
            .dequantize_with_tensor_ops(DType::F32, &Device::Cpu)
            .unwrap();
        assert_eq!(ops.dims(), host.dims());
        assert_eq!(
            ops.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            host.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{shape:?}"
        );
    }
}
