"""Claims audit (``fedbench audit``): each paper's stated resource figure beside what fedbench measures for the
same configuration, without training.

Every configuration is built by the method's own code (``fedbench.engine.prepare(cfg, shapes_only=True)``,
so CIFAR-10 shapes work offline with a stand-in) and measured by the run's profiler, as ``fedbench profile``
does, always in fp32: peak training memory (live-tensor peak of one step), FLOPs (``FlopCounterMode``; fvcore forward
multiply-adds where the paper quotes those) and bytes (what is sent down and up).

A row: paper, configuration, quantity, claimed, measured, ratio = measured / claimed, and, where fedbench
re-implements the paper's own accounting (SLT's memory estimator, LW-FedSSL's FLOP convention), the value
that accounting gives (``paper_convention``). "Claimed" holds only numbers read in a citable source: the
reference documents, or, for papers they do not cover, the authors' published figures (paper or repository, e.g.
their Flower baseline's README); ``claim_source`` says where. A figure none of them states is left empty ("not
stated"), with the paper's own accounting, where one follows by construction (FjORD's p^2 of a width-p
sub-model), as ``paper_convention``. ``why`` says in one line what separates the two, from the measurement's
own breakdown (parameters, gradients, optimizer state, saved activations, batch, and the rest: working memory
that is never saved for backward).

Batch sizes are the papers' where that is cheap on a CPU; LW-FedSSL is measured at batch 32 (its paper:
512), said in its rows. ``quick=True`` (tests) measures every paper at a tiny batch (and LW-FedSSL with one
round per stage): the same rows, memory figures not comparable with the claims.
"""
from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import date
from fractions import Fraction
from pathlib import Path

import pandas as pd
import torch
from rich.table import Table

from fedbench.config import resolve
from fedbench.engine import Run, prepare
from fedbench.profiler import Measurement, forward_macs
from fedbench.provenance import device_name
from fedbench.report import profile_rows

MB, MiB = 1e6, 2**20
COLUMNS = ["paper", "configuration", "quantity", "claimed", "measured", "ratio", "paper_convention",
           "claim_source", "why"]
NOT_STATED = "not stated"


@dataclass(frozen=True)
class Row:
    paper: str
    configuration: str
    quantity: str
    claimed: float | None     # read in a cited source only (claim_source); None: not stated there
    measured: float           # fedbench's profiler
    claim_source: str
    why: str
    paper_convention: float | None = None  # fedbench's re-implementation of the paper's own accounting

    @property
    def ratio(self) -> float | None:
        return None if self.claimed is None else self.measured / self.claimed


def breakdown(m: Measurement) -> dict[str, float]:
    """A measurement's parts in MB; ``other``: peak minus the rest (working memory never saved for backward:
    frozen-forward intermediates, backward and optimizer temporaries)."""
    parts = {"params": m.params, "grads": m.grads, "optimizer": m.optimizer, "activations": m.activations,
             "batch": m.batch}
    return {k: v / MB for k, v in parts.items()} | {"other": max(0, m.peak - sum(parts.values())) / MB}


def _prepare(device: str, **settings) -> Run:
    """A shapes-only run in fp32 (the papers' precision): ``--precision auto`` would choose by a timing, so a busy
    machine could measure one paper's configurations in bf16 and another's in fp32 (half the saved activations)."""
    return prepare(resolve({"device": device, "quiet": True, "precision": "fp32", **settings}), shapes_only=True)


# --- SLT -------------------------------------------------------------------------------------------
SLT = "SLT (Pfeiffer et al. 2023)"
SLT_FULL_MB, SLT_BUDGET_MB = 98.4, 12.0  # methods-width-slt.md §5.3: the code's estimator, ResNet20, s_FD 1 / 0.125
SLT_ESTIMATE = "methods-width-slt.md §5.3 (the SLT code's estimator, recomputed there)"
SLT_SOURCE = ("methods-width-slt.md §5.3: every configuration of the 0.125 sequence fits the budget, the "
              "estimator's memory of the width-0.125 model (12.0 MB)")


