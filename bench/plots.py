"""Speedup plots from benchmark records: one PNG per op, one panel per mode, bars per baseline."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402



def plot_speedups(records: list[dict], out_dir: Path, stem: str,
                  baselines_order: tuple[str, ...]) -> list[Path]:
    """``{stem}-{op}.png``: ours' speedup vs each baseline per case, with the 1.0 line; the
    baselines in ``baselines_order`` (harness.BASELINES), each in one color in every panel."""
    paths = []
    for op in dict.fromkeys(r["op"] for r in records):
        rows = [r for r in records if r["op"] == op and r["speedup"]]
        modes = list(dict.fromkeys(r["mode"] for r in rows))
        if not rows:
            continue
        baselines = [b for b in baselines_order if any(b in r["speedup"] for r in rows)]
        fig, axes = plt.subplots(len(modes), 1, squeeze=False,
                                 figsize=(max(6.0, 0.9 * max(len(rows) // len(modes), 1) + 3),
                                          3.2 * len(modes)))
        colors = {b: f"C{i}" for i, b in enumerate(baselines_order)}
        for ax, mode in zip(axes[:, 0], modes):
            mode_rows = [r for r in rows if r["mode"] == mode]
            width = 0.8 / max(len(baselines), 1)
            for i, baseline in enumerate(baselines):
                offset = (i - (len(baselines) - 1) / 2) * width
                present = [(j + offset, r["speedup"][baseline])
                           for j, r in enumerate(mode_rows) if baseline in r["speedup"]]
                if not present:  # e.g. _addmm_activation has no backward
                    continue
                xs, ys = zip(*present)
                bars = ax.bar(xs, ys, width, color=colors[baseline], label=f"vs {baseline}")
                ax.bar_label(bars, fmt="%.2f", fontsize=6)
            ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
            ax.set_xticks(range(len(mode_rows)))
            ax.set_xticklabels([f"{r['shape']}\n{r['dtype']} {r['approximate']}"
                                for r in mode_rows], fontsize=7)
            ax.set_ylabel("speedup (x)")
            ax.set_title(f"{op} {mode}: baseline time / ours (> 1: ours faster)", fontsize=9)
        handles = [plt.Rectangle((0, 0), 1, 1, color=colors[b]) for b in baselines]
        fig.legend(handles, [f"vs {b}" for b in baselines], loc="upper center",
                   ncol=len(baselines), fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.25 / fig.get_figheight()))
        path = out_dir / f"{stem}-{op.replace('/', '-')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
