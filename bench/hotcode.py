#!/usr/bin/env python3
"""The hot code of a callgrind run: the distinct 64-byte cache lines and
4 KiB pages of the instructions executed at least `--min` times.

Reads a callgrind output file written with `--dump-instr=yes` (positions
`instr line`, or `instr` alone). Each cost line gives an instruction's
address (absolute `0x..`, relative `+N`/`-N`, or `*` for the same) and its
Ir count, which for one instruction is how often it ran. The line after a
`calls=` line is the call's inclusive cost, not the instruction's own, and
only moves the position.

    python3 bench/hotcode.py callgrind.out --min 2500
"""
import argparse
from collections import defaultdict


def executions(path):
    counts = defaultdict(int)
    fn_of = {}
    names = {}
    fn = "?"
    total = 0
    addr = 0
    skip_next = False
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith(("fn=", "cfn=")):
                # fn=(id) name, or fn=(id) alone for a name given before
                # (by an fn= or a cfn= line).
                ref, _, name = line.split("=", 1)[1].partition(" ")
                if name:
                    names[ref] = name
                if line.startswith("fn="):
                    fn = names.get(ref, ref)
                continue
            if not line or line[0] not in "0123456789+-*":
                skip_next = skip_next or line.startswith("calls=")
                continue
            parts = line.split()
            a = parts[0]
            if a.startswith("0x"):
                addr = int(a, 16)
            elif a[0] in "+-":
                addr += int(a, 0) if a[1:2] == "0x" else int(a)
            elif a != "*":
                addr = int(a)
            if skip_next:
                skip_next = False
                continue
            # The last field is Ir (the only event collected).
            ir = int(parts[-1]) if len(parts) >= 2 else 0
            counts[addr] += ir
            fn_of[addr] = fn
            total += ir
    return counts, total, fn_of


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--min", type=int, required=True, help="executions to count as hot")
    p.add_argument("--per", type=int, default=0, help="divide the total by this (e.g. echoes)")
    p.add_argument("--by-function", action="store_true", help="list hot cache lines per function")
    args = p.parse_args()
    counts, total, fn_of = executions(args.out)
    hot = [a for a, n in counts.items() if n >= args.min]
    lines = {a // 64 for a in hot}
    pages = {a // 4096 for a in hot}
    per = f", {total / args.per:,.0f} instructions per message" if args.per else ""
    if args.by_function:
        per_fn = defaultdict(set)
        for a in hot:
            per_fn[fn_of[a]].add(a // 64)
        for name, ls in sorted(per_fn.items(), key=lambda kv: -len(kv[1])):
            print(f"{len(ls):5} {name}")
    print(
        f"{len(hot)} hot instructions, {len(lines)} cache lines "
        f"({len(lines) * 64 / 1024:.1f} KiB), {len(pages)} pages; "
        f"{total:,} instructions in all{per}"
    )


if __name__ == "__main__":
    main()
