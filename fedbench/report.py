"""Tables built once as DataFrames; rich, CSV and Markdown are thin renderers of them."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path

import pandas as pd
from rich.console import Group
from rich.table import Table
from rich.text import Text

from fedbench.budget import DEVICES, budget_order, label
from fedbench.config import EXECUTION, FIELDS, RunConfig, load_toml
from fedbench.devices import size
from fedbench.engine import Run
from fedbench.errors import ConfigError
from fedbench.observers import Inconsistent, check_rounds, read_logs, whole_lines
from fedbench.plan import Plan
from fedbench.plots import write_plots
from fedbench.records import Summary
from fedbench.registry import get_method

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
        "train_GFLOPs_per_sample": sum(share * prof.train_flops(plan, i)
                                       for i, share in enumerate(run.method.step_shares(plan))) / 1e9,
        "MB_down": down / MB, "MB_up": up / MB,
    }
    if worst.cuda_peak is not None:
        row["cuda_peak_MB"] = worst.cuda_peak / MB
    return row


def profile_rows(run: Run) -> pd.DataFrame:
    """The method's full model (budget 1, unless it needs more than FedAvg's), the budgets below the method's floor,
    then its configurations."""
    full = plan_row(run, run.method.full_plan())
    defines = abs(full["of_full"] - 1) < 1e-9
    note = ("defines budget 1" if defines else
            f"the method's full model; budget 1 is FedAvg's, {run.ctx.full_memory / MB:.4g} MB")
    rows = [{"budget": 1.0 if defines else None, **full, "note": note}]
    rows += [{"budget": b, "config": below(floor), "floor": floor} for b, floor in run.infeasible.items()]
    for info, plan in run.method.schedule():
        row = {"budget": info.get("budget"), **plan_row(run, plan), "note": info.get("note", "")}
        if row["budget"] is not None:
            row["fits"] = row["of_full"] <= row["budget"] + 1e-12
        rows.append(row)
    return pd.DataFrame(rows).astype({"steps": "Int64"})  # an infeasible row has none


def render_profile(run: Run, rows: pd.DataFrame) -> Table:
    cfg = run.config
    table = Table(title=f"{cfg.method}: {cfg.model} on {cfg.dataset}, batch {cfg.batch_size}, "
                        f"{run.ctx.device.type} live-tensor peak (MB = 1e6 B)")
    columns = [c for c in rows.columns if c not in ("params_MB", "grads_MB", "optimizer_MB", "batch_MB", "floor")]
    for c in columns:
        table.add_column(c, justify="left" if c in ("config", "note") else "right")
    for _, r in rows.iterrows():
        table.add_row(*(fmt(r[c]) for c in columns))
    return table


def fmt(v) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and pd.isna(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# --- comparison of finished runs (fedbench compare / report) ------------------------------------
RUN_MARKERS = ("config.toml", "summary.json", "rounds.csv", "failed.json")
NOT_SETTINGS = {"method", "seed", "memory_budget", "eval_initial"} | EXECUTION  # eval_initial: the same training
CELL_KEYS = ["model", "row", "supervised", "budget"]
RUN_COLUMNS = ["folder", "status", "problem", "method", "model", "dataset", "seed", "budget", "budget_value", "rounds", "final_accuracy",
               "diverged", "unbudgeted", "violations", "dropped", "floor", "warnings", "peak_MB", "peak_of_budget", "train_GFLOPs", "MB_down", "MB_up", "wall_s", "evaluation",
               "sim_s", "target_s", "best_accuracy", "initial_accuracy", "left_out", "gain", "precision", "device",
               "settings", "path"]
GAIN_ROUNDS = 50  # has the curve flattened: the final accuracy minus the evaluation this many rounds earlier


@dataclass
class Comparison:
    """Rows built once from run folders; every table, CSV, Markdown file and plot renders these."""

    runs: pd.DataFrame    # one per run folder: status ok | infeasible | failed | incomplete | corrupt, problem, measurements
    curves: pd.DataFrame  # one per (ok run, round): accuracy, cumulative MB down + up, simulated seconds
    cells: pd.DataFrame   # one per (row, budget): mean / std over seeds, worst memory, mean costs, simulated time
    pairs: pd.DataFrame   # one per (budget, row a, row b): seeds both finished, a's wins, mean a - b (``pairwise``)
    target: float | None = None  # --target-accuracy of the time-to-accuracy table


def compare_runs(root: str | Path, target: float | None = None) -> Comparison:
    """Read every run folder under ``root`` (recursively); raises ConfigError if there is none. ``target``: the
    accuracy whose first simulated time (runs with ``--devices``) the time-to-accuracy table shows."""
    if target is not None and not 0 < target <= 1:
        raise ConfigError("--target-accuracy", f"{target!r} not allowed; allowed: a number in (0, 1]")
    root = Path(root)
    folders = sorted({p.parent for name in RUN_MARKERS for p in root.rglob(name)}) if root.is_dir() else []
    if not folders:
        raise ConfigError("DIR", f"no fedbench run folders (config.toml, summary.json) under {root}")
    rows, curves = [], []
    for folder in folders:
        row, curve = read_run(folder, target)
        row["folder"] = folder.relative_to(root).as_posix()
        rows.append(row)
        if curve is not None:
            curves.append(curve.assign(folder=row["folder"]))
    runs = label_rows(pd.DataFrame(rows, columns=RUN_COLUMNS))
    keys = runs[["folder", "model", "row", "budget", "supervised"]]
    curves = (pd.concat(curves).merge(keys, on="folder") if curves
              else pd.DataFrame(columns=[*keys, "round", "accuracy", "cum_MB", "sim_s"]))
    pairs = pairwise(runs)
    return Comparison(runs, curves, cell_stats(runs, pairs), pairs, target)


def run_status(folder: Path) -> str:
    """ok | infeasible | failed | incomplete | corrupt: how ``report`` lists the run folder (``compare`` reruns
    all but ok)."""
    return read_run(Path(folder))[0]["status"]


def read_run(folder: Path, target: float | None = None) -> tuple[dict, pd.DataFrame | None]:
    """One run folder -> (its row, its per-round curve or None when it is not a finished, consistent run)."""
    row: dict = {"path": str(folder.resolve())}
    try:
        config = read_json_or_toml(folder / "config.toml")
        if not isinstance(config.get("method"), str):
            raise Inconsistent(f"config.toml method {config.get('method')!r} is not a method name")
        budget = budget_of(config)
        row |= {"method": config.get("method"), "model": str(config.get("model", "?")),
                "dataset": str(config.get("dataset", "?")), "seed": config.get("seed"), "budget": "+".join(map(label, budget)),
                "budget_value": budget[0] if len(budget) == 1 and not isinstance(budget[0], str) else float("nan"),
                "settings": {k: v for k, v in config.items() if k not in NOT_SETTINGS}}
        if not (folder / "summary.json").exists():
            return row | unfinished(folder, config), None
        summary = read_json_or_toml(folder / "summary.json")
        rounds, clients = read_logs(folder, clients=False)
        consistent(config, summary, rounds, clients)
        rollups = client_rollups(summary, rounds, clients)
    except Inconsistent as e:
        return row | {"status": "corrupt", "problem": str(e)}, None
    mb = (rounds["bytes_down"] + rounds["bytes_up"]).cumsum() / MB
    sim = rounds["sim_time_s"] if "sim_time_s" in rounds else pd.Series(float("nan"), index=rounds.index)
    reached = rounds.loc[rounds["accuracy"] >= target, "sim_time_s"] if target is not None and "sim_time_s" in rounds else ()
    if len(budget) == 1 and budget[0] != DEVICES:  # an absolute size as the fraction it was (one for all clients)
        row["budget_value"] = rollups.pop("budget_fraction")
    return row | {
        "status": "ok", "problem": "", "rounds": summary["rounds"], "final_accuracy": summary["final_accuracy"],
        "evaluation": summary.get("evaluation", ""), "violations": summary["violations"],
        "dropped": summary.get("dropped_client_rounds", 0) / max(1, int(rounds["clients"].sum())),
        "peak_MB": summary["peak_max_bytes"] / MB, "peak_of_budget": rollups["peak_of_budget"],
        "train_GFLOPs": summary["train_flops_per_client_round"] / 1e9,
        "MB_down": summary["bytes_down_per_client_round"] / MB, "MB_up": summary["bytes_up_per_client_round"] / MB,
        "wall_s": summary.get("wall_s"), "diverged": summary.get("diverged_round"),
        "unbudgeted": summary.get("unbudgeted") is True,
        "warnings": " | ".join(str(w) for w in summary.get("warnings") or []),
        "sim_s": float(sim.iloc[-1]), "target_s": float(reached.iloc[0]) if len(reached) else float("nan"),
        "best_accuracy": summary.get("best_accuracy"),
        "initial_accuracy": summary.get("initial_accuracy", float("nan")),  # --eval-initial
        "left_out": rollups["left_out"], "gain": gain(rounds), "precision": summary.get("precision", "?"),
        "device": device_of(summary),
    }, pd.DataFrame({"round": rounds["round"], "accuracy": rounds["accuracy"], "cum_MB": mb, "sim_s": sim})


def device_of(summary: dict) -> str:
    """``cpu (Intel(R) Xeon(R) Processor)``: the device type and the name provenance recorded."""
    device, name = str(summary.get("device", "?")), (summary.get("provenance") or {}).get("device_name")
    return f"{device} ({name})" if name else device


def gain(rounds: pd.DataFrame) -> float:
    """The last evaluation's accuracy minus the evaluation GAIN_ROUNDS rounds before it (NaN without one)."""
    evaluated = rounds.dropna(subset=["accuracy"]).set_index("round")["accuracy"]
    if evaluated.empty or evaluated.index[-1] - GAIN_ROUNDS not in evaluated.index:
        return float("nan")
    return float(evaluated.iloc[-1] - evaluated[evaluated.index[-1] - GAIN_ROUNDS])


