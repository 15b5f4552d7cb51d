#!/usr/bin/env python3
"""The decode step's timeline, from ./dsv2cu_timeline --bench MODEL --timeline CTX (build/timeline_CTX.csv).

Each row of the CSV is one block of one kernel: when it started, when its pdl_wait returned and when its
thread 0 finished (ns from the step's first block). This groups the blocks into kernel launches and the
launches into kinds, and prints per kind (means over the layers and the recorded steps):

  gap     from the previous launch's last block finishing to this launch's first wait returning: what a
          dependency costs (the grid's completion, the memory flush, the waiting blocks' release)
  busy    from that first wait returning to this launch's last block finishing
  block   the median block's own time after its wait (end - wait end)
  mark    the median block's time from its wait to its timeline_mark() (the kernels that mark one: the end of
          their setup, before the weight or cache loop; empty for the others and for files without marks)
  tail    last block's end - median block's end (stragglers)
  lead    first block's start to first wait end: how long the launch sat resident, waiting (PDL)

A launch's kind is its kernel and the kernel after it (the matvec before mla_prep is q / kv_a, the one before
moe_router or rmsnorm is o_proj, the last one is the lm_head). The sum of gap + busy over a step's
launches is the step. Standard library only.

usage: python3 tools/timeline_decode.py build/timeline_512.csv [more.csv, or .csv.gz]
"""
import csv
import gzip
import statistics
import sys
from collections import defaultdict


def launches_of(rows):
    """one step's rows -> its launches in order: dicts of name, blocks, start, wait_min, end_max, ..."""
    by_name = defaultdict(list)
    for r in rows:
        by_name[r["kernel"]].append(r)
    launches = []
    for name, rs in by_name.items():
        # a launch of a kind cannot return from its wait before the previous launch of that kind has ended
        # (a different kernel runs between them and waits for it), so a wait end past the running
        # maximum of ends starts a new launch
        rs.sort(key=lambda r: r["wait"])
        cur = None
        for r in rs:
            if cur is None or r["wait"] > cur["end_max"]:
                cur = {"name": name, "rows": []}
                cur["end_max"] = r["end"]
                launches.append(cur)
            cur["rows"].append(r)
            cur["end_max"] = max(cur["end_max"], r["end"])
    for ln in launches:
        rs = ln["rows"]
        ln["blocks"] = len(rs)
        ln["start"] = min(r["start"] for r in rs)
        ln["wait_min"] = min(r["wait"] for r in rs)
        ln["end_med"] = statistics.median(r["end"] for r in rs)
        ln["block_busy"] = statistics.median(r["end"] - r["wait"] for r in rs)
        marked = [r["mark"] - r["wait"] for r in rs if r["mark"] >= 0]
        ln["to_mark"] = statistics.median(marked) if marked else None
    launches.sort(key=lambda ln: ln["wait_min"])
    return launches


def main(paths):
    for path in paths:
        steps = defaultdict(list)
        with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
            for r in csv.DictReader(f):
                start, wait, end = int(r["start_ns"]), int(r["wait_end_ns"]), int(r["end_ns"])
                mark = int(r.get("mark_ns") or -1)  # (files before the marks have no such column)
                steps[int(r["step"])].append({"kernel": r["kernel"].replace("_kernel", ""), "start": start,
                                              "wait": wait if wait >= 0 else start, "end": end, "mark": mark})
        kinds = defaultdict(lambda: defaultdict(list))
        step_us, n_launches = [], []
        for s, rows in sorted(steps.items()):
            ls = launches_of(rows)
            n_launches.append(len(ls))
            step_us.append((max(ln["end_max"] for ln in ls) - min(ln["start"] for ln in ls)) / 1e3)
            for i, ln in enumerate(ls):
                nxt = ls[i + 1]["name"] if i + 1 < len(ls) else "end"
                k = kinds[f"{ln['name']} > {nxt}"]
                k["gap"].append((ln["wait_min"] - ls[i - 1]["end_max"]) / 1e3 if i else 0.0)
                k["busy"].append((ln["end_max"] - ln["wait_min"]) / 1e3)
                k["block"].append(ln["block_busy"] / 1e3)
                if ln["to_mark"] is not None:
                    k["mark"].append(ln["to_mark"] / 1e3)
                k["tail"].append((ln["end_max"] - ln["end_med"]) / 1e3)
                k["lead"].append((ln["wait_min"] - ln["start"]) / 1e3)
                k["blocks"].append(ln["blocks"])
        n_steps = len(steps)
        print(f"## {path}: {n_steps} steps, {statistics.mean(n_launches):.0f} launches a step, "
              f"step {statistics.mean(step_us):.1f} us (first block's start to last block's end)")
        print()
        print("| launch (kernel > next kernel) | per step | blocks | gap us | busy us | block us | mark us | tail us | lead us | gap + busy, us per step |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        total_gap = total_busy = 0.0
        order = sorted(kinds.items(), key=lambda kv: -(sum(kv[1]["gap"]) + sum(kv[1]["busy"])))
        for name, k in order:
            per_step = len(k["busy"]) / n_steps
            g, b = statistics.mean(k["gap"]), statistics.mean(k["busy"])
            total_gap += sum(k["gap"]) / n_steps
            total_busy += sum(k["busy"]) / n_steps
            mark = f"{statistics.mean(k['mark']):.2f}" if k["mark"] else ""
            print(f"| {name} | {per_step:.0f} | {statistics.median(k['blocks']):.0f} | {g:.2f} | {b:.2f} | "
                  f"{statistics.mean(k['block']):.2f} | {mark} | {statistics.mean(k['tail']):.2f} | {statistics.mean(k['lead']):.2f} | "
                  f"{(sum(k['gap']) + sum(k['busy'])) / n_steps:.0f} |")
        print(f"| all | {statistics.mean(n_launches):.0f} | | | | | | | | gaps {total_gap:.0f} + busy {total_busy:.0f} "
              f"= {total_gap + total_busy:.0f} |")
        print()


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python3 tools/timeline_decode.py build/timeline_CTX.csv [more.csv]")
    try:
        main(sys.argv[1:])
    except BrokenPipeError:  # the reader stopped early (| head): not an error of the file
        sys.stdout = None
    except (OSError, KeyError, ValueError, StopIteration) as e:  # a missing, truncated or foreign file
        sys.exit(f"timeline_decode.py: error: cannot read a timeline from {' '.join(sys.argv[1:])} ({type(e).__name__}: {e}); "
                 "it comes from ./dsv2cu_timeline --bench MODEL --timeline CTX")
