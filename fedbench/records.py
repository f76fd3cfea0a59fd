"""What a run records, declared once: a client-round (a row of clients.csv), a round (a row of rounds.csv) and the run
(summary.json).

Each field declares its unit, a one-line description, when it is written and when it may be empty, whether every run
folder has it, and, for a round's totals of its client-rounds, how it rolls them up. The engine builds the records
through these types, so it writes declared fields only and every field it must; the CSV columns and summary keys, the
checks of a run folder (``observers.read_logs``, ``report.consistent``), the rows a resumed run reads back
(``checkpoint.restore``) and README's tables follow from them. Adding a metric: declare its field, measure it.
"""
from __future__ import annotations

import math
import typing
from dataclasses import MISSING, dataclass, field, fields

import pandas as pd

DEVICES = "with --devices"          # when a field is written, where not always
EVAL_INITIAL = "with --eval-initial"
CUDA = "on CUDA"
ABSENT = object()  # the value of a field not written (its ``when`` does not hold)
UNITS = {"bytes": "B (decimal MB = 1e6 B in tables)",
         "train_flops": "FLOPs, 2 per multiply-add, conv/matmul/attention only (FlopCounterMode on meta)",
         "forward_macs_per_sample": "fvcore multiply-adds of the full model, one sample"}


@dataclass(frozen=True)
class Rollup:
    """A round's total of its client-rounds: ``how`` (sum, max, mean or count) of client field ``of`` over the round's
    client records, or over those that trained only (``trained``); count counts the records whose ``of`` is
    ``value`` (all of them without ``of``); ``empty`` is the total of no record."""
    how: str
    of: str | None = None
    trained: bool = False
    value: bool = True
    empty: object = 0

    def __call__(self, records: list[dict]):
        records = [r for r in records if not (self.trained and r["excluded"])]
        if self.how == "count":
            return sum(self.of is None or bool(r[self.of]) == self.value for r in records)
        values = [r[self.of] for r in records]
        if not values:
            return self.empty
        if self.how == "mean":
            return sum(values) / len(values)
        return {"sum": sum, "max": max}[self.how](values)

    def __str__(self) -> str:
        who = "clients that trained" if self.trained else "clients"
        if self.how == "count":
            return f"count of {who}" + (f" with {self.of} {str(self.value).lower()}" if self.of else "")
        empty = "empty" if isinstance(self.empty, float) and math.isnan(self.empty) else self.empty
        return f"{self.how} of {self.of} over {who}" + (f" ({empty} if none)" if self.trained else "")


@dataclass(frozen=True)
class Spec:
    """A field's declaration (``column``)."""
    unit: str
    doc: str
    when: str | None = None      # written only then (DEVICES, EVAL_INITIAL, CUDA); None: always
    empty: str | None = None     # when its value may be empty (None; NaN in a CSV); None: never
    required: bool = False       # every run folder has it (older ones may lack the others); a folder is checked on it
    rollup: Rollup | None = None

    def note(self) -> str:
        """When it is written or empty, and how it rolls up (README's tables)."""
        return "; ".join(filter(None, (self.when and f"only {self.when}", self.empty and f"empty {self.empty}",
                                       self.rollup and str(self.rollup))))


def column(unit: str, doc: str, *, when: str | None = None, empty: str | None = None, required: bool = False,
           rollup: Rollup | None = None, default_factory=MISSING):
    """A declared field; one with a ``when`` defaults to ABSENT."""
    return field(default=ABSENT if when else MISSING, default_factory=default_factory,
                 metadata={"spec": Spec(unit, doc, when, empty, required, rollup)})


@dataclass(kw_only=True)
class Record:
    """A record's fields, in the order they are written; build one, then ``row()`` is what is written."""

    def row(self) -> dict:
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not ABSENT}

    @classmethod
    def specs(cls) -> dict[str, Spec]:
        return {f.name: f.metadata["spec"] for f in fields(cls)}

    @classmethod
    def numeric(cls) -> dict[str, type]:
        """The numeric fields (bool aside) and their type: int or float."""
        hints = typing.get_type_hints(cls)
        return {name: t for name in cls.specs() for t in (int, float)
                if t in (hints[name], *typing.get_args(hints[name]))}

    @classmethod
    def required(cls) -> list[str]:
        return [name for name, spec in cls.specs().items() if spec.required]

    @classmethod
    def read(cls, frame: pd.DataFrame) -> list[dict]:
        """Rows as written, read back from a CSV: the declared columns it has, numbers of their declared type, None
        for an empty cell."""
        numeric = cls.numeric()
        columns = [c for c in cls.specs() if c in frame.columns]
        return [{c: None if pd.isna(v) else numeric.get(c, lambda x: x)(v) for c, v in r.items()}
                for r in frame[columns].to_dict("records")]


