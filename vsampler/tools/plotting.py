"""The `vsampler bench --plot` figure: speedup of each timed implementation over each peer, per workload."""

from __future__ import annotations

from typing import Any


def _short_vocab(v: int) -> str:
    return f"{v / 1000:.0f}k" if v >= 10000 else str(v)


def plot_speedups(results: list[dict[str, Any]], peers: list[str], path: str, title: str) -> None:
    """Writes a PNG: a grid of panels, one row per implementation (reference excluded) and one column per
    sampling config; in each, grouped bars per workload (batch, vocabulary, dtype), one bar per peer,
    log-scale y (speedup = peer time / implementation time; 1 = as fast, the black line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    impls = [i for i in dict.fromkeys(r["impl"] for r in results) if i != "reference"]
    configs = list(dict.fromkeys(r["config"] for r in results))
    if not impls or not peers:
        raise ValueError("nothing to plot: --plot needs a fast implementation and at least one peer")
    per_panel = max(sum(1 for r in results if r["impl"] == impls[0] and r["config"] == c) for c in configs)
    fig, axes = plt.subplots(
        len(impls),
        len(configs),
        figsize=(len(configs) * max(3.5, 0.35 * per_panel + 1.5), 4.2 * len(impls)),
        squeeze=False,
        sharey=True,
    )
    width = 0.8 / len(peers)
    top = max(max(r[f"speedup_vs_{p}"] for p in peers) for r in results if r["impl"] in impls)
    for row, impl in enumerate(impls):
        for col, config in enumerate(configs):
            ax = axes[row, col]
            rows = [r for r in results if r["impl"] == impl and r["config"] == config]
            labels = [f"B={r['batch']}\nV={_short_vocab(r['vocab'])}\n{r['dtype'].replace('float', 'f')}" for r in rows]
            x = np.arange(len(rows))
            for j, peer in enumerate(peers):
                ax.bar(
                    x + (j - (len(peers) - 1) / 2) * width,
                    [r[f"speedup_vs_{peer}"] for r in rows],
                    width,
                    label=f"vs {peer}",
                )
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_yscale("log")
            ax.set_ylim(top=top * 2)
            ax.set_title(f"{config} (impl={impl})", fontsize=10)
            ax.set_xticks(x, labels, fontsize=7)
            if col == 0:
                ax.set_ylabel("speedup: peer time / vsampler time (log)")
            if row == 0 and col == len(configs) - 1:
                ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
