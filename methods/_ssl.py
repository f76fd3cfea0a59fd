"""Self-supervised training and evaluation shared by the SSL methods (methods-depth-ssl.md §2.2, §3.1).

- :func:`views`: two augmented views of a uint8 batch, batched on its device, all randomness
  from one generator (MoCo v3's asymmetric BYOL recipe, see :func:`augment_view`).
- :class:`SSLModel`: an encoder ``FedModel`` plus projection head H (+ prediction head P for
  MoCo v3) with stable parameter names (``stem.*``, ``blocks.i.*``, ``head.*``, ``projector.*``,
  ``predictor.*``), so plans, extraction and aggregation treat the heads like any layer.
- :func:`infonce` (MoCo v3: in-batch negatives, scaled by 2 tau as MoCo v3's code; the trainer sums
  the two symmetric terms) and :func:`nt_xent` (SimCLR, unscaled).
- :class:`SSLTrainer`: AdamW (LW-FedSSL §4.1) or SGD; a momentum target re-copied from the
  online branch at every local training and never uploaded. The frozen leading units are
  shared by both branches and run once, without autograd (they are identical in the target:
  a momentum update of an unchanged tensor leaves it unchanged), so the target holds copies of
  the trainable part only. Its tensors count in the client's memory (``modules``).
- :class:`SSLMethod`: the base of the SSL methods (global model with heads, end-to-end plan,
  trainer, linear-probe or fine-tune evaluation).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fedbench.data import Dataset, augment, normalize
from fedbench.errors import ConfigError
from fedbench.method import Method, Trainer
from fedbench.models.base import FedModel
from fedbench.plan import Plan, Step
from fedbench.seeding import generator
from fedbench.settings import Range

if TYPE_CHECKING:
    from collections.abc import Callable

HIDDEN, OUT = 512, 256                      # H and P widths (LW-FedSSL §4.1)
CROP_SCALE, CROP_RATIO = (0.2, 1.0), (3 / 4, 4 / 3)
JITTER, P_JITTER, P_GRAY = (0.4, 0.4, 0.2, 0.1), 0.8, 0.2
BLUR_SIGMA, P_BLUR, P_SOLARIZE = (0.1, 2.0), (1.0, 0.1), (0.0, 0.2)   # per view (MoCo v3 / BYOL)
LUMA = (0.299, 0.587, 0.114)
YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


# ----------------------------------------------------------------------------- views

def views(x: torch.Tensor, gen: torch.Generator | None, ds: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Two normalised views of a uint8 batch; without a generator (FLOP counting) both are the batch itself."""
    mean = torch.tensor(ds.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(ds.std, device=x.device).view(1, -1, 1, 1)
    x = x.float() / 255
    if gen is None:
        v = (x - mean) / std
        return v, v
    v1, v2 = ((augment_view(x, gen, i) - mean) / std for i in (0, 1))
    return v1, v2


def augment_view(x: torch.Tensor, gen: torch.Generator, view: int) -> torch.Tensor:
    """Random resized crop (scale 0.2-1) + flip, colour jitter (p 0.8), grayscale (p 0.2), Gaussian
    blur (p 1.0 / 0.1) and solarisation (p 0 / 0.2) for view 0 / 1, as in MoCo v3's ViT recipe.

    1-channel data gets brightness and contrast jitter only (saturation, hue and grayscale need
    colour). Deviations from torchvision: jitter in the fixed order brightness, contrast,
    saturation, hue; hue as a rotation in YIQ space; an infeasible crop box is clamped instead
    of re-drawn; the crop scale is 0.2-1 (small images; MoCo v3 uses 0.08-1 at 224 px).
    """
    b, c = x.shape[:2]
    u = torch.rand(b, 14, generator=gen, device=x.device)
    x = _resized_crop(x, u[:, :4], u[:, 4] < 0.5)
    x = _jitter(x, u[:, 5:9] * 2 - 1, u[:, 9] < P_JITTER)
    if c == 3:
        x = torch.where((u[:, 10] < P_GRAY).view(-1, 1, 1, 1), _gray(x).expand_as(x), x)
    sigma = BLUR_SIGMA[0] + u[:, 11] * (BLUR_SIGMA[1] - BLUR_SIGMA[0])
    x = _blur(x, sigma, u[:, 12] < P_BLUR[view])
    return torch.where((u[:, 13] < P_SOLARIZE[view]).view(-1, 1, 1, 1) & (x >= 0.5), 1 - x, x)


def _resized_crop(x: torch.Tensor, u: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    area = CROP_SCALE[0] + u[:, 0] * (CROP_SCALE[1] - CROP_SCALE[0])
    ratio = torch.exp(math.log(CROP_RATIO[0]) + u[:, 1] * math.log(CROP_RATIO[1] / CROP_RATIO[0]))
    w, h = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)  # half-sizes in [-1, 1] coords
    theta = torch.zeros(len(x), 2, 3, device=x.device)
    theta[:, 0, 0] = torch.where(flip, -w, w)
    theta[:, 0, 2] = (u[:, 2] * 2 - 1) * (1 - w)
    theta[:, 1, 1] = h
    theta[:, 1, 2] = (u[:, 3] * 2 - 1) * (1 - h)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (x * torch.tensor(LUMA, device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)


def _jitter(x: torch.Tensor, r: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation, hue factors from r in [-1, 1] (torchvision's ranges)."""
    def blend(a, b, f):
        return (f.view(-1, 1, 1, 1) * a + (1 - f.view(-1, 1, 1, 1)) * b).clamp(0, 1)

    out = (x * (1 + JITTER[0] * r[:, 0]).view(-1, 1, 1, 1)).clamp(0, 1)
    gray = _gray(out) if x.shape[1] == 3 else out
    out = blend(out, gray.mean((1, 2, 3), keepdim=True), 1 + JITTER[1] * r[:, 1])
    if x.shape[1] == 3:
        out = blend(out, _gray(out), 1 + JITTER[2] * r[:, 2])
        angle = math.pi * 2 * JITTER[3] * r[:, 3]
        rot = torch.zeros(len(x), 3, 3, device=x.device)
        rot[:, 0, 0] = 1
        rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = angle.cos(), -angle.sin(), angle.sin(), angle.cos()
        yiq = YIQ.to(x.device)
        out = torch.einsum("bij,bjhw->bihw", torch.linalg.inv(yiq) @ rot @ yiq, out).clamp(0, 1)
    return torch.where(apply.view(-1, 1, 1, 1), out, x)


def _blur(x: torch.Tensor, sigma: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur, one sigma per sample, kernel ~10% of the image side (odd, >= 3)."""
    b, c, h, w = x.shape
    k = max(3, int(0.1 * h) // 2 * 2 + 1)
    t = torch.arange(k, device=x.device) - k // 2
    ker = torch.exp(-t[None] ** 2 / (2 * sigma[:, None] ** 2))
    ker = (ker / ker.sum(1, keepdim=True)).repeat_interleave(c, 0)
    y = F.pad(x.reshape(1, b * c, h, w), (k // 2,) * 4, mode="reflect")
    y = F.conv2d(F.conv2d(y, ker[:, None, :, None], groups=b * c), ker[:, None, None, :], groups=b * c)
    return torch.where(apply.view(-1, 1, 1, 1), y.view(b, c, h, w), x)


# ----------------------------------------------------------------------------- model and losses

def mlp(layers: int, dim_in: int, last_bn: bool) -> nn.Sequential:
    """MoCo v3's head MLP (Linear, BN, ReLU; hidden 512, out 256; BN without running statistics).

    Linear layers keep their bias: that reproduces LW-FedSSL's 0.759 M head parameters (§2.4).
    """
    mods: list[nn.Module] = []
    for i in range(layers):
        last = i == layers - 1
        mods.append(nn.Linear(dim_in if i == 0 else HIDDEN, OUT if last else HIDDEN))
        if not last:
            mods += [nn.BatchNorm1d(HIDDEN, track_running_stats=False), nn.ReLU()]
        elif last_bn:
            mods.append(nn.BatchNorm1d(OUT, affine=False, track_running_stats=False))
    return nn.Sequential(*mods)


class SSLModel(FedModel):
    """An encoder's stem, blocks and head (its ``head.pool`` gives the features) plus H (and P)."""

    def __init__(self, encoder: FedModel, predictor: bool):
        super().__init__(encoder.full_widths, encoder.widths)
        if not hasattr(encoder.head, "pool"):
            raise ConfigError("--model", "self-supervised methods need an encoder whose head exposes "
                                         "pre-logit features (head.pool); allowed: vit-tiny")
        self.stem, self.blocks, self.head = encoder.stem, encoder.blocks, encoder.head
        self._dims, self._ties = encoder.param_dims(), encoder.tied_groups()
        self.projector = mlp(3, encoder.num_features, last_bn=True)
        self.predictor = mlp(2, OUT, last_bn=False) if predictor else None

    def param_dims(self):
        return self._dims

    def tied_groups(self):
        return self._ties

    def features(self, x: torch.Tensor, blocks: Iterable[int] | None = None) -> torch.Tensor:
        return self.head.pool(self.forward_features(x, blocks))


def infonce(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    """MoCo v3's contrastive loss, 2 tau x CE(q k^T / tau, i -> i) on L2-normalised q, k: the other samples
    of the batch are the negatives (no queue).

    The factor 2 tau is MoCo v3's (Chen, Xie, He 2021, arXiv 2104.02057; official code
    ``facebookresearch/moco-v3`` ``moco/builder.py``: the cross-entropy times ``2 * self.T``);
    LW-FedSSL (methods-depth-ssl.md §2.2) writes the objective as l_con(q1, k2, tau) + l_con(q2, k1, tau)
    without stating a scale. The symmetric loss of :class:`SSLTrainer` sums two such terms, each
    scaled, as the official ``forward`` (``l1 + l2``). Under AdamW (the default) the scale
    hardly changes the updates; under ``--optimizer sgd`` it scales the effective learning rate.
    """
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / tau
    return F.cross_entropy(logits, torch.arange(len(q), device=q.device)) * (2 * tau)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR's NT-Xent over 2N views: each view's positive is its pair, the other 2N-2 are negatives."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = (z @ z.T / tau).fill_diagonal_(float("-inf"))
    n = len(z1)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, target)


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _units(model: SSLModel, step: Step) -> list[nn.Module]:
    order = range(len(model.blocks)) if step.blocks is None else step.blocks
    return [model.stem, *(model.blocks[i] for i in order)]


# ----------------------------------------------------------------------------- client training

class SSLTrainer(Trainer):
    """One client's local SSL optimisation (LW-FedSSL Algorithm 2 for MoCo v3; SimCLR without a target)."""

    def __init__(self, method: "SSLMethod", model: SSLModel, plan: Plan, step: Step, lr: float):
        super().__init__(method, model, plan, step, lr)
        units = _units(model, step)
        first = next((i for i, u in enumerate(units) if _trains(u)), len(units))
        self.prefix, self.online = units[:first], units[first:]
        self.target: nn.ModuleDict | None = None
        if model.predictor is not None:
            self.target = nn.ModuleDict({"units": nn.ModuleList(copy.deepcopy(self.online)),
                                         "head": copy.deepcopy(model.head),
                                         "projector": copy.deepcopy(model.projector)}).requires_grad_(False)
            online = [p for m in (*self.online, model.head, model.projector) for p in m.parameters()]
            pairs = [(t, o) for t, o in zip(self.target.parameters(), online) if o.requires_grad]
            self.momentum_pairs = ([t for t, _ in pairs], [o for _, o in pairs])

    def optimizer(self, lr: float) -> torch.optim.Optimizer:
        opts, cfg = self.method.options, self.method.config
        if opts.optimizer == "adamw":  # base lr per 256 samples, the run's lr schedule applied on top
            return torch.optim.AdamW(self.params, lr=opts.base_lr * cfg.batch_size / 256 * lr / cfg.lr,
                                     weight_decay=opts.adamw_weight_decay)
        return super().optimizer(lr)

    @staticmethod
    def _branch(units: Iterable[nn.Module], head: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for unit in units:
            h = unit(h)
        return head.pool(h).chunk(2)

    def loss(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        m, tau = self.model, self.method.options.tau
        h = torch.cat(views(x, gen, self.method.dataset))
        with torch.no_grad():
            for unit in self.prefix:
                h = unit(h)
        z1, z2 = (m.projector(f) for f in self._branch(self.online, m.head, h))   # heads per view (BN)
        if self.target is None:
            return nt_xent(z1, z2, tau)
        with torch.no_grad():
            k1, k2 = (self.target["projector"](f)
                      for f in self._branch(self.target["units"], self.target["head"], h))
        return infonce(m.predictor(z1), k2, tau) + infonce(m.predictor(z2), k1, tau)

    def step(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        if len(x) < 2:  # a contrastive batch needs a negative (and BN two samples): skip a trailing single
            return torch.zeros((), device=x.device)
        loss = super().step(x, y, gen)
        if self.target is not None:
            with torch.no_grad():
                torch._foreach_lerp_(*self.momentum_pairs, 1 - self.method.options.ema)
        return loss

    def modules(self) -> list[nn.Module]:
        return [self.model] + ([self.target] if self.target is not None else [])


def online_macs(model: SSLModel, step: Step, x: torch.Tensor) -> float:
    """LW-FedSSL's FLOP convention (App. A.1, methods-depth-ssl.md §2.4): forward multiply-adds of one
    pass of the online network per sample, units with trainable parameters counted 3x (forward +
    backward), frozen ones 1x; SimCLR counts both views (the paper's SimCLR rows are exactly 2x its
    MoCo v3 rows, inferred). ``x``: a batch of 2 (BN), on meta; the step's trainable flags set."""
    head = model.head
    units = [(u, u) for u in _units(model, step)] + [(head, head.pool), (model.projector, model.projector)]
    if model.predictor is not None:
        units.append((model.predictor, model.predictor))
    total, h = 0, x
    with torch.no_grad():
        for unit, fn in units:
            with FlopCounterMode(display=False) as counter:
                h = fn(h)
            total += counter.get_total_flops() * (3 if _trains(unit) else 1)
    return total / 2 / len(x) * (1 if model.predictor is not None else 2)


# ----------------------------------------------------------------------------- the method base

@dataclass(frozen=True)
class SSLOptions:
    tau: Annotated[float, Range(gt=0, le=100), "InfoNCE / NT-Xent temperature (LW-FedSSL §4.1)"] = 0.05
    ema: Annotated[float, Range(ge=0, lt=1), "MoCo v3 target momentum mu (LW-FedSSL §4.1)"] = 0.99
    optimizer: Annotated[Literal["adamw", "sgd"], "adamw (paper) or sgd (--lr, --momentum, --weight-decay)"] = "adamw"
    base_lr: Annotated[float, Range(gt=0, le=100), "AdamW lr per 256 samples (paper: 3e-4 at batch 512)"] = 1.5e-4
    adamw_weight_decay: Annotated[float, Range(ge=0, le=1), "AdamW weight decay"] = 1e-5
    eval: Annotated[Literal["linear", "finetune"], "linear (probe on frozen features) or finetune"] = "linear"
    probe_epochs: Annotated[int, Range(ge=1, le=10_000), "epochs of the linear probe"] = 100
    finetune_epochs: Annotated[int, Range(ge=1, le=10_000), "epochs of fine-tuning (--eval finetune)"] = 5
    eval_samples: Annotated[int, Range(ge=0), "labelled train images used by the evaluation (0: all)"] = 0


class SSLMethod(Method):
    """Clients use images only; H (and P) live in the global model; evaluation is a linear probe."""

    Options = SSLOptions
    supervised = False
    preferred_model = "vit-tiny"          # the papers' backbone
    objective: ClassVar[str] = "mocov3"   # or "simclr" (fixes whether the model holds a predictor)

    @classmethod
    def build_global(cls, build: "Callable[..., FedModel]") -> FedModel:
        return cls.client_builder(build)()

    @classmethod
    def client_builder(cls, build: "Callable[..., FedModel]") -> "Callable[..., FedModel]":
        return lambda **kw: SSLModel(build(**kw), predictor=cls.objective == "mocov3")

    def trainable(self, blocks: Iterable[int], stem: bool) -> tuple[str, ...]:
        """Prefixes trained with ``blocks``: the encoder's output norm and the SSL heads always train."""
        heads = ("head.norm", "projector") + (("predictor",) if self.objective == "mocov3" else ())
        return ("stem",) * stem + tuple(f"blocks.{i}" for i in blocks) + heads

    def full_plan(self) -> Plan:
        """End-to-end training under the same SSL loss (FedMoCoV3 / FedSimCLR): defines budget 1."""
        return Plan.of(steps=(Step(trainable=self.trainable(range(len(self.ctx.model.blocks)), stem=True)),),
                       label="end-to-end")

    def trainer(self, model: FedModel, plan: Plan, step: Step, lr: float, client: int | None = None) -> Trainer:
        return SSLTrainer(self, model, plan, step, lr)

    # --- evaluation -----------------------------------------------------------------------
    def describe_eval(self) -> str:
        o = self.options
        data = f"{o.eval_samples or 'all'} labelled train images"
        if o.eval == "finetune":
            return f"fine-tune top-1: whole encoder + new linear classifier, {o.finetune_epochs} epochs on {data}, test split"
        return (f"linear-probe top-1: frozen encoder (all blocks), linear classifier on standardised features, "
                f"{o.probe_epochs} epochs on {data}, test split")

    def evaluate(self, global_model: FedModel, rnd: int) -> dict[str, float]:
        ds, o = self.dataset, self.options
        gen = generator(self.config.seed, "ssl-eval", device=self.ctx.device)
        n = len(ds.train_y)
        idx = torch.randperm(n, generator=gen, device=gen.device)[:o.eval_samples] if o.eval_samples else None
        x, y = (ds.train_x, ds.train_y) if idx is None else (ds.train_x[idx], ds.train_y[idx])
        model = global_model.eval()
        with torch.enable_grad():
            logits = (self._finetune(global_model, x, y, gen) if o.eval == "finetune" else
                      linear_probe(lambda b: model.features(normalize(b, ds)), x, y, ds, o.probe_epochs, gen))
        model.train()
        return {"accuracy": float((logits.argmax(1) == ds.test_y).float().mean()),
                "loss": float(F.cross_entropy(logits, ds.test_y))}

    def _finetune(self, global_model: FedModel, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Whole encoder + a fresh classifier with AdamW (lr 1e-3, wd 1e-5, LW-FedSSL §4.1), crop/flip if the data augments."""
        ds = self.dataset
        model = copy.deepcopy(global_model).train()
        model.projector = model.predictor = None
        nn.init.normal_(model.head.fc.weight, std=0.01, generator=gen)
        nn.init.zeros_(model.head.fc.bias)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-5)
        for _ in range(self.options.finetune_epochs):
            for idx in torch.randperm(len(y), generator=gen, device=gen.device).split(self.config.batch_size):
                xb = augment(x[idx], gen) if ds.augment else x[idx]
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(normalize(xb, ds)), y[idx]).backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            return torch.cat([model(normalize(b, ds)) for b in ds.test_x.split(500)])


def linear_probe(features: "Callable[[torch.Tensor], torch.Tensor]", x: torch.Tensor, y: torch.Tensor,
                 ds: Dataset, epochs: int, gen: torch.Generator) -> torch.Tensor:
    """Test logits of a linear classifier (Adam, lr 1e-2, batch 256) on standardised frozen features."""
    with torch.no_grad():
        train = torch.cat([features(b) for b in x.split(500)])
        test = torch.cat([features(b) for b in ds.test_x.split(500)])
    mean, std = train.mean(0), train.std(0) + 1e-6
    train, test = (train - mean) / std, (test - mean) / std
    clf = nn.Linear(train.shape[1], ds.num_classes).to(train.device)
    nn.init.normal_(clf.weight, std=0.01, generator=gen)
    nn.init.zeros_(clf.bias)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-2)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen, device=gen.device).split(256):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(clf(train[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        return clf(test)