def audit_slt(device: str, quick: bool) -> list[Row]:
    """SLT's 0.125 sequence on resnet20-slt / CIFAR-10 shapes, batch 32, fitted by the paper's estimator
    (``--slt-memory-model paper``: the measured model refuses 0.125, slt.py ``floor``), each configuration
    measured. The claim: every configuration needs at most the budget, the width-0.125 model's memory."""
    batch = 4 if quick else 32
    run = _prepare(device, method="slt", model="resnet20-slt", dataset="cifar10", memory_budget=0.125,
                   batch_size=batch, rounds=1000, slt_memory_model="paper")
    slt, prof, full = run.method, run.profiler, run.ctx.full_memory
    est_full, est_budget = slt.limit(1.0), slt.limit(0.125)
    setting = f"resnet20-slt, CIFAR-10 shapes, batch {batch}"
    small = prof.measure(slt.config_plan(0.125, 0), 0)  # the width-0.125 small model, all trained: the budget
    saved = breakdown(prof.measure(slt.full_plan(), 0))["activations"]
    rows = [
        Row(SLT, f"{setting}; full model", "training memory, MB", SLT_FULL_MB, full / MB, SLT_ESTIMATE,
            f"the estimator adds up every op output that backward reaches ({est_full / MB:.1f} MB as fedbench "
            f"re-implements it); autograd saves {saved:.1f} MB of activations", est_full / MB),
        Row(SLT, f"{setting}; width-0.125 small model (the budget)", "training memory, MB", SLT_BUDGET_MB,
            small.peak / MB, SLT_ESTIMATE, "as the full model: every op output counted, not what autograd saves",
            est_budget / MB),
    ]
    for s, k_t in slt.configs:
        plan = slt.config_plan(s, k_t)
        m = prof.measure(plan, 0)
        other = breakdown(m)["other"]
        estimate = slt.estimate(plan)
        if m.peak <= small.peak:
            why = f"within: narrower than the budget's model (s = {s:g})"
        else:
            why = (f"over ({m.peak / full:.3f} of the measured full model): {m.peak / MB:.1f} MB measured, "
                   f"{estimate / MB:.1f} estimated, the budget model {small.peak / MB:.1f} vs {est_budget / MB:.1f}: "
                   f"the estimator counts every op output (more than autograd saves) but not this step's "
                   f"{other:.1f} MB of working memory (frozen full-width forward, backward temporaries)")
        rows.append(Row(SLT, f"{setting}; 0.125 sequence: {plan.label}", "peak training memory / the budget's "
                        "(width-0.125 model's; claimed: at most 1)", 1.0, m.peak / small.peak, SLT_SOURCE, why,
                        estimate / est_budget))
    return rows


# --- FEDEPTH ---------------------------------------------------------------------------------------
FEDEPTH = "FEDEPTH (Zhang et al. 2023)"
# methods-depth-ssl.md §1.3: the authors' hand partitions of PreResNet-20 (blocks L1..L9 = 0..8) per budget, and
# the reference's own count of each step's stored activations / the full model's (inferred there, not a claim).
HAND_PARTITIONS = {
    "1/6": ([(0, 0), (1, 1), (2, 2), (3, 3), (4, 5), (6, 8)], [0.23, 0.17, 0.17, 0.11, 0.17, 0.14]),
    "1/3": ([(0, 1), (2, 3), (4, 8)], [0.40, 0.28, 0.31]),
    "1/2": ([(0, 2), (3, 8)], [0.57, 0.43]),
}
FEDEPTH_SOURCE = ("methods-depth-ssl.md §1.3 / profiling.md §4.2: the code's group budgets [1/6, 1/3, 1/2, 1] "
                  "of full-model training memory, partitions fixed by hand")


def blocks_label(first: int, last: int) -> str:
    return f"L{first + 1}" if first == last else f"L{first + 1}-L{last + 1}"


def audit_fedepth(device: str, quick: bool) -> list[Row]:
    """The authors' hand partitions built with FeDepth's own step builder (``partition_plan`` over
    ``step_for``), each step measured, at the code's batch 128."""
    batch = 8 if quick else 128
    run = _prepare(device, method="fedepth", model="preresnet20", dataset="cifar10", batch_size=batch)
    fedepth, prof, full = run.method, run.profiler, run.ctx.full_memory
    full_saved = prof.measure(fedepth.full_plan(), 0).activations
    rows = []
    for name, (spans, counted) in HAND_PARTITIONS.items():
        budget = float(Fraction(name))
        plan = fedepth.partition_plan(spans, 0)
        for i, ((first, last), ref) in enumerate(zip(spans, counted)):
            m = prof.measure(plan, i)
            p = breakdown(m)
            saved = m.activations / full_saved
            what = ("stem + " if i == 0 else "") + blocks_label(first, last) + " + head"
            why = (f"{'within' if m.peak / full <= budget else 'over'}: saved activations {saved:.3f} of the full "
                   f"model's (the reference's count: {ref:.2f}), plus {p['other']:.1f} MB of working memory (backward "
                   f"temporaries, frozen-forward intermediates) and all {p['params']:.1f} MB of weights held")
            rows.append(Row(FEDEPTH, f"preresnet20, CIFAR-10 shapes, batch {batch}; budget {name}, step {i + 1}/"
                            f"{len(spans)}: {what}", "peak training memory / full model's (claimed: at most "
                            "the budget)", budget, m.peak / full, FEDEPTH_SOURCE, why))
    return rows


# --- LW-FedSSL -------------------------------------------------------------------------------------
LW = "LW-FedSSL (Tun et al. 2024)"
LW_SOURCE = "methods-depth-ssl.md §2.5 Table 2 (MoCo v3, ViT-Tiny, S = 12, R = 180, batch 512)"