@dataclass(kw_only=True)
class ClientRound(Record):
    """What one sampled client did in one round: a row of clients.csv."""
    round: int = column("index", "the round, from 1", required=True)
    client: int = column("index", "the client, from 0")
    budget: float = column("fraction", "its memory budget, of the full model's measured training memory")
    budget_bytes: int = column("B", "the budget in bytes (budget x full-model memory, rounded down)", required=True)
    config: str = column("text", "the configuration its method planned, or why it trained nothing (offline, excluded, "
                                 "out of memory (...))")
    peak_bytes: int = column("B", "measured peak training memory, max over the configuration's steps (0: trained "
                                  "nothing)", required=True)
    of_budget: float = column("fraction", "peak_bytes / budget_bytes (0: trained nothing)")
    within_budget: bool = column("bool", "peak_bytes <= budget_bytes, or the method is unbudgeted")
    train_flops: int = column("FLOPs", "training FLOPs: each step's measured FLOPs per sample x the samples it ran")
    bytes_down: int = column("B", "bytes it received")
    bytes_up: int = column("B", "bytes it sent (0 when late)")
    samples: int = column("count", "samples processed in local training, all epochs and steps")
    train_loss: float = column("-", "mean local training loss", empty="when it trained nothing")
    excluded: bool = column("bool", "it trained nothing: offline, dropped or left out by its method")
    dropped: bool = column("bool", "it ran out of memory (--over-budget drop)")
    cuda_peak_bytes: int = column("B", "CUDA allocator peak of its configuration (after a warm-up and a reset)",
                                  when=CUDA)
    device: str = column("text", "its device's name", when=DEVICES)
    compute_s: float = column("s", "simulated compute: train_flops / FLOP/s + mini-batches x overhead", when=DEVICES)
    comm_s: float = column("s", "simulated communication: bytes down / downlink + bytes up / uplink", when=DEVICES)
    time_s: float = column("s", "compute_s + comm_s", when=DEVICES)
    late: bool = column("bool", "it would finish after --deadline: its update is not used", when=DEVICES)


@dataclass(kw_only=True)
class Round(Record):
    """One round of the run: a row of rounds.csv. Its totals roll up the round's client records (``totals``)."""
    round: int = column("index", "the round, from 1", required=True)
    accuracy: float | None = column("fraction", "the method's evaluation of the global model",
                                    empty="on rounds without an evaluation", required=True)
    loss: float | None = column("-", "the evaluation's test loss", empty="on rounds without one")
    train_loss: float = column("-", "mean local training loss",
                               rollup=Rollup("mean", "train_loss", trained=True, empty=math.nan))
    lr: float = column("-", "the clients' learning rate")
    bytes_down: int = column("B", "bytes sent to the clients", required=True, rollup=Rollup("sum", "bytes_down"))
    bytes_up: int = column("B", "bytes the clients sent", required=True, rollup=Rollup("sum", "bytes_up"))
    train_flops: int = column("FLOPs", "the clients' training FLOPs", required=True,
                              rollup=Rollup("sum", "train_flops"))
    peak_max: int = column("B", "largest client peak", required=True, rollup=Rollup("max", "peak_bytes", trained=True))
    peak_mean: float = column("B", "mean client peak", rollup=Rollup("mean", "peak_bytes", trained=True, empty=0.0))
    of_budget_max: float = column("fraction", "largest client peak / its budget", rollup=Rollup("max", "of_budget"))
    violations: int = column("count", "client-rounds over budget", required=True,
                             rollup=Rollup("count", "within_budget", value=False))
    clients: int = column("count", "clients sampled", required=True, rollup=Rollup("count"))
    trained: int = column("count", "clients that trained", rollup=Rollup("count", trained=True))
    dropped: int = column("count", "clients out of memory (--over-budget drop)", rollup=Rollup("count", "dropped"))
    wall_s: float = column("s", "wall-clock time of the round: training, aggregation, evaluation", required=True)
    late: int = column("count", "clients late for --deadline", when=DEVICES, rollup=Rollup("count", "late"))
    round_s: float = column("s", "simulated round time: its slowest client's, or the deadline when one is late",
                            when=DEVICES)
    sim_time_s: float = column("s", "simulated time of the run so far", when=DEVICES)

    @classmethod
    def totals(cls, records: list[dict]) -> dict:
        """The fields that roll up the round's client records; none of a client field that no record has."""
        return {name: spec.rollup(records) for name, spec in cls.specs().items()
                if spec.rollup and (spec.rollup.of is None or any(spec.rollup.of in r for r in records))}


