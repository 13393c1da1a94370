"""Helpers shared by the benchmark drivers: machine description and result files.

Every result is `bench/results/NAME.json` with exactly the keys
{"name", "machine", "date", "ours", "peer", "unit", "ratio", "notes"}; "ratio" > 1 means
we are better.
"""

import datetime
import json
import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    """CPU model, cores, memory and kernel, as stored in every result file."""
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} cores, {mem_gib:.0f} GiB RAM, {platform.system()} {platform.release()}"


def load_average() -> str:
    """The 1/5/15-minute load averages, to record how busy a shared machine was."""
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "unknown"


def write_result(name, ours, peer, unit, ratio, notes):
    """Writes bench/results/NAME.json; `peer` and `ratio` may be None (no fair peer)."""
    out = ROOT / "bench" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "name": name,
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
        "ours": round(ours, 4),
        "peer": None if peer is None else round(peer, 4),
        "unit": unit,
        "ratio": None if ratio is None else round(ratio, 3),
        "notes": notes,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