def audit_lw_fedssl(device: str, quick: bool) -> list[Row]:
    """lw-fedssl's whole schedule against end-to-end FedMoCoV3 (fedssl's plan) by the code path of
    ``fedbench profile --method lw-fedssl``: ``profile_rows`` (each stage's memory) and the method's
    ``accounting`` (the whole-schedule FLOP and byte ratios that command's last row shows)."""
    batch, per_stage = (4, 1) if quick else (32, 15)
    run = _prepare(device, method="lw-fedssl", model="vit-tiny", dataset="cifar10", batch_size=batch,
                   rounds=12 * per_stage)
    table = profile_rows(run)
    e2e, stages = table.iloc[0], table.iloc[1:]
    worst = stages.loc[stages["of_full"].idxmax()]
    ratios = run.method.accounting()
    setting = (f"vit-tiny (patch 4), CIFAR-10 shapes (paper: COCO at 32x32), 12 stages x {per_stage} rounds, "
               f"batch {batch} (paper: 512)")
    fixed = worst["params_MB"] + worst["grads_MB"] + worst["optimizer_MB"]
    return [
        Row(LW, f"{setting}; the costliest stage ({worst['config']}) vs end-to-end", "peak training memory ratio",
            2.61 / 8.72, float(worst["of_full"]), LW_SOURCE + ": 2.61 / 8.72 GB = 0.30x",
            f"batch {batch}, not 512: saved activations (end-to-end {e2e['activations_MB']:.0f} MB, the stage "
            f"{worst['activations_MB']:.0f} MB) grow with the batch, the stage's {fixed:.0f} MB of weights (with the "
            "momentum target), gradients and AdamW state do not; the paper's GPU tool is not stated (§2.4)"),
        Row(LW, f"{setting}; whole schedule", "training FLOPs ratio", 139 / 586, ratios["flops"],
            LW_SOURCE + ": 139 / 586 GFLOPs = 0.24x",
            "fedbench counts what runs: the momentum target's forward too, which end-to-end pays for every block "
            "and LW only for the trained one; paper_convention: fedbench's count in the paper's (one online pass, "
            "trained units 3x)", ratios["paper_flops"]),
        Row(LW, f"{setting}; whole schedule, stateful clients (paper's default)", "bytes down + up ratio",
            1.66 / 8.40, ratios["bytes_stateful"], LW_SOURCE + ": 1.66 / 8.40 GB = 0.20x",
            "the same accounting: frozen blocks stay on the client, heads H and P go both ways every round"),
        Row(LW, f"{setting}; whole schedule, stateless clients (worst case)", "bytes down + up ratio",
            3.35 / 8.40, ratios["bytes_stateless"], "methods-depth-ssl.md §2.5 Table 5: 3.35 / 8.40 GB = 0.40x",
            "the same accounting: the whole encoder so far goes down every round"),
    ]


# --- Federated Dropout -----------------------------------------------------------------------------
FD = "Federated Dropout (Caldas et al. 2018)"
FD_WIDTHS = (0.75, 0.5, 0.25)
FD_SOURCE = ("paper-tables.md §4 / methods-width-slt.md §3.1, the abstract: 'up to' {x}, combined with lossy "
             "compression; keep-rate and model not stated")
FD_CLAIMS = {"bytes down / full model's": (1 / 14, "14x less down"), "bytes up / full model's": (1 / 28, "28x less up"),
             "training FLOPs / full model's": (1 / 1.7, "1.7x less local computation")}


def audit_fd(device: str, quick: bool) -> list[Row]:
    """FD's paper variant (floor widths, int32 index lists sent down) on resnet20, the model of the SLT authors'
    FD (the FD paper's models are not in the reference), at keep-rates 0.75, 0.5, 0.25 (the paper's: not
    stated). The abstract's "up to" figures stand beside every keep-rate."""
    batch = 4 if quick else 32
    run = _prepare(device, method="fd", model="resnet20", dataset="cifar10", batch_size=batch)
    fd, prof, full = run.method, run.profiler, run.ctx.full_memory
    base = fd.full_plan()
    down0, up0 = prof.bytes_of(base)
    flops0 = prof.train_flops(base)
    rows = []
    for w in FD_WIDTHS:
        plan = fd.width_plan(w)
        down, up = prof.bytes_of(plan)
        m = prof.measure(plan, 0)
        config = (f"resnet20 (the SLT authors' FD model), CIFAR-10 shapes, batch {batch}; keep-rate {w:g} "
                  "(paper's: not stated)")
        measured = {"bytes down / full model's": down / down0, "bytes up / full model's": up / up0,
                    "training FLOPs / full model's": prof.train_flops(plan) / flops0}
        for quantity, value in measured.items():
            claim, text = FD_CLAIMS[quantity]
            why = "dropout alone: about w^2"
            if "bytes" in quantity:
                why += "; the claim adds lossy compression, which fedbench does not implement"
            if quantity.startswith("bytes down"):
                why += f"; {plan.index_bytes / 1e3:.1f} kB of int32 index lists sent down"
            rows.append(Row(FD, config, quantity, claim, value, FD_SOURCE.format(x=text), why))
        p = breakdown(m)
        rows.append(Row(FD, config, "peak training memory / full model's", None, m.peak / full, NOT_STATED,
                        f"saved activations ({p['activations']:.1f} MB of {m.peak / MB:.1f}) scale with w: about w"))
    return rows


