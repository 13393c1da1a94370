#!/usr/bin/env bash
# Wall time and peak memory of the README's first command (`pipeline run manifests/demo.toml`)
# from a cold cache, after the build: what the README states. No peer (nothing else runs this
# pipeline). Also times the rerun, which takes every stage from the cache.
#
#   bench/demo_cold_run.sh            # writes bench/results/demo_cold_run.json
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
cache=$(mktemp -d)
trap 'rm -rf "$cache"' EXIT
log="$cache/time.txt"
/usr/bin/time -v target/release/pipeline --cache "$cache/c" run manifests/demo.toml >/dev/null 2>"$log"
rerun_start=$(date +%s.%N)
target/release/pipeline --cache "$cache/c" run manifests/demo.toml >/dev/null
rerun_end=$(date +%s.%N)
python3 - "$log" "$rerun_start" "$rerun_end" <<'PY'
import re, sys
sys.path.insert(0, "bench")
from benchlib import load_average, write_result
text = open(sys.argv[1]).read()
wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([0-9:.]+)", text).group(1)
secs = sum(float(p) * 60 ** i for i, p in enumerate(reversed(wall.split(":"))))
peak_gb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) * 1024 / 1e9
rerun = float(sys.argv[3]) - float(sys.argv[2])
print(f"cold run {secs:.1f} s, peak {peak_gb:.2f} GB, rerun {rerun:.2f} s")
write_result("demo_cold_run", secs, None, "s wall time of the demo from a cold cache (lower is better)",
             None, f"`pipeline run manifests/demo.toml` from an empty cache, after the build "
             f"(bench/demo_cold_run.sh): {secs:.1f} s, peak resident memory of the pipeline "
             f"process {peak_gb:.2f} GB (the two trainings run in parallel); the rerun took "
             f"{rerun:.2f} s, every stage from the cache. Downloads come from the local pip cache "
             f"when warm. Load average after: {load_average()}.")
PY
