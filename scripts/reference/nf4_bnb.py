"""Generate models/tests/fixtures/nf4_bnb.safetensors with bitsandbytes' own NF4 quantizer.

The Rust test `quant_bnb_fixture` quantizes the same input with `pipeline_models::quant::nf4`
and compares codes, double-quantized statistics and dequantized values with these.

Run in a throwaway venv (needs torch, numpy, safetensors, bitsandbytes >= 0.47 for its CPU path):
    python scripts/reference/nf4_bnb.py models/tests/fixtures/nf4_bnb.safetensors
"""

import sys

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch
from safetensors.torch import save_file


def main(out: str) -> None:
    g = torch.Generator().manual_seed(0)
    # 40 x 448 = 17920 values: 280 NF4 blocks, so the second level has a partial block of 24.
    w = torch.randn(40, 448, generator=g) * 0.02
    w[3, :64] = 0.0  # an all-zero block
    w[5, 64:128] *= 50.0  # an outlier block
    q, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    deq = F.dequantize_4bit(q, state)
    q1, state1 = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    deq1 = F.dequantize_4bit(q1, state1)
    tensors = {
        "input": w.contiguous(),
        "packed": q.flatten().to(torch.uint8).contiguous(),
        "absmax_codes": state.absmax.to(torch.uint8).contiguous(),
        "absmax_scales": state.state2.absmax.float().contiguous(),
        "absmax_offset": state.offset.float().reshape(1).contiguous(),
        # bitsandbytes' CPU kernel overwrites code[0] (-0.99297) with -1.0 in its cached map, so
        # store both that map and a freshly built canonical one (what CUDA uses).
        "dynamic_map": state.state2.code.float().contiguous(),
        "dynamic_map_canonical": F.create_dynamic_map().float().contiguous(),
        "nf4_code": state.code.float().contiguous(),
        "dequant": deq.float().contiguous(),
        "packed_single": q1.flatten().to(torch.uint8).contiguous(),
        "absmax_single": state1.absmax.float().contiguous(),
        "dequant_single": deq1.float().contiguous(),
    }
    save_file(tensors, out, metadata={"bitsandbytes": bnb.__version__, "torch": torch.__version__})


if __name__ == "__main__":
    main(sys.argv[1])
