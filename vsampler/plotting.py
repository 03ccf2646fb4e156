"""The `vsampler bench --plot` figure: speedup of each timed implementation over each peer, per workload."""

from __future__ import annotations

from typing import Any


def plot_speedups(results: list[dict[str, Any]], peers: list[str], path: str, title: str) -> None:
    """Writes a PNG: one panel per implementation (reference excluded), grouped bars per workload, one bar
    per peer, log-scale y (speedup = peer time / implementation time; 1 = as fast), a line at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    impls = [i for i in dict.fromkeys(r["impl"] for r in results) if i != "reference"]
    if not impls or not peers:
        raise ValueError("nothing to plot: --plot needs a fast implementation and at least one peer")
    fig, axes = plt.subplots(
        len(impls), 1, figsize=(max(8, 0.45 * len(results) / max(len(impls), 1) + 3), 4.5 * len(impls)), squeeze=False
    )
    width = 0.8 / len(peers)
    for ax, impl in zip(axes[:, 0], impls, strict=True):
        rows = [r for r in results if r["impl"] == impl]
        labels = [f"{r['config']}\nB={r['batch']} V={r['vocab']}\n{r['dtype'].replace('float', 'f')}" for r in rows]
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
        ax.set_ylabel("speedup (peer time / vsampler time, log scale)")
        ax.set_title(f"vsampler impl={impl}")
        ax.set_xticks(x, labels, fontsize=7)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
