"""llama.cpp's side of the CPU generation benchmark (bench/generate_llamacpp_bench.py).

Speaks the protocol of `models/benches/generate_cpu.rs`: loads the GGUF, prints
`{"ready": true, ...}`, then for every stdin line `{"batch": B, "max_new_tokens": N}` generates
greedily for every prompt (token ids from --prompts), B sequences at a time, exactly N new tokens
each (no EOS), and prints `{"secs", "new_tokens", "prefill_secs", "decode_secs", "tokens"}`.

It drives llama.cpp through llama-cpp-python's C API bindings, the way llama.cpp's own
`batched` example does: one context whose KV cache holds B sequences; the prompts of a batch go
through `llama_decode` together (prefill), then every step decodes one token per sequence in one
batch (decode). Greedy choice is the argmax of each sequence's logits, as ours is.

    python bench/generate_llamacpp_peer.py --gguf MODEL.gguf --prompts prompts.json --threads 2
"""

import argparse
import ctypes
import json
import sys
import time

import llama_cpp as L
import numpy as np

_quiet = None  # the log callback, kept alive for as long as llama.cpp may call it


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--prompts", required=True, help="JSON list of token id lists")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=32, help="most sequences per batch")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="most new tokens per sequence")
    args = ap.parse_args()

    prompts = json.load(open(args.prompts))
    # llama.cpp logs every tensor it loads to stderr; the driver wants only the JSON lines.
    global _quiet
    _quiet = L.llama_log_callback(lambda level, text, user_data: None)
    L.llama_log_set(_quiet, ctypes.c_void_p())
    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    model = L.llama_model_load_from_file(args.gguf.encode(), mparams)
    if not model:
        sys.exit(f"llama.cpp could not load {args.gguf}")
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)

    longest = max(len(p) for p in prompts)
    per_seq = longest + args.max_new_tokens
    cparams = L.llama_context_default_params()
    cparams.n_ctx = per_seq * args.max_batch
    cparams.n_batch = max(per_seq * args.max_batch, 512)
    cparams.n_ubatch = 512
    cparams.n_seq_max = args.max_batch
    cparams.n_threads = args.threads
    cparams.n_threads_batch = args.threads
    ctx = L.llama_init_from_model(model, cparams)
    if not ctx:
        sys.exit("llama.cpp could not create a context")
    memory = L.llama_get_memory(ctx)
    batch = L.llama_batch_init(cparams.n_batch, 0, 1)

    def logits_argmax(i):
        ptr = L.llama_get_logits_ith(ctx, i)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,))))

    def fill(entries):
        """entries: (token, pos, seq, wants_logits)."""
        batch.n_tokens = len(entries)
        for i, (tok, pos, seq, logits) in enumerate(entries):
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = 1 if logits else 0

    def decode():
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            sys.exit(f"llama_decode failed with {rc}")

    def generate(chunk, max_new_tokens):
        """Greedy tokens for each prompt of `chunk`; (tokens, prefill secs, decode secs)."""
        L.llama_memory_clear(memory, True)
        start = time.perf_counter()
        entries, last = [], []
        for seq, prompt in enumerate(chunk):
            for pos, tok in enumerate(prompt):
                entries.append((tok, pos, seq, pos == len(prompt) - 1))
            last.append(len(entries) - 1)
        fill(entries)
        decode()
        out = [[logits_argmax(i)] for i in last]
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for step in range(1, max_new_tokens):
            fill([(out[s][-1], len(p) + step - 1, s, True) for s, p in enumerate(chunk)])
            decode()
            for s in range(len(chunk)):
                out[s].append(logits_argmax(s))
        return out, prefill, time.perf_counter() - start

    print(json.dumps({"ready": True, "llama_cpp": L.__version__,
                      "system_info": L.llama_print_system_info().decode()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        b, n = int(cmd["batch"]), int(cmd["max_new_tokens"])
        if b > args.max_batch or n > args.max_new_tokens:
            sys.exit(f"batch {b} / {n} new tokens exceed --max-batch / --max-new-tokens")
        tokens, prefill, decode_secs = [], 0.0, 0.0
        start = time.perf_counter()
        for i in range(0, len(prompts), b):
            t, p, d = generate(prompts[i:i + b], n)
            tokens += t
            prefill += p
            decode_secs += d
        secs = time.perf_counter() - start
        print(json.dumps({"secs": secs, "new_tokens": sum(len(t) for t in tokens),
                          "prefill_secs": prefill, "decode_secs": decode_secs, "tokens": tokens}),
              flush=True)
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)


if __name__ == "__main__":
    main()