# --- HeteroFL and FedRolex (PreResNet-18 widths) -----------------------------------------------------
HETEROFL = "HeteroFL (Diao et al. 2021)"
HETEROFL_LEVELS = {"a": (1.0, 9.6e6, 330.2e6, 36.71), "b": (0.5, 2.4e6, 83.3e6, 9.19),
                   "c": (0.25, 604e3, 21.2e6, 2.30), "d": (0.125, 152e3, 5.5e6, 0.58),
                   "e": (0.0625, 38e3, 1.5e6, 0.15)}  # methods-width-slt.md §2.6: width, params, FLOPs, space (MB)
HETEROFL_SOURCE = "methods-width-slt.md §2.6 (author slides, CIFAR10, PreResNet18)"
FLOPS = "FLOPs per sample, M (measured: fvcore forward multiply-adds)"


def width_costs(run: Run, width: float) -> tuple[int, int, int]:
    """Parameters, fvcore forward multiply-adds per sample and bytes sent down of the method's width-w model."""
    prof = run.profiler
    plan = run.method.width_plan(width)
    model = prof.build_client(plan)
    return sum(p.numel() for p in model.parameters()), forward_macs(model, prof.sample_shape), prof.bytes_of(plan)[0]


def agree(measured: float, claimed: float) -> str:
    return f"{abs(measured / claimed - 1) * 100:.1f}% apart"


def audit_heterofl(device: str, quick: bool) -> list[Row]:
    """Levels a-e (first-k, ceil) of preresnet18 on CIFAR-10 shapes at the code's batch 10: parameters and
    fvcore forward multiply-adds of the width-w model, bytes sent, measured training memory."""
    batch = 2 if quick else 10
    run = _prepare(device, method="heterofl", model="preresnet18", dataset="cifar10", batch_size=batch)
    prof, full = run.profiler, run.ctx.full_memory
    params0, macs0, down0 = width_costs(run, 1.0)
    _, claimed_params0, claimed_flops0, space0 = HETEROFL_LEVELS["a"]
    config = f"preresnet18, CIFAR-10 shapes, batch {batch}"
    gap = ("the reference cannot explain the table's 9.6 M for the 11.2 M-parameter network the code builds "
           "(§2.6); FedRolex reports 11.1722 M for it (rows below)")
    rows = [
        Row(HETEROFL, f"{config}; level a (w = 1)", "parameters, M", claimed_params0 / 1e6, params0 / 1e6,
            HETEROFL_SOURCE, gap),
        Row(HETEROFL, f"{config}; level a (w = 1)", FLOPS, claimed_flops0 / 1e6, macs0 / 1e6, HETEROFL_SOURCE,
            "the paper's counter is not in the reference; FedRolex reports 557.656 M for this network (rows below)"),
        Row(HETEROFL, f"{config}; level a (w = 1)", "model size, MB (measured: fp32 bytes sent / 2^20)", space0,
            down0 / MiB, HETEROFL_SOURCE, "4-byte parameters in MiB (9.6 M x 4 B = 36.6 MiB): the parameter "
            "count's gap"),
    ]
    for level, (w, claimed_params, claimed_flops, _) in list(HETEROFL_LEVELS.items())[1:]:
        params, macs, _ = width_costs(run, w)
        label = f"{config}; level {level} (w = {w:g}) vs level a"
        m = prof.measure(run.method.width_plan(w), 0)
        p = breakdown(m)
        rows += [
            Row(HETEROFL, label, "parameter ratio", claimed_params / claimed_params0, params / params0,
                HETEROFL_SOURCE + f": {claimed_params / 1e6:g} M / 9.6 M",
                f"{agree(params / params0, claimed_params / claimed_params0)}: both about w^2 (the classifier keeps "
                "its 10 rows; the table rounds to 2-3 digits)"),
            Row(HETEROFL, label, "FLOP ratio (measured: fvcore forward)", claimed_flops / claimed_flops0,
                macs / macs0, HETEROFL_SOURCE + f": {claimed_flops / 1e6:g} M / 330.2 M",
                f"{agree(macs / macs0, claimed_flops / claimed_flops0)}: both about w^2; the paper's counter is not "
                "in the reference"),
            Row(HETEROFL, label, "peak training memory / full model's", None, m.peak / full, NOT_STATED,
                f"saved activations ({p['activations']:.1f} MB) scale with w, weights, gradients and momentum "
                f"({(p['params'] + p['grads'] + p['optimizer']):.1f} MB) with w^2"),
        ]
    return rows


