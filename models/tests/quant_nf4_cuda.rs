//! The NF4 CUDA kernel against the host decoder, bit for bit, in f32, f16 and bf16, with and
//! without double quantization and with a partial last block. Built only with the `cuda`
//! feature and meant for a machine with a GPU (a `cuda` build does not start without the CUDA
//! driver libraries); see ../shared/gpu/README.md for building here and running there.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use pipeline_models::quant::nf4::Nf4Tensor;

fn weight(rows: usize, cols: usize) -> Tensor {
    let values: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % 13) as f32))
        .collect();
    Tensor::from_vec(values, (rows, cols), &Device::Cpu).expect("weight")
}

#[test]
fn the_kernel_decodes_exactly_as_the_host() {
    let cuda = Device::new_cuda(0).expect("this test needs a CUDA device");
    // 3 x 100 = 300 values: four full blocks of 64 and a partial one.
    for (rows, cols) in [(3, 100), (64, 128)] {
        for double_quant in [false, true] {
            let q = Nf4Tensor::quantize(&weight(rows, cols), double_quant).expect("quantize");
            let host = Tensor::from_vec(
                q.dequantize_f32().expect("host"),
                (rows, cols),
                &Device::Cpu,
            )
            .expect("host tensor");
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let expected = host
                    .to_dtype(dtype)
                    .expect("cast")
                    .to_dtype(DType::F32)
                    .expect("f32");
                // Twice: the second use takes the device-resident codes from the cache.
                for _ in 0..2 {
                    let got = q.dequantize(dtype, &cuda).expect("kernel");
                    assert_eq!(got.dtype(), dtype);
                    assert_eq!(got.dims(), [rows, cols]);
                    let got = got
                        .to_device(&Device::Cpu)
                        .and_then(|t| t.to_dtype(DType::F32))
                        .expect("to host");
                    assert_eq!(
                        got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        expected.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        "{rows}x{cols} double_quant={double_quant} {dtype:?}"
                    );
                }
            }
            // The tensor-op decoder on the device agrees as well.
            let ops = q
                .dequantize_with_tensor_ops(DType::F32, &cuda)
                .and_then(|t| Ok(t.to_device(&Device::Cpu)?))
                .expect("tensor ops");
            assert_eq!(
                ops.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                host.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
    }
}