def client_rollups(summary: dict, rounds: pd.DataFrame, clients: pd.DataFrame | None) -> dict:
    """The largest peak / budget, the share of sampled client-rounds left out (excluded by the method, offline,
    out of memory or late) and the first client group's budget as a fraction: from summary.json, or from
    clients.csv for a run whose summary.json predates those keys."""
    sampled = max(1, int(rounds["clients"].sum()))
    if summary.get("of_budget_max") is not None and "budget_fractions" in summary:
        peak, fractions = summary["of_budget_max"], summary["budget_fractions"]
        if not isinstance(peak, (int, float)) or not isinstance(fractions, list):
            raise Inconsistent(f"summary.json of_budget_max {peak!r} or budget_fractions {fractions!r} is malformed")
        left_out = summary.get("excluded_client_rounds", 0) + summary.get("late_client_rounds", 0)
        return {"peak_of_budget": float(peak), "left_out": left_out / sampled,
                "budget_fraction": float(fractions[0]) if fractions else float("nan")}
    if clients is None:
        raise Inconsistent("summary.json lacks of_budget_max and budget_fractions (an older fedbench wrote it) "
                           "and there is no clients.csv to take them from")
    out = pd.Series(False, index=clients.index)
    for column in ("excluded", "dropped", "late"):   # (older runs lack the later columns)
        if column in clients:
            out |= clients[column].astype(bool)
    return {"peak_of_budget": float((clients["peak_bytes"] / clients["budget_bytes"]).max()),
            "left_out": float(out.mean()), "budget_fraction": float(clients["budget"].iloc[0])}


