#!/usr/bin/env python3
"""Picture of DeepSeekMoE routing from `./dsv2 ... --routing-out routing.csv`.

Top: for each MoE layer, a heatmap of expert (rows) by token (columns), coloured by the gate
value g_i,t of the experts each token chose (eq. 21), blank where an expert was not chosen;
dotted lines separate the expert groups of device-limited routing. Bottom: the load of each
expert per layer (how many tokens chose it), with the count a perfectly balanced router would
give (K_r x tokens / N_r), the quantity the paper's balance losses (eqs. 23-28) push toward.

Needs matplotlib (Debian: apt-get install python3-matplotlib); dsv2 and its tests do not.

usage: python3 tools/plot_routing.py routing.csv routing.png [--groups 4]
"""
import argparse
import csv


def read_routing(path):
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            rows.append((int(r["pos"]), r["text"], int(r["layer"]), int(r["expert"]), float(r["weight"])))
    if not rows:
        raise SystemExit(f"plot_routing.py: error: {path} has no routing rows")
    return rows


def label(text):
    """a token's text as a tick label: special tokens shortened, newlines shown"""
    if text.startswith("<\uff5c"):
        return "BOS" if "begin" in text else "EOS"
    return text.replace(" ", "\u2423")  # (newlines arrive escaped as \\n)


def plot(rows, out, groups, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positions = sorted({r[0] for r in rows})
    layers = sorted({r[2] for r in rows})
    n_experts = max(r[3] for r in rows) + 1
    if groups and n_experts % groups:
        n_experts = (n_experts + groups - 1) // groups * groups  # unchosen high experts
    text = {r[0]: r[1] for r in rows}
    col = {p: i for i, p in enumerate(positions)}
    k_per_token = len(rows) / (len(positions) * len(layers))

    fig = plt.figure(figsize=(min(16, max(8, 0.22 * len(positions) + 2)), 2.0 * len(layers) + 3.2))
    gs = fig.add_gridspec(len(layers) + 1, 1, height_ratios=[1] * len(layers) + [1.3], hspace=0.45)
    for li, layer in enumerate(layers):
        ax = fig.add_subplot(gs[li])
        grid = [[float("nan")] * len(positions) for _ in range(n_experts)]
        for p, _, l, e, w in rows:
            if l == layer:
                grid[e][col[p]] = w
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest", origin="lower")
        if groups and groups > 1:
            for g in range(1, groups):
                ax.axhline(g * n_experts / groups - 0.5, color="grey", linestyle=":", linewidth=0.8)
        ax.set_ylabel(f"layer {layer}\nexpert")
        ax.set_yticks(range(0, n_experts, max(1, n_experts // 8)))
        if li == len(layers) - 1 and len(positions) <= 120:
            ax.set_xticks(range(len(positions)))
            ax.set_xticklabels([label(text[p]) for p in positions], rotation=90, fontsize=7,
                               family="monospace")
        else:
            ax.set_xticks([])
        fig.colorbar(im, ax=ax, pad=0.01, label="g_i,t")
        if li == 0:
            ax.set_title(title)

    ax = fig.add_subplot(gs[len(layers)])
    width = 0.8 / len(layers)
    for li, layer in enumerate(layers):
        load = [0] * n_experts
        for _, _, l, e, _ in rows:
            if l == layer:
                load[e] += 1
        ax.bar([e - 0.4 + width * (li + 0.5) for e in range(n_experts)], load, width=width, label=f"layer {layer}")
    ax.axhline(k_per_token * len(positions) / n_experts, color="black", linestyle="--", linewidth=1,
               label="balanced")
    ax.set_xticks(range(n_experts))
    ax.set_xlabel("routed expert")
    ax.set_ylabel("tokens routed")
    ax.legend(fontsize=7, ncol=len(layers) + 1, loc="upper right")
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(f"wrote {out}: {len(positions)} tokens x {len(layers)} MoE layers, {n_experts} experts")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", help="the file written by ./dsv2 --routing-out")
    ap.add_argument("png", help="the picture to write")
    ap.add_argument("--groups", type=int, default=4, help="expert groups to mark (n_group; 1: none)")
    ap.add_argument("--title", default="DeepSeekMoE routing: gate value g_i,t of the chosen experts",
                    help="title of the picture")
    args = ap.parse_args()
    plot(read_routing(args.csv), args.png, args.groups, args.title)


if __name__ == "__main__":
    main()
