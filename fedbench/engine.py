"""The one round loop (DESIGN.md, data flow of one run). It never names a method.

``prepare`` does everything that can fail on bad input (data, partition, model, budgets,
the method's measured configurations) before anything is written; ``Run.execute`` then
runs the rounds and hands each finished round to the observers (CSV, progress, checkpoints).
"""
from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

import torch

from fedbench import batched
from fedbench.budget import DEVICES, Infeasible, client_budgets, draw_budgets, fractions
from fedbench.config import RunConfig, for_dataset
from fedbench.data import Dataset, load_dataset, placeholder
from fedbench.devices import Device, assign
from fedbench.distributed import Group
from fedbench.errors import ConfigError
from fedbench.method import ClientData, Context, Method
from fedbench.models import FedModel, create_model
from fedbench.partition import partition
from fedbench.plan import OFFLINE, Plan, out_of_memory
from fedbench.precision import autocast, choose
from fedbench.profiler import Profiler, Traffic, forward_macs
from fedbench.provenance import provenance
from fedbench.records import ClientRound, Round, Summary
from fedbench.registry import check_options, get_method, method_options, model_kwargs
from fedbench.seeding import generator, sample_clients
from fedbench.submodel import build_submodel, load_slices, uploaded

log = logging.getLogger(__name__)


class Observer:
    """No-op hooks; CSV writers, progress bars and checkpoints override what they need."""

    def on_start(self, run: "Run") -> None: ...
    def after_round(self, run: "Run", row: dict, clients: list[dict]) -> None: ...
    def on_end(self, run: "Run", summary: dict) -> None: ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def unbudgeted(method: type[Method]) -> bool:
    """Whether a budget given to the method is recorded as unbudgeted (no client-round counted over it): the
    self-supervised methods, which fit nothing to a budget. FedAvg fits nothing either, but as the reference
    its client-rounds over budget are counted."""
    return not (method.budgeted or method.supervised)


def diverged(row: dict) -> bool:
    """A round whose clients trained to a mean train loss that is NaN or inf (None: a NaN read back from
    rounds.csv); a round in which every sampled client sat out trained nothing and did not diverge."""
    if row.get("trained", row["clients"]) == 0:
        return False
    return row["train_loss"] is None or not math.isfinite(row["train_loss"])


def create_on(device: torch.device, name: str, **kw) -> FedModel:
    """A model laid out for ``device``: on CPUs, convolutions in channels-last (oneDNN's native layout;
    the CNN's max-pool runs 16x faster in it, benchmarks/throughput.py), on GPUs in PyTorch's default."""
    model = create_model(name, **kw)
    return model.to(memory_format=torch.channels_last) if device.type == "cpu" else model