FEDROLEX = "FedRolex (Alam et al. 2022)"
FEDROLEX_SOURCE = "paper-tables.md §1.5 Table 7 (PreResNet18, CIFAR, averages over participating clients)"
FEDROLEX_WIDTHS = (1.0, 0.5, 0.25, 0.125, 0.0625)  # beta, uniform over the 5 levels (§1.1)
FEDROLEX_CLAIMS = {  # Table 7: (params M, FLOPs M, model size MB) of homogeneous largest / FedRolex / smallest
    "homogeneous largest (beta = 1)": (11.1722, 557.656, 42.62),
    "FedRolex, mean over beta = 1, 1/2, 1/4, 1/8, 1/16": (2.9781232, 149.048384, 11.36),
    "homogeneous smallest (beta = 1/16)": (0.04451, 2.41318, 0.17),
}


def audit_fedrolex(device: str, quick: bool) -> list[Row]:
    """Table 7's per-client averages, measured on fedrolex's own width-beta models (preresnet18, CIFAR-10
    shapes, batch 10 as Table 8): the mean over the five levels, where Table 7 averages over clients."""
    batch = 2 if quick else 10
    run = _prepare(device, method="fedrolex", model="preresnet18", dataset="cifar10", batch_size=batch)
    costs = {w: width_costs(run, w) for w in FEDROLEX_WIDTHS}
    mean = [sum(c[i] for c in costs.values()) / len(costs) for i in range(3)]
    measured = {"homogeneous largest (beta = 1)": costs[1.0], "homogeneous smallest (beta = 1/16)": costs[0.0625],
                "FedRolex, mean over beta = 1, 1/2, 1/4, 1/8, 1/16": mean}
    config = f"preresnet18, CIFAR-10 shapes, batch {batch}"
    rows = []
    for what, (params, flops, size) in FEDROLEX_CLAIMS.items():
        p, f, d = measured[what]
        rows += [
            Row(FEDROLEX, f"{config}; {what}", "parameters per client, M", params, p / 1e6, FEDROLEX_SOURCE,
                f"{agree(p / 1e6, params)}: the same network"),
            Row(FEDROLEX, f"{config}; {what}", FLOPS, flops, f / 1e6, FEDROLEX_SOURCE,
                f"{agree(f / 1e6, flops)}: the paper's counter is not in the reference"),
            Row(FEDROLEX, f"{config}; {what}", "model size per client, MB (measured: fp32 bytes sent / 2^20)", size,
                d / MiB, FEDROLEX_SOURCE, f"{agree(d / MiB, size)}: 4-byte parameters in MiB"),
        ]
    return rows


# --- FjORD -----------------------------------------------------------------------------------------
FJORD = "FjORD (Horvath et al. 2021)"
FJORD_SETUP = ("P and batch 32 as github.com/adap/flower baselines/fjord/README.md, the authors' baseline (ResNet-18, "
               "CIFAR-10), which states no memory, FLOP or byte figure")


