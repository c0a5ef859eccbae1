"""What a training step holds in memory: the step-peak meter, and the accounted ledger beside it.

`StepPeakMeter` measures the peak of a training step: weights and buffers, the activations autograd saves
for backward, gradients, optimizer states and masters, and every temporary, at the worst moment of the
step. That is the figure a GPU's memory has to hold, and the one on which MISA and LoRA differ most: a
frozen linear layer saves no input for its weight, LoRA's A matrix needs the input of every adapted
projection, and backward stops at the lowest trainable layer.

- `mode="track"` (the CPU, and fake tensors for the planner): a `TorchDispatchMode` registers the storage
  of every tensor an op returns, counted once however many views share it, and a weak reference on the
  storage removes it when it is freed; the running sum's maximum over the step is its peak. The tensors
  alive when a step begins are found from the model (parameters, buffers, gradients) and the optimizer
  (its state, and every tensor its own objects hold: MISA's arena, norm buffers, step counts). Each storage
  carries a kind: weights (parameters and buffers), gradients (a parameter's `.grad`, relabelled when
  autograd accumulates it), optimizer (held by the optimizer), activations (saved for backward: relabelled
  by a saved-tensors hook), temporaries (everything else). What a kernel allocates inside itself and frees
  before it returns (a matmul's workspace) is not seen. A storage resized in place (FSDP2 frees and
  re-allocates its unsharded parameters and all-gather buffers by resizing their storages to 0 and back, which
  no op reports) is followed by wrapping `torch.UntypedStorage.resize_` during the step; one that grows from
  outside the step's bookkeeping counts as a temporary. Sizes are read again when each step begins.
- `mode="cuda"`: `torch.cuda.max_memory_allocated` after a reset at the start of the step, which counts
  everything on the device (the caching allocator's rounding included) and tells no kinds.

Why not `torch.distributed._tools.mem_tracker.MemTracker`: in the torch we install (2.14) it registers a
post-accumulate-grad hook on every parameter of the model, which fails on a frozen one ("cannot register a
hook on a tensor that doesn't require gradient"), and it refuses to be entered for a second iteration; MISA
freezes most of the model and changes which part at every switch.

`MemoryMeter` is the accounted ledger (adapters + gradients + Adam states + masters at their peak), which
stays beside the measured peak because it is what a method's bytes per element predict.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import deque
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, Iterator, List, Optional

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

KINDS = ("weights", "activations", "gradients", "optimizer", "temporaries")
# A storage takes the lowest-ranked kind it is ever given: a temporary becomes an activation when autograd
# saves it, a weight saved for backward stays a weight, a gradient an optimizer keeps a reference to stays
# a gradient.
_RANK = {"weights": 0, "gradients": 1, "optimizer": 2, "activations": 3, "temporaries": 4}
# Objects of these packages are walked for the tensors an optimizer holds (its plans, arenas, counters).
_OWN_PACKAGES = ("misa", "misa_kernels", "torch.optim")


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _storage(t: Tensor):
    local = getattr(t, "_local_tensor", None)  # a DTensor's memory is its local shard
    t = local if isinstance(local, Tensor) else t
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensors without storage (nested, some subclasses)
        return None


def _key(t: Tensor) -> Optional[int]:
    st = _storage(t)
    return None if st is None else st._cdata


def optimizer_tensors(opt) -> List[Tensor]:
    """Every tensor an optimizer holds: its state, and what its own objects (those of misa, misa_kernels and
        torch.optim) keep in attributes, lists and dicts. Modules are not walked into, and parameters (the model's
    weights) are left out."""
    found: List[Tensor] = []
    seen = set()
    todo = deque([opt])
    while todo:
        obj = todo.popleft()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, nn.Parameter):  # the model's, counted as weights
            continue
        if isinstance(obj, Tensor):
            found.append(obj)
        elif isinstance(obj, nn.Module):
            continue
        elif isinstance(obj, dict):
            todo.extend(obj.keys())
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset, deque)):
            todo.extend(obj)
        elif type(obj).__module__.split(".")[0] in ("misa", "misa_kernels") or type(obj).__module__.startswith(
            "torch.optim"
        ):
            todo.extend(vars(obj).values() if hasattr(obj, "__dict__") else ())
            for slot in getattr(type(obj), "__slots__", ()):
                if hasattr(obj, slot):
                    todo.append(getattr(obj, slot))
    return found


@dataclass
class StepPeak:
    """One metered step: its peak bytes and, when tracked, the bytes of each kind at that moment."""

    peak_bytes: int
    parts: Optional[Dict[str, int]] = None

    def as_dict(self) -> Dict:
        return asdict(self)


class _Tracker(TorchDispatchMode):
    """Registers the storage of every tensor an op returns (see the module doc)."""

    def __init__(self, meter: "StepPeakMeter"):
        super().__init__()
        self.meter = meter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        meter = self.meter
        # An output that shares an input's storage (a view, an in-place op) allocated nothing: if that storage
        # is not counted, it is memory from outside the step (a view into the data set), and stays uncounted.
        inputs = {_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and _key(t) not in inputs:
                meter._register(t, "temporaries")
        meter._observe()
        return out


class StepPeakMeter:
    """The peak memory of training steps (see the module doc).

        meter = StepPeakMeter(model, opt)
        with meter.step():                # one metered training step
            loss = model.loss(batch); loss.backward(); opt.step(); opt.zero_grad()
        meter.peak_bytes, meter.peak_parts, meter.steps

    `mode`: "auto" (cuda for a model on a CUDA device, else track), "track" or "cuda". Steps outside
    `step()` run at full speed and are not counted; frees there are still seen. The meter is a long-lived
    object: what a step leaves behind (new optimizer states) is counted from then on.
    """

    def __init__(self, model: nn.Module, optimizer=None, *, mode: str = "auto", block_bytes: int = 1):
        if mode not in ("auto", "track", "cuda"):
            raise ValueError(f"mode: expected 'auto', 'track' or 'cuda', got {mode!r}")
        if isinstance(block_bytes, bool) or not isinstance(block_bytes, int) or block_bytes < 1:
            raise ValueError(f"block_bytes: expected a positive integer, got {block_bytes!r}")
        # mode "track": each storage counts as a whole number of blocks, as a caching allocator hands them out
        # (512 B on CUDA: the planner's model of the GPU, misa/jobs/device_model.py); 1 counts exact bytes
        self.block_bytes = block_bytes
        self.model, self.optimizer = model, optimizer
        first = next(iter(model.parameters()), None)
        on_cuda = first is not None and first.device.type == "cuda"
        self.mode = ("cuda" if on_cuda else "track") if mode == "auto" else mode
        if self.mode == "cuda" and not on_cuda:
            raise ValueError("mode='cuda' reads the CUDA allocator's peak: the model is not on a CUDA device")
        self.steps: List[StepPeak] = []
        self._live: Dict[int, list] = {}  # storage key -> [nbytes, kind, weakref]
        self._by_kind = dict.fromkeys(KINDS, 0)
        self._total = 0
        self._step_peak = 0
        self._step_parts: Dict[str, int] = {}
        self._peak_temporaries: set = set()
        self._inside = False

    # ---------------------------------------------------------------- results
    @property
    def peak_bytes(self) -> int:
        """The largest peak of the metered steps (0 before any)."""
        return max((s.peak_bytes for s in self.steps), default=0)

    @property
    def peak_parts(self) -> Optional[Dict[str, int]]:
        """The bytes of each kind at the moment of the largest peak (None in mode 'cuda')."""
        return max(self.steps, key=lambda s: s.peak_bytes).parts if self.steps else None

    def state_dict(self) -> List[Dict]:
        """The metered steps' results (a resumed run continues from them)."""
        return [s.as_dict() for s in self.steps]

    def load_state_dict(self, steps: List[Dict]) -> None:
        self.steps = [StepPeak(**s) for s in steps]

    @property
    def live_bytes(self) -> int:
        """Bytes the tracked storages hold now (mode 'track')."""
        return self._total

    # ---------------------------------------------------------------- one step
    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        if self._inside:
            raise RuntimeError("StepPeakMeter.step(): already inside a metered step")
        self._inside = True
        try:
            if self.mode == "cuda":
                device = next(iter(self.model.parameters())).device
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                yield
                torch.cuda.synchronize(device)
                self.steps.append(StepPeak(torch.cuda.max_memory_allocated(device)))
                return
            self._refresh()
            self._register_roots()
            self._step_peak, self._step_parts = self._total, dict(self._by_kind)
            self._peak_temporaries = set()
            hooks = [
                p.register_post_accumulate_grad_hook(self._grad_ready)
                for p in self.model.parameters()
                if p.requires_grad
            ]
            try:
                with (
                    torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack),
                    _Tracker(self),
                    _storage_resizes(self),
                ):
                    yield
            finally:
                for h in hooks:
                    h.remove()
            self._register_roots()  # what the step left behind takes its kind (new optimizer states)
            self.steps.append(StepPeak(self._step_peak, self._step_parts))
        finally:
            self._inside = False

    # ---------------------------------------------------------------- bookkeeping
    def _register(self, t: Tensor, kind: str) -> None:
        st = _storage(t)
        if st is not None:
            self._register_storage(st, kind)

    def _blocks(self, nbytes: int) -> int:
        return -(-nbytes // self.block_bytes) * self.block_bytes

    def _register_storage(self, st, kind: str) -> None:
        key = st._cdata
        entry = self._live.get(key)
        if entry is not None:
            if _RANK[kind] < _RANK[entry[1]]:
                self._by_kind[entry[1]] -= entry[0]
                self._by_kind[kind] += entry[0]
                if key in self._peak_temporaries:
                    # it was alive at the step's peak as a temporary: a gradient being accumulated there is
                    # a gradient at the peak too
                    self._peak_temporaries.discard(key)
                    self._step_parts[entry[1]] -= entry[0]
                    self._step_parts[kind] += entry[0]
                entry[1] = kind
            return
        nbytes = self._blocks(st.nbytes())
        ref = weakref.ref(st, lambda _, key=key: self._freed(key))
        self._live[key] = [nbytes, kind, ref]
        self._by_kind[kind] += nbytes
        self._total += nbytes

    def _freed(self, key: int) -> None:
        self._peak_temporaries.discard(key)  # a storage made later at the same address is another one
        entry = self._live.pop(key, None)
        if entry is not None:
            self._by_kind[entry[1]] -= entry[0]
            self._total -= entry[0]

    def _resized(self, st) -> None:
        entry = self._live.get(st._cdata)
        if entry is None:
            self._register_storage(st, "temporaries")
        else:
            self._resize_entry(entry, self._blocks(st.nbytes()))
        self._observe()

    def _resize_entry(self, entry: list, nbytes: int) -> None:
        self._by_kind[entry[1]] += nbytes - entry[0]
        self._total += nbytes - entry[0]
        entry[0] = nbytes

    def _refresh(self) -> None:
        """Sizes as they are now: a storage resized between steps, where no resize is followed."""
        for entry in list(self._live.values()):
            st = entry[2]()
            if st is not None:
                self._resize_entry(entry, self._blocks(st.nbytes()))

    def _observe(self) -> None:
        if self._total > self._step_peak:
            self._step_peak = self._total
            self._step_parts = dict(self._by_kind)
            self._peak_temporaries = {k for k, e in self._live.items() if e[1] == "temporaries"}

    def _register_roots(self) -> None:
        for p in self.model.parameters():
            self._register(p, "weights")
            if p.grad is not None:
                self._register(p.grad, "gradients")
        for b in self.model.buffers():
            self._register(b, "weights")
        if self.optimizer is not None:
            for t in optimizer_tensors(self.optimizer):
                self._register(t, "optimizer")
        self._observe()

    def _grad_ready(self, p: Tensor) -> None:
        if p.grad is not None:
            self._register(p.grad, "gradients")

    def _pack(self, t: Tensor) -> Tensor:
        self._register(t, "activations")
        return t


def _unpack(t: Tensor) -> Tensor:
    return t


@contextlib.contextmanager
def _storage_resizes(meter: "StepPeakMeter") -> Iterator[None]:
    """Reports every `UntypedStorage.resize_` to the meter while a step runs (module doc)."""
    cls = torch.UntypedStorage
    own = cls.__dict__.get("resize_")
    original = cls.resize_  # torch._C.StorageBase's, found through the class

    def resize_(storage, size):
        out = original(storage, size)
        meter._resized(storage)
        return out

    cls.resize_ = resize_
    try:
        yield
    finally:
        if own is None:
            del cls.resize_
        else:
            cls.resize_ = own


# ---------------------------------------------------------------- the accounted ledger
@dataclass
class Accounted:
    trainable_params: int = 0
    adapter_bytes: int = 0  # weights the method adds to the model (LoRA/DoRA); 0 for MISA, LISA, BAdam, AdamW
    grad_bytes: int = 0
    state_bytes: int = 0  # Adam's first and second moments (and their step counters)
    master_bytes: int = 0  # fp32 master copies of low-precision weights

    @property
    def total_bytes(self) -> int:
        return self.adapter_bytes + self.grad_bytes + self.state_bytes + self.master_bytes

    def as_dict(self) -> Dict[str, int]:
        return {**asdict(self), "total_bytes": self.total_bytes}


def optimizer_bytes(opt: torch.optim.Optimizer) -> Dict[str, int]:
    """{"states": ..., "masters": ...}: what the optimizer holds. MISA says it itself (its arena is
    allocated up front for the largest active set); a torch optimizer holds the tensors in its state."""
    own = getattr(opt, "memory_bytes", None)
    if callable(own):
        return own()
    states = masters = 0
    for st in opt.state.values():
        for key, value in st.items():
            if torch.is_tensor(value):
                if key == "master":
                    masters += _nbytes(value)
                else:
                    states += _nbytes(value)
    return {"states": states, "masters": masters}


class MemoryMeter:
    """The peak, over steps, of adapters + gradients + optimizer states + masters (the accounted ledger).
    `base_params`: the parameters of the model before a method added any (adapters are the others)."""

    def __init__(self, model: nn.Module, base_params: Iterable[Tensor]):
        self.model = model
        base = {id(p) for p in base_params}
        self._adapters = [p for p in model.parameters() if id(p) not in base]
        self.peak = Accounted()
        self._grads = 0
        self._trainable = 0

    def state_dict(self) -> Dict[str, int]:
        return asdict(self.peak)

    def load_state_dict(self, peak: Dict[str, int]) -> None:
        self.peak = Accounted(**peak)

    def before_step(self) -> None:
        params = list(self.model.parameters())
        self._grads = sum(_nbytes(p.grad) for p in params if p.grad is not None)
        self._trainable = sum(p.numel() for p in params if p.requires_grad)

    def after_step(self, opt: torch.optim.Optimizer) -> None:
        held = optimizer_bytes(opt)
        now = Accounted(
            trainable_params=self._trainable,
            adapter_bytes=sum(map(_nbytes, self._adapters)),
            grad_bytes=self._grads,
            state_bytes=held["states"],
            master_bytes=held["masters"],
        )
        if now.total_bytes > self.peak.total_bytes:
            self.peak = now
        self.peak.trainable_params = max(self.peak.trainable_params, now.trainable_params)
