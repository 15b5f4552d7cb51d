"""The economy experiment's plot (tools/bench_serving.sh): aggregate decode tok/s against the batch
size, the latent (MLA) cache against the expanded (MHA) cache, one panel per model shape and context,
each layout's largest batch within the cache budget marked; the transformers baseline where measured.

    python3 tools/plot_serving.py serving.csv OUT.png

serving.csv columns: shape, ctx, system (latent | mha | transformers), batch, tok_per_s, max_batch
(max_batch: the largest batch whose cache fits the budget; the same on every row of a system).
"""
import csv, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {"latent": ("tab:blue", "o", "dsv2cu, latent cache (MLA)"),
         "mha": ("tab:red", "s", "dsv2cu, expanded cache (MHA layout)"),
         "transformers": ("tab:gray", "^", "transformers generate")}


def main():
    rows = list(csv.DictReader(open(sys.argv[1])))
    panels = sorted({(r["shape"], int(r["ctx"])) for r in rows})
    cols = 2 if len(panels) > 1 else 1
    rows_n = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(6.0 * cols, 4.4 * rows_n), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (shape, ctx) in zip(axes.flat, panels):
        for system, (color, marker, label) in STYLE.items():
            pts = sorted((int(r["batch"]), float(r["tok_per_s"])) for r in rows
                         if r["shape"] == shape and int(r["ctx"]) == ctx and r["system"] == system)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=label)
            mb = [r["max_batch"] for r in rows if r["shape"] == shape and int(r["ctx"]) == ctx and r["system"] == system]
            if mb and mb[0]:
                ax.axvline(int(mb[0]), color=color, linestyle=":", linewidth=1)
                ax.annotate(f"budget: {mb[0]}", (int(mb[0]), ax.get_ylim()[1] * 0.02), color=color, fontsize=7,
                            rotation=90, ha="right", va="bottom")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequences in the batch")
        ax.set_ylabel("decode tok/s (all sequences)")
        ax.set_title(f"{shape}, context {ctx}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)


if __name__ == "__main__":
    main()