def audit_fjord(device: str, quick: bool) -> list[Row]:
    """FjORD's width-p sub-models for p in P (the Flower baseline's P) on resnet20, CIFAR-10 shapes, batch 32 (the
    baseline's; its ResNet-18 is not measured here), each as a client of p_max = p: parameters and fvcore forward
    multiply-adds of the width-p model, peak training memory of the p_max = p plan (the maximum over its steps, one
    per drawable width), bytes down and up, each over p = 1's. No source read states a figure; the nominal p^2 of a
    width-p (first-k) sub-model stands as the paper convention."""
    batch = 2 if quick else 32
    run = _prepare(device, method="fjord", model="resnet20", dataset="cifar10", batch_size=batch, memory_budget=1)
    fj, prof, full = run.method, run.profiler, run.ctx.full_memory
    params0, macs0, down0 = width_costs(run, 1.0)
    _, up0 = prof.bytes_of(fj.width_plan(1.0))
    P = ", ".join(f"{p:g}" for p in fj.P)
    rows = []
    for p in fj.P:
        plan = fj.width_plan(p)
        params, macs, down = width_costs(run, p)
        _, up = prof.bytes_of(plan)
        steps = [prof.measure(plan, i) for i in range(len(plan.steps))]
        top = max(range(len(steps)), key=lambda i: steps[i].peak)
        widest = breakdown(steps[top])
        c = (f"resnet20, CIFAR-10 shapes, batch {batch}, P = {P} ({FJORD_SETUP}); width p = {p:g} (p_max = {p:g}, "
             "ceil(pK) channels)")
        rounding = (f"{agree(params / params0, p * p)} from p^2: ceil(pK) keeps at least pK channels (16 x {p:g} -> "
                    f"{math.ceil(round(16 * p, 9))}), the input's 3 channels and the 10 classifier rows stay")
        rows += [
            Row(FJORD, c, "parameters / full model's", None, params / params0, NOT_STATED, rounding, p * p),
            Row(FJORD, c, "forward FLOPs / full model's (fvcore multiply-adds)", None, macs / macs0, NOT_STATED,
                f"{agree(macs / macs0, p * p)} from p^2: every conv's in and out channels scale with p, the stem's "
                "input does not", p * p),
            Row(FJORD, c, "peak training memory / full model's", None, max(s.peak for s in steps) / full, NOT_STATED,
                f"about p, not p^2: the step p = {fj.allowed(p)[top]:g} peaks; its saved activations "
                f"({widest['activations']:.1f} MB, width x batch) outweigh p_max-sized params, grads and SGD state "
                f"({widest['params']:.2f} MB each, ~p^2); the steps' peaks: "
                f"{', '.join(f'{s.peak / MB:.1f}' for s in steps)} MB", p * p),
            Row(FJORD, c, "bytes down / full model's", None, down / down0, NOT_STATED,
                "the dense p_max sub-model (fp32), as its parameter ratio", p * p),
            Row(FJORD, c, "bytes up / full model's", None, up / up0, NOT_STATED,
                "the whole p_max sub-model is uploaded whatever widths were drawn (the baseline's choice)", p * p),
        ]
    return rows


# --- DepthFL ---------------------------------------------------------------------------------------
DEPTHFL = "DepthFL (Kim et al. 2023)"
DEPTHFL_VRAM = ("github.com/adap/flower baselines/depthfl/README.md (the first author's baseline) states only that, "
                "with the default settings (ResNet18, CIFAR-100, batch 50), clients use 1.3 GB of GPU "
                "memory: not this configuration")


def audit_depthfl(device: str, quick: bool) -> list[Row]:
    """DepthFL's depth-d local models (``depth_plan``: stem, levels 1..d and their d exits, all trained) on resnet20
    (3 stages: depths 1-3; the paper's ResNet-18 has 4), CIFAR-10 shapes, batch 50 (the baseline README's): the
    parameters a depth-d client trains and sends, its measured peak training memory, bytes up and training FLOPs
    per sample (forward and backward, ``FlopCounterMode``), each over the full depth's. Nothing read states such a
    figure per depth."""
    batch = 2 if quick else 50
    run = _prepare(device, method="depthfl", model="resnet20", dataset="cifar10", batch_size=batch, memory_budget=1)
    df, prof = run.method, run.profiler
    full, n = prof.memory_of(df.full_plan()), len(df.levels)
    _, up0 = prof.bytes_of(df.full_plan())
    flops0 = prof.train_flops(df.full_plan())
    rows = []
    for d in range(1, n + 1):
        plan = df.depth_plan(d)
        step = plan.steps[0]
        with torch.device("meta"):
            model = prof.build_client(plan)
        trained = {name: t.numel() for name, t in model.named_parameters() if step.trains(name)}
        exits = sum(v for name, v in trained.items() if ".exit." in name)
        m = prof.measure(plan, 0)
        part = breakdown(m)
        _, up = prof.bytes_of(plan)
        flops = prof.train_flops(plan)
        c = (f"resnet20 ({n} stages = {n} depths; paper: ResNet-18, 4), CIFAR-10 shapes (paper: CIFAR-100), batch "
             f"{batch}; depth {d}/{n}: blocks {step.blocks[0]}-{step.blocks[-1]}, {d} exit{'s' if d > 1 else ''}")
        vram = f"; {DEPTHFL_VRAM}" if d == n else ""
        rows += [
            Row(DEPTHFL, c, "parameters trained and sent, M", None, sum(trained.values()) / 1e6, NOT_STATED,
                f"stem, level{'s 1-' if d > 1 else ' '}{d} and {exits / 1e3:.1f}k parameters of shallow exits"
                + (" and the model's head" if d == n else "; the deeper stages hold most weights (channels x2, x4)")),
            Row(DEPTHFL, c, "peak training memory / full depth's", None, m.peak / full, NOT_STATED,
                f"saved activations {part['activations']:.1f} MB (the first stage, at full resolution, and exit 1 "
                f"hold most), params {part['params']:.2f}, grads {part['grads']:.2f}, optimizer "
                f"{part['optimizer']:.2f}, other {part['other']:.1f} MB{vram}"),
            Row(DEPTHFL, c, "bytes up / full depth's", None, up / up0, NOT_STATED,
                "the trained tensors (fp32): stem, levels and exits up to depth d"),
            Row(DEPTHFL, c, "training FLOPs per sample / full depth's", None, flops / flops0, NOT_STATED,
                f"{flops / 1e9:.3f} of {flops0 / 1e9:.3f} GFLOPs (forward and backward, FlopCounterMode): every "
                "stage costs about the same (channels x2, resolution /4), plus the exits"),
        ]
    return rows


