"""PEFT interoperability for `pipeline_models::peft`.

make DIR    Writes a tiny LoRA adapter with PEFT itself (committed as
            models/tests/fixtures/peft_tiny/); the Rust test `peft_fixture` reads it, checks it,
            and rewrites it with our writer.
logits DIR  Loads the committed fixture adapter into a PeftModel over the tiny base and writes
            the base (DIR/base: config.json, model.safetensors) and PEFT's logits for fixed
            token ids (DIR/peft_logits.safetensors), committed as
            models/tests/fixtures/peft_tiny_logits/; the Rust test `peft_fixture` loads the
            same base and adapter and must produce the same logits.
verify DIR  Loads an adapter written by our Rust code (set PEFT_ROUNDTRIP_OUT=DIR when running
            `cargo test -p pipeline-models --test peft_fixture`) into a PeftModel over the same
            tiny base and checks every LoRA weight arrived unchanged.

Needs a throwaway venv with torch, transformers, peft, safetensors (no network access to a hub:
the base model is built from a config with random weights).
"""

import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def make(out: str) -> None:
    base = tiny_base()
    cfg = LoraConfig(
        r=2,
        lora_alpha=8,
        lora_dropout=0.05,
        target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
        init_lora_weights=False,  # random B too, so values are checkable
    )
    model = get_peft_model(base, cfg)
    model.peft_config["default"].base_model_name_or_path = "tiny-llama-test"
    model.save_pretrained(out)


FIXTURE = "models/tests/fixtures/peft_tiny"


def logits(out: str) -> None:
    from safetensors.torch import save_file

    base = tiny_base()
    base.save_pretrained(f"{out}/base", safe_serialization=True)
    model = PeftModel.from_pretrained(base, FIXTURE)
    model.eval()
    ids = torch.tensor([[1, 5, 9, 3, 30, 2, 7, 11], [4, 4, 0, 17, 8, 25, 6, 31]])
    with torch.no_grad():
        out_logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    save_file(
        {"input_ids": ids.to(torch.int64), "logits": out_logits.float().contiguous()},
        f"{out}/peft_logits.safetensors",
    )
    print(f"wrote {out}: logits {tuple(out_logits.shape)}")


def verify(adapter_dir: str) -> None:
    model = PeftModel.from_pretrained(tiny_base(), adapter_dir)
    saved = load_file(f"{adapter_dir}/adapter_model.safetensors")
    state = model.state_dict()
    n = 0
    for key, tensor in saved.items():
        # PEFT inserts the adapter name when loading: ...lora_A.weight -> ...lora_A.default.weight
        live = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight"
        )
        assert live in state, f"{live} not in the PEFT model"
        assert torch.equal(state[live].float(), tensor.float()), f"{key} changed on load"
        n += 1
    lora_keys = [k for k in state if ".lora_" in k]
    assert n == len(lora_keys), f"file has {n} LoRA tensors, model {len(lora_keys)}"
    print(f"OK: PEFT loaded {n} LoRA tensors from {adapter_dir}; config r={model.peft_config['default'].r}")


if __name__ == "__main__":
    {"make": make, "logits": logits, "verify": verify}[sys.argv[1]](sys.argv[2])
