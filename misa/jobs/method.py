"""A method entry of the jobs' command lines (`misa.train --compare`, `misa.finetune --methods`, `misa.plan
--methods`), parsed once into a Method that every later step reads:

    misa-official+delta=0.1+flush=true  ->  Method(name="misa", options={"variant": "official", "flush": True},
                                                   overrides={"delta": 0.1})

`options` are the optimizer's own switches (what train.build_optimizer passes to MISA); `overrides` are settings
misa.finetune and misa.plan change for that one method (its delta, interval, embeddings, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

from .cli import UsageError

OPTIMIZERS = ("misa", "lisa", "badam", "adamw")  # misa.train's
METHODS = OPTIMIZERS + ("lora", "dora")  # misa.finetune's and misa.plan's
# the optimizer's own switches: misa with a preset and switches, misa-paper, misa-official+flush=true
SWITCHES = {
    "flush": "bool",
    "keep_states": "bool",
    "norm_power": "int",
    "logit_cap": "float",
    "warmup_interval": "int",
    "eta": "eta",
    "states": ("fp32", "8bit"),
    "masters": ("fp32", "kahan", "none"),
    "rounding": ("nearest", "stochastic"),
    "release_grads": "bool",
    "check_finite": "bool",
}
# settings a misa.finetune entry may override beyond SWITCHES (misa+delta=0.1+interval=50+embeddings=frozen)
SETTINGS = {
    "delta": float,
    "interval": int,
    "embeddings": str,
    "train_norms": bool,
    "lisa_layers": int,
    "warmup_steps": int,
}
# --equal-memory's criteria and the suffix of the rows they size to LoRA's memory
EQUAL = {"peak": "@lora-peak", "accounted": "@lora-memory"}


@dataclass
class Method:
    entry: str  # as given, the row's name: misa+delta=0.03+states=8bit+masters=kahan, lora, misa@lora-peak
    name: str  # misa, lisa, badam, adamw, lora, dora
    options: Dict = field(default_factory=dict)  # the optimizer's own switches
    overrides: Dict = field(default_factory=dict)  # the settings this entry overrides: delta, interval, ...


def method_name(entry: str) -> str:
    return entry.split("+")[0].split("-")[0].split("@")[0]


def bare_entry(entry: str) -> str:
    """The entry without the suffix --equal-memory gave it."""
    for suffix in EQUAL.values():
        entry = entry.replace(suffix, "")
    return entry


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError(text)
    return text.lower() in ("true", "1")


def parse_optimizer(entry: str) -> Method:
    """A misa.train --compare entry: 'misa-official+flush=true' -> Method('misa', {'variant': 'official',
    'flush': True}). Raises UsageError naming what is wrong."""
    head, *switches = entry.split("+")
    name, _, preset = head.partition("-")
    from ..variants import PRESETS

    if name not in OPTIMIZERS or (preset and (name != "misa" or preset not in PRESETS)):
        raise UsageError(
            f"--compare: unknown optimizer {entry!r}; choose from {', '.join(OPTIMIZERS)}, "
            f"misa-<{'|'.join(PRESETS)}>, with +switch=value ({', '.join(SWITCHES)})"
        )
    options = {"variant": preset} if preset else {}
    for item in switches:
        key, _, value = item.partition("=")
        kind = SWITCHES.get(key)
        if kind is None or not value or name != "misa":
            raise UsageError(
                f"--compare: {item!r} in {entry!r}: expected misa...+switch=value with a switch from "
                f"{', '.join(SWITCHES)}"
            )
        try:
            if isinstance(kind, tuple):  # a choice: the state formats
                if value not in kind:
                    raise ValueError(value)
                options[key] = value
            elif kind == "bool":
                options[key] = _bool(value)
            elif kind == "eta":
                options[key] = value if value == "auto" else float(value)
            else:
                options[key] = int(value) if kind == "int" else float(value)
        except ValueError:
            expected = "one of " + ", ".join(kind) if isinstance(kind, tuple) else f"a {kind}"
            raise UsageError(f"--compare: {item!r}: expected {expected}") from None
    return Method(entry, name, options)


def parse_entry(entry: str) -> Method:
    """A misa.finetune (or misa.plan) --methods entry, with the settings it overrides and, for LoRA and DoRA,
    no switches: 'misa+delta=0.1+flush=true' -> Method('misa', {'flush': True}, {'delta': 0.1})."""
    name = method_name(entry)
    if name not in METHODS or (name != "misa" and bare_entry(entry.split("+")[0]) != name):
        raise UsageError(
            f"--methods: unknown method {entry!r}; choose from {', '.join(METHODS)} "
            "(misa may carry a preset and +switch=value)"
        )
    head, *switches = entry.split("+")
    kept, overrides = [head], {}
    for item in switches:
        key, _, value = item.partition("=")
        if key in SETTINGS:
            try:
                overrides[key] = _bool(value) if SETTINGS[key] is bool else SETTINGS[key](value)
            except ValueError:
                kind = SETTINGS[key].__name__
                raise UsageError(f"--methods: {item!r} in {entry!r}: expected a {kind}") from None
            if key == "embeddings" and value not in ("every-step", "module", "frozen"):
                raise UsageError(f"--methods: {item!r}: embeddings is every-step, module or frozen")
        else:
            kept.append(item)
    if name in OPTIMIZERS:
        options = parse_optimizer(bare_entry("+".join(kept))).options  # raises UsageError naming the switch
    elif len(kept) > 1 or overrides:
        raise UsageError(f"--methods: {entry!r}: {name} takes no switches (use --lora-r, --lora-alpha)")
    else:
        options = {}
    return Method(entry, name, options, overrides)
