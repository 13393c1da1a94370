#!/usr/bin/env python3
"""Writes a phi-1.5-shaped Hugging Face checkpoint with random weights, for measuring what
training costs at microsoft/phi-1_5's size where the hub (and so the real weights) cannot be
reached. Memory and speed do not depend on the weights' values.

    /tmp/refvenv/bin/python bench/phi15_shaped.py OUT_DIR --tokenizer TOKENIZER_JSON

OUT_DIR gets config.json (phi-1.5's: 24 layers, hidden 2048, MLP 8192, 32 heads, partial
rotary 0.5, vocab 51200), model.safetensors (float16, 1.42 B parameters) and a copy of
TOKENIZER_JSON (any tokenizer whose ids stay below 51200; the SmolLM2 one is fine).
"""
import argparse
import os
import shutil

import torch
from transformers import PhiConfig, PhiForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    config = PhiConfig(
        vocab_size=51200,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
        hidden_act="gelu_new",
        max_position_embeddings=2048,
        layer_norm_eps=1e-5,
        partial_rotary_factor=0.5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    model = PhiForCausalLM._from_config(config, dtype=torch.float16)
    n = sum(p.numel() for p in model.parameters())
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True, max_shard_size="20GB")
    shutil.copy(args.tokenizer, os.path.join(args.out, "tokenizer.json"))
    print(f"{n / 1e9:.3f} B parameters -> {args.out}")


if __name__ == "__main__":
    main()
