"""Quality-vs-speed (Pareto) plot, in the manner of the paper's Figure 1."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def plot_pareto(points: list[dict], path: str | Path, title: str = "",
                baselines: dict[str, float] | None = None) -> Path:
    """points: dicts with `label`, `img_per_s`, `psnr` and optionally `rfid`. One panel per metric
    present; x is throughput on a log scale; the Pareto-optimal points are joined. baselines: {label: PSNR} drawn
    as horizontal lines on the PSNR panel (codes of the same size without a decoder to time: bicubic, PCA)."""
    metrics = [("psnr", "PSNR (dB), higher is better", True)]
    if any(p.get("rfid") is not None for p in points):
        metrics.append(("rfid", "rFID, lower is better", False))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
    for ax, (key, label, higher) in zip(axes[0], metrics):
        pts = [p for p in points if p.get(key) is not None]
        for p in pts:
            ax.scatter(p["img_per_s"], p[key], s=36)
            ax.annotate(p["label"], (p["img_per_s"], p[key]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front, best = [], None
        for p in sorted(pts, key=lambda p: -p["img_per_s"]):  # fastest first: keep points that improve quality
            if best is None or (p[key] > best if higher else p[key] < best):
                front.append(p)
                best = p[key]
        if len(front) > 1:
            ax.plot([p["img_per_s"] for p in front], [p[key] for p in front], "--", color="gray", lw=1)
        if key == "psnr":
            for name, value in (baselines or {}).items():
                ax.axhline(value, ls=":", lw=1, color="black")
                ax.annotate(name, (0.01, value), xycoords=("axes fraction", "data"), textcoords="offset points",
                            xytext=(0, 3), fontsize=8)
        ax.margins(x=0.3, y=0.12)  # room for the labels right of and above the points
        ax.set_xscale("log")
        ax.set_xlabel("decode throughput (img/s, log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
