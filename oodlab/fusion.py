"""Horizontal fusion of replicas: N models of one architecture trained as one batched model.

A small model on a GPU is bound by kernel launches, not arithmetic; N replicas whose
parameters are stacked along a new leading dimension (``torch.func.stack_module_state``)
run every layer once for all of them under ``torch.func.vmap`` (HFTA, MLSys 2021). One
optimizer steps the stacked parameters: RMSprop and Adam act elementwise, and the summed
loss gives each slice its own replica's gradient, so this is N independent optimizers.

The replicas' own modules and optimizers stay the source of truth for checkpoints and
scoring: ``sync_out`` writes the stacked weights and optimizer state back into them and
``sync_in`` reads them (after a checkpoint was loaded), so a fused and a looped trial save
the same checkpoint format and either can resume the other.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap


class _Call(nn.Module):
    """Calls ``fn(module, *args)`` as its forward, so ``functional_call`` can swap the module's weights."""

    def __init__(self, module: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.m = module
        self.fn = fn

    def forward(self, *args: Any) -> Any:
        return self.fn(self.m, *args)


class Stack:
    """N replicas (same architecture, no buffers) as stacked parameters with one optimizer.

    ``make_opt(params)`` builds the optimizer the replicas use (same class and settings);
    the replicas' optimizers must each hold their model's ``parameters()`` in order.
    """

    def __init__(self, models: list[nn.Module], opts: list[torch.optim.Optimizer],
                 make_opt: Callable[[list[torch.Tensor]], torch.optim.Optimizer]) -> None:
        if any(True for _ in models[0].buffers()):
            raise ValueError("fusion of models with buffers (e.g. BatchNorm statistics) is not supported")
        self.models, self.opts = models, opts
        self.base = copy.deepcopy(models[0]).to("meta")  # architecture only; weights come from self.params
        params, _ = stack_module_state(models)
        self.names = list(params)
        self.params = params
        self.opt = make_opt([params[k] for k in self.names])
        self.sync_in()

    def vmap(self, fn: Callable[..., dict[str, torch.Tensor]], *batched: torch.Tensor | None
             ) -> dict[str, torch.Tensor]:
        """``fn(model, *args)`` for every replica at once; each arg has a leading replica dimension
        (None: passed as None); returns fn's dict with (N,) entries."""
        call = _Call(self.base, fn)

        def one(params: dict[str, torch.Tensor], *args: torch.Tensor | None) -> dict[str, torch.Tensor]:
            return functional_call(call, {f"m.{k}": v for k, v in params.items()}, args)

        dims = (0, *(None if a is None else 0 for a in batched))
        return vmap(one, in_dims=dims)(self.params, *batched)

    @torch.no_grad()
    def sync_out(self) -> None:
        """Write the stacked weights and optimizer state into the replicas' modules and optimizers."""
        for i, model in enumerate(self.models):
            for name, p in model.named_parameters():
                p.copy_(self.params[name][i])
        state = self.opt.state_dict()
        for i, opt in enumerate(self.opts):
            opt.load_state_dict(_slice_state(state, i))

    @torch.no_grad()
    def sync_in(self) -> None:
        """Read the replicas' weights and optimizer states into the stack (after they were loaded)."""
        for name in self.names:
            self.params[name].copy_(torch.stack([dict(m.named_parameters())[name] for m in self.models]))
        self.opt.load_state_dict(_stack_states([o.state_dict() for o in self.opts]))


def _stack_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One optimizer state for stacked parameters from N replicas' states: per-parameter tensors
    (RMSprop's square_avg, Adam's moments) are stacked, scalars (the shared step count) kept."""
    out = copy.deepcopy(states[0])
    for j, per in out["state"].items():
        for k, v in per.items():
            if isinstance(v, torch.Tensor) and v.ndim >= 1:
                per[k] = torch.stack([s["state"][j][k] for s in states])
    return out


def _slice_state(state: dict[str, Any], i: int) -> dict[str, Any]:
    """Replica i's optimizer state from the stacked one (inverse of ``_stack_states``)."""
    out = {"param_groups": copy.deepcopy(state["param_groups"]), "state": {}}
    for j, per in state["state"].items():
        out["state"][j] = {k: (v[i].clone() if isinstance(v, torch.Tensor) and v.ndim >= 1 else copy.deepcopy(v))
                           for k, v in per.items()}
    return out
