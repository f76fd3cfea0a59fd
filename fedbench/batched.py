"""Clients that share a plan shape train together: stacked weights under ``torch.func.vmap`` (issue 8).

One-client-at-a-time simulation of small clients is bound by kernel launches and Python, not
by arithmetic. Here the k clients of a group keep their own weights, momentum buffers, mini-batch
order, augmentation draws and gradient clipping, stacked along a leading client dimension, and
each SGD step is one vectorised call. Every client's generator is drawn in the same order as in
one-at-a-time training (its epoch permutation, then each batch's augmentation), so the result
equals it within float tolerance.

Clients hold different numbers of samples (non-IID partitions) and their last batch is smaller,
so the steps run in lock-step and, at each step, the clients still training are grouped by their
batch size. Only methods that declare ``Method.trains_batched`` apply: they train with the default
loop (``Method.local_train`` and ``Method.trainer``), a ``loss`` that is a pure function of its
arguments (per-client tensors come through ``Method.client_inputs``), and no randomness inside the model.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import accumulate

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from fedbench.data import train_batch
from fedbench.method import ClientData, Method, TrainResult
from fedbench.models.base import FedModel
from fedbench.plan import Plan, Step

State = dict[str, torch.Tensor]


class _Objective(nn.Module):
    """``method.loss`` of one step as a module, so ``functional_call`` can swap in a client's tensors."""

    def __init__(self, method: Method, model: FedModel, plan: Plan, step: Step):
        super().__init__()
        self.model = model
        self.method, self.plan, self.step = method, plan, step

    def forward(self, x: torch.Tensor, y: torch.Tensor, client: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.method.loss(self.model, x, y, self.plan, self.step, **client)


def state_of(model: FedModel) -> State:
    """A detached copy of the module's parameters and buffers."""
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def load_state(model: FedModel, state: State) -> None:
    with torch.no_grad():
        for n, t in [*model.named_parameters(), *model.named_buffers()]:
            t.copy_(state[n])


def train_group(method: Method, model: FedModel, plan: Plan, states: Sequence[State],
                datas: Sequence[ClientData], lr: float, gens: Sequence[torch.Generator]) -> list[tuple[State, TrainResult]]:
    """Train k clients of one plan shape from their initial ``states``; ``model`` is the working module.

    Returns each client's trained state and its TrainResult, as ``Method.local_train`` would.
    """
    cfg = method.config
    k, device = len(datas), datas[0].y.device
    stacked = {n: torch.stack([s[n] for s in states]) for n in states[0]}
    inputs = [method.client_inputs(d) for d in datas]
    client = {key: torch.stack([c[key] for c in inputs]) for key in inputs[0]}
    params = [n for n, _ in model.named_parameters()]
    pooled_x, pooled_y = torch.cat([d.x for d in datas]), torch.cat([d.y for d in datas])  # one gather per step
    offsets = list(accumulate((len(d) for d in datas), initial=0))
    loss_sum = torch.zeros(k, device=device)
    for step in plan.steps:
        trained = [n for n in params if step.trains(n)]
        objective = _Objective(method, model, plan, step)

        def loss_of(train: State, rest: State, x, y, own):
            tensors = {"model." + n: t for n, t in (train | rest).items()}
            return functional_call(objective, tensors, (x, y, own))

        grad_fn = vmap(grad_and_value(loss_of), randomness="error")
        momentum = {n: torch.zeros_like(stacked[n]) for n in trained} if cfg.momentum else {}
        for _ in range(cfg.local_epochs):
            orders = [torch.randperm(len(d), generator=g, device=g.device).to(device).split(cfg.batch_size)
                      for d, g in zip(datas, gens)]
            for j in range(max(len(o) for o in orders)):
                by_size: dict[int, list[int]] = {}
                for i, o in enumerate(orders):
                    if j < len(o):
                        by_size.setdefault(len(o[j]), []).append(i)
                for members in by_size.values():
                    rows = torch.cat([orders[i][j] + offsets[i] for i in members])
                    x = train_batch(pooled_x[rows], method.dataset, [gens[i] for i in members])
                    x, y = x.unflatten(0, (len(members), -1)), pooled_y[rows].view(len(members), -1)
                    index = None if len(members) == k else torch.tensor(members, device=device)
                    losses = sgd_step(stacked, momentum, trained, grad_fn, index, x, y, client, lr, method)
                    if index is None:
                        loss_sum += losses
                    else:
                        loss_sum.index_add_(0, index, losses)
    steps = len(plan.steps) * cfg.local_epochs
    return [({n: t[i] for n, t in stacked.items()},
             TrainResult(loss=float(loss_sum[i]) / max(steps * math.ceil(len(d) / cfg.batch_size), 1),
                         samples=[cfg.local_epochs * len(d)] * len(plan.steps)))
            for i, d in enumerate(datas)]


def sgd_step(stacked: State, momentum: State, trained: list[str], grad_fn, rows: torch.Tensor | None,
             x: torch.Tensor, y: torch.Tensor, client: State, lr: float, method: Method) -> torch.Tensor:
    """One step of the clients at ``rows`` (None: all): torch.optim.SGD's foreach update (weight decay,
    momentum, no dampening), per client; returns their losses.

    With every client present the stacked tensors are used (BatchNorm's running statistics update
    in place); otherwise the members' rows are gathered and written back.
    """
    cfg = method.config
    whole = rows is None
    take = (lambda t: t) if whole else (lambda t: t.index_select(0, rows))
    train = {n: take(stacked[n]) for n in trained}
    rest = {n: take(t) for n, t in stacked.items() if n not in train}
    grads, losses = grad_fn(train, rest, x, y, {key: take(t) for key, t in client.items()})
    if method.grad_clip > 0:  # torch.nn.utils.clip_grad_norm_ per client, before the optimizer step
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], dim=1).norm(dim=1)
        coef = (method.grad_clip / (norms + 1e-6)).clamp(max=1.0)
        grads = {n: g * coef.view(-1, *[1] * (g.dim() - 1)) for n, g in grads.items()}
    params, grads = [train[n] for n in trained], [grads[n] for n in trained]
    if cfg.weight_decay:
        grads = torch._foreach_add(grads, params, alpha=cfg.weight_decay)
    if cfg.momentum:
        bufs = [take(momentum[n]) for n in trained]
        torch._foreach_mul_(bufs, cfg.momentum)
        torch._foreach_add_(bufs, grads)
        grads = bufs
        if not whole:
            for n, buf in zip(trained, bufs):
                momentum[n].index_copy_(0, rows, buf)
    if whole:
        torch._foreach_add_(params, grads, alpha=-lr)
    else:
        for n, new in zip(trained, torch._foreach_add(params, grads, alpha=-lr)):
            stacked[n].index_copy_(0, rows, new)
    if not whole:
        for n, t in rest.items():  # buffers the members updated (BatchNorm statistics); frozen tensors
            stacked[n].index_copy_(0, rows, t)
    return losses.detach()
