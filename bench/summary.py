#!/usr/bin/env python3
"""Prints bench/results/*.json as the markdown table in the README (ratio > 1: we are better)."""

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def fmt(x):
    if x is None:
        return "-"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def main():
    print("| benchmark | unit | ours | peer | ratio |")
    print("|---|---|---|---|---|")
    for path in sorted(RESULTS.glob("*.json")):
        r = json.loads(path.read_text())
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        print(f"| `{r['name']}` | {r['unit']} | {fmt(r['ours'])} | {fmt(r['peer'])} | {ratio} |")


if __name__ == "__main__":
    main()
