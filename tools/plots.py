#!/usr/bin/env python3
"""Plots for the model card.

  python3 tools/plots.py OUTDIR     # reads OUTDIR/train_log.csv, OUTDIR/metrics.json
writes OUTDIR/loss_curves.png and OUTDIR/expert_load.png
"""
import csv
import json
import os
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    d = sys.argv[1]
    rows = list(csv.DictReader(open(os.path.join(d, "train_log.csv"))))
    m = json.load(open(os.path.join(d, "metrics.json")))
    tok = [int(r["tokens"]) / 1e6 for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    ax[0].plot(tok, [float(r["train_loss"]) for r in rows], lw=0.7, alpha=0.6, label="train (batch)")
    for key, lab in (("val_english", "val English"), ("val_code", "val Python")):
        pts = [(t, float(r[key])) for t, r in zip(tok, rows) if r[key]]
        if pts:
            ax[0].plot(*zip(*pts), "o-", ms=3, label=lab)
    s2 = [t for t, r in zip(tok, rows) if r["stage"] == "2"]
    if s2:
        ax[0].axvline(s2[0], color="k", ls="--", lw=0.8, label="YaRN on, ctx 1024")
    ax[0].set_xlabel("tokens seen (M)")
    ax[0].set_ylabel("cross entropy (nats/token)")
    ax[0].set_ylim(top=min(8.5, ax[0].get_ylim()[1]))
    ax[0].legend()
    ax[0].set_title("training")
    lc = m.get("long_context", {})
    labels = {"plain_rope_256_trained": "plain RoPE (trained at 256)",
              "yarn_before_finetune": "YaRN, no fine-tune", "yarn_after_finetune": "YaRN + fine-tune at 1024"}
    for k, lab in labels.items():
        if k in lc:
            ys = lc[k]["loss_by_64_positions"]
            ax[1].plot([64 * i + 32 for i in range(len(ys))], ys, "o-", ms=3, label=lab)
    ax[1].axvline(256, color="k", ls=":", lw=0.8)
    ax[1].set_xlabel("position (mean over 64-token buckets)")
    ax[1].set_ylabel("validation loss")
    ax[1].set_title("context extension")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(d, "loss_curves.png"), dpi=110)

    el = m.get("expert_load", {})
    if el:
        layers = sorted(el, key=int)
        fig, ax = plt.subplots(1, 1, figsize=(10, 1.0 + 0.6 * len(layers)))
        import numpy as np
        a = np.array([el[l] for l in layers])
        im = ax.imshow(a, aspect="auto", cmap="viridis", vmin=0)
        for i in range(a.shape[0]):
            for j in range(a.shape[1]):
                ax.text(j, i, f"{100 * a[i, j]:.1f}", ha="center", va="center", fontsize=7,
                        color="w" if a[i, j] < a.max() * 0.6 else "k")
        ax.set_yticks(range(len(layers)), [f"layer {l}" for l in layers])
        ax.set_xticks(range(a.shape[1]))
        ax.set_xlabel("routed expert (groups of 4: 0-3, 4-7, 8-11, 12-15)")
        ax.set_title(f"share of routed slots per expert on validation tokens, % (uniform = {100 / a.shape[1]:.2f})")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(os.path.join(d, "expert_load.png"), dpi=110)
    print("plots written to", d)


if __name__ == "__main__":
    main()
