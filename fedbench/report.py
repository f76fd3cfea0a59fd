"""Tables built once as DataFrames; rich, CSV and Markdown are thin renderers of them."""
from __future__ import annotations

import pandas as pd
from rich.table import Table

from fedbench.engine import Run
from fedbench.plan import Plan

MB = 1e6


def plan_row(run: Run, plan: Plan) -> dict:
    """Measured cost of one configuration: memory (max over steps), FLOPs per sample, bytes."""
    prof = run.profiler
    steps = [prof.measure(plan, i) for i in range(len(plan.steps))]
    worst = max(steps, key=lambda m: m.peak)
    down, up = prof.bytes_of(plan)
    row = {
        "config": plan.label, "steps": len(plan.steps),
        "peak_MB": worst.peak / MB, "of_full": worst.peak / run.ctx.full_memory,
        "params_MB": worst.params / MB, "grads_MB": worst.grads / MB, "optimizer_MB": worst.optimizer / MB,
        "activations_MB": worst.activations / MB, "batch_MB": worst.batch / MB,
        "train_GFLOPs_per_sample": sum(prof.train_flops(plan, i) for i in range(len(plan.steps))) / 1e9,
        "MB_down": down / MB, "MB_up": up / MB,
    }
    if worst.cuda_peak is not None:
        row["cuda_peak_MB"] = worst.cuda_peak / MB
    return row


def profile_rows(run: Run) -> pd.DataFrame:
    """The full model (budget 1 by definition), then each of the method's configurations."""
    rows = [{"budget": 1.0, **plan_row(run, run.method.full_plan()), "note": "defines budget 1"}]
    for info, plan in run.method.schedule():
        row = {"budget": info.get("budget"), **plan_row(run, plan), "note": info.get("note", "")}
        if row["budget"] is not None:
            row["fits"] = row["of_full"] <= row["budget"] + 1e-12
        rows.append(row)
    return pd.DataFrame(rows)


def render_profile(run: Run, rows: pd.DataFrame) -> Table:
    cfg = run.config
    table = Table(title=f"{cfg.method}: {cfg.model} on {cfg.dataset}, batch {cfg.batch_size}, "
                        f"{run.ctx.device.type} live-tensor peak (MB = 1e6 B)")
    columns = [c for c in rows.columns if c not in ("params_MB", "grads_MB", "optimizer_MB", "batch_MB")]
    for c in columns:
        table.add_column(c, justify="left" if c in ("config", "note") else "right")
    for _, r in rows.iterrows():
        table.add_row(*(fmt(r[c]) for c in columns))
    return table


def fmt(v) -> str:
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
