"""PNG plots of a comparison (matplotlib Figure, Agg): readable without the tables.

- accuracy vs memory budget: one line per method, error bars = std over seeds, over-budget points ringed;
- accuracy vs round, vs cumulative MB communicated and (runs with ``--devices``) vs simulated time: one panel
  per budget, one line per method (mean over seeds, a band from the lowest to the highest seed). Self-supervised
  methods (linear-probe accuracy) are drawn dashed.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from matplotlib import colormaps
from matplotlib.figure import Figure  # drawn and saved with the Agg canvas, no pyplot state

from fedbench.budget import budget_order

if TYPE_CHECKING:
    from fedbench.report import Comparison

BUDGET_AXIS = "memory budget (fraction of the full model's measured training memory)"
ACCURACY_AXIS = "final test accuracy (top-1; SSL: linear probe)"


def write_plots(comp: Comparison, folder: Path) -> list[Path]:
    cells, curves = comp.cells, comp.curves
    if cells["model"].nunique() > 1:  # one line per method and model (budgets are fractions of each model's memory)
        cells = cells.assign(row=cells["row"] + " [" + cells["model"] + "]")
        curves = curves.assign(row=curves["row"] + " [" + curves["model"] + "]")
    rows = cells["row"].unique()
    palette = colormaps["tab10" if len(rows) <= 10 else "tab20"]
    colors = {row: palette(i % palette.N) for i, row in enumerate(rows)}
    paths = [folder / "accuracy_vs_budget.png", folder / "accuracy_vs_round.png", folder / "accuracy_vs_mb.png"]
    accuracy_vs_budget(cells, colors).savefig(paths[0], dpi=120, bbox_inches="tight")
    curves = curves.dropna(subset=["accuracy"])
    axes = [(paths[1], "round", "communication round"),
            (paths[2], "cum_MB", "cumulative MB communicated (down + up, all clients)")]
    if curves["sim_s"].notna().any():  # runs with --devices: simulated time in s, min or h
        last = curves["sim_s"].max()
        unit, scale = ("s", 1) if last < 120 else ("min", 60) if last < 7200 else ("h", 3600)
        curves = curves.assign(sim=curves["sim_s"] / scale)
        paths.append(folder / "accuracy_vs_time.png")
        axes.append((paths[3], "sim", f"simulated time ({unit}, --devices time model)"))
    for path, x, label in axes:
        accuracy_vs(curves.dropna(subset=[x]), x, label, colors).savefig(path, dpi=120, bbox_inches="tight")
    return paths


def style(supervised: bool) -> dict:
    return {"linestyle": "-" if supervised else "--", "marker": "o" if supervised else "s"}


def accuracy_vs_budget(cells, colors: dict[str, str]) -> Figure:
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    single = cells[(cells["seeds"] > 0) & cells["budget_value"].notna()]
    for row, c in single.groupby("row", sort=False):
        c = c.sort_values("budget_value")
        name = row + ("" if c["supervised"].iloc[0] else " (linear probe)")
        ax.errorbar(c["budget_value"], c["accuracy_mean"], yerr=c["accuracy_std"].fillna(0), color=colors[row],
                    capsize=3, label=name, **style(bool(c["supervised"].iloc[0])))
    bad = single[single["violations"] > 0]
    if len(bad):
        ax.scatter(bad["budget_value"], bad["accuracy_mean"], s=160, facecolors="none", edgecolors="red",
                   label="a client exceeded its budget", zorder=3)
    ax.set_xscale("log", base=2)
    budgets = sorted(single["budget_value"].unique())
    ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
    ax.set(xlabel=BUDGET_AXIS, ylabel=ACCURACY_AXIS, title="Accuracy vs memory budget (error bars: std over seeds)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        fig.legend(fontsize=8, loc="outside right center")
    return fig


def accuracy_vs(curves, x: str, xlabel: str, colors: dict[str, str]) -> Figure:
    """One panel per budget, one line per method: the mean over seeds at each round, and a band from the lowest to
    the highest seed."""
    budgets = budget_order(curves["budget"])
    cols = min(max(len(budgets), 1), 4)
    rows = -(-max(len(budgets), 1) // cols)
    fig = Figure(figsize=(3.5 + 3.6 * cols, 0.6 + 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True).ravel()
    for ax, budget in zip(axes, budgets):
        for row, c in curves[curves["budget"] == budget].groupby("row", sort=False):
            by_round = c.groupby("round")
            mean = by_round[[x, "accuracy"]].mean()
            ax.plot(mean[x], mean["accuracy"], color=colors[row], **style(bool(c["supervised"].iloc[0])),
                    markersize=3, label=row + ("" if c["supervised"].iloc[0] else " (linear probe)"))
            if c["folder"].nunique() > 1:  # the band: lowest to highest seed at each round
                ax.fill_between(mean[x], by_round["accuracy"].min(), by_round["accuracy"].max(),
                                color=colors[row], alpha=0.2, linewidth=0)
        ax.set_title(f"memory budget {budget}")
        ax.grid(alpha=0.3)
    for ax in axes[len(budgets):]:
        ax.set_visible(False)
    fig.supxlabel(xlabel)
    fig.supylabel("test accuracy (mean over seeds; band: lowest to highest seed)")
    handles = {h.get_label(): h for ax in axes for h in ax.get_lines()}
    if handles:
        fig.legend(handles.values(), handles.keys(), fontsize=8, loc="outside right center")
    fig.suptitle(f"Accuracy vs {xlabel.split(' (')[0]}")
    return fig
