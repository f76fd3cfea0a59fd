"""The base every method plugs in through: a policy over plans plus a few hooks (DESIGN.md).

A method overrides the fewest hooks: ``setup`` (resolve every budget into a configuration, by
measurement), ``plan`` (a client's sub-model this round), ``loss`` or ``trainer`` (local
objective), ``add_update`` (aggregation), ``evaluate``. It never owns the round loop, the
sampler, the profiler or the outputs. Hooks are told their inputs (round, client, budget):
what one hook stores and a later one reads is either resolved in ``setup`` or checkpointed
(``state_dict``). Methods register themselves with ``register_method`` (timm's ``register_model``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from fedbench.aggregate import MaskedMean
from fedbench.data import Dataset, normalize, train_batch
from fedbench.models.base import FedModel
from fedbench.plan import Plan, Step
from fedbench.profiler import dense_bytes
from fedbench.submodel import set_trainable, uploaded

if TYPE_CHECKING:
    from fedbench.distributed import Group
    from collections.abc import Callable, Mapping

    from fedbench.config import RunConfig
    from fedbench.profiler import Profiler


@dataclass
class ClientData:
    """One client's local data, already on the run's device (uint8 images, int64 labels)."""

    client: int
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class TrainResult:
    loss: float
    samples: list[int]  # samples processed in each step of the plan (for FLOPs)


@dataclass
class Context:
    """What a method may use: the run's config and data, the global model, its factory, the profiler, its options."""

    config: "RunConfig"
    dataset: Dataset
    model: FedModel                    # the global model
    build: "Callable[..., FedModel]"   # build(widths=..., rate=...) -> FedModel at those widths
    profiler: "Profiler"
    options: Any                       # the method's ``Options``, filled from the run's settings
    full_memory: int = 0               # bytes: budget 1, the measured peak of the full model under FedAvg
    #                                    (self-supervised: under this method; ``engine.fedavg_memory``)
    fractions: list[float] = field(default_factory=list)  # --memory-budget as fractions of full_memory (per group,
    #                                                        or per client under --memory-budget devices)
    client_labels: list[torch.Tensor] = field(default_factory=list)  # per client: labels it holds
    group: "Group | None" = None       # processes sharing each round's clients (fedbench.distributed)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


