"""MISA as a torch.optim.Optimizer: a thin scheduler over misa_kernels.

Every `interval` optimizer steps (an outer loop) it flushes the momentum of the active
modules, updates their importance from the squared gradient norms that the fused AdamW kernel
accumulated, samples a new set within the budget `delta`, and hands the new modules' optimizer
states out of a fixed StateArena. Frozen modules have requires_grad=False, no gradient and no state.
"""

from __future__ import annotations

import gc
import math
import warnings
import weakref
from collections import defaultdict
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

import misa_kernels
from misa_kernels import StateArena, quant
from misa_kernels.arena import ALIGN_ELEMENTS
from misa_kernels.scalars import tensor_key

from .partition import Partition, partition
from .sampler import ORDERS, ImportanceSampler, entropy
from .variants import Variant, resolve

_MODULES_GROUP = "modules"
STATE_FORMATS = ("fp32", "8bit")
# parameter -> weak reference to the MISA that manages it; both sides weak, so neither keeps the other alive
_OWNERS = WeakIdKeyDictionary()
_ALWAYS_GROUP = "always"


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself: kernels run on local data."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


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
    for name, value in (("interval", interval), ("warmup_interval", warmup_interval),
                        ("min_flush_steps", min_flush_steps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")


class MISA(torch.optim.Optimizer):
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
    ):
        _check_config(lr, betas, eps, weight_decay, delta, eta, interval, warmup_interval, min_flush_steps)
        if rounding not in ("nearest", "stochastic"):
            raise ValueError(f"rounding: expected 'nearest' or 'stochastic', got {rounding!r}")
        if states not in STATE_FORMATS:
            raise ValueError(f"states: expected one of {', '.join(map(repr, STATE_FORMATS))}, got {states!r}")
        if master_weights not in (None, True, False, "fp32", "kahan"):
            raise ValueError(f"master_weights: expected None, True, False, 'fp32' or 'kahan', got {master_weights!r}")
        if master_weights and rounding == "stochastic":
            raise ValueError(f"master_weights={master_weights!r} and rounding='stochastic' exclude each other: "
                             "stochastic rounding is the memory-free alternative to a master copy")
        if release_grads and check_finite:
            raise ValueError("release_grads=True updates each tensor during backward, before every gradient exists, "
                             "so a step with a non-finite gradient cannot be skipped as a whole: pass "
                             "check_finite=False with it")
        self.rounding = rounding
        self.states = states
        self.release_grads = bool(release_grads)
        if master_weights is None:
            master_weights = "fp32" if rounding == "nearest" else False
        self.master_format = {True: "fp32", False: None}.get(master_weights, master_weights)
        self.master_weights = self.master_format is not None
        self.seed = int(seed)
        if order not in ORDERS:
            raise ValueError(f"order: expected one of {', '.join(map(repr, ORDERS))}, got {order!r}")
        if backend not in ("auto", "torch", "triton", "cuda"):
            raise ValueError(f"backend: expected one of 'auto', 'torch', 'triton', 'cuda', got {backend!r}")
        self.v: Variant = resolve(variant, flush=flush, keep_states=keep_states, norm_power=norm_power,
                                  logit_cap=None if logit_cap is None or math.isinf(logit_cap) else logit_cap,
                                  warmup_interval=warmup_interval, sample_last=sample_last)
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
            model_or_named_params, granularity=granularity, include_embedding=include_embedding,
            include_lm_head=include_lm_head, embedding_and_head_every_step=self.v.embedding_and_head_every_step,
            train_1d=train_1d, module_biases=self.v.module_biases)
        modules = self.partition.modules
        self.module_names: List[str] = [m.name for m in modules]
        sizes = [m.numel for m in modules]
        self.budget = self.delta * self.partition.total_params
        self._check_budget(sizes)
        self.sampler = ImportanceSampler(
            sizes, self.budget, eta=eta, beta=beta, order=order, variant=self.v, seed=seed)

        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        groups = [{"params": [p for m in modules for _, p in m.params], "name": _MODULES_GROUP}]
        extra = [p for _, p in self.partition.always]
        if extra:
            groups.append({"params": extra, "name": _ALWAYS_GROUP})
        groups += self._user_groups(always_train, groups)
        super().__init__(groups, defaults)

        every_param = [p for g in self.param_groups for p in g["params"]]
        devices = {_local(p).device for p in every_param}
        if len(devices) > 1:
            raise ValueError(f"model_or_named_params: parameters on mixed devices ({', '.join(map(str, devices))}); "
                             "MISA keeps one state arena per optimizer: move the model to one device")
        self.device = devices.pop()
        if rounding == "stochastic" and any(_local(p).dtype == torch.float16 for p in every_param):
            raise ValueError("rounding='stochastic' supports bfloat16 parameters; the model has float16 ones: "
                             "use master_weights=True instead")
        self._index = {p: i for i, p in enumerate(every_param)}
        self._param_names = {p: n for m in modules for n, p in m.params}
        self._param_names.update({p: n for n, p in self.partition.always})
        self._always = [(gi, p) for gi, g in enumerate(self.param_groups) if gi > 0 for p in g["params"]]
        self.arena = StateArena(self._arena_capacity(modules), device=self.device)
        # Non-finite steps are decided and skipped on the device (no host sync): a running count of
        # skipped steps, its value when the current active set was drawn (a state's true step count is
        # its attempted steps minus the skips since), and the skips of the current period.
        self._skips = torch.zeros((), dtype=torch.float32, device=self.device)
        self._skips_at_switch = self._skips.clone()
        self._period_skips = torch.zeros((), dtype=torch.float32, device=self.device)
        self._device_steps = check_finite
        for _, p in self._always:
            self._acquire(p)

        self._active: List[int] = []
        self._t = 0  # optimizer steps into the current outer loop
        self._period_len = self.warmup_interval
        self._step_count = 0
        self._S = torch.zeros(0, device=self.device)
        self._cached_norms: Optional[Tuple[int, Tensor]] = None
        self.switch_log: List[Dict] = []
        self._switch_hooks: List[Callable[["MISA"], None]] = []
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
        self._released: set = set()  # tensors updated by their hook since the last step()
        self._release_sq = torch.zeros(1, dtype=torch.float32, device=self.device)
        if self.release_grads:
            self._install_release_hooks(every_param)
        self._switch(self.sampler.sample())
        self._constructed = True

    # ---------------------------------------------------------------- construction helpers
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
                raise ValueError("model_or_named_params: these parameters already belong to another live MISA "
                                 f"optimizer ({other!r}); two would fight over requires_grad. Delete the first one, "
                                 "or give each optimizer its own parameters")
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
        warnings.warn(f"MISA: {len(frozen)} parameter tensors ({n:,} parameters, {n / self.partition.total_params:.2%} "
                      f"of the model: {names}) belong to no module and stay frozen for the whole run; train them at "
                      "every step with always_train=[...] (train_1d=True for norms), or make the embedding and "
                      "head modules with include_embedding/include_lm_head", UserWarning, stacklevel=3)

    def add_param_group(self, param_group) -> None:
        if getattr(self, "_constructed", False):
            raise NotImplementedError("MISA.add_param_group: MISA decides which parameters train; pass extra "
                                      "parameters (or param-group dicts) as always_train=... when constructing it")
        super().add_param_group(param_group)

    def _check_budget(self, sizes: Sequence[int]) -> None:
        total = self.partition.total_params
        smallest = min(range(len(sizes)), key=lambda b: sizes[b])
        if sizes[smallest] > self.budget:
            raise ValueError(
                f"delta={self.delta:g} is smaller than the smallest module ({self.module_names[smallest]}: "
                f"{sizes[smallest]:,} parameters, {sizes[smallest] / total:.4%} of {total:,}); "
                f"raise delta to at least {sizes[smallest] / total:.4g}")
        largest = max(range(len(sizes)), key=lambda b: sizes[b])
        too_big = [self.module_names[b] for b in range(len(sizes)) if sizes[b] > self.budget]
        if too_big and self.order in ("misa", "uniform"):
            warnings.warn(f"delta={self.delta:g}: {len(too_big)} module(s) are larger than the budget and will never "
                          f"be trained (e.g. {too_big[0]}, {sizes[largest] / total:.4%} of all parameters)",
                          UserWarning, stacklevel=3)
        if self.order in ("ascending", "descending", "random"):
            if sizes[largest] > self.budget:
                raise ValueError(
                    f"delta={self.delta:g}: order={self.order!r} visits every module, but "
                    f"{self.module_names[largest]} ({sizes[largest] / total:.4%} of all parameters) does not fit; "
                    f"raise delta to at least {sizes[largest] / total:.4g}")

    def _user_groups(self, always_train, groups) -> List[Dict]:
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

    def _arena_capacity(self, modules) -> int:
        """fp32 elements of an arena that holds the largest active set the budget allows, in the chosen
        formats. Every active set holds at most `budget` global elements (a shard at most the largest
        local/global ratio of them); each large tensor costs its formats' bytes per element, and every
        block may waste up to one alignment unit. Tensors below quant.MIN_NUMEL keep fp32 states: all of
        them are counted in full (few and small), so the bound holds whichever are active."""
        ratio = max(sum(_local(p).numel() for _, p in m.params) / max(m.numel, 1) for m in modules)
        module_tensors = [p for m in modules for _, p in m.params]
        every = module_tensors + [p for _, p in self._always]
        large = self._bytes_per_element(large=True)
        # an active small tensor costs its extra bytes over the large rate; all of them may be active
        small = sum(_local(p).numel() for p in module_tensors if self.states == "8bit" and not self._is_8bit(p))
        n_blocks = max((len(self._state_layout(p, 1)) for p in every), default=0)
        module_bytes = (math.ceil(self.budget * ratio) * large + small * (self._bytes_per_element(large=False) - large)
                        + ALIGN_ELEMENTS * 4 * n_blocks * len(module_tensors))
        always_bytes = sum(self.arena_bytes(p) for _, p in self._always)
        master_share = self._master_bytes() / large if large else 0.0
        self._arena_parts = {"masters": master_share}
        return int(math.ceil((module_bytes + always_bytes) / 4))

    def _bytes_per_element(self, large: bool) -> float:
        states = quant.BYTES_PER_ELEMENT if (large and self.states == "8bit") else 8.0
        return states + self._master_bytes()

    def _master_bytes(self) -> int:
        low = any(_local(p).dtype != torch.float32 for g in self.param_groups for p in g["params"])
        return {"fp32": 4, "kahan": 2}.get(self.master_format, 0) if low else 0

    def arena_bytes(self, p: Tensor) -> int:
        """Bytes the arena gives parameter `p` when it is active (alignment included)."""
        layout = self._state_layout(p, _local(p).numel()).values()
        return 4 * StateArena.required_numel([(n * _itemsize(dtype) + 3) // 4 for n, dtype in layout])

    # ---------------------------------------------------------------- observable state
    def memory_bytes(self) -> Dict[str, int]:
        """Bytes this optimizer holds: {"states": Adam's m and v (codes and scales when 8-bit), "masters":
        master copies or compensations}. Both live in the arena, allocated at construction for the largest
        active set the budget allows, so this is the arena's size (split by the formats' bytes per
        element), whatever the current set uses."""
        total = self.arena.stats()["bytes"]
        masters = int(total * self._arena_parts["masters"])
        return {"states": total - masters, "masters": masters}

    @property
    def formats(self) -> Dict[str, object]:
        """The state formats and what they cost: {"states", "masters", "bytes_per_element"} (an active
        element of a tensor of at least quant.MIN_NUMEL elements; smaller ones keep fp32 states)."""
        return {"states": self.states, "masters": self.master_format if self._master_bytes() else None,
                "bytes_per_element": self._bytes_per_element(large=True)}

    @property
    def active_modules(self) -> List[str]:
        return [self.module_names[b] for b in self._active]

    @property
    def importance(self) -> Tensor:
        return self.sampler.importance()

    @property
    def probabilities(self) -> Tensor:
        return self.sampler.probabilities()

    @property
    def trainable_fraction(self) -> float:
        return sum(self.sampler.sizes[b] for b in self._active) / self.partition.total_params

    @property
    def steps_in_period(self) -> int:
        return self._t

    def register_switch_hook(self, hook: Callable[["MISA"], None]) -> None:
        """`hook(optimizer)` runs after every switch of the active set (used to rebuild DDP)."""
        self._switch_hooks.append(hook)

    # ---------------------------------------------------------------- states in the arena
    def _has_master(self, p: Tensor) -> bool:
        return self.master_weights and _local(p).dtype != torch.float32

    def _is_8bit(self, p: Tensor) -> bool:
        return self.states == "8bit" and _local(p).numel() >= quant.MIN_NUMEL

    def _state_layout(self, p: Tensor, numel: Optional[int] = None) -> Dict[str, Tuple[object, torch.dtype]]:
        """{state key: (shape or element count, dtype)} of an active parameter in the chosen formats."""
        shape = _local(p).shape if numel is None else numel
        n = _local(p).numel() if numel is None else numel
        if self._is_8bit(p):
            layout = {"exp_avg": (shape, quant.CODE_DTYPE), "exp_avg_sq": (shape, quant.CODE_DTYPE),
                      "exp_avg_absmax": (quant.n_blocks(n), torch.float32),
                      "exp_avg_sq_absmax": (quant.n_blocks(n), torch.float32)}
        else:
            layout = {"exp_avg": (shape, torch.float32), "exp_avg_sq": (shape, torch.float32)}
        if self._has_master(p):
            if self.master_format == "kahan":
                layout["compensation"] = (shape, torch.bfloat16)
            else:
                layout["master"] = (shape, torch.float32)
        return layout

    def _state_keys(self, p: Tensor) -> Tuple[str, ...]:
        return tuple(self._state_layout(p))

    def _acquire(self, p: Tensor) -> None:
        # Contents are undefined until the module's first (fresh) step writes them, the master included.
        i = self._index[p]
        for key, (shape, dtype) in self._state_layout(p).items():
            self.arena.acquire((key, i), shape, dtype)
        # "step" counts the steps attempted since activation; "skips0" is the skip count then
        self.state[p] = {"step": 0, "skips0": self._skips_at_switch}
        self._refresh_views([p])

    def _refresh_views(self, params) -> None:
        for p in params:
            i = self._index[p]
            for key in self._state_keys(p):
                self.state[p][key] = self.arena.view((key, i))

    def _release(self, p: Tensor) -> None:
        i = self._index[p]
        for key in self._state_keys(p):
            self.arena.release((key, i))
        self.state.pop(p, None)

    # ---------------------------------------------------------------- switching
    def _module_params(self, b: int) -> List[Tensor]:
        return [p for _, p in self.partition.modules[b].params]

    def _switch(self, new: Sequence[int], *, log: bool = True, keep_states: Optional[set] = None) -> None:
        new = sorted(new)
        if self._check_active_set is not None:
            self._check_active_set(new)
        old, new_set = set(self._active), set(new)
        if keep_states is None:
            keep_states = old & new_set if self.v.keep_states else set()
        for b in old:
            for p in self._module_params(b):
                if b not in keep_states:
                    self._release(p)
                if b not in new_set:
                    p.requires_grad_(False)
                    p.grad = None
        generation = self.arena.generation
        self._skips_at_switch = self._skips.clone()
        for b in new:
            for p in self._module_params(b):
                p.requires_grad_(True)
                if b not in keep_states:
                    self._acquire(p)
        if self.arena.generation != generation:  # compaction moved blocks: re-point every state
            self._refresh_views(list(self.state.keys()))
        self._active = new
        self._build_slots()
        self._release_sq = torch.zeros(len(self._slots) + 1, dtype=torch.float32, device=self.device)
        self._S = torch.zeros(len(new), dtype=torch.float32, device=self.device)
        self._period_skips = torch.zeros((), dtype=torch.float32, device=self.device)
        self._t = 0
        self._period_len = self.warmup_interval if self.sampler.in_warmup else self.interval
        if log:
            probs = self.probabilities
            self.switch_log.append({
                "step": self._step_count, "active_modules": self.active_modules,
                "trainable_fraction": self.trainable_fraction, "entropy": entropy(probs),
                "period_len": self._period_len, "warmup": self.sampler.in_warmup,
            })
        for hook in self._switch_hooks:
            hook(self)

    def _build_slots(self) -> None:
        self._index_cache: Dict[Tuple[int, ...], Tensor] = {}
        # One slot per active module tensor, modules in order; a padded gather matrix sums them per module.
        self._slots: Dict[Tensor, int] = {}
        rows = []
        for b in self._active:
            row = []
            for p in self._module_params(b):
                self._slots[p] = len(self._slots)
                row.append(self._slots[p])
            rows.append(row)
        width = max((len(r) for r in rows), default=1)
        pad = len(self._slots)
        self._seg_index = torch.tensor([r + [pad] * (width - len(r)) for r in rows] or [[pad]],
                                       dtype=torch.int64, device=self.device)

    # ---------------------------------------------------------------- gradient release
    def _install_release_hooks(self, params) -> None:
        # The hook holds the optimizer weakly: a model must not keep a dropped optimizer alive.
        me = weakref.ref(self)

        def hook(p: Tensor) -> None:
            opt = me()
            if opt is not None:
                opt._update_released(p)

        self._release_handles = []
        for p in params:  # a hook can only be registered while the tensor requires grad; it stays after that
            frozen = not p.requires_grad
            p.requires_grad_(True)
            self._release_handles.append(p.register_post_accumulate_grad_hook(hook))
            p.requires_grad_(not frozen)

    def _update_released(self, p: Tensor) -> None:
        """Update `p` from its just-accumulated gradient and free the gradient (release_grads=True)."""
        if p.grad is None or p not in self.state:
            return
        if p in self._released:
            name = self._param_names.get(p, "a tensor")
            raise RuntimeError(f"MISA(release_grads=True): a second backward reached {name} before step(): each "
                               "gradient updates its tensor as soon as it exists, so gradients cannot be accumulated "
                               "over several backward passes; call step() after each backward, or construct MISA "
                               "without release_grads")
        g = _local(p.grad)
        if g.is_sparse:
            raise RuntimeError(f"MISA does not support sparse gradients ({self._param_names.get(p, 'a param')})")
        self._released.add(p)
        gi = 0 if p in self._slots else self._group_of(p)
        with torch.no_grad():
            self._fused_steps([(gi, p, g, self._slots.get(p))], self._release_sq, call_base=self._index[p])
        p.grad = None

    def _group_of(self, p: Tensor) -> int:
        return next(gi for gi, q in self._always if q is p)

    def _release_step(self, loss):
        """step() under release_grads: the updates ran in the hooks; keep the books."""
        if not self._released:
            return loss
        step_sq, self._release_sq = self._release_sq, torch.zeros_like(self._release_sq)
        self._released.clear()
        if self._reduce_sq_norms is not None:
            self._reduce_sq_norms(step_sq)
        per_module = step_sq[self._seg_index].sum(dim=1)
        self._S += per_module.sqrt() if self.v.norm_power == 1 else per_module
        self._advance()
        return loss

    # ---------------------------------------------------------------- the step
    def _grads(self) -> List[Tuple[int, Tensor, Tensor, Optional[int]]]:
        """(group index, local param, local grad, slot or None) for every active param with a grad."""
        out = []
        active = [(0, p) for b in self._active for p in self._module_params(b)] + self._always
        for gi, p in active:
            if p.grad is None:
                continue
            g = _local(p.grad)
            if g.is_sparse:
                raise RuntimeError(f"MISA does not support sparse gradients ({self._param_names.get(p, 'a param')})")
            out.append((gi, p, g, self._slots.get(p)))
        return out

    def _norms_by_slot(self, entries) -> Tuple[Tensor, Tensor]:
        """Squared norms of every grad: per module slot (plus a zero pad slot), and per entry."""
        by_dtype = defaultdict(list)
        for k, (_, _, g, _) in enumerate(entries):
            by_dtype[g.dtype].append(k)
        if len(by_dtype) == 1:  # one dtype (the usual case): the norms are already in entry order
            per_entry = misa_kernels.grad_sq_norms([e[2] for e in entries], backend=self.backend)
            return self._to_slots(entries, per_entry), per_entry
        per_entry = torch.zeros(len(entries), dtype=torch.float32, device=self.device)
        for ks in by_dtype.values():
            norms = misa_kernels.grad_sq_norms([entries[k][2] for k in ks], backend=self.backend)
            per_entry[self._index_tensor(ks)] = norms
        return self._to_slots(entries, per_entry), per_entry

    def _index_tensor(self, indices: List[int]) -> Tensor:
        """A device tensor of these indices, made once per active set: a copy from host memory at every
        step would make the step wait for the GPU."""
        key = tuple(indices)
        cached = self._index_cache.get(key)
        if cached is None:
            cached = self._index_cache[key] = torch.tensor(indices, dtype=torch.int64, device=self.device)
        return cached

    def _to_slots(self, entries, per_entry: Tensor) -> Tensor:
        step_sq = torch.zeros(len(self._slots) + 1, dtype=torch.float32, device=self.device)
        ks = [k for k, e in enumerate(entries) if e[3] is not None]
        if ks:
            idx = self._index_tensor([entries[k][3] for k in ks])
            step_sq.index_copy_(0, idx, per_entry[self._index_tensor(ks)])
        return step_sq

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.release_grads:
            return self._release_step(loss)
        entries = self._grads()
        if not entries:
            return loss
        found = None  # 0-d device flag: 1.0 when this step's gradients hold NaN/inf
        cached = self._cached_norms
        self._cached_norms = None
        if cached is not None and cached[0] == self._step_count:
            step_sq, total = cached[1], cached[2]  # from clip_grad_norm_, already summed over shards
        elif self.check_finite:
            step_sq, per_entry = self._norms_by_slot(entries)
            step_sq, total = self._reduced(step_sq, per_entry)
        else:
            step_sq, total = None, None
        if self.check_finite:
            self._device_steps = True
            # total - total is 0 for a finite total and NaN otherwise: three launches (isfinite is four alone)
            found = (total - total).ne(0).to(torch.float32)
        if step_sq is None:
            step_sq = torch.zeros(len(self._slots) + 1, dtype=torch.float32, device=self.device)
            self._fused_steps(entries, step_sq, found)
            if self._reduce_sq_norms is not None:
                self._reduce_sq_norms(step_sq)
        else:
            self._fused_steps(entries, None, found)
        if found is not None and self.v.count_nonfinite_steps:
            # The authors' code: a non-finite tensor's norm counts as 1.0 and the step counts.
            step_sq = torch.nan_to_num(step_sq, nan=1.0, posinf=1.0, neginf=1.0)  # one launch, not three
        per_module = step_sq[self._seg_index].sum(dim=1)
        stat = per_module.sqrt() if self.v.norm_power == 1 else per_module
        if found is not None and not self.v.count_nonfinite_steps:
            stat = stat * (1.0 - found)  # a skipped step adds nothing to the statistic
        self._S += stat
        if found is not None:
            self._skips += found
            self._period_skips += found
        self._advance()
        return loss

    def _reduced(self, step_sq: Tensor, per_entry: Tensor) -> Tuple[Tensor, Tensor]:
        """Per-slot squared norms and the total over every gradient, summed over shards (FSDP2) so that
        every rank takes the same skip decision."""
        total = per_entry.sum()
        if self._reduce_sq_norms is None:
            return step_sq, total
        sq = torch.cat([step_sq, (total - step_sq.sum()).reshape(1)])
        self._reduce_sq_norms(sq)
        return sq[:-1], sq.sum()

    def _advance(self) -> None:
        self._t += 1
        self._step_count += 1
        if self.v.schedule == "global_step":
            # The authors' schedule: after every step while a module was never selected, then at multiples of T.
            done = self._step_count % self.interval == 0 or self.sampler.never_selected()
        else:
            done = self._t >= self._period_len
        if done:
            self._end_period()

    def _true_step(self, st: Dict, ahead: int = 0):
        """A state's step count (plus `ahead`) for the bias corrections: a number, or (once steps may be
        skipped on the device) a 0-d device tensor, the attempted steps minus the skips since activation."""
        if not self._device_steps:
            return st["step"] + ahead
        # number - tensor launches one kernel; a tensor built from host data would copy and wait on a GPU
        return float(st["step"] + ahead) - (self._skips - st["skips0"])

    def _fused_steps(self, entries, step_sq: Optional[Tensor], found: Optional[Tensor] = None,
                     call_base: int = 0) -> None:
        """One fused kernel call per (group, dtype, step count, activation, module-or-not, state format).
        `call_base` numbers the calls for the stochastic-rounding seeds (a released tensor's own index)."""
        calls = defaultdict(list)
        for gi, p, g, slot in entries:
            st = self.state[p]
            calls[(gi, _local(p).dtype, st["step"], id(st["skips0"]), slot is not None, "exp_avg_absmax" in st)].append(
                (p, g, slot))
        for call, ((gi, _, step, _, is_module, _), items) in enumerate(calls.items()):
            group = self.param_groups[gi]
            beta1, beta2 = group["betas"]
            params = [_local(p) for p, _, _ in items]
            states = [self.state[p] for p, _, _ in items]
            norms, scatter = None, None
            if step_sq is not None and is_module:
                slots = [s for _, _, s in items]
                if slots == list(range(slots[0], slots[0] + len(slots))):
                    norms = step_sq[slots[0]:slots[0] + len(slots)]  # a contiguous view: accumulate in place
                else:
                    norms = torch.zeros(len(slots), dtype=torch.float32, device=self.device)
                    scatter = self._index_tensor(slots)
            misa_kernels.adamw_step_(
                params, [g for _, g, _ in items], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                step=self._true_step(states[0], ahead=1), fresh=step == 0, grad_sq_norms=norms, skip=found,
                backend=self.backend,
                **self._rounding_args(states, call_base + call))
            if scatter is not None:
                step_sq.index_copy_(0, scatter, norms)
            for s in states:
                s["step"] = step + 1

    def _rounding_args(self, states, call: int) -> Dict:
        """master_params or compensation, block scales of 8-bit states, rounding and seed for one kernel
        call (every state of a call has one format). The stochastic seed is a function of (seed, step,
        call), so a resumed run rounds exactly as the uninterrupted one."""
        first = states[0] if states else {}
        seed = tensor_key(self.seed & 0x7FFFFFFF, self._step_count * 1024 + call) & 0x7FFFFFFF
        args = dict(rounding=self.rounding, seed=seed)
        for key, arg in (("master", "master_params"), ("compensation", "compensation"),
                         ("exp_avg_absmax", "exp_avg_absmax"), ("exp_avg_sq_absmax", "exp_avg_sq_absmax")):
            if key in first:
                args[arg] = [s[key] for s in states]
        return args

    def _end_period(self) -> None:
        length = self._t
        skipped = int(self._period_skips)  # the period's end reads the statistics anyway
        if skipped:
            warnings.warn(f"MISA: {skipped} of the last {length} steps had non-finite gradients and were skipped "
                          "(parameters and optimizer state untouched)", RuntimeWarning, stacklevel=3)
        if self.flush and length - skipped >= self.min_flush_steps:
            self._flush()
        counted = length if self.v.count_nonfinite_steps else max(length - skipped, 1)
        stats = (self._S / (self.interval if self.v.divide_by_interval else counted)).tolist()
        self.sampler.update(self._active, stats)
        self._switch(self.sampler.sample())

    def _flush(self) -> None:
        calls = defaultdict(list)
        for b in self._active:
            for p in self._module_params(b):
                st = self.state.get(p)
                if st is not None and self._steps_taken(st) > 0:
                    calls[(_local(p).dtype, st["step"], id(st["skips0"]), "exp_avg_absmax" in st)].append(p)
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        for call, params in enumerate(calls.values()):
            states = [self.state[p] for p in params]
            misa_kernels.momentum_flush_(
                [_local(p) for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], step=self._true_step(states[0]),
                backend=self.backend, **self._rounding_args(states, 512 + call))

    def _steps_taken(self, st: Dict) -> int:
        """A state's true step count as a number (reads the device: for period ends and checkpoints)."""
        return st["step"] - int(self._skips - st["skips0"]) if self._device_steps else st["step"]

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients so far (reads the device)."""
        return int(self._skips)

    # ---------------------------------------------------------------- gradient clipping
    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> Tensor:
        """Clip the active gradients by their global L2 norm, using one fused norm pass; the next
        `step()` reuses these norms (scaled by the clip factor) instead of computing them again.
        Returns the norm before clipping, like torch.nn.utils.clip_grad_norm_."""
        if norm_type != 2.0:
            raise ValueError(f"norm_type: MISA clips by the L2 norm only, got {norm_type}")
        if self.release_grads:
            raise RuntimeError("MISA(release_grads=True) cannot clip by the global norm: each tensor was updated and "
                               "its gradient freed during backward, before the norm of all of them existed")
        entries = self._grads()
        if not entries:
            return torch.zeros((), device=self.device)
        step_sq, per_entry = self._norms_by_slot(entries)
        step_sq, total_sq = self._reduced(step_sq, per_entry)  # sharded (FSDP2): over every rank's shards
        total = total_sq.sqrt()
        # No host check of the norm: a non-finite norm makes coef non-finite, and step() skips on the device.
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_([g for _, _, g, _ in entries], coef)
        self._cached_norms = (self._step_count, step_sq * coef * coef, total_sq * coef * coef)
        return total

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict:
        sd = super().state_dict()
        # torch's state_dict hands out the live per-parameter dicts: copy them before replacing their
        # tensors, or this optimizer's states would stop being views of the arena.
        live = {i: self.param_by_index(int(i)) for i in sd["state"]}
        sd["state"] = {i: {**{key: value.detach().clone() for key, value in st.items()
                              if torch.is_tensor(value) and key != "skips0"},
                           "step": self._steps_taken(self.state[live[i]])} for i, st in sd["state"].items()}
        sd["misa"] = {
            "module_names": list(self.module_names),
            "variant": self.variant,
            "sampler": self.sampler.state_dict(),
            "active": list(self._active),
            "t": self._t,
            "period_len": self._period_len,
            "step_count": self._step_count,
            "S": self._S.detach().cpu().clone(),
            "skipped_steps": self.skipped_steps,
            "period_skips": int(self._period_skips),
            "switch_log": list(self.switch_log),
        }
        return sd

    def load_state_dict(self, state_dict: Dict) -> None:
        self.load_schedule(state_dict)
        for i, st in state_dict["state"].items():
            p = self.param_by_index(int(i))
            if p not in self.state:
                raise ValueError(f"state_dict: state for {self._param_names.get(p, i)}, which is not active")
            self._load_states(p, self.state[p], st)
            self.state[p]["step"] = int(st["step"])

    def _load_states(self, p: Tensor, here: Dict, saved: Dict) -> None:
        """Copy a saved parameter's states into its arena views, converting between formats: fp32 states
        are quantized into 8-bit ones and 8-bit ones dequantized (quant.py), an fp32 master becomes a
        compensation (master - weight) and the reverse (weight + compensation); a checkpoint without
        either starts them from the weight, as an activation does."""
        maps = quant.maps(self.device)
        for key, scale_key, qmap in (("exp_avg", "exp_avg_absmax", maps[0]), ("exp_avg_sq", "exp_avg_sq_absmax",
                                                                               maps[1])):
            if key not in saved:
                continue
            value = saved[key].to(self.device)
            if (scale_key in here) == (scale_key in saved):  # same format: the exact bytes
                here[key].copy_(value.reshape(here[key].shape))
                if scale_key in here:
                    here[scale_key].copy_(saved[scale_key].reshape(-1))
            elif scale_key in here:
                codes, scales = quant.quantize(value.float(), qmap)
                here[key].copy_(codes.reshape(here[key].shape))
                here[scale_key].copy_(scales)
            else:
                here[key].copy_(quant.dequantize(value, saved[scale_key].to(self.device), qmap).reshape(
                    here[key].shape))
        weight = _local(p).detach().float().reshape(-1)
        if "master" in here:
            if "master" in saved:
                value = saved["master"]
            elif "compensation" in saved:
                value = weight + saved["compensation"].to(self.device).float().reshape(-1)
            else:
                value = weight
            here["master"].copy_(value.reshape(here["master"].shape))
        if "compensation" in here:
            if "compensation" in saved:
                value = saved["compensation"]
            elif "master" in saved:
                value = saved["master"].to(self.device).float().reshape(-1) - weight
            else:
                value = torch.zeros_like(weight)
            here["compensation"].copy_(value.reshape(here["compensation"].shape))

    def param_by_index(self, i: int) -> Tensor:
        """The parameter behind index `i` of state_dict()["state"] (param-group order)."""
        return [p for g in self.param_groups for p in g["params"]][i]

    def load_schedule(self, state_dict: Dict) -> None:
        """Everything of a state_dict except the Adam states: hyperparameters, the sampler and its RNG, the
        active set (whose states are then acquired, undefined until filled in) and the step counters."""
        misa = state_dict.get("misa")
        if misa is None:
            raise ValueError("state_dict: not a MISA state_dict (no 'misa' entry)")
        if misa["module_names"] != self.module_names:
            raise ValueError("state_dict: saved for a model with different modules "
                             f"({len(misa['module_names'])} saved, {len(self.module_names)} here)")
        if len(state_dict["param_groups"]) != len(self.param_groups):
            raise ValueError("state_dict: the number of param groups differs")
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError("state_dict: a param group has a different number of parameters")
            for key, value in saved.items():
                if key != "params":
                    group[key] = value
        # Switch to the saved active set, dropping every current module state.
        self.sampler.load_state_dict(misa["sampler"])
        self._switch(misa["active"], log=False, keep_states=set())
        self._t = int(misa["t"])
        self._period_len = int(misa["period_len"])
        self._step_count = int(misa["step_count"])
        self._S = misa["S"].to(device=self.device, dtype=torch.float32).clone()
        self._skips = torch.full((), float(misa["skipped_steps"]), dtype=torch.float32, device=self.device)
        self._period_skips = torch.full((), float(misa.get("period_skips", 0)), dtype=torch.float32,
                                        device=self.device)
        self._device_steps = self._device_steps or self.check_finite
        self._skips_at_switch = self._skips.clone()
        for st in self.state.values():  # saved steps are true steps: no skips since "activation"
            st["skips0"] = self._skips_at_switch
        self.switch_log = list(misa["switch_log"])

    def __repr__(self) -> str:
        frozen = sum(p.numel() for _, p in self._never_trained())
        return (f"MISA(modules={len(self.module_names)}, delta={self.delta:g}, eta={self.eta}, "
                f"interval={self.interval}, order={self.order!r}, variant={self.variant!r}, "
                f"active={len(self._active)}, trainable={self.trainable_fraction:.2%}, "
                f"never trained={frozen / self.partition.total_params:.2%}, "
                f"states={self.formats['states']}, masters={self.formats['masters']}, "
                f"bytes/element={self.formats['bytes_per_element']:.2f}, "
                f"holds={sum(self.memory_bytes().values()) / 2**20:.2f} MiB)")


class BlockCoordinateDescentOptimizer(MISA):
    """The authors' API: wrap a base Adam/AdamW and sample blocks within `param_ratio_limit`.

    The base optimizer only supplies the hyperparameters (lr, betas, eps, weight_decay); the update
    runs on misa_kernels like MISA. Extra keyword arguments go to MISA (eta, interval, variant, ...).
    """

    def __init__(self, base_optimizer: torch.optim.Optimizer, named_parameters_list, param_ratio_limit: float = 0.03,
                 **misa_kwargs):
        if not isinstance(base_optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            raise TypeError(f"base_optimizer: expected torch.optim.AdamW or Adam, got {type(base_optimizer).__name__}")
        d = base_optimizer.defaults
        if isinstance(base_optimizer, torch.optim.Adam) and not isinstance(base_optimizer, torch.optim.AdamW) \
                and d.get("weight_decay", 0.0) != 0.0 and not d.get("decoupled_weight_decay", False):
            raise ValueError("base_optimizer: Adam with weight_decay is L2-regularised Adam; MISA implements "
                             "AdamW's decoupled weight decay: pass torch.optim.AdamW")
        self.base_optimizer = base_optimizer
        super().__init__(list(named_parameters_list), lr=d["lr"], betas=d["betas"], eps=d["eps"],
                         weight_decay=d.get("weight_decay", 0.0), delta=param_ratio_limit, **misa_kwargs)
