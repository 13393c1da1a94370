#!/usr/bin/env python3
"""kill -9 soak: crash the reduced demo at random points and check that nothing is lost.

One uninterrupted run of the reduced demo (the reductions of tests/demo_e2e.rs) gives the
reference: every stage's output tree. Then, for each trial, a fresh cache, a run killed with
SIGKILL at a random moment (seeded, uniform over the reference run's duration), `pipeline
verify` on what the crash left, and a resumed run to the end. A trial is *identical* when the
verify found nothing corrupt, the resumed run succeeded and every stage's output tree equals
the reference's; otherwise it is *lost*, with the reason.

    cargo build --release
    python3 scripts/kill9-soak.py --trials 20 --out scripts/kill9-soak.result.json

Too slow for CI (about one reduced demo per trial); its last result is committed.
"""

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "manifests" / "demo.toml"


def demo_reductions():
    """The `--set` reductions of tests/demo_e2e.rs (its `REDUCE`), read from there so that the
    soak and the test always run the same reduced demo."""
    source = (ROOT / "tests" / "demo_e2e.rs").read_text()
    block = re.search(r"const REDUCE: &\[&str\] = &\[(.*?)\];", source, re.S)
    if block is None:
        sys.exit("cannot find REDUCE in tests/demo_e2e.rs")
    return re.findall(r'"([^"]+)"', block.group(1))


REDUCE = demo_reductions()


def command(binary, cache):
    cmd = [str(binary), "--cache", str(cache), "run", str(MANIFEST), "--json", "--jobs", "2"]
    for s in REDUCE:
        cmd += ["--set", s]
    return cmd


def trees(cache, run_json):
    """Output tree of every stage: the run report gives each stage's key, the action record
    of that key its trees."""
    by_key = {}
    for shard in (cache / "actions").iterdir():
        for record_path in shard.iterdir() if shard.is_dir() else [shard]:
            if record_path.suffix != ".json":
                continue
            record = json.loads(record_path.read_text())
            by_key[record["key"]] = {k: v["tree"] for k, v in record["outputs"].items()}
    report = json.loads(run_json)
    return {s["stage"]: by_key.get(s["key"]) for s in report["stages"]}


def run_to_end(binary, cache):
    out = subprocess.run(command(binary, cache), capture_output=True)
    if out.returncode != 0:
        return None, out.stderr.decode(errors="replace")[-2000:]
    return trees(cache, out.stdout), None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary", default=ROOT / "target" / "release" / "pipeline", type=Path)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=20261202)
    ap.add_argument("--out", type=Path, default=ROOT / "scripts" / "kill9-soak.result.json")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    # The commit the binary was built from is the one checked out when the soak starts.
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    work = Path(args.work or tempfile.mkdtemp(prefix="kill9-soak-"))
    work.mkdir(parents=True, exist_ok=True)

    reference_cache = work / "reference"
    shutil.rmtree(reference_cache, ignore_errors=True)
    start = time.monotonic()
    reference, error = run_to_end(args.binary, reference_cache)
    reference_s = time.monotonic() - start
    if reference is None:
        sys.exit(f"the reference run failed:\n{error}")
    print(f"reference run: {reference_s:.1f} s, {len(reference)} stages", flush=True)

    details = []
    for trial in range(args.trials):
        cache = work / f"trial-{trial}"
        shutil.rmtree(cache, ignore_errors=True)
        kill_at = rng.uniform(0.05, 0.95) * reference_s
        proc = subprocess.Popen(
            command(args.binary, cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            proc.wait(timeout=kill_at)
            killed = False
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed = True
        verify = subprocess.run(
            [str(args.binary), "--cache", str(cache), "verify"], capture_output=True, text=True
        )
        resumed, error = run_to_end(args.binary, cache)
        if verify.returncode != 0:
            outcome = "lost: verify found damage: " + (verify.stdout + verify.stderr)[-500:]
        elif resumed is None:
            outcome = "lost: the resumed run failed: " + error
        else:
            differing = sorted(s for s, t in reference.items() if resumed.get(s) != t)
            outcome = "identical" if not differing else f"lost: outputs differ for {differing}"
        details.append(
            {"trial": trial, "kill_at_s": round(kill_at, 2), "killed": killed, "outcome": outcome}
        )
        print(f"trial {trial}: kill at {kill_at:.1f} s (killed: {killed}): {outcome}", flush=True)
        shutil.rmtree(cache, ignore_errors=True)

    cpu = next(
        (l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
        platform.processor(),
    )
    identical = sum(d["outcome"] == "identical" for d in details)
    result = {
        "name": "kill9_soak",
        "machine": f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}",
        "date": date.today().isoformat(),
        "commit": commit,
        "command": "python3 scripts/kill9-soak.py --trials %d --seed %d" % (args.trials, args.seed),
        "reference_run_s": round(reference_s, 1),
        "trials": len(details),
        "killed_mid_run": sum(d["killed"] for d in details),
        "identical": identical,
        "lost": len(details) - identical,
        "details": details,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "details"}, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if identical == len(details) else 1)


if __name__ == "__main__":
    main()
