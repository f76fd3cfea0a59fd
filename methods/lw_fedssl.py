"""LW-FedSSL and Prog-FedSSL (Tun et al., arXiv 2401.11647 v4, §3.1-3.2, Algorithms 1-4; methods-depth-ssl.md §2).

The encoder grows in S stages of R_s rounds. In stage s clients attach block(s) s to the
frozen encoder F_{s-1} and train, with MoCo v3, only that block plus the heads H and P
(LW-FedSSL); the frozen blocks run forward only, without autograd, and deeper blocks do not
run. Prog-FedSSL keeps every block so far trainable and exchanged. The server takes the
sample-weighted mean of what was trained (``MaskedMean``), so frozen blocks stay bit-identical.

As in the paper: the patch embedding (``stem``) trains with stage 1 (footnote 1); H and P
persist across stages; blocks per stage is ``--blocks-per-stage`` (Table 3); R_s is
``--rounds-per-stage`` or R / S (stage boundaries at round s*R/S when R is not a multiple).
Inferred: the encoder's final LayerNorm (``head.norm``) sits on the current top block and
trains in every stage (384 parameters, exchanged with H and P).

Resource accounting (§2.4): ``fedbench profile`` lists each stage's measured memory, FLOPs and
bytes; the last row's note gives whole-schedule ratios to end-to-end training (``fedssl``)
over the same rounds: FLOPs as measured (both views, online forward+backward and target
forward) and in the paper's convention (fvcore-style forward multiply-adds of one online pass,
trained units 3x), bytes with stateful clients (the paper's default: frozen blocks are kept)
and stateless ones (Table 5's worst case). Run ``--client-state stateful`` for the former.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch

from fedbench.errors import ConfigError
from fedbench.method import register_method
from fedbench.plan import Plan, Step
from fedbench.profiler import Traffic
from fedbench.seeding import generator
from fedbench.settings import Range
from fedbench.submodel import build_submodel, set_trainable, tensor_bytes, uploaded
from fedbench.methods._ssl import SSLMethod, SSLModel, SSLOptions, online_macs


@dataclass(frozen=True)
class LayerWiseOptions(SSLOptions):
    blocks_per_stage: Annotated[int, Range(ge=1, le=10_000), "blocks trained per stage (Table 3: 1, 2, 3, 4, 6)"] = 1
    rounds_per_stage: Annotated[int, Range(ge=0, le=1_000_000), "R_s, rounds per stage; 0: R / S"] = 0


class LayerWise(SSLMethod):
    """Stages of consecutive blocks trained in order; ``progressive`` keeps the earlier ones trainable."""

    Options = LayerWiseOptions
    progressive: ClassVar[bool] = False

    def __init__(self, ctx):
        super().__init__(ctx)
        depth, per = len(ctx.model.blocks), self.options.blocks_per_stage
        if not 1 <= per <= depth:
            raise ConfigError("--blocks-per-stage", f"{per} not allowed; allowed: 1..{depth} (the model's depth)")
        self.stages = [tuple(range(i, min(i + per, depth))) for i in range(0, depth, per)]
        if not self.options.rounds_per_stage and self.config.rounds < len(self.stages):
            raise ConfigError("--rounds", f"{self.config.rounds} rounds cannot cover {len(self.stages)} stages; "
                                          f"allowed: >= {len(self.stages)} (or set --rounds-per-stage)")
        self._macs: dict[tuple, float] = {}
        self._meta: dict[tuple, SSLModel] = {}

    # --- schedule -------------------------------------------------------------------------
    def stage_of(self, rnd: int) -> int:
        per, stages = self.options.rounds_per_stage, len(self.stages)
        return min(rnd // per, stages - 1) if per else rnd * stages // self.config.rounds

    def layer_plan(self, kept: tuple[int, ...], active: tuple[int, ...], stem: bool, label: str) -> Plan:
        """Run ``kept`` blocks in order; train ``active`` (and the stem if asked) plus the heads."""
        return Plan.of(steps=(Step(blocks=kept, trainable=self.trainable(active, stem)),), label=label)

    def stage_plan(self, s: int) -> Plan:
        active = self.stages[s]
        kept = tuple(range(active[-1] + 1))
        return self.layer_plan(kept, kept if self.progressive else active, stem=s == 0 or self.progressive,
                               label=f"stage {s + 1}/{len(self.stages)}")

    def plan(self, rnd: int, client: int, budget: float, gen: torch.Generator) -> Plan:
        return self.stage_plan(self.stage_of(rnd))

    def schedule(self) -> list[tuple[dict, Plan]]:
        rounds = Counter(self.stage_of(r) for r in range(self.config.rounds))
        rows = []
        for s, active in enumerate(self.stages):
            first, last = 1 if self.progressive else active[0] + 1, active[-1] + 1
            trained = f"block {last}" if first == last else f"blocks {first}-{last}"
            rows.append(({"note": f"{trained} trained, {rounds[s]} rounds"}, self.stage_plan(s)))
        return self.with_totals(rows)

    # --- whole-schedule accounting --------------------------------------------------------
    def with_totals(self, rows: list[tuple[dict, Plan]]) -> list[tuple[dict, Plan]]:
        """Append the whole-schedule ratios to end-to-end to the last row's note."""
        r = self.accounting()
        who = f" (client 0, budget {self.ctx.fractions[0]:g})" if self.budgeted else ""
        rows[-1][0]["note"] += (f"; schedule{who} / end-to-end: FLOPs {r['flops']:.3f} measured, {r['paper_flops']:.3f} "
                                f"paper convention; bytes {r['bytes_stateful']:.3f} stateful, "
                                f"{r['bytes_stateless']:.3f} stateless clients")
        return rows

    def accounting(self) -> dict[str, float]:
        """Totals over all rounds for one client taking part in every round (client 0's plans, at its fixed
        budget, ``fractions[0]``), / end-to-end.

        FLOPs per sample and local epoch summed over rounds (the paper's GFLOPs, §2.4); bytes down +
        up per round as the engine counts them (stateful: a tensor is re-sent only after it changed).
        """
        cfg, device = self.config, self.ctx.device
        budget = self.ctx.fractions[0]
        ours = [self.plan(r, 0, budget, generator(cfg.seed, "client", r, 0, device=device)) for r in range(cfg.rounds)]
        mine, full = self._totals(ours), self._totals([self.full_plan()] * cfg.rounds)
        return {k: mine[k] / full[k] for k in mine}

    def _totals(self, plans: list[Plan]) -> dict[str, float]:
        prof, model = self.ctx.profiler, self.ctx.model
        out = dict.fromkeys(("flops", "paper_flops", "bytes_stateful", "bytes_stateless"), 0.0)
        traffic = {"bytes_stateful": Traffic(stateful=True), "bytes_stateless": Traffic(stateful=False)}
        for rnd, plan in enumerate(plans):
            sub = self._meta_model(plan)
            out["flops"] += sum(prof.train_flops(plan, i) for i in range(len(plan.steps)))
            out["paper_flops"] += self.paper_macs(plan)
            sent = uploaded(sub, plan)
            for key, t in traffic.items():
                out[key] += t.down(0, plan, sub, model) + tensor_bytes(sent.values())
                t.commit(sent, rnd)
        return out

    def _meta_model(self, plan: Plan) -> SSLModel:
        key = plan.shape_key()
        if key not in self._meta:
            with torch.device("meta"):
                self._meta[key] = build_submodel(self.ctx.build, self.ctx.model, plan)
        return self._meta[key]

    def paper_macs(self, plan: Plan) -> float:
        """The paper's per-sample FLOPs of one round-epoch of this plan (``online_macs`` per step)."""
        key = plan.shape_key()
        if key not in self._macs:
            model = self._meta_model(plan)
            x = torch.zeros((2, *self.ctx.profiler.sample_shape), device="meta")
            total = 0.0
            for step in plan.steps:
                set_trainable(model, step)
                total += online_macs(model, step, x)
            self._macs[key] = total
        return self._macs[key]


@register_method
class LWFedSSL(LayerWise):
    name = "lw-fedssl"
    description = "layer-wise MoCo v3: stage s trains only block(s) s + heads on the frozen earlier blocks"
    paper = "Tun et al. 2024/25, LW-FedSSL: Resource-efficient Layer-wise Federated Self-supervised Learning (arXiv 2401.11647 v4)"


@register_method
class ProgFedSSL(LayerWise):
    name = "prog-fedssl"
    description = "progressive MoCo v3: LW-FedSSL's stages with every block so far trainable and exchanged"
    paper = "Tun et al. 2024/25, arXiv 2401.11647 v4, §3.2 (Prog-FedSSL)"
    progressive = True