@dataclass
class Run:
    config: RunConfig
    dataset: Dataset
    parts: list[torch.Tensor]
    model: FedModel
    method: Method
    profiler: Profiler
    ctx: Context
    start_round: int = 0
    rows: list[dict] = field(default_factory=list)
    traffic: Traffic | None = None
    group: Group | None = None         # torchrun processes sharing each round's clients (None: this one alone)
    devices: list[Device] | None = None  # each client's device (--devices): simulated time per client-round
    initial: dict = field(default_factory=dict)  # --eval-initial: the evaluation of the initial global model
    infeasible: dict[float, float] = field(default_factory=dict)  # profile: budget left out -> its measured floor
    _submodels: OrderedDict = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self.traffic = Traffic(stateful=self.config.client_state == "stateful")

    # --- one client ---------------------------------------------------------------------
    def client_data(self, client: int) -> ClientData:
        idx = self.parts[client].to(self.dataset.train_y.device)
        return ClientData(client, self.dataset.train_x[idx], self.dataset.train_y[idx])

    def working(self, plan: Plan) -> FedModel:
        """A working module per plan shape, reused in place (pfl-research's placeholder model)."""
        key = plan.shape_key()
        if key not in self._submodels:
            self._submodels[key] = build_submodel(self.ctx.build, self.model, plan).to(self.ctx.device)
            if len(self._submodels) > 16:
                self._submodels.popitem(last=False)
        self._submodels.move_to_end(key)
        return self._submodels[key]

    def submodel(self, plan: Plan) -> FedModel:
        """The working module of the plan's shape, loaded with the plan's slice of the global model."""
        model = self.working(plan)
        load_slices(model, self.model, plan)
        return model

    def budgets(self, rnd: int) -> list[float]:
        """Each client's budget in round ``rnd`` (a fraction): its fixed group's (its device's under
        ``--memory-budget devices``: one fraction per client), or drawn for the round."""
        cfg = self.config
        if cfg.budget_assignment == "per-round":
            return draw_budgets(self.ctx.fractions, cfg.clients, cfg.seed, rnd)
        return client_budgets(self.ctx.fractions, cfg.clients)

    def lr_at(self, rnd: int) -> float:
        cfg = self.config
        if cfg.lr_schedule == "cosine":  # from lr to lr * lr_floor: SLT's code ends at lr/10 (its run_fl.py)
            floor = cfg.lr * cfg.lr_floor
            return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * rnd / cfg.rounds))
        return cfg.lr

    # --- the round loop ------------------------------------------------------------------
    def execute(self, observers: list[Observer] = ()) -> dict:
        cfg = self.config
        traffic = self.traffic
        if cfg.eval_initial and self.start_round == 0:  # as round 1's evaluation would see it, before any training
            with autocast(cfg.precision, self.ctx.device):
                self.initial = self.method.evaluate(self.model, 0)
        for o in observers:
            o.on_start(self)
        for rnd in range(self.start_round, cfg.rounds):
            t0 = time.perf_counter()
            lr = self.lr_at(rnd)
            agg = self.method.aggregator(self.model)
            records = self.train_round(rnd, lr, agg, traffic)
            if self.group is not None:
                records = self.merge(agg, records)
            traffic.commit(agg.apply(), rnd)
            evaluate = (rnd + 1) % cfg.eval_every == 0 or rnd + 1 == cfg.rounds
            with autocast(cfg.precision, self.ctx.device):
                metrics = self.method.evaluate(self.model, rnd) if evaluate else {}
            row = self.round_row(rnd, lr, records, metrics, time.perf_counter() - t0)
            self.rows.append(row)
            for o in observers:
                o.after_round(self, row, records)
            if diverged(row):  # stop here; summary.json says status diverged, and the round
                break
        summary = self.summary()
        for o in observers:
            o.on_end(self, summary)
        return summary

    def train_round(self, rnd: int, lr: float, agg, traffic: "Traffic") -> list[dict]:
        """Sample, plan, extract, train, aggregate and measure this round's clients; records in client order.

        Clients that share a plan shape train together (``fedbench.batched``) when the method
        allows it and ``--client-batching`` is on, or auto on a GPU (on CPUs the stacked clients'
        grouped convolutions measured slower than one client at a time); their updates are
        folded in as each group ends.
        """
        cfg = self.config
        work, budgets = [], self.budgets(rnd)
        clients = sample_clients(cfg.seed, rnd, cfg.clients, cfg.clients_per_round)
        if self.group is not None:
            clients = self.group.share(clients, [len(self.parts[c]) for c in clients])
        for client in clients:                                                                     # 1. sample
            gen = generator(cfg.seed, "client", rnd, client, device=self.ctx.device)
            if not self.online(rnd, client):
                work.append((client, gen, OFFLINE))
                continue
            plan = self.method.plan(rnd, client, budgets[client], gen)                            # 2. plan
            if cfg.over_budget == "drop" and self.over_budget(plan, client, budgets[client]):
                plan = out_of_memory(plan)
            work.append((client, gen, plan))
        groups: dict[tuple, list[tuple]] = {}
        for item in work:
            groups.setdefault(item[2].shape_key(), []).append(item)
        batch = cfg.client_batching == "on" or (cfg.client_batching == "auto" and self.ctx.device.type == "cuda")
        batch = batch and self.method.trains_batched
        records = []
        for group in groups.values():
            records += self.train_group(rnd, lr, agg, traffic, budgets, group, batch)
        return sorted(records, key=lambda r: r["client"])

    def train_group(self, rnd: int, lr: float, agg, traffic: "Traffic", budgets: list[float], group: list[tuple],
                    batch: bool) -> list[dict]:
        """Train, aggregate and measure the round's clients of one plan shape (together when ``batch``)."""
        records = []
        datas = [self.client_data(client) for client, _, _ in group]
        if batch and len(group) > 1 and group[0][2].steps:
            states = []
            for _, _, plan in group:                                                           # 3. extract
                model = self.submodel(plan)
                states.append(batched.state_of(model))
            with autocast(self.config.precision, self.ctx.device):                               # 4. train
                results = batched.train_group(self.method, model, group[0][2], states, datas, lr,
                                              [gen for _, gen, _ in group])
        else:
            results = [None] * len(group)
        for (client, gen, plan), data, done in zip(group, datas, results):
            if not plan.steps:  # the client sits the round out
                records.append(self.measure(rnd, client, budgets[client], plan, None, None, traffic))
                continue
            if done is None:
                model = self.submodel(plan)
                with autocast(self.config.precision, self.ctx.device):
                    result = self.method.local_train(model, data, plan, lr, gen)
            else:
                model = self.working(plan)
                batched.load_state(model, done[0])
                result = done[1]
            record = self.measure(rnd, client, budgets[client], plan, model, result, traffic)       # 5. measure
            if not record.get("late"):
                self.method.add_update(agg, plan, model, data)                                  # 6. aggregate
            records.append(record)
        return records

    def online(self, rnd: int, client: int) -> bool:
        """Whether the sampled client's device is online this round (its availability; a seeded draw)."""
        if self.devices is None or self.devices[client].availability >= 1:
            return True
        u = torch.rand((), generator=generator(self.config.seed, "online", rnd, client), dtype=torch.float64)
        return float(u) < self.devices[client].availability

    def over_budget(self, plan: Plan, client: int, budget: float) -> bool:
        """Whether the client's configuration measures above its budget (never for a method that ignores budgets)."""
        if not plan.steps or unbudgeted(type(self.method)):
            return False
        return max(m.peak for m in self.measured(plan, client)) > budget * self.ctx.full_memory

    def measured(self, plan: Plan, client: int) -> list:
        """The profiler's measurement of each step of ``plan`` at the client's batch (cached by the profiler)."""
        n = len(self.parts[client])
        return [self.profiler.measure(plan, i, n) for i in range(len(plan.steps))]

    def merge(self, agg, records: list[dict]) -> list[dict]:
        """All processes' round: summed masked sums, every client's record, stateful clients' holdings."""
        agg.all_reduce(self.group.all_reduce)
        held = self.traffic.held
        merged = []
        for part, holdings in self.group.gather((records, {r["client"]: held.get(r["client"]) for r in records})):
            merged += part
            held.update({c: h for c, h in holdings.items() if h is not None})
        return sorted(merged, key=lambda r: r["client"])

    def measure(self, rnd: int, client: int, budget: float, plan: Plan, model: FedModel | None, result,
                traffic: "Traffic") -> dict:
        """The client-round's record (``fedbench.records.ClientRound``)."""
        budget_bytes = budget * self.ctx.full_memory
        if not plan.steps:  # excluded (offline, or dropped: out of memory): no memory used, nothing computed or sent
            record = {"round": rnd + 1, "client": client, "budget": budget, "budget_bytes": int(budget_bytes),
                      "config": plan.label, "peak_bytes": 0, "of_budget": 0.0, "within_budget": True, "train_flops": 0,
                      "bytes_down": 0, "bytes_up": 0, "samples": 0, "train_loss": float("nan"), "excluded": True,
                      "dropped": bool(plan.option("out_of_memory"))}
            return ClientRound(**(record | self.timing(client, record, []))).row()
        steps = self.measured(plan, client)
        peak = max(m.peak for m in steps)
        flops = sum(self.profiler.train_flops(plan, i) * n for i, n in enumerate(result.samples))
        record = {
            "round": rnd + 1, "client": client, "budget": budget, "budget_bytes": int(budget_bytes),
            "config": plan.label, "peak_bytes": peak, "of_budget": peak / max(1, int(budget_bytes)),
            "within_budget": peak <= budget_bytes or unbudgeted(type(self.method)),
            "train_flops": flops, "bytes_down": traffic.down(client, plan, model, self.model, self.method.sent_bytes),
            "bytes_up": self.method.sent_bytes(uploaded(model, plan), plan), "samples": sum(result.samples),
            "train_loss": result.loss, "excluded": False, "dropped": False,
        }
        if steps[0].cuda_peak is not None:
            record["cuda_peak_bytes"] = max(m.cuda_peak for m in steps)
        return ClientRound(**(record | self.timing(client, record, result.samples))).row()

    def timing(self, client: int, record: dict, samples: list[int]) -> dict:
        """The client-round's simulated seconds on the client's device (none without ``--devices``): compute from
        its measured FLOPs and mini-batches, communication from its bytes (``fedbench.devices``). Under
        ``--deadline`` a client that would finish later is late: its update is not used and its upload is cut
        off (bytes up 0; time_s says when it would have finished)."""
        if self.devices is None:
            return {}
        device, n, batch = self.devices[client], len(self.parts[client]), self.config.batch_size
        batches = sum((s // n) * -(-n // batch) if n and s % n == 0 else -(-s // batch) for s in samples)
        compute, comm = device.seconds(record["train_flops"], batches, record["bytes_down"], record["bytes_up"])
        late = self.config.deadline is not None and compute + comm > self.config.deadline
        return {"device": device.name, "compute_s": compute, "comm_s": comm, "time_s": compute + comm,
                "late": late} | ({"bytes_up": 0} if late else {})

    def round_row(self, rnd: int, lr: float, records: list[dict], metrics: dict, seconds: float) -> dict:
        """The round's row: its evaluation, its totals of the client records (``Round.totals``), its times."""
        return Round(round=rnd + 1, accuracy=metrics.get("accuracy"), loss=metrics.get("loss"), lr=lr, wall_s=seconds,
                     **Round.totals(records), **self.round_time(records)).row()

    def round_time(self, records: list[dict]) -> dict:
        """Simulated seconds of a synchronous round (none without ``--devices``): its slowest client's, or the
        deadline when a client is late; and the cumulative time of the run."""
        if self.devices is None:
            return {}
        late = any(r["late"] for r in records)
        seconds = self.config.deadline if late else max((r["time_s"] for r in records if not r["excluded"]), default=0.0)
        before = self.rows[-1]["sim_time_s"] if self.rows else 0.0
        return {"round_s": seconds, "sim_time_s": before + seconds}

    # --- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: global weights, method state, byte accounting."""
        return {"round": self.completed, "model": self.model.state_dict(), "method": self.method.state_dict(),
                "traffic": self.traffic.state_dict(), "initial": self.initial}

    @property
    def completed(self) -> int:
        return self.rows[-1]["round"] if self.rows else self.start_round

    def load_state_dict(self, state: dict, rows: list[dict]) -> None:
        self.model.load_state_dict(state["model"])
        self.method.load_state_dict(state["method"])
        self.traffic.load_state_dict(state["traffic"])
        self.start_round = state["round"]
        self.initial = state.get("initial", {})
        self.rows = [r for r in rows if r["round"] <= self.start_round]

    def summary(self) -> dict:
        """The run's summary (``fedbench.records.Summary``); rows read back from an older rounds.csv may lack the
        later columns."""
        evaluated = [r for r in self.rows if r["accuracy"] is not None]
        sampled = sum(r["clients"] for r in self.rows)
        trained = sum(r.get("trained", r["clients"]) for r in self.rows)
        client_rounds = trained or 1  # costs per client-round trained
        stopped = next((r["round"] for r in self.rows if diverged(r)), None)
        cfg = self.config
        return Summary(**{
            "method": cfg.method, "model": cfg.model, "dataset": cfg.dataset, "seed": cfg.seed,
            "memory_budget": list(cfg.memory_budget),
            "budget_fractions": [] if DEVICES in cfg.memory_budget else list(self.ctx.fractions),
            "rounds": len(self.rows),
            "status": "diverged" if stopped else "ok", "diverged_round": stopped,
            "unbudgeted": unbudgeted(type(self.method)),
            "final_accuracy": evaluated[-1]["accuracy"] if evaluated else None,
            **({"initial_accuracy": self.initial["accuracy"]} if self.initial else {}),
            "best_accuracy": max((r["accuracy"] for r in evaluated), default=None),
            "evaluation": self.method.describe_eval(),
            "notes": self.method.notes(len(self.rows)), "warnings": self.method.warnings(len(self.rows)),
            "full_model_memory_bytes": self.ctx.full_memory,
            "peak_max_bytes": max((r["peak_max"] for r in self.rows), default=0),
            "of_budget_max": max(r["of_budget_max"] for r in self.rows)
            if self.rows and all("of_budget_max" in r for r in self.rows) else None,
            "violations": sum(r["violations"] for r in self.rows),
            "client_rounds": sampled,
            "excluded_client_rounds": sampled - trained,
            "dropped_client_rounds": sum(r.get("dropped", 0) for r in self.rows),
            "over_budget": cfg.over_budget,
            **({"devices": cfg.devices, "deadline": cfg.deadline,
                "late_client_rounds": sum(r["late"] for r in self.rows),
                "simulated_time_s": self.rows[-1]["sim_time_s"] if self.rows else 0.0} if self.devices else {}),
            "train_flops_per_client_round": sum(r["train_flops"] for r in self.rows) / client_rounds,
            "bytes_down_per_client_round": sum(r["bytes_down"] for r in self.rows) / client_rounds,
            "bytes_up_per_client_round": sum(r["bytes_up"] for r in self.rows) / client_rounds,
            "forward_macs_per_sample": forward_macs(self.model, tuple(self.dataset.train_x.shape[1:])),
            "device": str(self.ctx.device), "precision": cfg.precision,
            "processes": self.group.size if self.group is not None else 1,
            "wall_s": sum(r["wall_s"] for r in self.rows),
            "provenance": provenance(self.ctx.device),
        }).row()


def prepare(cfg: RunConfig, shapes_only: bool = False, group: Group | None = None,
            on_measure: Callable[[int], None] | None = None) -> Run:
    """Check the method, model and options (``check_options``: the default model filled in), load, partition,
    build and measure; raises ConfigError on bad input, writes nothing.

    ``group``: the torchrun processes that share each round's clients (see ``fedbench.distributed``).
    ``shapes_only`` (for ``fedbench profile``): only the data's shape matters, so a dataset
    whose files are missing is replaced by a stand-in of its shape, nothing is partitioned, and a budget below
    the method's measured floor is left out (``Run.infeasible``) unless every budget is.
    """
    cfg = check_options(cfg)
    device = resolve_device(cfg.device)
    try:
        dataset = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed)
    except ConfigError:
        if not shapes_only or (dataset := placeholder(cfg.dataset)) is None:
            raise
    cfg = for_dataset(cfg, dataset)
    dataset = replace(dataset, augment=cfg.augment == "crop-flip")
    parts = ([dataset.train_y.new_zeros(0)] * cfg.clients if shapes_only
             else partition(dataset.train_y, cfg.clients, cfg.partition, cfg.seed))
    dataset = dataset.to(device)
    build = partial(create_on, device, cfg.model, num_classes=dataset.num_classes, in_chans=dataset.in_chans,
                    img_size=dataset.img_size, **model_kwargs(cfg))
    chosen = choose(cfg.precision, build, tuple(dataset.train_x.shape[1:]), dataset.num_classes, cfg.batch_size, device)
    if group is not None and cfg.precision == "auto":  # the processes of one run measure alike: take rank 0's
        chosen = group.gather(chosen)[0]
    cfg = replace(cfg, precision=chosen)
    torch.manual_seed(cfg.seed)  # model initialisation only; the round loop uses derived generators
    method_cls = get_method(cfg.method)
    if group is not None and method_cls.keeps_client_state:
        raise ConfigError("--nproc-per-node", f"{cfg.method} keeps state of its own between rounds (per-client "
                                              "models), held where a client trains: run it in one process; a sweep "
                                              "under torchrun (fedbench compare) runs its cells one process each")
    model = method_cls.build_global(build).to(device)
    client_build = method_cls.client_builder(build)
    measuring = partial(Profiler, sample_shape=tuple(dataset.train_x.shape[1:]), num_classes=dataset.num_classes,
                        batch_size=min(cfg.batch_size, max(map(len, parts)) or cfg.batch_size),  # the largest client's
                        device=device, seed=cfg.seed, precision=cfg.precision)
    profiler = measuring(partial(build_submodel, client_build, model), on_measure=on_measure)
    ctx = Context(config=cfg, dataset=dataset, model=model, build=client_build, profiler=profiler,
                  options=method_options(method_cls, cfg),
                  client_labels=[dataset.train_y[p.to(device)].unique() for p in parts], group=group)
    method = method_cls(ctx)
    profiler.bind(partial(method.trainer, lr=cfg.lr), method.sent_bytes)
    ctx.full_memory = (fedavg_memory(ctx, build, measuring) if method_cls.supervised
                       else profiler.memory_of(method.full_plan()))
    devices = assign(cfg.devices, cfg.clients, cfg.seed) if cfg.devices else None
    ctx.fractions = fractions(cfg.memory_budget, ctx.full_memory, [d.memory for d in devices or ()])
    infeasible = set_up(method, each=shapes_only)
    for warning in method.warnings(cfg.rounds):
        log.warning("%s: %s", cfg.method, warning)
    return Run(cfg, dataset, parts, model, method, profiler, ctx, group=group, devices=devices, infeasible=infeasible)


_FEDAVG_PEAKS: dict[tuple, int] = {}  # fedavg_memory by everything it depends on: measured once per process


def fedavg_memory(ctx: Context, build: partial[FedModel], measuring: partial[Profiler]) -> int:
    """Budget 1 of a supervised method (DESIGN.md, "Memory budgets"): the measured peak of the plain full model under
    FedAvg's step (``Method``'s default), the same bytes for every method whatever it adds to the model or the step
    (DepthFL's exits, FIARSE's masks). A self-supervised method's budget 1 is its own end-to-end full plan."""
    cfg = ctx.config
    key = (*(f.args + tuple(sorted(f.keywords.items())) for f in (build, measuring)), cfg.lr, cfg.momentum,
           cfg.weight_decay)
    if key not in _FEDAVG_PEAKS:
        with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):  # draws none of the run's
            plain = build()
        profiler = measuring(partial(build_submodel, build, plain))
        fedavg = Method(replace(ctx, model=plain, build=build, profiler=profiler))
        profiler.bind(partial(fedavg.trainer, lr=cfg.lr), fedavg.sent_bytes)
        _FEDAVG_PEAKS[key] = profiler.memory_of(Plan())
    return _FEDAVG_PEAKS[key]


def set_up(method: Method, each: bool = False) -> dict[float, float]:
    """``method.setup()``; with ``each`` (``fedbench profile``) a budget below the method's measured floor is left out
    instead of refusing the list: returns budget -> floor of those left out. Raises Infeasible as a run does when
    every budget is below the floor."""
    try:
        method.setup()
        return {}
    except Infeasible:
        if not each:
            raise
    ctx, given, floors = method.ctx, method.ctx.fractions, {}
    for b in method.budgets:  # each budget alone
        ctx.fractions = [b]
        try:
            method.setup()
        except Infeasible as e:
            floors[b] = e.floor
    ctx.fractions = [f for f in given if f not in floors] or given
    method.setup()  # the budgets that fit, together; when none does, the refusal of the whole list
    return floors
