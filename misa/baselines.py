"""The layer-wise baselines, as their authors run them, on MISA's machinery (the same kernels, arena,
master weights and checkpoints), so that comparisons differ only in what is trained when.

    LISA  (LMFlow's DynamicLayerActivationCallback; Pan et al. 2024)
    BAdam (BlockOptimizer; Luo et al. 2024)
"""

from __future__ import annotations

from typing import List, Optional

from torch import nn

from .optimizer import MISA
from .partition import partition


def _layers(model: nn.Module):
    layers = partition(model, granularity="layer")
    blocks = [m for m in layers.modules if m.kind == "block"]
    if not blocks:
        raise ValueError(
            "model: no transformer layers found (parameters named like 'layers.3.'): layer-wise baselines need them"
        )
    return layers.total_params, max(m.numel for m in blocks), len(blocks)


def _layer_fraction(model: nn.Module, n_layers: int) -> float:
    """delta that holds exactly `n_layers` of the largest transformer layers (the inverse of layers_within)."""
    total, largest, count = _layers(model)
    if not 1 <= n_layers <= count:
        raise ValueError(f"n_layers: expected 1..{count}, got {n_layers}")
    return min(1.0, n_layers * largest / total * (1 + 1e-9))


def layers_within(model: nn.Module, delta: float) -> int:
    """The most of the model's largest transformer layers that a budget of `delta` holds, at least one: how
    many layers LISA trains at a MISA budget (the inverse of _layer_fraction)."""
    total, largest, count = _layers(model)
    return min(count, max(1, int(delta * total // largest)))


def _outside_layers(model: nn.Module) -> List[nn.Parameter]:
    """Embedding, LM head and final norm: every parameter outside the transformer layers."""
    layers = partition(model, granularity="layer")
    inside = {id(p) for m in layers.modules if m.kind == "block" for _, p in m.params}
    return [p for p in model.parameters() if id(p) not in inside]


def LISA(model: nn.Module, lr: float = 1e-5, *, n_layers: int = 2, interval: int = 20, seed: int = 0, **kwargs) -> MISA:
    """LISA: every `interval` steps, `n_layers` decoder layers drawn uniformly without replacement (an
    independent draw each time); embedding, LM head and final norm train at every step; Adam states
    restart at each switch (the paper's experiments ran each interval with a fresh optimizer; LMFlow's
    callback keeps stale states, its issues #729, #768, #778); no flush."""
    return MISA(model, **lisa_kwargs(model, lr=lr, n_layers=n_layers, interval=interval, seed=seed, **kwargs))


def lisa_kwargs(model: nn.Module, lr: float = 1e-5, *, n_layers: int = 2, interval: int = 20, seed: int = 0, **kwargs):
    """LISA's arguments of MISA (what misa.optimizer.capacity reads a LISA's bound from, no optimizer built)."""
    return dict(
        lr=lr,
        delta=_layer_fraction(model, n_layers),
        interval=interval,
        granularity="layer",
        order="uniform",
        variant="paper",
        flush=False,
        keep_states=False,
        warmup_interval=interval,
        sample_last=0,
        always_train=_outside_layers(model),
        seed=seed,
        **kwargs,
    )


def BAdam(
    model: nn.Module,
    lr: float = 1e-5,
    *,
    interval: int = 50,
    switch_mode: str = "descending",
    train_outside_layers: bool = False,
    seed: int = 0,
    **kwargs,
) -> MISA:
    """BAdam: one decoder layer per block, visited in `switch_mode` order ("descending" from the last
    layer, "ascending", or "random": reshuffled once per pass), `interval` steps per block, optimizer
    state and step count reset at every switch, no flush; fp32 master copies of the active block (MISA's
    default for bf16/fp16). Embedding, LM head and final norm are frozen unless
    `train_outside_layers` (then trained at every step)."""
    if switch_mode not in ("descending", "ascending", "random"):
        raise ValueError(f"switch_mode: expected 'descending', 'ascending' or 'random', got {switch_mode!r}")
    always: Optional[List[nn.Parameter]] = _outside_layers(model) if train_outside_layers else None
    return MISA(
        model,
        lr=lr,
        delta=_layer_fraction(model, 1),
        interval=interval,
        granularity="layer",
        order=switch_mode,
        variant="paper",
        flush=False,
        keep_states=False,
        warmup_interval=interval,
        sample_last=0,
        always_train=always,
        seed=seed,
        **kwargs,
    )
