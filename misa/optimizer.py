"""MISA as a torch.optim.Optimizer: a thin scheduler over misa_kernels.

Every `interval` optimizer steps (an outer loop) it flushes the momentum of the active
modules, updates their importance from the squared gradient norms that the fused AdamW kernel
accumulated, samples a new set within the budget `delta`, and hands the new modules' optimizer
states out of a fixed StateArena. Frozen modules have requires_grad=False, no gradient and no state.

This file is the public face: the arguments, their checks and the construction. The work is in parts,
one file per concern, that MISA composes:

    active_set.py    state formats, the arena's capacity at any delta, and the ActiveSet: the arena, its
                     typed views and the slots of the active tensors (objects MISA holds: self.active_set)
    schedule.py      periods, switches, the importance update and the next sample (sampler.py)
    period.py        the period's counters as one record (MISA.period), which checkpoints read and write
    fused_step.py    step(): norms, the non-finite check, the fused misa_kernels calls, flush, clipping
    cuda_graph.py    cuda_graph=True: the steady step recorded once and replayed (a GraphRecorder: self.graph)
    grad_release.py  release_grads=True: updates in backward hooks
    checkpoint.py    state_dict / load_state_dict, conversion between state formats

Each part makes the state it owns (an object, or `_init_*`) and is the only one to write it
(tests/test_parts.py); a switch announces itself once (`_switched`), and each part resets its own.

LISA and BAdam (baselines.py) are MISA configured from the same parts.
"""

from __future__ import annotations

import gc
import inspect
import math
import warnings
import weakref
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from misa_kernels import StateArena

from .active_set import STATE_FORMATS, ActiveSet, Capacity, StateFormats, _local
from .checkpoint import Checkpoint
from .compiled_switch import SwitchTags
from .cuda_graph import CudaGraphStep, GraphRecorder
from .fused_step import FusedStep
from .grad_release import GradRelease
from .partition import Partition, partition
from .period import Period
from .sampler import ORDERS, ImportanceSampler
from .schedule import Schedule
from .variants import Variant, resolve

_MODULES_GROUP = "modules"
# parameter -> weak reference to the MISA that manages it; both sides weak, so neither keeps the other alive
_OWNERS = WeakIdKeyDictionary()
_ALWAYS_GROUP = "always"


