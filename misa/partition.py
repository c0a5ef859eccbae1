"""Model -> modules: the units MISA samples (the paper's partition).

granularity="module": every 2-D weight inside a transformer block is one module (q/k/v/o, gate/up/down
for LLaMA-style names; c_attn/c_proj/c_fc for GPT-2; query_key_value/dense/... for NeoX), together
with its own bias. granularity="layer": each block (everything under `<...>.<index>.`) is one module.
Blocks are recognised by an integer path component ("model.layers.3.mlp..."). A model without blocks
still works: every owner of a 2-D weight (each nn.Linear, nn.Embedding, ...) becomes a module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

NamedParams = List[Tuple[str, nn.Parameter]]

_EMBED = re.compile(r"(^|\.)(embed_tokens|embeddings?|wte|wpe|tok_embeddings|word_embeddings|embed_in)$")
_HEAD = re.compile(r"(^|\.)(lm_head|embed_out|output|head|score)$")


@dataclass
class Module:
    name: str  # a parameter belongs to it when its name starts with name + "."
    params: NamedParams
    kind: str = "block"  # "block" | "embedding" | "lm_head" | "other"

    @property
    def numel(self) -> int:
        return sum(p.numel() for _, p in self.params)


@dataclass
class Partition:
    modules: List[Module]
    always: NamedParams = field(default_factory=list)  # trained at every step
    frozen: NamedParams = field(default_factory=list)  # never trained
    total_params: int = 0

    @property
    def names(self) -> List[str]:
        return [m.name for m in self.modules]


def named_parameters(model_or_named_params) -> Tuple[NamedParams, Optional[nn.Module]]:
    if isinstance(model_or_named_params, nn.Module):
        model = model_or_named_params
        items = list(model.named_parameters())  # tied weights appear once
    else:
        model = None
        items = []
        seen = set()
        for item in model_or_named_params:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)):
                raise TypeError(
                    "model_or_named_params: expected an nn.Module or an iterable of (name, parameter) "
                    f"pairs such as model.named_parameters(); got an item {type(item).__name__}"
                )
            if id(item[1]) not in seen:
                seen.add(id(item[1]))
                items.append(item)
    if not items:
        if model is None:
            raise ValueError(
                "model_or_named_params: the iterable of (name, parameter) pairs was empty; a generator "
                "such as model.named_parameters() can be consumed only once: pass the model, or "
                "list(model.named_parameters())"
            )
        raise ValueError("model_or_named_params: the model has no parameters: nothing to partition")
    return items, model


def _owner(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def _block_of(name: str) -> Optional[str]:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return None


def _module_types(model: Optional[nn.Module]) -> Dict[str, type]:
    return {} if model is None else {n: type(m) for n, m in model.named_modules()}


def partition(
    model_or_named_params: Union[nn.Module, Iterable[Tuple[str, nn.Parameter]]],
    *,
    granularity: str = "module",
    include_embedding: bool = False,
    include_lm_head: bool = False,
    embedding_and_head_every_step: bool = False,
    train_1d: bool = False,
    module_biases: bool = True,
) -> Partition:
    """module_biases=False: a module is its >=2-D weight alone and biases are 1-D parameters of their own
    (frozen, or trained every step with train_1d), as in the authors' code."""
    if granularity not in ("module", "layer"):
        raise ValueError(f"granularity: expected 'module' or 'layer', got {granularity!r}")
    items, model = named_parameters(model_or_named_params)
    types = _module_types(model)
    total = sum(p.numel() for _, p in items)
    has_blocks = any(_block_of(n) is not None for n, _ in items)

    def kind_of(owner: str) -> str:
        t = types.get(owner)
        if (t is not None and issubclass(t, nn.Embedding)) or _EMBED.search(owner):
            return "embedding"
        if _HEAD.search(owner):
            return "lm_head"
        return "other"

    # Owners of a >=2-D weight are the candidate modules; their 1-D params (biases) go with them.
    weight_owners = {_owner(n) for n, p in items if p.dim() >= 2}
    groups: Dict[str, Module] = {}
    always: NamedParams = []
    frozen: NamedParams = []
    for name, p in items:
        owner = _owner(name)
        block = _block_of(name) if has_blocks else None
        if block is not None and granularity == "layer":
            key, kind = block, "block"
        elif owner in weight_owners and (module_biases or p.dim() >= 2):
            key, kind = owner, ("block" if block is not None else kind_of(owner))
        else:  # a 1-D parameter of its own: norms, scales
            (always if train_1d else frozen).append((name, p))
            continue
        if has_blocks and kind in ("embedding", "lm_head", "other") and block is None:
            wanted = {"embedding": include_embedding, "lm_head": include_lm_head, "other": True}[kind]
            if not wanted:
                frozen.append((name, p))
                continue
            if embedding_and_head_every_step and kind != "other":
                always.append((name, p))
                continue
        groups.setdefault(key, Module(key, [], kind)).params.append((name, p))
    modules = list(groups.values())
    if not modules:
        raise ValueError(
            "model: nothing to partition: found no 2-D weight (nn.Linear, nn.Embedding, ...) to "
            "sample; MISA trains modules built of matrices"
        )
    return Partition(modules=modules, always=always, frozen=frozen, total_params=total)