def budget_of(config: dict) -> tuple[float | str, ...]:
    from fedbench.config import parse_budget

    try:
        return parse_budget(config.get("memory_budget", [1.0]))
    except ConfigError:
        raise Inconsistent(f"config.toml memory-budget {config.get('memory_budget')!r} is not a list of budgets") from None


def read_json_or_toml(path: Path) -> dict:
    try:
        data = json.loads(path.read_text()) if path.suffix == ".json" else load_toml(path)
    except (OSError, ValueError) as e:  # ConfigError and JSONDecodeError are ValueErrors
        raise Inconsistent(f"{path.name} unreadable ({getattr(e, 'message', e)})") from None
    if not isinstance(data, dict):
        raise Inconsistent(f"{path.name} is not a table")
    return data


def unfinished(folder: Path, config: dict) -> dict:
    failed = folder / "failed.json"
    if failed.exists():
        record = read_json_or_toml(failed)
        floor = record.get("infeasible_floor")
        if isinstance(floor, (int, float)) and not isinstance(floor, bool):
            return {"status": "infeasible", "problem": str(record.get("error", "?")), "floor": float(floor)}
        return {"status": "failed", "problem": str(record.get("error", "?"))}
    try:
        done = len(whole_lines(folder / "rounds.csv"))
    except (OSError, ValueError):
        done = 0
    return {"status": "incomplete",
            "problem": f"no summary.json; {done} of {config.get('rounds', '?')} rounds in rounds.csv"}


