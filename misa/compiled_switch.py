"""Switching parameters' requires_grad so that a compiled model sees the switch.

torch.compile guards a graph on its inputs' requires_grad, but torch 2.11's dynamo skips a parameter's
tensor guards while the dict it is read from (its module's `_parameters`) keeps its version tag
(`skip_tensor_guards_with_matching_dict_tags`, on there with `use_recursive_dict_tags_for_guards`).
MISA, LISA and BAdam flip requires_grad and nothing else, so a model compiled before a switch kept its old
graph and, after the switch, no parameter received a gradient: the run went on without training (seen on
the H200's torch 2.11 in tests/test_cuda_graph.py; torch 2.14 re-checks). Setting the flag back to the
same value does not change a dict's tag, nor does writing a value it already holds, but putting a key in
and taking it out does, keeping the parameters' order: at each switch the owners' `_parameters` get a new
tag, dynamo checks their tensors again and traces the new set: one recompile per switch, as on a torch
that guards requires_grad itself.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional

from torch import Tensor, nn

_SENTINEL = "_misa_switch"


class SwitchTags:
    """The modules that hold each parameter directly; a switch gives their `_parameters` a new tag."""

    def __init__(self, model: Optional[nn.Module]):
        self._owners: Dict[int, List[nn.Module]] = {}
        if model is not None:
            for module in model.modules():
                for p in module._parameters.values():
                    if p is not None:
                        self._owners.setdefault(id(p), []).append(module)

    def touch(self, params: Iterable[Tensor]) -> None:
        """Give a new tag to the owners of `params`, whose requires_grad just changed."""
        seen = set()
        for p in params:
            for module in self._owners.get(id(p), ()):
                if id(module) not in seen:
                    seen.add(id(module))
                    module._parameters[_SENTINEL] = None
                    del module._parameters[_SENTINEL]