def _check_config(lr, betas, eps, weight_decay, delta, eta, interval, warmup_interval, min_flush_steps):
    if not (isinstance(lr, Tensor) or lr >= 0):
        raise ValueError(f"lr: expected lr >= 0, got {lr}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0 <= b < 1 for b in betas)):
        raise ValueError(f"betas: expected a pair in [0, 1), got {betas!r}")
    if not eps > 0:
        raise ValueError(f"eps: expected eps > 0, got {eps}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay: expected weight_decay >= 0, got {weight_decay}")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta <= 1:
        raise ValueError(f"delta: expected a fraction of all parameters in (0, 1], got {delta!r}")
    if eta != "auto" and not (isinstance(eta, (int, float)) and eta >= 0 and math.isfinite(eta)):
        raise ValueError(f"eta: expected a finite eta >= 0 or 'auto', got {eta!r}")
    for name, value in (
        ("interval", interval),
        ("warmup_interval", warmup_interval),
        ("min_flush_steps", min_flush_steps),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")


def _master_format(master_weights, rounding: str) -> Optional[str]:
    if master_weights is None:
        master_weights = "fp32" if rounding == "nearest" else False
    return {True: "fp32", False: None}.get(master_weights, master_weights)


def _user_groups(always_train, groups) -> List[Dict]:
    """always_train as param groups, each parameter checked to be in no other group."""
    if always_train is None:
        return []
    taken = {id(p) for g in groups for p in g["params"]}
    out = []
    items = list(always_train)
    if items and isinstance(items[0], dict):
        out = [dict(g, params=list(g["params"]), name=g.get("name", _ALWAYS_GROUP)) for g in items]
    elif items:
        out = [{"params": items, "name": _ALWAYS_GROUP}]
    for g in out:
        for p in g["params"]:
            if id(p) in taken:
                raise ValueError("always_train: a parameter is already a module or trained at every step")
            taken.add(id(p))
    return out


def _formats(states: str, master_format: Optional[str], tensors: Iterable[Tensor]) -> StateFormats:
    low = any(_local(p).dtype != torch.float32 for p in tensors)
    return StateFormats(states=states, masters=master_format, low_precision=low)


def capacity(model_or_named_params, **misa_kwargs) -> Capacity:
    """The arena's size at any delta of `MISA(model_or_named_params, **misa_kwargs)`, computed without building
    it (no optimizer, no arena, no sampler; a model on the meta device will do): `.bytes_at(delta)` is the bound
    that --equal-memory and the planner size a budget with (bytes_at below)."""
    a = _arguments(model_or_named_params, misa_kwargs)
    v = resolve(a["variant"], warmup_interval=a["warmup_interval"], sample_last=a["sample_last"])
    part = partition(
        model_or_named_params,
        granularity=a["granularity"],
        include_embedding=a["include_embedding"],
        include_lm_head=a["include_lm_head"],
        embedding_and_head_every_step=v.embedding_and_head_every_step,
        train_1d=a["train_1d"],
        module_biases=v.module_biases,
    )
    modules = [[p for _, p in m.params] for m in part.modules]
    tensors = [p for m in modules for p in m] + [p for _, p in part.always]
    always = [p for _, p in part.always]
    always += [p for g in _user_groups(a["always_train"], [{"params": tensors}]) for p in g["params"]]
    formats = _formats(a["states"], _master_format(a["master_weights"], a["rounding"]), tensors + always)
    return Capacity.of(formats, modules, always, part.total_params)


def bytes_at(model_or_named_params, **misa_kwargs) -> Dict[str, int]:
    """What `MISA(model_or_named_params, **misa_kwargs)` would hold at its delta, computed, not built:
    {"states", "masters"}, its arena as memory_bytes() would report it, and "gradients", the most its active
    set and the tensors trained at every step hold at once."""
    delta = _arguments(model_or_named_params, misa_kwargs)["delta"]
    return capacity(model_or_named_params, **misa_kwargs).bytes_at(delta)


def _arguments(model_or_named_params, misa_kwargs: Dict) -> Dict:
    """MISA's arguments as its constructor would see them (defaults filled in; a name it does not take raises
    TypeError, as MISA(...) would)."""
    args = inspect.signature(MISA.__init__).bind(None, model_or_named_params, **misa_kwargs)
    args.apply_defaults()
    return args.arguments


class MISA(Schedule, FusedStep, CudaGraphStep, GradRelease, Checkpoint, torch.optim.Optimizer):
    """Module-wise Importance SAmpling (Liu et al., NeurIPS 2025) with fused AdamW.

    Args:
        model_or_named_params: an nn.Module, or `model.named_parameters()`.
        lr, betas, eps, weight_decay: AdamW's (decoupled weight decay, as torch.optim.AdamW).
        delta: trainable-parameter budget, a fraction of all model parameters (embeddings included).
        eta: sampling temperature: p = softmax(eta * energy), the energy being the importance of squared
            norms (or the square of a norm importance). "auto" (default) uses eta = 1 / (mean energy of
            the modules sampled so far), so the same value means the same thing on every model: a module
            with the mean energy is e times as likely as one with none. A number is the paper's eta on the
            raw energies (whose scale depends on the model, the loss and the learning rate).
        interval: optimizer steps per outer loop (T).
        granularity: "module" (each weight matrix) or "layer" (each transformer block).
        order: "misa" (importance sampling), "uniform" (LISA-style), "ascending" | "descending" |
            "random" (BAdam's switch modes).
        variant: a preset of the switches below (misa/variants.py): "default" (what trained best in our
            measurements), "paper" (Algorithm 1 as printed) or "official" (the authors' code), or a
            misa.Variant. Each switch argument left None takes the preset's value.
        include_embedding, include_lm_head: make them modules, or train them at every step when the
            variant's embedding_and_head_every_step is set ("official").
        sample_last: the oldest-sampled modules forced into each sample (anti-starvation).
        warmup_interval: length of the loops that force never-sampled modules in (None: interval).
        seed: seeds the sampler's own generator (saved in state_dict).
        backend: misa_kernels backend, "auto" | "torch" | "triton" | "cuda".
        beta: EMA factor of the importance estimate (0.8).
        min_flush_steps: loops shorter than this are not flushed (a flush after one step would apply
            beta1/(1-beta1) = 9 more steps of a single noisy gradient).
        flush: apply the end-of-loop momentum flush.
        keep_states: a module sampled again in the next loop keeps its Adam state and step count.
        norm_power: 2, the importance tracks squared gradient norms; 1, norms (the authors' code).
        logit_cap: logits are min(logit_cap, eta * energy); math.inf for no cap.
        train_1d: train 1-D parameters of their own (norms) at every step instead of freezing them.
        always_train: extra parameters, or param-group dicts, trained at every step.
        check_finite: compute each step's gradient norms first and skip the step (parameters and
            optimizer state untouched) if any is NaN/inf. The decision stays on the device: the fused
            kernel reads a skip flag and the bias corrections use device-side step counts, so step()
            never waits for the GPU; the skipped step counts in its outer loop, which warns when it
            ends. Costs one read of the gradients; check_finite=False gives the single fused pass.
        master_weights: keep an fp32 master copy of every active bf16/fp16 parameter in the state
            arena (created from the weight when the module is activated, updated in fp32, written back
            rounded after every step, dropped when the module is frozen, saved in state_dict). Default:
            on for low-precision parameters unless rounding="stochastic"; fp32 parameters need none.
            Without it, an AdamW step at fine-tuning learning rates rounds away in bf16 (measured: 46%
            of the entries of a bf16 weight never change in 50 steps at lr 5e-5).
            "fp32" is the same as True; "kahan" keeps a bf16 compensation instead (2 B per element instead
            of 4: the weight plus its compensation carry the value to about 16 bits, updated in the same
            pass).
        rounding: "nearest", or "stochastic" (bf16 only): the memory-free alternative to master
            weights, unbiased rounding of the fp32 result into the weight, reproducible from `seed`.
        release_grads: update each active tensor in a hook as soon as backward has accumulated its
            gradient, and free the gradient there, so that a step never holds the active gradients at once
            (2 B per active element in bf16). `step()` then only keeps the books (importance, period ends).
            What it cannot honour it refuses: the non-finite check (check_finite=False is required: the
            step cannot be skipped as a whole before every gradient exists), clipping by the global norm
            (`clip_grad_norm_` raises), gradient accumulation (a second backward before `step()` raises),
            and DDP/FSDP2 (a hook runs before the gradients are reduced). Exact resume and the importance
            statistic are kept.
        cuda_graph: record the steady step (between switches) as a CUDA graph and replay it (misa/cuda_graph.py):
            a few microseconds of host time per step instead of the Python around the kernels. CUDA tensors
            only; not with rounding="stochastic" (its seed changes at every step), release_grads or
            torch.distributed. Steps with clipped gradients, fresh steps and period ends run eagerly.
        states: "fp32" (default) or "8bit": Adam's m and v as blockwise 8-bit codes (bitsandbytes'
            dynamic maps, one fp32 scale per 256 elements: 2.03 B per element instead of 8), dequantized,
            updated and requantized in the fused pass. Tensors below 4096 elements keep fp32 states.
            README "State formats" has the measured cost of each format.
    """

    def __init__(
        self,
        model_or_named_params,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        delta: float = 0.03,
        eta="auto",
        interval: int = 50,
        granularity: str = "module",
        order: str = "misa",
        variant="default",
        include_embedding: bool = False,
        include_lm_head: bool = False,
        sample_last: Optional[int] = None,
        warmup_interval: Optional[int] = None,
        seed: int = 0,
        backend: str = "auto",
        *,
        beta: float = 0.8,
        min_flush_steps: int = 5,
        flush: Optional[bool] = None,
        keep_states: Optional[bool] = None,
        norm_power: Optional[int] = None,
        logit_cap: Optional[float] = None,
        train_1d: bool = False,
        always_train: Optional[Iterable] = None,
        check_finite: bool = True,
        master_weights=None,
        rounding: str = "nearest",
        states: str = "fp32",
        release_grads: bool = False,
        cuda_graph: bool = False,
    ):
        _check_config(lr, betas, eps, weight_decay, delta, eta, interval, warmup_interval, min_flush_steps)
        if rounding not in ("nearest", "stochastic"):
            raise ValueError(f"rounding: expected 'nearest' or 'stochastic', got {rounding!r}")
        if states not in STATE_FORMATS:
            raise ValueError(f"states: expected one of {', '.join(map(repr, STATE_FORMATS))}, got {states!r}")
        if master_weights not in (None, True, False, "fp32", "kahan"):
            raise ValueError(f"master_weights: expected None, True, False, 'fp32' or 'kahan', got {master_weights!r}")
        if master_weights and rounding == "stochastic":
            raise ValueError(
                f"master_weights={master_weights!r} and rounding='stochastic' exclude each other: "
                "stochastic rounding is the memory-free alternative to a master copy"
            )
        if release_grads and check_finite:
            raise ValueError(
                "release_grads=True updates each tensor during backward, before every gradient exists, "
                "so a step with a non-finite gradient cannot be skipped as a whole: pass "
                "check_finite=False with it"
            )
        if cuda_graph and (rounding == "stochastic" or release_grads):
            raise ValueError(
                "cuda_graph=True records the steady step once and replays it: "
                + (
                    "rounding='stochastic' changes its seed at every step"
                    if rounding == "stochastic"
                    else "release_grads=True updates during backward, outside any step"
                )
                + "; use one or the other"
            )
        self.rounding = rounding
        self.states = states
        self.release_grads = bool(release_grads)
        self.cuda_graph = bool(cuda_graph)
        self.master_format = _master_format(master_weights, rounding)
        self.master_weights = self.master_format is not None
        self.seed = int(seed)
        if order not in ORDERS:
            raise ValueError(f"order: expected one of {', '.join(map(repr, ORDERS))}, got {order!r}")
        if backend not in ("auto", "torch", "triton", "cuda"):
            raise ValueError(f"backend: expected one of 'auto', 'torch', 'triton', 'cuda', got {backend!r}")
        self.v: Variant = resolve(
            variant,
            flush=flush,
            keep_states=keep_states,
            norm_power=norm_power,
            logit_cap=None if logit_cap is None or math.isinf(logit_cap) else logit_cap,
            warmup_interval=warmup_interval,
            sample_last=sample_last,
        )
        if logit_cap is not None and math.isinf(logit_cap) and self.v.logit_cap is not None:
            from dataclasses import replace

            self.v = replace(self.v, name=self.v.name + "+logit_cap=inf", logit_cap=None)
        self.variant, self.order, self.granularity = self.v.name, order, granularity
        self.delta, self.eta, self.interval = float(delta), (eta if eta == "auto" else float(eta)), interval
        self.warmup_interval = self.v.warmup_interval or interval
        self.min_flush_steps = min_flush_steps
        self.flush = self.v.flush
        self.backend = backend
        self.check_finite = check_finite
        self.partition: Partition = partition(
            model_or_named_params,
            granularity=granularity,
            include_embedding=include_embedding,
            include_lm_head=include_lm_head,
            embedding_and_head_every_step=self.v.embedding_and_head_every_step,
            train_1d=train_1d,
            module_biases=self.v.module_biases,
        )
        modules = self.partition.modules
        self.module_names: List[str] = [m.name for m in modules]
        sizes = [m.numel for m in modules]
        self.budget = self.delta * self.partition.total_params
        self._check_budget(sizes)
        self.sampler = ImportanceSampler(sizes, self.budget, eta=eta, beta=beta, order=order, variant=self.v, seed=seed)

        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        groups = [{"params": [p for m in modules for _, p in m.params], "name": _MODULES_GROUP}]
        extra = [p for _, p in self.partition.always]
        if extra:
            groups.append({"params": extra, "name": _ALWAYS_GROUP})
        groups += _user_groups(always_train, groups)
        super().__init__(groups, defaults)

        every_param = [p for g in self.param_groups for p in g["params"]]
        devices = {_local(p).device for p in every_param}
        if len(devices) > 1:
            raise ValueError(
                f"model_or_named_params: parameters on mixed devices ({', '.join(map(str, devices))}); "
                "MISA keeps one state arena per optimizer: move the model to one device"
            )
        self.device = devices.pop()
        if rounding == "stochastic" and any(_local(p).dtype == torch.float16 for p in every_param):
            raise ValueError(
                "rounding='stochastic' supports bfloat16 parameters; the model has float16 ones: "
                "use master_weights=True instead"
            )
        self._index = {p: i for i, p in enumerate(every_param)}
        self._param_names = {p: n for m in modules for n, p in m.params}
        self._param_names.update({p: n for n, p in self.partition.always})
        self._always = [(gi, p) for gi, g in enumerate(self.param_groups) if gi > 0 for p in g["params"]]
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True: CUDA graphs record CUDA kernels; the model is on {self.device}")
        # each part makes the state it owns (and alone writes): the active set's memory (active_set.py)
        self.state_formats = _formats(states, self.master_format, every_param)
        self.capacity = Capacity.of(
            self.state_formats,
            [self._module_params(b) for b in range(len(modules))],
            [p for _, p in self._always],
            self.partition.total_params,
        )
        self.active_set = ActiveSet(
            self.state_formats,
            self.capacity.arena_numel(self.budget),
            self.device,
            self._index,
            self.state,
            self._module_params,
            self._always,
        )
        # the step counters, the importance statistic and the skip counts (period.py)
        self.period = Period(self.device, self.warmup_interval)
        self.graph = GraphRecorder()  # cuda_graph.py: the recorded steady step
        self._init_step(check_finite)  # fused_step.py
        self._init_schedule()  # schedule.py
        for _, p in self._always:
            self.active_set.acquire(p, self.period.skips_at_switch)

        # compiled_switch.py: a switch marks the modules it changes, so that a compiled model retraces
        self._switch_tags = SwitchTags(model_or_named_params if isinstance(model_or_named_params, nn.Module) else None)
        # Distributed hooks (misa.distributed): sum per-tensor squared norms over shards, check agreement.
        self._reduce_sq_norms: Optional[Callable[[Tensor], None]] = None
        self._check_active_set: Optional[Callable[[List[int]], None]] = None

        self._claim(every_param + [p for _, p in self.partition.frozen])
        self._warn_frozen()
        for _, p in self._never_trained():
            p.requires_grad_(False)
            p.grad = None
        for m in modules:
            for _, p in m.params:
                p.requires_grad_(False)
                p.grad = None
        for _, p in self._always:
            p.requires_grad_(True)
        self._init_release(every_param)  # grad_release.py
        self._switch(self.sampler.sample())
        self._constructed = True

    def _switched(self) -> None:
        """A switch announces itself here, once (schedule.py); each part resets what it owns."""
        self._invalidate_plan()  # new states, views and slots: the step's plan is made again
        self.graph.invalidate()  # and a recorded step with it: its memory goes back now
        self._reset_release()

    # ---------------------------------------------------------------- the active set's memory (active_set.py)
    @property
    def arena(self) -> StateArena:
        """The StateArena that holds every active tensor's states (and masters or compensations)."""
        return self.active_set.arena

    def memory_bytes(self) -> Dict[str, int]:
        """Bytes this optimizer holds: {"states": Adam's m and v (codes and scales when 8-bit), "masters":
        master copies or compensations}. Both live in the arena, allocated at construction for the largest
        active set the budget allows, so this is the arena's size (split by the formats' bytes per
        element), whatever the current set uses."""
        return self.capacity.split(self.arena.stats()["bytes"])

    def bytes_at(self, delta: float) -> Dict[str, int]:
        """What this optimizer would hold at `delta` (misa.bytes_at: computed, not built); at its own delta
        "states" and "masters" equal memory_bytes()."""
        return self.capacity.bytes_at(delta)

    def arena_bytes(self, p: Tensor) -> int:
        """Bytes the arena gives parameter `p` when it is active (alignment included)."""
        return self.state_formats.arena_bytes(p)

    @property
    def formats(self) -> Dict[str, object]:
        """The state formats and what they cost: {"states", "masters", "bytes_per_element"} (an active
        element of a tensor of at least quant.MIN_NUMEL elements; smaller ones keep fp32 states)."""
        f = self.state_formats
        return {
            "states": f.states,
            "masters": f.masters if f.master_bytes else None,
            "bytes_per_element": f.bytes_per_element(large=True),
        }

    # ---------------------------------------------------------------- construction helpers (the rest: the parts)
    def _claim(self, params) -> None:
        # MISA owns requires_grad of its parameters; a second live MISA on them would silently undo the
        # first one's freezing at each switch. (A weak map, not an attribute: models stay deep-copyable.)
        def owner(p):
            ref = _OWNERS.get(p)
            return ref() if ref is not None else None

        if any(owner(p) not in (None, self) for p in params):
            gc.collect()  # an optimizer the caller dropped may only await the cycle collector
        for p in params:
            other = owner(p)
            if other is not None and other is not self:
                raise ValueError(
                    "model_or_named_params: these parameters already belong to another live MISA "
                    f"optimizer ({other!r}); two would fight over requires_grad. Delete the first one, "
                    "or give each optimizer its own parameters"
                )
        me = weakref.ref(self)
        for p in params:
            _OWNERS[p] = me

    def _never_trained(self):
        trained = {id(p) for g in self.param_groups for p in g["params"]}
        return [(n, p) for n, p in self.partition.frozen if id(p) not in trained]

    def _warn_frozen(self) -> None:
        frozen = self._never_trained()
        if not frozen:
            return
        n = sum(p.numel() for _, p in frozen)
        names = ", ".join(name for name, _ in frozen[:4]) + (", ..." if len(frozen) > 4 else "")
        warnings.warn(
            f"MISA: {len(frozen)} parameter tensors ({n:,} parameters, {n / self.partition.total_params:.2%} "
            f"of the model: {names}) belong to no module and stay frozen for the whole run; train them at "
            "every step with always_train=[...] (train_1d=True for norms), or make the embedding and "
            "head modules with include_embedding/include_lm_head",
            UserWarning,
            stacklevel=3,
        )

    def add_param_group(self, param_group) -> None:
        if getattr(self, "_constructed", False):
            raise NotImplementedError(
                "MISA.add_param_group: MISA decides which parameters train; pass extra "
                "parameters (or param-group dicts) as always_train=... when constructing it"
            )
        super().add_param_group(param_group)

    def _check_budget(self, sizes: Sequence[int]) -> None:
        total = self.partition.total_params
        smallest = min(range(len(sizes)), key=lambda b: sizes[b])
        if sizes[smallest] > self.budget:
            raise ValueError(
                f"delta={self.delta:g} is smaller than the smallest module ({self.module_names[smallest]}: "
                f"{sizes[smallest]:,} parameters, {sizes[smallest] / total:.4%} of {total:,}); "
                f"raise delta to at least {sizes[smallest] / total:.4g}"
            )
        largest = max(range(len(sizes)), key=lambda b: sizes[b])
        too_big = [self.module_names[b] for b in range(len(sizes)) if sizes[b] > self.budget]
        if too_big and self.order in ("misa", "uniform"):
            warnings.warn(
                f"delta={self.delta:g}: {len(too_big)} module(s) are larger than the budget and will never "
                f"be trained (e.g. {too_big[0]}, {sizes[largest] / total:.4%} of all parameters)",
                UserWarning,
                stacklevel=3,
            )
        if self.order in ("ascending", "descending", "random"):
            if sizes[largest] > self.budget:
                raise ValueError(
                    f"delta={self.delta:g}: order={self.order!r} visits every module, but "
                    f"{self.module_names[largest]} ({sizes[largest] / total:.4%} of all parameters) does not fit; "
                    f"raise delta to at least {sizes[largest] / total:.4g}"
                )

    def __repr__(self) -> str:
        frozen = sum(p.numel() for _, p in self._never_trained())
        return (
            f"MISA(modules={len(self.module_names)}, delta={self.delta:g}, eta={self.eta}, "
            f"interval={self.interval}, order={self.order!r}, variant={self.variant!r}, "
            f"active={len(self.active_set.indices)}, trainable={self.trainable_fraction:.2%}, "
            f"never trained={frozen / self.partition.total_params:.2%}, "
            f"states={self.formats['states']}, masters={self.formats['masters']}, "
            f"bytes/element={self.formats['bytes_per_element']:.2f}, "
            f"holds={sum(self.memory_bytes().values()) / 2**20:.2f} MiB)"
        )


class BlockCoordinateDescentOptimizer(MISA):
    """The authors' API: wrap a base Adam/AdamW and sample blocks within `param_ratio_limit`.

    The base optimizer only supplies the hyperparameters (lr, betas, eps, weight_decay); the update
    runs on misa_kernels like MISA. Extra keyword arguments go to MISA (eta, interval, variant, ...).
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        named_parameters_list,
        param_ratio_limit: float = 0.03,
        **misa_kwargs,
    ):
        if not isinstance(base_optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            raise TypeError(f"base_optimizer: expected torch.optim.AdamW or Adam, got {type(base_optimizer).__name__}")
        d = base_optimizer.defaults
        if (
            isinstance(base_optimizer, torch.optim.Adam)
            and not isinstance(base_optimizer, torch.optim.AdamW)
            and d.get("weight_decay", 0.0) != 0.0
            and not d.get("decoupled_weight_decay", False)
        ):
            raise ValueError(
                "base_optimizer: Adam with weight_decay is L2-regularised Adam; MISA implements "
                "AdamW's decoupled weight decay: pass torch.optim.AdamW"
            )
        self.base_optimizer = base_optimizer
        super().__init__(
            list(named_parameters_list),
            lr=d["lr"],
            betas=d["betas"],
            eps=d["eps"],
            weight_decay=d.get("weight_decay", 0.0),
            delta=param_ratio_limit,
            **misa_kwargs,
        )