class Trainer:
    """One client's optimisation state for one step: SGD (momentum, weight decay) on the step's loss."""

    def __init__(self, method: "Method", model: FedModel, plan: Plan, step: Step, lr: float):
        self.method, self.model, self.plan, self.step_spec = method, model, plan, step
        self.client: dict[str, torch.Tensor] = {}   # the client's own tensors for the loss (``client_inputs``)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = self.optimizer(lr)

    def optimizer(self, lr: float) -> torch.optim.Optimizer:
        """SGD with the run's momentum and weight decay over the trained parameters (a method may override it)."""
        cfg = self.method.config
        return torch.optim.SGD(self.params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def prepare(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        return train_batch(x, self.method.dataset, gen)

    def loss(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        return self.method.loss(self.model, self.prepare(x, gen), y, self.plan, self.step_spec, **self.client)

    def step(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(x, y, gen)
        loss.backward()
        if self.method.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]],
                                           self.method.grad_clip)
        self.opt.step()
        return loss.detach()

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def state_tensors(self) -> list[torch.Tensor]:
        """Everything the client keeps between steps: weights, buffers, gradients, optimizer state."""
        out = []
        for m in self.modules():
            out += [*m.parameters(), *m.buffers(), *(p.grad for p in m.parameters() if p.grad is not None)]
        out += [v for s in self.opt.state.values() for v in s.values() if torch.is_tensor(v)]
        return out


EVAL_BATCH = 500


@torch.no_grad()
def evaluate_on_test(model: FedModel, ds: Dataset, group: "Group | None" = None) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` on the test split, in batches of EVAL_BATCH.

    BatchNorm without running statistics (the SLT/FEDEPTH code's, kept here) normalises each batch
    with its own statistics, so the result depends on which samples share a batch: the split's
    fixed content order (``fedbench.data.content_order``) mixes the classes of every batch.
    With a process ``group`` each process evaluates every size-th batch and the sums are all-reduced
    (the same batches, so the same accuracy and, summed in float64, the same loss).
    """
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=ds.test_y.device)  # correct, summed loss
    rank, size = (group.rank, group.size) if group is not None else (0, 1)
    for i in range(rank * EVAL_BATCH, len(ds.test_y), size * EVAL_BATCH):
        x, y = normalize(ds.test_x[i:i + EVAL_BATCH], ds), ds.test_y[i:i + EVAL_BATCH]
        out = model(x)
        totals += torch.stack([(out.argmax(1) == y).sum().double(),
                               F.cross_entropy(out.float(), y, reduction="sum").double()])
    if group is not None:
        group.all_reduce(totals)
    model.train()
    n = len(ds.test_y)
    correct, loss = totals.tolist()
    return {"accuracy": int(correct) / n, "loss": loss / n}


@dataclass(frozen=True)
class NoOptions:
    """A method without options of its own."""


class Method:
    """Default behaviour is FedAvg: every client trains the full model with cross-entropy.

    ``Options`` is a frozen dataclass of the method's own settings; each field is a CLI flag
    (``--slt-memory-model paper`` sets ``slt_memory_model``) and a TOML key.
    """

    Options: ClassVar[type] = NoOptions
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    supervised: ClassVar[bool] = True   # False: evaluated by linear probe (the output says so)
    budgeted: ClassVar[bool] = False    # True: the method fits each client's configuration to its budget
    # Capabilities the engine relies on, declared (never inferred from which hooks are overridden):
    trains_batched: ClassVar[bool] = False      # True: clients of one plan shape may train together (fedbench.batched):
    #                                             default local_train and Trainer, a pure loss, no randomness in the model
    keeps_client_state: ClassVar[bool] = False  # True: per-client state (in state_dict) lives where the client trains,
    #                                             so the run cannot be spread over processes
    preferred_model: ClassVar[str | None] = None  # used when --model is not given (e.g. the paper's model)
    grad_clip: float = 0.0              # > 0: clip each local step's gradient norm to this (all trainable tensors)
    weighting: ClassVar[str] = "samples"  # client weights of the masked mean under --weighting method (as its code)

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.config = ctx.config
        self.dataset = ctx.dataset
        self.options = ctx.options

    @property
    def budgets(self) -> list[float]:
        """Every budget a client can receive (the distinct ``--memory-budget`` fractions), ascending."""
        return sorted(set(self.ctx.fractions))

    # --- models -------------------------------------------------------------------------
    @classmethod
    def build_global(cls, build: "Callable[..., FedModel]") -> FedModel:
        """The global model (methods with extra heads wrap it here)."""
        return build()

    @classmethod
    def client_builder(cls, build: "Callable[..., FedModel]") -> "Callable[..., FedModel]":
        """The factory of client sub-models at given widths (same structure as ``build_global``)."""
        return build

    # --- configuration ------------------------------------------------------------------
    def setup(self) -> None:
        """Resolve each of ``self.budgets`` into a configuration (by measurement); raise ConfigError if impossible."""

    def full_plan(self) -> Plan:
        """The method's full configuration; its measured memory defines budget 1 for a self-supervised method (a
        supervised method's budget 1 is FedAvg's full model, ``engine.fedavg_memory``)."""
        return Plan()

    def plan(self, rnd: int, client: int, budget: float, gen: torch.Generator) -> Plan:
        """The client's sub-model in round ``rnd`` under ``budget`` (one of ``self.budgets``); ``gen`` is
        the client's generator of the round. A function of its arguments and of what ``setup`` resolved."""
        return self.full_plan()

    def schedule(self) -> list[tuple[dict, Plan]]:
        """(info, plan) per configuration the method uses, for ``fedbench profile``.

        info may hold ``budget`` (the fraction the plan must fit) and a ``note``; the profile
        command measures each plan itself.
        """
        return []

    def step_shares(self, plan: Plan) -> list[float]:
        """The expected share of a client's samples that each step of ``plan`` trains, for FLOPs per sample
        (``fedbench profile``): 1 each by default (every step passes over all local data)."""
        return [1.0] * len(plan.steps)

    # --- local training -----------------------------------------------------------------
    def client_inputs(self, data: ClientData) -> dict[str, torch.Tensor]:
        """Tensors of the client's own that ``loss`` receives as keyword arguments (default: none).

        Without them (profiling) ``loss`` must still work: its keyword arguments need defaults.
        """
        return {}

    def loss(self, model: FedModel, x: torch.Tensor, y: torch.Tensor, plan: Plan, step: Step) -> torch.Tensor:
        """A pure function of its arguments: clients that share a plan shape may be trained batched."""
        return F.cross_entropy(model(x, blocks=step.blocks), y)

    def trainer(self, model: FedModel, plan: Plan, step: Step, lr: float, client: int | None = None) -> Trainer:
        """The optimisation of one step for ``client`` (None: the profiler's stand-in client)."""
        return Trainer(self, model, plan, step, lr)

    def local_train(self, model: FedModel, data: ClientData, plan: Plan, lr: float,
                    gen: torch.Generator) -> TrainResult:
        """Each step of the plan in order, ``local_epochs`` epochs each, mini-batches in a seeded order."""
        cfg = self.config
        total, batches, samples = torch.zeros((), device=data.y.device), 0, []
        client = self.client_inputs(data)
        for step in plan.steps:
            set_trainable(model, step)
            trainer = self.trainer(model, plan, step, lr, data.client)
            trainer.client = client
            for _ in range(cfg.local_epochs):
                order = torch.randperm(len(data), generator=gen, device=gen.device).to(data.y.device)
                for idx in order.split(cfg.batch_size):
                    total += trainer.step(data.x[idx], data.y[idx], gen)
                    batches += 1
            samples.append(cfg.local_epochs * len(data))
        return TrainResult(loss=float(total) / max(batches, 1), samples=samples)

    # --- communication ------------------------------------------------------------------
    def sent_bytes(self, tensors: "Mapping[str, torch.Tensor]", plan: Plan) -> int:
        """Bytes of sending these tensors of the plan's sub-model (named as in the global model), down or up.

        Default: dense, elements x dtype size. A method that sends a sparse encoding counts its own here (the
        engine's bytes down and up and ``Profiler.bytes_of`` call it); the tensors may be on the meta device
        (``fedbench profile``), so only their names, shapes and dtypes may be read.
        """
        return dense_bytes(tensors, plan)

    # --- aggregation and evaluation -----------------------------------------------------
    def aggregator(self, global_model: FedModel) -> MaskedMean:
        return MaskedMean(global_model)

    def client_weight(self, data: ClientData) -> float:
        """The client's weight in the masked mean: its sample count, or 1 (``--weighting``, else the method's)."""
        rule = self.weighting if self.config.weighting == "method" else self.config.weighting
        return float(len(data)) if rule == "samples" else 1.0

    def add_update(self, agg: MaskedMean, plan: Plan, model: FedModel, data: ClientData) -> None:
        agg.add(plan, uploaded(model, plan), self.client_weight(data))

    def eval_model(self, global_model: FedModel, rnd: int) -> FedModel:
        """The model that is evaluated after round ``rnd`` (0-based; default: the full global model)."""
        return global_model

    def evaluate(self, global_model: FedModel, rnd: int) -> dict[str, float]:
        """Top-1 accuracy and mean cross-entropy on the test split after round ``rnd`` (0-based)."""
        return evaluate_on_test(self.eval_model(global_model, rnd), self.dataset, self.ctx.group)

    def describe_eval(self) -> str:
        return "top-1 accuracy of the full global model on the test split"

    def notes(self, rounds: int) -> dict[str, Any]:
        """What the method reports about a run of ``rounds`` rounds (summary.json ``notes``), e.g. coverage."""
        return {}

    def warnings(self, rounds: int) -> list[str]:
        """Why the run's accuracy may not measure the method (summary.json ``warnings``; marked in reports),
        e.g. parts of the evaluated model that no client ever trained."""
        return []

    # --- state (checkpointed by the engine) ----------------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


METHODS: dict[str, type[Method]] = {}  # name -> class, filled by ``register_method``; ``fedbench.registry`` queries it


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator; the class declares ``name``, ``description`` and ``paper``."""
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"method name {cls.name!r} missing or registered twice")
    METHODS[cls.name] = cls
    return cls
