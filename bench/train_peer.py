#!/usr/bin/env python3
"""The PyTorch + PEFT side of `bench/train_bench.py`: LoRA training steps.

Loads SmolLM2-135M from the same GGUF file (transformers dequantizes it), wraps the same
modules in PEFT LoRA adapters (same r, alpha, dropout), and runs AdamW steps (lr 2e-4, gradient
clipping at 1.0) on the same kind of fixed pseudo-random batch. Prints one JSON line.

`--precision fp16|bf16` (for a GPU: `--device cuda`) keeps the frozen base in that dtype and the
adapters in f32 (as `prepare_model_for_kbit_training` leaves them), runs the forward under
autocast and, for fp16, steps through a GradScaler; times are taken after a synchronize and the
peak device memory is reported.
"""

import argparse
import json
import resource
import sys
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    args = ap.parse_args()
    half = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    if args.threads:
        torch.set_num_threads(args.threads)

    from pathlib import Path

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    gguf = Path(args.gguf)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, torch_dtype=half or torch.float32
    ).to(args.device)
    config = LoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=args.targets.split(","),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    load_s = time.perf_counter() - t0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0
    )
    g = torch.Generator().manual_seed(7)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(args.device)
    mask = torch.ones_like(ids)
    scaler = torch.amp.GradScaler(args.device, enabled=args.precision == "fp16")
    adapter_params = [p for p in model.parameters() if p.requires_grad]

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    times, losses, scales = [], [], []
    for i in range(args.steps + args.warmup):
        sync()
        t = time.perf_counter()
        with torch.autocast(args.device, dtype=half or torch.float32, enabled=half is not None):
            out = model(input_ids=ids, attention_mask=mask, labels=ids)
        scales.append(scaler.get_scale() if scaler.is_enabled() else 1.0)
        scaler.scale(out.loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(adapter_params, 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sync()
        secs = time.perf_counter() - t
        losses.append(out.loss.item())
        print(f"step {i}: {secs:.3f} s, loss {losses[-1]:.4f}", file=sys.stderr)
        if i >= args.warmup:
            times.append(secs)
    times.sort()
    median = times[len(times) // 2]
    tokens = args.batch * (args.seq - 1)
    print(
        json.dumps(
            {
                "impl": "peer",
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "batch": args.batch,
                "seq": args.seq,
                "trainable_params": trainable,
                "load_s": load_s,
                "step_s_median": median,
                "step_s_all": times,
                "tokens_per_s": tokens / median,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "device": args.device,
                "precision": args.precision,
                "peak_device_bytes": torch.cuda.max_memory_allocated()
                if args.device == "cuda"
                else None,
                "losses": losses,
                "loss_scales": scales,
            }
        )
    )


if __name__ == "__main__":
    main()
