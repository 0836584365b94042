"""Training curves as a PNG: losses per step, validation Dice per class, and the share of trusted
pseudo-label pixels when the run records it.

matplotlib is imported only when a plot is made, and drawn with its Agg canvas directly: the global
backend (Slicer's, a notebook's) is never switched.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

from .progress import ProgressRecord


def plot_curves(history: Iterable[ProgressRecord] | str | os.PathLike[str], path: str | os.PathLike[str],
                title: str = "") -> Path:
    """Draw ``history`` (records, or a history JSONL file) into the PNG ``path``; returns the path.

    Non-finite or missing values are left out of their line. An empty history gives a figure that
    says so, so a GUI can always show the file.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .history import read_history

    records = read_history(history) if isinstance(history, (str, os.PathLike)) else list(history)
    steps = [r for r in records if r.event == "step"]
    vals = [r for r in records if r.event == "val"]
    has_mask = any(r.mask_ratio is not None for r in steps)
    panels = 2 + int(has_mask)
    fig = Figure(figsize=(6.4, 2.6 * panels), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]

    loss_names = sorted({k for r in steps for k in r.losses})
    for name in loss_names:
        xs, ys = _series(steps, lambda r: r.losses.get(name))
        axes[0].plot(xs, ys, label=name, linewidth=1.0)
    axes[0].set_ylabel("loss")
    if loss_names:
        axes[0].legend(loc="upper right", fontsize="small")
    else:
        axes[0].text(0.5, 0.5, "no steps recorded yet", ha="center", va="center", transform=axes[0].transAxes)

    class_names = list(dict.fromkeys(k for r in vals for k in r.val_dice))
    for name in class_names:
        xs, ys = _series(vals, lambda r: r.val_dice.get(name))
        axes[1].plot(xs, ys, marker="o", markersize=3, label=name, linewidth=1.0)
    axes[1].set_ylabel("validation Dice")
    axes[1].set_ylim(0.0, 1.0)
    if class_names:
        axes[1].legend(loc="lower right", fontsize="small")
    else:
        axes[1].text(0.5, 0.5, "no validation yet", ha="center", va="center", transform=axes[1].transAxes)

    if has_mask:
        xs, ys = _series(steps, lambda r: r.mask_ratio)
        axes[2].plot(xs, ys, color="tab:gray", linewidth=1.0)
        axes[2].set_ylabel("trusted pixels")
        axes[2].set_ylim(0.0, 1.0)
    axes[-1].set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, out)  # a GUI reloading the image never sees half a file
    return out


def _series(records: list[ProgressRecord], get: Callable[[ProgressRecord], float | None]
            ) -> tuple[list[int], list[float]]:
    xs: list[int] = []
    ys: list[float] = []
    for r in records:
        v = get(r)
        if v is not None:
            xs.append(r.step)
            ys.append(float(v))
    return xs, ys