# --- CoCoFL ----------------------------------------------------------------------------------------
COCOFL = "CoCoFL (Pfeiffer et al. 2023)"
COCOFL_SOURCE = ("github.com/k1l1/CoCoFL nets/QuantizedNets/ResNet/tables/table__CoCoFL_arm_QResNet18.json: the "
                 "authors' profiled configurations of QResNet18 (units 0 input layer, 1-8 blocks, 9 linear), memory "
                 "and data relative to full training (ARM device, batch not stated)")
# trained units (first, last) -> (memory, data) of the table's entry that freezes every other unit
COCOFL_CLAIMS = {(9, 9): (0.21917, 0.00046), (0, 0): (0.556, 0.00017), (5, 9): (0.61411, 0.93945),
                 (0, 4): (0.73592, 0.06055)}


def audit_cocofl(device: str, quick: bool) -> list[Row]:
    """The table's configurations on preresnet18 (stem, 8 blocks, head: the same 10 units as the code's
    QResNet18), CIFAR-10 shapes, batch 32, built and measured by cocofl's own trainer (frozen units int8)."""
    batch = 2 if quick else 32
    run = _prepare(device, method="cocofl", model="preresnet18", dataset="cifar10", batch_size=batch, memory_budget=1)
    m, prof, full = run.method, run.profiler, run.ctx.full_memory
    _, up0 = prof.bytes_of(m.full_plan())
    rows = []
    for (a, b), (memory, data) in COCOFL_CLAIMS.items():
        plan = m.config_plan(a, b)
        meas = prof.measure(plan, 0)
        part = breakdown(meas)
        _, up = prof.bytes_of(plan)
        config = (f"preresnet18, CIFAR-10 shapes, batch {batch}; {plan.label} (units {a}-{b} of 0-9 trained, "
                  "the rest frozen int8)")
        rows += [
            Row(COCOFL, config, "peak training memory / full model's", memory, meas.peak / full, COCOFL_SOURCE,
                f"live tensors: params {part['params']:.1f} (frozen ones int8), grads {part['grads']:.1f}, "
                f"optimizer {part['optimizer']:.1f}, activations {part['activations']:.1f}, other "
                f"{part['other']:.1f} MB (simulated int8: frozen units run in float one at a time; units after the "
                "run save their int8 input, the code float ReLU outputs); the table: ARM, int8 kernels, folded BN"),
            Row(COCOFL, config, "bytes up / full model's", data, up / up0, COCOFL_SOURCE,
                f"{agree(up / up0, data)}: trained float32 parameters only (preresnet18's stem has no BN)"),
        ]
    return rows


# --- FIARSE ----------------------------------------------------------------------------------------
FIARSE = "FIARSE (Wu et al. 2024)"
FIARSE_SOURCE = ("github.com/HarliWu/FIARSE README: sub-model sizes --model-size 1.0 0.25 0.0625 0.015625 (the "
                 "fraction of parameters a client keeps, by construction); the README states no memory or byte figure")


def audit_fiarse(device: str, quick: bool) -> list[Row]:
    """FIARSE's published (element-wise) form on resnet20, CIFAR-10 shapes, batch 20 (the README's --bsz; the
    paper's ResNet-18 is not measured here), at the README's four sub-model sizes p. The nominal size p (the fraction
    of parameters kept, the method's own accounting) stands as the paper convention beside what is measured:
    the parameters the mask keeps (claimed = p by construction), peak training memory and bytes sent, each over
    the p = 1 configuration's (its full model)."""
    from fedbench.methods.fiarse import PAPER_SIZES, masked_names

    batch = 4 if quick else 20
    # budget 1 is FedAvg's full model, below every p's measured memory: a budget of 4 lets the run be prepared
    run = _prepare(device, method="fiarse", model="resnet20", dataset="cifar10", batch_size=batch, memory_budget=4)
    fi, prof = run.method, run.profiler
    full = prof.memory_of(fi.density_plan(1.0))
    down0, up0 = prof.bytes_of(fi.density_plan(1.0))
    config = f"resnet20, CIFAR-10 shapes, batch {batch}, --variant paper (element-wise mask); nominal size p = {{p:g}}"
    rows = [Row(FIARSE, config.format(p=1), "peak training memory / FedAvg's full model", None, full / run.ctx.full_memory,
                NOT_STATED, "the masked copy of every conv/linear weight that each forward saves for backward")]
    for p in PAPER_SIZES:
        plan = fi.density_plan(p)
        held = fi.held(p)
        kept = sum(int(h.sum()) for h in held.values()) / sum(h.numel() for h in held.values())
        m = prof.measure(plan, 0)
        part = breakdown(m)
        down, up = prof.bytes_of(plan)
        c = config.format(p=p)
        rows += [
            Row(FIARSE, c, "conv/linear parameters kept / all", p, kept, FIARSE_SOURCE,
                f"one global threshold over {len(masked_names(run.model))} conv/linear tensors; norms not masked"),
            Row(FIARSE, c, "peak training memory / full model's", None, m.peak / full, NOT_STATED,
                f"dense tensors with zeros: params {part['params']:.1f}, grads {part['grads']:.1f}, optimizer "
                f"{part['optimizer']:.1f}, activations {part['activations']:.1f} MB as at p = 1; a budget below "
                "this is refused", paper_convention=p),
            Row(FIARSE, c, "bytes up / full model's", None, up / up0, NOT_STATED,
                "kept values + 1-bit-per-element bitmap per masked tensor (dense where smaller); norms dense",
                paper_convention=p),
            Row(FIARSE, c, "bytes down / full model's", None, down / down0, NOT_STATED,
                "the sparse sub-model, encoded as the upload", paper_convention=p),
        ]
    return rows