def consistent(config: dict, summary: dict, rounds: pd.DataFrame, clients: pd.DataFrame | None) -> None:
    """Raise Inconsistent unless summary.json, rounds.csv and clients.csv (where kept) describe the same finished
    run: it has the required keys (``fedbench.records.Summary``), its numbers are numbers (int fields ints; empty only
    where they may be)."""
    required, numeric, specs = Summary.required(), Summary.numeric(), Summary.specs()
    missing = [k for k in required if k not in summary]
    if missing:
        raise Inconsistent(f"summary.json lacks {', '.join(missing)}")
    for key in ("method", "seed", "memory_budget"):
        if summary[key] != config.get(key):
            raise Inconsistent(f"summary.json {key} {summary[key]!r} differs from config.toml {config.get(key)!r}")
    for key in (k for k in required if k in numeric):
        value = summary[key]
        number = isinstance(value, int if numeric[key] is int else (int, float)) and not isinstance(value, bool)
        if not number and not (specs[key].empty and value is None):
            raise Inconsistent(f"summary.json {key} {value!r} is not a number")
    check_rounds(rounds, clients, summary["rounds"], "summary.json")
    evaluated = rounds["accuracy"].dropna()
    last = float(evaluated.iloc[-1]) if len(evaluated) else None
    final = summary["final_accuracy"]
    if (last is None) != (final is None) or (last is not None and abs(last - final) > 1e-9):
        raise Inconsistent(f"rounds.csv ends at accuracy {last}, summary.json says {final}")
    violations = int(rounds["violations"].sum())
    if violations != summary["violations"]:
        raise Inconsistent(f"rounds.csv has {violations} violations, summary.json says {summary['violations']}")


def label_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """Row label = method, plus the settings that differ between that method's runs (never averaged over)
    and the run settings (RunConfig fields) where the run differs from the most common value of all runs; a
    setting the run leaves unset (e.g. no --deadline) adds nothing, and one its config.toml lacks (written
    before the setting existed) counts as its default."""
    def supervised(method, evaluation) -> bool:
        try:
            return get_method(method).supervised
        except ConfigError:  # a method not registered here: judge by what its summary says
            return "linear-probe" not in str(evaluation)

    defaults = {f.name: f.default for f in fields(RunConfig)  # each model has tables of its own
                if f.name in FIELDS - NOT_SETTINGS - {"model"}}
    runs = runs.assign(settings=[defaults | s if isinstance(s, dict) else s for s in runs["settings"]])
    known = [s for s in runs["settings"] if isinstance(s, dict)]
    common = {k: Counter(repr(s.get(k)) for s in known).most_common(1)[0][0] for k in defaults if known}
    labels = []
    for method, settings in zip(runs["method"], runs["settings"]):
        if not isinstance(settings, dict):
            labels.append(None)
            continue
        others = [s for m, s in zip(runs["method"], runs["settings"]) if m == method and isinstance(s, dict)]
        varying = {k for k in {k for s in others for k in s} - {"model"} if len({repr(s.get(k)) for s in others}) > 1}
        unusual = {k for k in common if repr(settings.get(k)) != common[k]}
        labels.append(method + "".join(f" {k.replace('_', '-')}={settings[k]}" for k in sorted(varying | unusual)
                                       if settings.get(k) is not None))  # a setting not given: the plain row
    return runs.assign(row=labels, supervised=[supervised(m, e) for m, e in zip(runs["method"], runs["evaluation"])])


def has_text(column: pd.Series) -> pd.Series:
    """Which entries of a text column (all missing: read as float) hold some text."""
    return column.notna() & (column.astype(str) != "")


