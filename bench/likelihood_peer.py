#!/usr/bin/env python3
"""The PyTorch + transformers side of a likelihood-scoring benchmark.

Scores every task of an input file (the format of models/tests/fixtures/smollm2_likelihood.json:
tasks with `ids` and `target_start`, any number of them) with SmolLM2-135M from the same GGUF
(transformers dequantizes it to float32): forward only, under torch.no_grad(), in batches of
`--batch-size` sequences sorted by length and right-padded with an attention mask; each
sequence's NLL is the sum of -log p over its target tokens (float32 log_softmax, as HF's own
loss). Only the logits of the positions that predict targets are computed (`logits_to_keep`,
the last positions of the padded batch; `--logits all` computes every position's).
One untimed warm-up round, then `--rounds` timed rounds; prints one JSON line with the median.

Run in the reference venv (see scripts/reference/likelihood_reference.py), with the
OpenMP threads passive so that an idle pool does not spin on a shared machine:

    OMP_WAIT_POLICY=PASSIVE /tmp/refvenv/bin/python bench/likelihood_peer.py \
        --make-input all-humaneval /tmp/likelihood_humaneval.json [--with-nll]
    OMP_WAIT_POLICY=PASSIVE /tmp/refvenv/bin/python bench/likelihood_peer.py \
        /tmp/likelihood_humaneval.json [--batch-size 8] [--rounds 3] [--threads 2]

`--make-input all-humaneval` tokenizes all 164 HumanEval tasks exactly as the reference
script does (the pipeline's prompt/target split and tokenization); `--with-nll` also stores
the float64 reference NLLs, which the timed run then checks its own against.
"""

import argparse
import json
import os
import resource
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts", "reference"))
import likelihood_reference as ref  # noqa: E402


def load_average():
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "unknown"


def make_input(which, out, gguf, data, with_nll):
    if which != "all-humaneval":
        sys.exit(f"unknown input set {which!r} (known: all-humaneval)")
    tok = ref.load_tokenizer(gguf)
    tasks, _ = ref.build_tasks(tok, ref.humaneval_problems(data))
    if with_nll:
        model = ref.load_model(gguf)
        for i, t in enumerate(tasks):
            ref.score(t, ref.nll_unbatched(model, t["ids"], t["target_start"]))
            print(f"{i + 1}/{len(tasks)} {t['task_id']}: nll {t['nll']:.4f}", file=sys.stderr)
    else:
        for t in tasks:
            t["tokens"] = len(t["ids"]) - t["target_start"]
    header = {
        "about": "All HumanEval tasks tokenized as the pipeline does (prompt rstripped, "
                 "target = stripped whitespace + canonical solution), for bench/likelihood_peer.py"
                 + ("; NLLs from transformers in float64." if with_nll else "."),
        "gguf": os.path.basename(gguf),
        **ref.versions(),
        "dtype": "float32",
        "add_special_tokens_adds": ref.special_tokens_added(tok),
    }
    ref.write_tasks_json(out, header, tasks)
    print(f"wrote {len(tasks)} tasks, {sum(len(t['ids']) for t in tasks)} ids, "
          f"{sum(len(t['ids']) - t['target_start'] for t in tasks)} targets to {out}",
          file=sys.stderr)


def batches(tasks, batch_size):
    order = sorted(range(len(tasks)), key=lambda i: len(tasks[i]["ids"]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def score_batch(torch, model, tasks, idx, all_logits):
    """Per-task NLLs of one right-padded batch."""
    seqs = [tasks[i] for i in idx]
    n = max(len(t["ids"]) for t in seqs)
    x = torch.zeros((len(seqs), n), dtype=torch.int64)
    mask = torch.zeros((len(seqs), n), dtype=torch.int64)
    for r, t in enumerate(seqs):
        x[r, : len(t["ids"])] = torch.tensor(t["ids"])
        mask[r, : len(t["ids"])] = 1
    # Position p predicts token p + 1: keep the last `keep` positions, from the earliest
    # position that predicts a target.
    keep = n if all_logits else n - min(t["target_start"] for t in seqs) + 1
    logits = model(input_ids=x, attention_mask=mask, logits_to_keep=keep).logits
    first = n - keep
    out = []
    for r, t in enumerate(seqs):
        s, e = t["target_start"], len(t["ids"])
        logp = torch.log_softmax(logits[r, s - 1 - first : e - 1 - first].float(), dim=-1)
        out.append(-logp.gather(1, x[r, s:e, None]).sum().item())
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("input", nargs="?", help="tasks JSON (fixture format)")
    ap.add_argument("--make-input", nargs=2, metavar=("SET", "OUT"),
                    help="write an input file instead: SET is all-humaneval")
    ap.add_argument("--with-nll", action="store_true", help="with --make-input: store NLLs")
    ap.add_argument("--gguf", default=ref.DEFAULT_GGUF)
    ap.add_argument("--data", default=ref.DEFAULT_DATA, help="the shared data folder")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=ref.THREADS)
    ap.add_argument("--logits", choices=["targets", "all"], default="targets")
    args = ap.parse_args()
    ref.THREADS = args.threads

    if args.make_input:
        make_input(*args.make_input, args.gguf, args.data, args.with_nll)
        return
    if not args.input:
        ap.error("give an input file, or --make-input")

    import torch

    with open(args.input, encoding="utf-8") as f:
        tasks = json.load(f)["tasks"]
    load_before = load_average()
    t0 = time.perf_counter()
    model = ref.load_model(args.gguf)
    torch.set_num_threads(args.threads)
    load_s = time.perf_counter() - t0
    plan = batches(tasks, args.batch_size)

    def one_round():
        nll = [0.0] * len(tasks)
        t = time.perf_counter()
        with torch.no_grad():
            for idx in plan:
                for i, v in zip(idx, score_batch(torch, model, tasks, idx, args.logits == "all")):
                    nll[i] = v
        return time.perf_counter() - t, nll

    warm_s, nll = one_round()
    print(f"warm-up: {warm_s:.2f} s", file=sys.stderr)
    times = []
    for r in range(args.rounds):
        secs, nll = one_round()
        times.append(secs)
        print(f"round {r}: {secs:.2f} s", file=sys.stderr)
    median = sorted(times)[len(times) // 2]
    targets = sum(len(t["ids"]) - t["target_start"] for t in tasks)
    positions = sum(len(t["ids"]) for t in tasks)
    padded = sum(len(idx) * max(len(tasks[i]["ids"]) for i in idx) for idx in plan)
    rel = [abs(v - t["nll"]) / abs(t["nll"]) for v, t in zip(nll, tasks) if t.get("nll")]
    print(
        json.dumps(
            {
                "impl": "peer",
                "tasks": len(tasks),
                "scored_tokens": targets,
                "seconds": median,
                "seconds_all": times,
                "tokens_per_s": targets / median,
                "all_positions_per_s": positions / median,
                "padded_positions": padded,
                "batch_size": args.batch_size,
                "logits": args.logits,
                "torch": torch.__version__,
                "transformers": ref.versions()["transformers"],
                "threads": torch.get_num_threads(),
                "load_s": load_s,
                "warmup_s": warm_s,
                "max_rel_vs_input_nll": max(rel) if rel else None,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "load_average": [load_before, load_average()],
            }
        )
    )


if __name__ == "__main__":
    main()