PAPERS: dict[str, Callable[[str, bool], list[Row]]] = {
    SLT: audit_slt, FEDEPTH: audit_fedepth, LW: audit_lw_fedssl, FD: audit_fd, HETEROFL: audit_heterofl,
    FEDROLEX: audit_fedrolex, FJORD: audit_fjord, DEPTHFL: audit_depthfl, FIARSE: audit_fiarse, COCOFL: audit_cocofl}


def audit(device: str = "cpu", quick: bool = False) -> pd.DataFrame:
    """Every paper's rows (``COLUMNS``); raises ConfigError on a bad device.

    The profiler collects garbage before each of the ~70 measurements; over the ~450k long-lived objects of
    torch, timm, fvcore and pandas that takes 0.2 s each time, so they are frozen out of collection while the
    audit runs (``gc.freeze``; objects made during the audit are collected as usual, the figures unchanged).
    """
    gc.collect()
    gc.freeze()
    try:
        rows = [r for fn in PAPERS.values() for r in fn(device, quick)]
    finally:
        gc.unfreeze()
    frame = pd.DataFrame([asdict(r) | {"ratio": r.ratio} for r in rows])
    return frame[COLUMNS]


# --- rendering -------------------------------------------------------------------------------------
def number(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4g}"


def render(rows: pd.DataFrame, title: str) -> Table:
    table = Table(title=title)
    for c in ("paper", "configuration", "quantity", "claimed", "measured", "ratio", "paper_convention", "why"):
        table.add_column(c, justify="right" if c in ("claimed", "measured", "ratio", "paper_convention") else "left")
    for r in rows.itertuples():
        claimed = NOT_STATED if pd.isna(r.claimed) else number(r.claimed)
        table.add_row(r.paper, r.configuration, r.quantity, claimed, number(r.measured), number(r.ratio),
                      number(r.paper_convention), r.why)
    return table


def markdown(rows: pd.DataFrame, header: str) -> str:
    cells = [["paper", "configuration", "quantity", "claimed", "measured", "ratio", "paper convention", "why",
              "claim source"]]
    for r in rows.itertuples():
        cells.append([r.paper, r.configuration, r.quantity, NOT_STATED if pd.isna(r.claimed) else number(r.claimed),
                      number(r.measured), number(r.ratio), number(r.paper_convention), r.why, r.claim_source])
    lines = ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    return "\n".join([header, "", lines[0], "|" + "---|" * len(cells[0]), *lines[1:]]) + "\n"


def title(device: str) -> str:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto"
                       else device)
    return (f"fedbench claims audit, {date.today():%Y-%m-%d}, {device_name(dev)}, torch {torch.__version__}, fp32: "
            "measured / claimed (MB = 1e6 B unless the quantity says otherwise)")


READING = ("Written by `fedbench audit`. ratio = measured / claimed. *claimed* holds only figures read in a "
           "cited source (the reference documents or the authors' paper or repository: *claim source*), \"not "
           "stated\" where none gives one; *paper convention*: the "
           "paper's own accounting as fedbench re-implements it (SLT's memory estimator, LW-FedSSL's FLOP count); "
           "*why*: what separates measured from claimed, from the measurement's breakdown.")


def write(rows: pd.DataFrame, folder: str | Path, heading: str) -> list[Path]:
    """claims.csv (the rows) and claims.md (the same as a Markdown table)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    csv, md = folder / "claims.csv", folder / "claims.md"
    rows.to_csv(csv, index=False)
    md.write_text(markdown(rows, f"# {heading}\n\n{READING}"))
    return [csv, md]
