"""Summarise a py-spy profile (collapsed stacks, ``py-spy record -f raw``) as Markdown tables.

    py-spy record -p PID --native -r 500 -d 8 -f raw -o connect.raw   # while a load runs
    python benchmarks/flame_summary.py connect.raw --title "connect load" > summary.md

A flame graph is for looking; this is for committing and comparing: where the samples end (self time,
system calls included when recorded with ``--native``) and which of our Python frames they pass through.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path


def load(path: Path) -> tuple[int, collections.Counter[str], collections.Counter[str]]:
    """Total samples, samples by leaf frame, samples by frame anywhere on the stack (once per stack)."""
    leaf: collections.Counter[str] = collections.Counter()
    anywhere: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = stack.split(";")
        leaf[frames[-1]] += samples
        for frame in set(frames):
            anywhere[frame] += samples
    return total, leaf, anywhere


def ours(frame: str) -> bool:
    return "l4proxy/" in frame or "(l4proxy" in frame


def table(rows: list[tuple[str, int]], total: int) -> list[str]:
    out = ["| share | frame |", "| ---: | --- |"]
    out += [f"| {100 * n / total:.1f}% | `{frame[:110]}` |" for frame, n in rows]
    return out


def summary(path: Path, title: str, top: int) -> str:
    total, leaf, anywhere = load(path)
    lines = [f"### {title}", "", f"{total} samples from `{path.name}`.", "", "Where samples end (self):", ""]
    lines += table(leaf.most_common(top), total)
    lines += ["", "Our frames on the stack (inclusive):", ""]
    below_main = [(f, n) for f, n in anywhere.most_common() if ours(f) and n < total]  # not the entry frames
    lines += table(below_main[:top], total)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", type=Path, help="py-spy collapsed-stack output (-f raw)")
    parser.add_argument("--title", default="profile")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    print(summary(args.raw, args.title, args.top), end="")


if __name__ == "__main__":
    main()
