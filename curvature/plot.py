"""Matplotlib figures; imported lazily so that matplotlib stays an optional extra (``pip install curvature[plot]``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["plot_density", "plot_history"]


def _figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib ``Figure`` on the Agg canvas, made without pyplot so the user's backend stays as it was."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plotting needs matplotlib: pip install matplotlib (or the extra: pip install 'curvature[plot]')."
        ) from error
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    """Lay out the figure and write it to ``path`` (folders created), the format from its suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_density(
    grid: torch.Tensor,
    density: torch.Tensor,
    nodes: torch.Tensor,
    path: str | Path,
    log_scale: bool = True,
    title: str | None = None,
) -> Path:
    """Plot a broadened spectral density with its quadrature nodes as ticks, and save it.

    Args:
        grid: Evaluation points.
        density: The density on ``grid``.
        nodes: The quadrature nodes, drawn as a rug.
        path: The output file; its suffix picks the format (``.png``).
        log_scale: Use a log density axis.
        title: The figure title.

    Returns:
        The path written.
    """
    fig = _figure((6, 4))
    ax = fig.add_subplot()
    values = density.numpy()
    floor = max(float(density.max()) * 1e-12, 1e-300)
    if log_scale:
        ax.semilogy(grid.numpy(), values.clip(min=floor))
    else:
        ax.plot(grid.numpy(), values)
    ax.plot(nodes.numpy(), [floor if log_scale else 0.0] * nodes.numel(), "|", color="black", markersize=8,
            alpha=0.5)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(title or "spectral density (stochastic Lanczos quadrature)")
    return _save(fig, path)


def plot_history(
    steps: list[int],
    series: dict[str, list[float]],
    path: str | Path,
    lines: dict[str, float] | None = None,
    title: str | None = None,
    lower: dict[str, list[float]] | None = None,
    lower_label: str | None = None,
) -> Path:
    """Plot tracked values against the training step, with optional horizontal reference lines, and save it.

    Args:
        steps: The steps of the measurements.
        series: Label to values (one per step; NaN leaves a gap).
        path: The output file; its suffix picks the format (``.png``).
        lines: Label to the value of a horizontal reference line (e.g. the stability edge ``2/η``).
        title: The figure title.
        lower: Series of another scale (overlaps in ``[0, 1]``), drawn in a second panel below, same steps.
        lower_label: The y label of that panel.

    Returns:
        The path written.
    """
    fig = _figure((7, 6.5) if lower else (7, 4))
    ax = fig.add_subplot(2, 1, 1) if lower else fig.add_subplot()
    for label, values in series.items():
        ax.plot(steps, values, label=label)
    for label, value in (lines or {}).items():
        ax.axhline(value, linestyle="--", color="gray", linewidth=1)
        ax.annotate(label, (steps[-1] if steps else 0, value), textcoords="offset points", xytext=(-30, 4),
                    color="gray")
    axes = [ax]
    if lower:
        below = fig.add_subplot(2, 1, 2, sharex=ax)
        for label, values in lower.items():
            below.plot(steps, values, marker=".", label=label)
        below.set_ylim(-0.02, 1.02)
        if lower_label:
            below.set_ylabel(lower_label)
        axes.append(below)
    for each in axes:
        each.legend()
        each.grid(alpha=0.3)
    axes[-1].set_xlabel("training step")
    if title:
        ax.set_title(title)
    return _save(fig, path)
