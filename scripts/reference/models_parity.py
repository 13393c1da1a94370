#!/usr/bin/env python3
"""Reference logits from Hugging Face transformers for the `pipeline-models` parity tests.

Run in a throwaway venv (torch is large; never in the repo):

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/python -m pip install torch transformers accelerate safetensors gguf numpy
    /tmp/refvenv/bin/python scripts/reference/models_parity.py [--smollm2-gguf PATH]

Writes into models/tests/fixtures/:
  tiny_phi/, tiny_llama/  config.json, model.safetensors (random weights), io.safetensors
                          (input_ids u32->i64 stored as int64, attention_mask, logits f32)
  smollm2_ref.safetensors  (with --smollm2-gguf: input_ids, logits[..., :256], argmax ids)
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(ROOT, "models", "tests", "fixtures")


def randomize(model, seed):
    """Replace HF's small init with larger random values so that bugs show in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def inputs(vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.int64)
    mask[1, 5:] = 0  # right padding on the second row
    return ids, mask


def dump(name, model, config_dict, vocab, seed):
    out = os.path.join(FIXTURES, name)
    os.makedirs(out, exist_ok=True)
    model.eval()
    ids, mask = inputs(vocab, seed)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config_dict.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    save_file(tensors, os.path.join(out, "model.safetensors"))
    save_file(
        {"input_ids": ids.to(torch.int64), "attention_mask": mask.to(torch.int64), "logits": logits},
        os.path.join(out, "io.safetensors"),
    )
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config_dict, f, indent=2)
    print(name, "logits", tuple(logits.shape), "max |logit|", logits.abs().max().item())


def tiny_phi():
    cfg = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, hidden_act="gelu_new",
        max_position_embeddings=64, rope_theta=10000.0, partial_rotary_factor=0.5,
        layer_norm_eps=1e-5, qk_layernorm=False, tie_word_embeddings=False,
        model_type="phi", architectures=["PhiForCausalLM"],
    )
    torch.manual_seed(0)
    model = PhiForCausalLM(PhiConfig(**cfg, attn_implementation="eager"))
    randomize(model, 1)
    dump("tiny_phi", model, cfg, cfg["vocab_size"], 2)


def tiny_llama():
    cfg = dict(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, hidden_act="silu",
        max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
        model_type="llama", architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="eager"))
    randomize(model, 3)
    model.tie_weights()
    dump("tiny_llama", model, cfg, cfg["vocab_size"], 4)


def smollm2(gguf_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32
    )
    model.eval()
    # Arbitrary but fixed token ids (no tokenizer needed on the Rust side).
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 30, 2]], dtype=torch.int64)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    save_file(
        {
            "input_ids": ids,
            "logits_head": logits[..., :256].contiguous(),
            "argmax": logits.argmax(-1).to(torch.int64),
            "max": logits.max(-1).values.contiguous(),
        },
        os.path.join(FIXTURES, "smollm2_ref.safetensors"),
    )
    print("smollm2 logits", tuple(logits.shape), "argmax", logits.argmax(-1).tolist())


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2-gguf", help="path to SmolLM2-135M-Instruct.Q4_1.gguf")
    args = ap.parse_args()
    tiny_phi()
    tiny_llama()
    if args.smollm2_gguf:
        smollm2(args.smollm2_gguf)