def cell_stats(runs: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """Runs per (row, budget): how many finished (seeds), failed or are missing (runs - seeds - failed);
    accuracy mean/std over the finished seeds, worst memory, mean costs, the mean gain over the last GAIN_ROUNDS
    rounds and the paired ``order`` in its table column (``orderings``). Only cells with a finished or an
    infeasible run: a cell of failed, incomplete or corrupt runs alone is no row of the tables (``problems``
    lists its runs)."""
    done = runs[runs["method"].notna()]
    done = done.assign(ok=done["status"] == "ok", failed=done["status"] == "failed",
                       above_initial=done["final_accuracy"] > done["initial_accuracy"],  # False where not evaluated
                       infeasible=done["status"] == "infeasible",
                       error=done["problem"].where(done["status"] == "failed"), diverged=done["diverged"].notna(),
                       unbudgeted=done["unbudgeted"].eq(True))
    cells = done.groupby(CELL_KEYS).agg(
        dataset=("dataset", "first"), budget_value=("budget_value", "first"), runs=("ok", "size"), seeds=("ok", "sum"), failed=("failed", "sum"),
        infeasible=("infeasible", "sum"), floor=("floor", "max"),
        warned=("warnings", lambda w: int(has_text(w).sum())),
        error=("error", "first"), diverged=("diverged", "sum"), unbudgeted=("unbudgeted", "any"),
        accuracy_mean=("final_accuracy", "mean"), accuracy_std=("final_accuracy", "std"),
        peak_MB=("peak_MB", "max"), peak_of_budget=("peak_of_budget", "max"), train_GFLOPs=("train_GFLOPs", "mean"),
        MB_down=("MB_down", "mean"), MB_up=("MB_up", "mean"), violations=("violations", "sum"),
        dropped=("dropped", "max"), sim_s=("sim_s", "mean"), target_s=("target_s", "mean"),
        reached=("target_s", "count"), best_accuracy=("best_accuracy", "max"),
        initial_accuracy=("initial_accuracy", "mean"), above_initial=("above_initial", "sum"),
        left_out=("left_out", "mean"), gain=("gain", "mean")).reset_index()
    cells = cells[(cells["seeds"] > 0) | (cells["infeasible"] > 0)]
    cells = cells.assign(order=orderings(cells, pairs))
    return cells.sort_values(["supervised", "model", "row", "budget_value", "budget"],
                             ascending=[False, True, True, True, True], ignore_index=True)


def pairwise(runs: pd.DataFrame) -> pd.DataFrame:
    """Every ordered pair of rows (a, b) of one table column (model, budget) compared seed by seed: the seeds both
    finished without diverging, in how many a's final accuracy is above b's, and the mean of a - b. The seeds share
    the partition and the client sampling across methods, so a paired comparison is the fair one."""
    ok = runs[(runs["status"] == "ok") & runs["diverged"].isna() & runs["final_accuracy"].notna()]
    out = []
    for key, col in ok.groupby(["model", "supervised", "budget"], sort=False):
        acc = col.pivot_table(index="seed", columns="row", values="final_accuracy", aggfunc="first")
        for a, b in ((a, b) for a in acc.columns for b in acc.columns if a != b):
            both = acc[[a, b]].dropna()
            if len(both):
                diff = both[a] - both[b]
                out.append(dict(zip(("model", "supervised", "budget"), key), a=a, b=b, seeds=len(both),
                                wins=int((diff > 0).sum()), mean_diff=float(diff.mean())))
    return pd.DataFrame(out, columns=["model", "supervised", "budget", "a", "b", "seeds", "wins", "mean_diff"])


def orderings(cells: pd.DataFrame, pairs: pd.DataFrame) -> pd.Series:
    """Per table column (model, budget) of two cells or more and several seeds: ``best`` on the cell of highest mean
    accuracy, ``below`` on every cell whose accuracy is below the best one's in each of at least two seeds they share
    (``pairwise``), else empty. Cells that diverged take no part."""
    order = pd.Series("", index=cells.index, dtype=object)
    fair = cells[(cells["seeds"] > 0) & (cells["diverged"] == 0)]
    for (model, supervised, budget), col in fair.groupby(["model", "supervised", "budget"], sort=False):
        best = col["accuracy_mean"].idxmax()
        if col.at[best, "seeds"] < 2 or len(col) < 2:
            continue
        order[best] = "best"
        lead = pairs[(pairs["model"] == model) & (pairs["supervised"] == supervised) & (pairs["budget"] == budget)
                     & (pairs["a"] == cells.at[best, "row"])].set_index("b")
        for i, row in col["row"].items():
            if row in lead.index and 2 <= lead.at[row, "seeds"] == lead.at[row, "wins"]:
                order[i] = "below"
    return order


def over(c) -> str:
    """`` !``: a client exceeded its budget."""
    return " !" if c.violations > 0 else ""


def marks(c) -> str:
    """``over``; `` (dropped X%)``: under ``--over-budget drop``, the largest share of sampled client-rounds that ran
    out of memory; then `` *``: the run warned that its accuracy may not measure the method."""
    return over(c) + (f" (dropped {c.dropped:.0%})" if c.dropped > 0 else "") + (" *" if c.warned > 0 else "")


def fmt_accuracy(c) -> str:
    """mean ± std over seeds; (finished/all) when some runs of the cell did not finish; infeasible (floor X): the
    budget is below the method's measured floor on this model (none finished); diverged (training stopped at a
    NaN/inf loss; (diverged/finished) when not every seed did); (untrained X): the same evaluation of the initial
    model (--eval-initial), mean over seeds, and with several seeds in how many the final accuracy is above the
    seed's own untrained one; ▲ the best mean of its column, ▼ below that best in every seed they
    share (at least two; ``orderings``)."""
    if c.seeds == 0:
        return infeasible(c)
    if c.diverged:
        return "diverged" + (f" ({c.diverged}/{c.seeds})" if c.diverged < c.seeds else "")
    spread = f" ± {c.accuracy_std:.4f}" if c.seeds > 1 else ""
    part = f" ({c.seeds}/{c.runs})" if c.seeds < c.runs else ""
    above = f", above it in {c.above_initial}/{c.seeds}" if c.seeds > 1 else ""
    untrained = f" (untrained {c.initial_accuracy:.4f}{above})" if pd.notna(c.initial_accuracy) else ""
    order = {"best": " ▲", "below": " ▼"}.get(c.order, "")
    return f"{c.accuracy_mean:.4f}{spread}{part}{untrained}{order}{marks(c)}"


def infeasible(c) -> str:
    return below(c.floor) if c.infeasible else ""


def below(floor: float) -> str:
    return f"infeasible (floor {floor:.3f})"


def fmt_memory(c) -> str:
    """Peak MB (peak / budget, or unbudgeted: a method that fits nothing to a budget, none counted over it)."""
    if c.seeds == 0:
        return infeasible(c)
    return f"{c.peak_MB:.3g} ({'unbudgeted' if c.unbudgeted else f'{c.peak_of_budget:.2f}'}){over(c)}"


TABLES = {  # file stem: (title, cell text, which rows: True supervised, False self-supervised, None all)
    "accuracy": ("Final top-1 accuracy, mean ± std over seeds (▲ = best mean of the column, ▼ = below it in every "
                 "paired seed, at least 2; ! = a client exceeded its memory budget, dropped X% = client-rounds that ran "
                 "out of memory under --over-budget drop, * = see Warnings)",
                 fmt_accuracy, True),
    "accuracy_ssl": ("Self-supervised methods: final linear-probe accuracy (see runs.csv evaluation), mean ± std "
                     "over seeds (! = over budget)", fmt_accuracy, False),
    "gain": (f"Accuracy gain over the last {GAIN_ROUNDS} rounds (final minus the evaluation {GAIN_ROUNDS} rounds "
             "earlier), mean over seeds: near 0 = the curve has flattened; - = no evaluation that early",
             lambda c: "-" if c.seeds == 0 or pd.isna(c.gain) else f"{c.gain:+.4f}", None),
    "memory": ("Peak client training memory, MB, max over client-rounds (in brackets: peak / budget, max)",
               fmt_memory, None),
    "flops": ("Training GFLOPs per client-round (mean over seeds)",
              lambda c: "-" if c.seeds == 0 else f"{c.train_GFLOPs:.3g}", None),
    "communication": ("MB down / up per client-round (mean over seeds)",
                      lambda c: "-" if c.seeds == 0 else f"{c.MB_down:.3g} / {c.MB_up:.3g}", None),
}


def duration(seconds: float) -> str:
    """Simulated seconds as s, min or h."""
    return f"{seconds:.3g} s" if seconds < 60 else f"{seconds / 60:.3g} min" if seconds < 3600 else f"{seconds / 3600:.3g} h"


def fmt_time_to(c) -> str:
    """Simulated time until the first evaluation at or above the target, mean over the seeds that reached it."""
    if c.seeds == 0:
        return infeasible(c)
    if c.reached == 0:
        return f"not reached (best {c.best_accuracy:.4f})"
    return duration(c.target_s) + (f" ({c.reached}/{c.seeds} seeds)" if c.reached < c.seeds else "") + marks(c)


def time_tables(comp: Comparison) -> dict[str, tuple[str, object, None]]:
    """The simulated-time tables, for comparisons whose runs had --devices (time-to-accuracy with a target)."""
    if not comp.cells["sim_s"].notna().any():
        return {}
    out = {}
    if comp.target is not None:
        out["time_to_accuracy"] = (f"Simulated time to reach {comp.target:g} test accuracy (first evaluation at or "
                                   "above it; mean over the seeds that reached it; --devices time model)", fmt_time_to, None)
    out["simulated_time"] = ("Simulated time of the whole run (sum of round times: slowest client, or the deadline)",
                             lambda c: "-" if c.seeds == 0 else duration(c.sim_s), None)
    out["left_out"] = ("Share of the sampled client-rounds left out: excluded by the method, offline, out of memory "
                       "(--over-budget drop) or late (--deadline); mean over seeds",
                       lambda c: "-" if c.seeds == 0 else f"{c.left_out:.0%}", None)
    return out


def protocol(runs: pd.DataFrame, cells: pd.DataFrame) -> str:
    """What a table's finished runs were, for its title: rounds, seeds per cell, evaluation schedule, precision and
    device, each as a range or a list where they differ (the rows already split runs whose settings differ)."""
    ok = runs[runs["status"] == "ok"]
    if ok.empty:
        return "no finished run"

    def span(values, unit: str) -> str:
        low, high = int(min(values)), int(max(values))
        return f"{low}{f'-{high}' if high > low else ''} {unit}{'s' if high > 1 else ''}"

    every = {s.get("eval_every") for s in ok["settings"] if isinstance(s, dict)} - {None}
    evaluated = [f"evaluated every {' or '.join(map(str, sorted(every)))} rounds and after the last"] if every else []
    return ", ".join([span(ok["rounds"], "round"), span(cells.loc[cells["seeds"] > 0, "seeds"], "seed"), *evaluated,
                      " + ".join(sorted(set(ok["precision"]))), " + ".join(sorted(set(ok["device"])))])


def pivots(comp: Comparison) -> dict[str, tuple[str, pd.DataFrame]]:
    """Rows = methods (and settings that vary), columns = memory budgets; one set of tables per model (budgets
    are fractions of that model's full training memory, so no table holds two models); only tables with rows.
    File stems get a ``-MODEL`` suffix when the comparison holds more than one model. An absolute budget's
    column shows the fraction it was (``8MB (= 0.194)``)."""
    out = {}
    budgets = budget_order(comp.cells["budget"])
    models = list(comp.cells["model"].unique())
    for model in models:
        of_model = comp.cells[comp.cells["model"] == model]
        data = ", ".join(sorted(set(of_model["dataset"])))
        fraction = of_model.dropna(subset=["budget_value"]).groupby("budget")["budget_value"].first()
        header = {b: f"{b} (= {fraction[b]:.3g})" if size(b) is not None and b in fraction else b for b in budgets}
        for name, (title, text, kind) in (TABLES | time_tables(comp)).items():
            cells = of_model if kind is None else of_model[of_model["supervised"] == kind]
            if cells.empty:
                continue
            table = (cells.assign(text=[text(c) for c in cells.itertuples()])
                     .pivot(index="row", columns="budget", values="text")
                     .reindex(index=cells["row"].unique(), columns=[b for b in budgets if b in set(cells["budget"])])
                     .fillna("-").rename(columns=header))
            if (table == "-").all().all():  # nothing to show (e.g. no run long enough for the gain)
                continue
            table.index.name, table.columns.name = "method", None
            runs = comp.runs[(comp.runs["model"] == model) & comp.runs["row"].isin(cells["row"])]
            out[name if len(models) == 1 else f"{name}-{model}"] = (
                f"{title}; {model} on {data}; {protocol(runs, cells)}", table)
    return out


def paired_tables(comp: Comparison) -> list[tuple[str, pd.DataFrame]]:
    """For each table column (model, budget) of two cells or more, one of them of two seeds or more: the ranking
    (accuracy, the paired comparison with the best cell, the gain over the last GAIN_ROUNDS rounds, peak / budget)
    and the pairwise table (row a beats column b in k of n shared seeds, mean a - b)."""
    out = []
    cells = comp.cells[(comp.cells["seeds"] > 0) & (comp.cells["diverged"] == 0)]
    for (model, supervised, budget), col in cells.groupby(["model", "supervised", "budget"], sort=False):
        if col["seeds"].max() < 2 or len(col) < 2:
            continue
        col = col.sort_values("accuracy_mean", ascending=False)
        pairs = comp.pairs[(comp.pairs["model"] == model) & (comp.pairs["supervised"] == supervised)
                           & (comp.pairs["budget"] == budget)]
        best = col["row"].iloc[0]
        versus = pairs[pairs["a"] == best].set_index("b")

        def against(row: str) -> str:
            if row == best:
                return "best"
            if row not in versus.index:
                return "no shared seed"
            v = versus.loc[row]
            return f"below in {v.wins}/{v.seeds} seeds, {-v.mean_diff:+.4f}"

        ranking = pd.DataFrame({"method": col["row"], "accuracy": [fmt_accuracy(c) for c in col.itertuples()],
                                "seeds": col["seeds"], "vs best (paired by seed)": col["row"].map(against),
                                f"gain, last {GAIN_ROUNDS} rounds": [fmt(g) if pd.isna(g) else f"{g:+.4f}"
                                                                      for g in col["gain"]],
                                "peak / budget": [fmt_memory(c) for c in col.itertuples()]}).set_index("method")
        matrix = (pairs.assign(text=[f"{w}/{n}, {d:+.4f}" for w, n, d in zip(pairs["wins"], pairs["seeds"],
                                                                             pairs["mean_diff"])])
                  .pivot(index="a", columns="b", values="text").reindex(index=col["row"], columns=col["row"])
                  .fillna("-"))
        matrix.index.name, matrix.columns.name = "a (row) vs b (column)", None
        where = f"{model}, budget {budget}, {col['seeds'].max()} seeds"
        out += [(f"Ranking at {where} (paired by seed: the seeds share partition and client sampling)", ranking),
                (f"Pairwise at {where}: a beats b in k of n shared seeds, mean a - b", matrix)]
    return out


def problems(comp: Comparison) -> pd.DataFrame:
    """Runs that are neither finished nor a measured infeasibility (those show in the tables)."""
    return comp.runs.loc[~comp.runs["status"].isin(["ok", "infeasible"]), ["folder", "status", "problem"]]


def render_comparison(comp: Comparison) -> list[Group]:
    """Each table under its title (a rich title would wrap at the table's width)."""
    tables = []
    for title, pivot in pivots(comp).values():
        table = Table()
        table.add_column("method")
        for budget in pivot.columns:
            table.add_column(f"budget {budget}", justify="right")
        for method, values in pivot.iterrows():
            table.add_row(method, *values)
        tables.append(Group(Text(title, style="bold"), table))
    bad = problems(comp)
    if len(bad):
        table = Table("folder", "status", "problem")
        for r in bad.itertuples():
            table.add_row(r.folder, r.status, r.problem)
        tables.append(Group(Text("Runs not in the tables", style="bold red"), table))
    return tables


def markdown(frame: pd.DataFrame) -> str:
    frame = frame.reset_index()
    cells = [[str(c) for c in frame.columns]]
    cells += [[str(v).replace("|", "\\|") for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join([lines[0], "|" + "---|" * len(frame.columns), *lines[1:]]) + "\n"


def write_comparison(comp: Comparison, folder: str | Path) -> list[Path]:
    """runs.csv (one row per run), cells.csv (per method and budget), one CSV per table, report.md, plots."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("*.csv"), *folder.glob("*.png"), *folder.glob("report.md")]:
        old.unlink()  # a previous report's tables (e.g. of other models) must not linger beside these
    paths = [folder / "runs.csv", folder / "cells.csv", folder / "curves.csv"]
    comp.runs.drop(columns=["settings", "path"]).to_csv(paths[0], index=False)
    comp.cells.to_csv(paths[1], index=False)
    comp.curves.to_csv(paths[2], index=False)
    doc = ["# fedbench comparison\n", "Budgets are fractions of the full model's measured training memory "
           "(FedAvg, same batch size); MB = 1e6 B.\n"]
    for name, (title, pivot) in pivots(comp).items():
        pivot.to_csv(folder / f"{name}.csv")
        paths.append(folder / f"{name}.csv")
        doc += [f"## {title}\n", markdown(pivot)]
    comp.pairs.to_csv(folder / "pairwise.csv", index=False)
    paths.append(folder / "pairwise.csv")
    for title, table in paired_tables(comp):
        doc += [f"## {title}\n", markdown(table)]
    evaluation = comp.runs[comp.runs["status"] == "ok"].drop_duplicates(["row", "evaluation"])
    doc += ["## Evaluation\n", "".join(f"- {r.row}: {r.evaluation}\n" for r in evaluation.itertuples())]
    warned = comp.runs[has_text(comp.runs["warnings"])].drop_duplicates(["row", "budget", "warnings"])
    if len(warned):
        doc += ["## Warnings (cells marked *)\n",
                "".join(f"- {r.row}, budget {r.budget}: {r.warnings}\n" for r in warned.itertuples())]
    bad = problems(comp)
    if len(bad):
        doc += ["## Runs not in the tables\n", markdown(bad.set_index("folder"))]
    paths.append(folder / "report.md")
    paths[-1].write_text("\n".join(doc))
    return paths + write_plots(comp, folder)
