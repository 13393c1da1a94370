#!/usr/bin/env python3
"""The PyTorch + PEFT side of `bench/train_bench.py`: LoRA training steps on the CPU.

Loads SmolLM2-135M from the same GGUF file (transformers dequantizes it to f32), wraps the same
modules in PEFT LoRA adapters (same r, alpha, dropout), and runs AdamW steps (f32, lr 2e-4,
gradient clipping at 1.0) on the same kind of fixed pseudo-random batch. Prints one JSON line.
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
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from pathlib import Path

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    gguf = Path(args.gguf)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32
    )
    config = LoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=args.targets.split(","),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    model.train()
    load_s = time.perf_counter() - t0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0
    )
    g = torch.Generator().manual_seed(7)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    mask = torch.ones_like(ids)
    times, losses = [], []
    for i in range(args.steps + args.warmup):
        t = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
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
                "losses": losses,
            }
        )
    )


if __name__ == "__main__":
    main()