@dataclass(kw_only=True)
class Summary(Record):
    """The finished (or diverged) run: summary.json."""
    method: str = column("text", "the method", required=True)
    model: str = column("text", "the model")
    dataset: str = column("text", "the dataset")
    seed: int = column("-", "the seed", required=True)
    memory_budget: list = column("list", "--memory-budget as given: fractions, sizes or devices", required=True)
    budget_fractions: list = column("list", "each client group's budget as a fraction of full_model_memory_bytes "
                                            "(empty under devices: one per client)")
    rounds: int = column("count", "rounds run", required=True)
    status: str = column("text", "ok, or diverged (a round's train loss not finite: the run stopped)")
    diverged_round: int | None = column("index", "the round it diverged in", empty="unless it diverged")
    unbudgeted: bool = column("bool", "the method fits nothing to a budget: no client-round counted over it")
    final_accuracy: float | None = column("fraction", "the last evaluation's accuracy", empty="without an evaluation",
                                          required=True)
    initial_accuracy: float = column("fraction", "the same evaluation of the initial model", when=EVAL_INITIAL)
    best_accuracy: float | None = column("fraction", "the best evaluation's accuracy", empty="without an evaluation")
    evaluation: str = column("text", "what the accuracy measures")
    notes: list = column("list", "the method's notes on the run")
    warnings: list = column("list", "the method's warnings (parts of the model never trained, ...)")
    full_model_memory_bytes: int = column("B", "measured training memory of the full model: budget 1")
    peak_max_bytes: int = column("B", "largest client peak", required=True)
    of_budget_max: float | None = column("fraction", "largest client peak / its budget, over all client-rounds",
                                         empty="when a resumed run's earlier rounds.csv lacks of_budget_max")
    violations: int = column("count", "client-rounds over budget", required=True)
    client_rounds: int = column("count", "client-rounds sampled")
    excluded_client_rounds: int = column("count", "client-rounds that trained nothing")
    dropped_client_rounds: int = column("count", "client-rounds out of memory (--over-budget drop)")
    over_budget: str = column("text", "--over-budget: record or drop")
    devices: str = column("text", "--devices profile", when=DEVICES)
    deadline: float | None = column("s", "--deadline", when=DEVICES, empty="without --deadline")
    late_client_rounds: int = column("count", "client-rounds late for the deadline", when=DEVICES)
    simulated_time_s: float = column("s", "simulated time of the run", when=DEVICES)
    train_flops_per_client_round: float = column("FLOPs", "training FLOPs per client-round that trained", required=True)
    bytes_down_per_client_round: float = column("B", "bytes down per client-round that trained", required=True)
    bytes_up_per_client_round: float = column("B", "bytes up per client-round that trained", required=True)
    forward_macs_per_sample: int = column("MACs", "fvcore's forward multiply-adds of the full model, one sample")
    device: str = column("text", "the torch device it ran on")
    precision: str = column("text", "training arithmetic: fp32 or bf16")
    processes: int = column("count", "processes that shared each round's clients")
    wall_s: float = column("s", "wall-clock time of its rounds")
    provenance: dict = column("table", "fedbench, its commit, torch, Python, the device's name, the command")
    units: dict = column("table", "the units of bytes and FLOPs", default_factory=lambda: dict(UNITS))
