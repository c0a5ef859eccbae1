"""`python -m misa.plan`: what a training step of a model holds on a GPU, planned on a CPU without one.

The step is run, not estimated: the architecture is built on `meta` (no weights), the method is applied
there (peft's adapters, MISA's partition), the model is materialised with `to_empty(device="cpu")` inside
`FakeTensorMode` (tensors with shapes, dtypes and storages, and no memory), and warm-up and measured
training steps run under the step-peak meter (`misa.memory.StepPeakMeter`), which counts every storage
from its creation to its release: weights, activations saved for backward, gradients, optimizer states
and masters, temporaries. An 8B step takes seconds.

Why fake CPU tensors and not fake CUDA ones: backward on fake CUDA tensors needs a CUDA context ("hasPrimaryContext
expects a valid device index") that a machine without a GPU does not have. The CPU step differs from the GPU's
in a few known terms, added explicitly (`misa.jobs.device_model`, each tested against an H200 measurement):
- the cuBLAS workspaces of the step's two threads (forward's and autograd's), 2 x 32 MiB on Hopper;
- the caching allocator's rounding of every block to 512 B (the meter rounds each storage);
- attention: the planned step calls SDPA causally without a mask (`model(input_ids=ids, labels=ids)`), which the
  CPU runs with its flash kernel: it saves the output and the log-sum-exp, as every fused GPU kernel does (cuDNN
  and flash for bf16/fp16, memory-efficient for fp32), never the S x S matrix. The kernel is then told apart by
  dtype only: bf16/fp16 take cuDNN on Hopper (measured on the H200), whose seed and offset add a 512-B block
  per layer whose backward is pending; fp32 takes the memory-efficient kernel, which adds none. The math path
  (a mask or dtype the fused kernels refuse, which saves the S x S weights) is not planned;
- MISA's CUDA step scratch (5 KiB at the first step). The Triton backend's tuner scratch (1 GiB, once per
  machine at the first launch) is left out: the plan is for the CUDA backend, the default on a GPU.
Nothing is fitted: a term that the validation (tests/test_plan.py, against the committed H200 peaks) finds
missing is measured and modelled here.

MISA's active set is planned, not drawn: its worst case is the largest set the budget allows with the lowest
layer active (backward runs down to it), chosen by `worst_set.largest_set` (misa/jobs/worst_set.py), or with
`--worst-set search` the worst of `worst_set.candidate_sets` measured one by one (the default for models under
1B parameters, where the set changes the peak most). The optimizer holds its periods (`MISA.hold`): no period ends, no
value of a fake tensor is read.

Models: the built-in sizes (misa/jobs/model.py, trained with its own loss), a shipped config (llama3-8b, llama3.2-1b,
qwen2.5-7b, mistral-7b: their public shapes; mistral-7b is v0.3, without a sliding window), or a Hugging
Face config file or folder (config only, no weights), planned as the transformers model a user trains:
`model(input_ids=ids, labels=ids).loss`, which upcasts the logits to fp32; LoRA and DoRA through
`get_peft_model` on the seven projections, with `enable_input_require_grads()` under checkpointing.

With `--budget`, each method's row says whether it fits, and the planner answers the largest delta of each
MISA entry, the largest LoRA/DoRA rank and the longest sequence that fit (each found from two planned points
of a peak that is affine in it, then checked by planning it). Exit code 2 means bad input.

`--fsdp N` plans rank 0's peak under FSDP2 over N ranks in this one process: torch's fake process group
(whose collectives move no data) and a CPU device mesh over it, `fully_shard` on every block and then the root
(`shard`), on meta before the model is materialised, MISA through `misa.distributed.prepare`. The meter
follows FSDP2's storage resizes, by which it frees and re-gathers the unsharded weights. Checked against real
2-rank gloo runs on the CPU (tests/test_plan_fsdp.py). What NCCL allocates for itself, and the caching
allocator's per-stream reuse of the all-gather and reduce-scatter buffers on a GPU, are not modelled.

Planned steps are independent of each other: `--jobs` runs them in that many processes side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import cli, device_model, extras, files
from .method import Method, parse_entry

CONFIGS = Path(__file__).parent / "configs"
SHIPPED = sorted(p.stem for p in CONFIGS.glob("*.json"))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GPUS = {"hopper": (9, 0), "ampere": (8, 0), "ada": (8, 9), "none": None}  # compute capability of each target
SEARCH_BELOW_PARAMS = 1_000_000_000  # below this, --worst-set auto measures every candidate set
STEPS = 2  # --worst-set search: the first creates the optimizer states, the second holds them through a step
SEQ_MULTIPLE = 64  # the longest sequence is reported in multiples of this
PLOT = "plan.png"


class UsageError(ValueError):
    pass


# ----------------------------------------------------------------------------------------- inputs
def parse_size(text: str) -> int:
    """'24GiB', '24 GB', '80e9', '512MiB' -> bytes (GB and GiB alike mean 2**30: a card's memory is sold in GiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?b?)?\s*", text.lower())
    if not m:
        raise UsageError(f"--budget: expected a size such as 24GiB or 80GB, got {text!r}")
    value, unit = float(m.group(1)), (m.group(2) or "b")
    scale = {"b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[unit[0]]
    if value <= 0:
        raise UsageError(f"--budget: expected a size > 0, got {text!r}")
    return int(value * scale)


def parse_ints(text: str, flag: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag}: expected positive integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"{flag}: expected positive integers separated by commas, got {text!r}")
    return values


@dataclass
class Model:
    """What to build: a built-in size, or a transformers config."""

    name: str
    builtin: Optional[str] = None  # a key of misa.jobs.model.SIZES
    hf_config: Optional[object] = None  # a transformers PretrainedConfig

    @property
    def n_layers(self) -> int:
        if self.builtin:
            from .model import SIZES

            return SIZES[self.builtin].num_layers
        return self.hf_config.num_hidden_layers

    @property
    def vocab_size(self) -> int:
        if self.builtin:
            from .model import SIZES

            return SIZES[self.builtin].vocab_size
        return self.hf_config.vocab_size


def load_model(spec: str) -> Model:
    """A built-in size, a shipped config's name, or a path to a config JSON or a folder with config.json."""
    from .model import SIZES

    if spec in SIZES:
        return Model(spec, builtin=spec)
    path = CONFIGS / f"{spec}.json" if spec in SHIPPED else Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UsageError(
            f"--model: {spec!r} is neither a built-in size ({', '.join(SIZES)}), a shipped config "
            f"({', '.join(SHIPPED)}), nor a config file or folder"
        )
    try:
        fields = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"--model: {path} is not a JSON config ({exc})") from None
    if not isinstance(fields, dict) or "hidden_size" not in fields or "num_hidden_layers" not in fields:
        raise UsageError(f"--model: {path} is not a model config (expected hidden_size, num_hidden_layers, ...)")
    try:
        import transformers
    except ImportError:
        raise UsageError("--model: a transformers config needs transformers: pip install misa-kernels[hf]") from None
    fields.setdefault("model_type", "llama")  # a LlamaConfig's own JSON has no model_type
    try:
        config = transformers.AutoConfig.for_model(**fields)
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--model: {path}: {exc}") from None
    return Model(spec if spec in SHIPPED else str(path), hf_config=config)


def parse_methods(text: str) -> List[Method]:
    """--methods: each entry parsed once (method.py), as misa.finetune parses its own."""
    try:
        methods = [parse_entry(entry.strip()) for entry in text.split(",") if entry.strip()]
    except cli.UsageError as exc:
        raise UsageError(str(exc)) from None
    if not methods:
        raise UsageError("--methods: expected at least one method")
    return methods


# ----------------------------------------------------------------------------------------- one planned step
@dataclass
class Setting:
    seq: int
    batch: int
    dtype: str
    checkpointing: bool
    lora_r: int = 16
    lora_alpha: Optional[float] = None
    gpu: str = "hopper"
    worst_set: str = "auto"
    fsdp: int = 1  # ranks FSDP2 shards over (1: no sharding); the plan is rank 0's, whose shards are the largest


def _optimizer_args(method: Method, setting: Setting, delta: Optional[float]):
    """The namespace train.build_optimizer reads, with misa.finetune's defaults."""
    from . import finetune

    fargs = finetune.build_parser().parse_args([])
    fargs.dtype = setting.dtype
    fargs.backend = "torch"  # the kernels' own steps cannot run on fake tensors; the CUDA step's scratch is added
    overrides = dict(method.overrides)
    if delta is not None:
        overrides["delta"] = delta
    rargs = finetune.run_args(fargs, lr=1e-5, seed=0, overrides=overrides, out=Path("."))
    rargs.interval = max(2, rargs.interval)
    return rargs


def _build(model_spec: Model, method: Method, setting: Setting):
    """(model on meta, its loss on a [batch, seq+1] batch of ids)."""
    dtype = DTYPES[setting.dtype]
    if model_spec.builtin:
        from .model import SIZES, LlamaConfig, LlamaForCausalLM

        fields = SIZES[model_spec.builtin].to_dict()
        fields["max_seq_len"] = max(fields["max_seq_len"], setting.seq)
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**fields)).to(dtype)
        model.gradient_checkpointing = setting.checkpointing
        if method.name in ("lora", "dora"):
            from ..integrations.lora import attach_lora

            attach_lora(model, setting.lora_r, setting.lora_alpha or 2.0 * setting.lora_r, dora=method.name == "dora")
        return model, model.loss
    import transformers

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built directly in the training dtype, as a user loads it
    try:
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(model_spec.hf_config, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(previous)
    if setting.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method.name in ("lora", "dora"):
        from peft import LoraConfig, get_peft_model

        from ..integrations.lora import PROJECTIONS

        targets = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in PROJECTIONS
            }
        )
        if not targets:
            raise UsageError(
                f"--methods: {method.entry}: the model has none of the projections LoRA adapts "
                f"({', '.join(PROJECTIONS)})"
            )
        # low_cpu_mem_usage: the adapters are made on meta like the model; otherwise peft initialises them on the
        # CPU first (2.5 GB of real memory and seconds at rank 226 on 8B) only to move them to meta
        model = get_peft_model(
            model,
            LoraConfig(
                r=setting.lora_r,
                lora_alpha=setting.lora_alpha or 2 * setting.lora_r,
                target_modules=targets,
                use_dora=method.name == "dora",
            ),
            low_cpu_mem_usage=True,
        )
        if setting.checkpointing:
            model.enable_input_require_grads()

    def loss(batch):
        ids = batch[:, :-1]
        return model(input_ids=ids, labels=ids).loss

    return model, loss


def _optimizer(model, method: Method, setting: Setting, delta: Optional[float]):
    from .train import build_optimizer

    if method.name in ("lora", "dora"):
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if method.name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-5)
    return build_optimizer(method, model, _optimizer_args(method, setting, delta))


@dataclass
class Row:
    model: str
    method: str
    seq: int
    batch: int
    dtype: str
    checkpointing: bool
    peak_bytes: int  # the step's peak on the GPU: the planned step's peak and the GPU's terms
    parts: Dict[str, int]  # the planned step's bytes of each kind at its peak
    gpu_terms: Dict[str, int]  # what the GPU adds (module doc)
    delta: Optional[float] = None
    lora_r: Optional[int] = None
    trainable: int = 0  # parameters trained at once
    active_set: Optional[List[str]] = None  # MISA: the planned worst set
    formats: Optional[Dict] = None  # MISA: its state formats and bytes per active element (MISA.formats)
    arena_bytes: Optional[int] = None  # MISA: its state arena, allocated up front
    release_grads: bool = False
    seconds: float = 0.0
    fits: Optional[bool] = None
    fsdp: int = 1  # ranks sharded over; peak_bytes is one rank's

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30


def gpu_terms(setting: Setting, n_layers: int, method: Method) -> Dict[str, int]:
    capability = GPUS[setting.gpu]
    if capability is None:
        return {}
    terms = {"cublas_workspace": device_model.training_step_workspace_bytes(capability)}
    # cuDNN's seed and offset: one block per attention call whose backward is still to run at the peak, every
    # layer's without checkpointing, one (the block being recomputed) with it
    calls = 1 if setting.checkpointing else n_layers
    if setting.dtype != "fp32":  # fp32 takes the memory-efficient kernel, which saves no seed of its own here
        terms["attention_seed"] = calls * device_model.allocator_bytes(device_model.SDPA_CUDNN_EXTRA_BYTES)
    if method.name in ("misa", "lisa", "badam"):
        terms["step_scratch"] = device_model.STEP_SCRATCH_BYTES["cuda_first"]
    return terms


def blocks(model: nn.Module, n_layers: int) -> List[nn.Module]:
    """The model's decoder blocks: its ModuleList of n_layers (the built-in model's `layers`, transformers' and peft's
    `model.layers`)."""
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) == n_layers:
            return list(m)
    raise UsageError(f"--fsdp: found no list of the model's {n_layers} blocks to shard")


def shard(model: nn.Module, n_layers: int, mesh=None) -> None:
    """FSDP2 as a user applies it: `fully_shard` on every block, then on the root (its embedding, norm and
    head). The planner and the real runs that check it (tests/test_plan_fsdp.py) shard with this one function."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks(model, n_layers):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _fake_mesh(world: int):
    """Rank 0 of `world` ranks in this one process: torch's fake process group (its own distributed tests'),
    whose collectives move no data, and a CPU device mesh over it. Made once per world size."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized() and (dist.get_backend() != "fake" or dist.get_world_size() != world):
        if dist.get_backend() != "fake":
            raise UsageError("--fsdp: plans in a process of its own; this one already has a real process group")
        dist.destroy_process_group()
    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    return init_device_mesh("cpu", (world,))


def plan_step(model_spec: Model, method: Method, setting: Setting, delta: Optional[float] = None) -> Row:
    """One planned training step of `method` on `model_spec` (module doc)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..memory import StepPeakMeter
    from . import worst_set

    start = time.perf_counter()
    with warnings.catch_warnings(), _quiet_transformers():
        warnings.simplefilter("ignore")  # deprecations, frozen-part notices and short planned periods
        model, loss_fn = _build(model_spec, method, setting)
        if setting.fsdp > 1:
            shard(model, model_spec.n_layers, _fake_mesh(setting.fsdp))  # on meta, as FSDP2's docs build
        block = device_model.BLOCK_BYTES if GPUS[setting.gpu] else 1
        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device="cpu")
            model.train()
            try:
                opt = _optimizer(model, method, setting, delta)
            except ValueError as exc:  # a delta no module fits in, a method the model cannot take
                raise UsageError(f"--methods: {method.entry}: {exc}") from None
            if setting.fsdp > 1 and method.name == "misa":
                from .. import distributed

                distributed.prepare(opt)  # its norms summed over the ranks, as a user's MISA under FSDP2
            batch = torch.zeros(setting.batch, setting.seq + 1, dtype=torch.long)

            def train_step():
                loss_fn(batch).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            chosen = None
            held = opt.hold() if hasattr(opt, "hold") else contextlib.nullcontext()
            with held:
                n_params = sum(p.numel() for p in model.parameters())
                if hasattr(opt, "set_active") and (
                    setting.worst_set == "search" or (setting.worst_set == "auto" and n_params < SEARCH_BELOW_PARAMS)
                ):
                    peak, parts, chosen = worst_set.worst_case_peak(
                        model, opt, train_step, lambda: loss_fn(batch), steps=STEPS, block_bytes=block
                    )
                    if peak < 0:
                        raise UsageError(f"--methods: {method.entry}: delta={opt.delta:g} fits no module")
                else:
                    if hasattr(opt, "set_active"):
                        chosen = worst_set.largest_set(opt)
                        if chosen is None:
                            raise UsageError(f"--methods: {method.entry}: delta={opt.delta:g} fits no module")
                        opt.set_active(chosen)  # held from here on: no period ends
                    _prime(model, opt)
                    meter = StepPeakMeter(model, opt, mode="track", block_bytes=block)
                    worst_set.measure_steps(meter, train_step, 1)
                    peak, parts = meter.peak_bytes, meter.peak_parts
            trainable = (
                sum(opt.sampler.sizes[b] for b in chosen)
                if chosen is not None
                else sum(p.numel() for p in model.parameters() if p.requires_grad)
            )
            names = [opt.module_names[b] for b in chosen] if chosen is not None else None
            used_delta = getattr(opt, "delta", None)
            formats = dict(opt.formats) if hasattr(opt, "formats") else None
            arena = sum(opt.memory_bytes().values()) if hasattr(opt, "memory_bytes") else None
            release = bool(getattr(opt, "release_grads", False))
    terms = gpu_terms(setting, model_spec.n_layers, method)
    return Row(
        model=model_spec.name,
        method=method.entry,
        seq=setting.seq,
        batch=setting.batch,
        dtype=setting.dtype,
        checkpointing=setting.checkpointing,
        peak_bytes=peak + sum(terms.values()),
        parts=parts,
        gpu_terms=terms,
        delta=used_delta,
        lora_r=setting.lora_r if method.name in ("lora", "dora") else None,
        trainable=trainable,
        active_set=names,
        formats=formats,
        arena_bytes=arena,
        release_grads=release,
        seconds=round(time.perf_counter() - start, 2),
        fsdp=setting.fsdp,
    )


def _prime(model: nn.Module, opt) -> None:
    """Makes the optimizer's states as a first step would, without its forward and backward: a step on zero
    gradients. The measured step then holds them throughout, as every step after the first does (the first
    step's peak is never above the second's: its states appear only when its gradients are done)."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _quiet_transformers():
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


# ----------------------------------------------------------------------------------------- the budget's answers
def _largest(
    plan: Callable[[float], Row], lo: float, hi: float, budget: int, *, quantum: float, ceiling: float, tries: int = 4
) -> Tuple[Optional[float], Optional[Row]]:
    """The largest x <= ceiling (a multiple of `quantum`) whose planned peak fits `budget`. The peak is close
    to affine in x (a delta, a rank, a sequence length), so x is found by the secant through two planned
    points (lo, hi), then by regula falsi between the largest x planned to fit and the smallest planned not
    to, kept a quarter of the bracket in from each end (so that a step in the peak cannot stall it), `tries`
    more plans at most; it stops once the bracket is one quantum wide or the fit is within 0.5% of the budget.
    Every x it returns was planned. (None, None) when nothing planned fits."""

    def down(x):
        return math.floor(x / quantum + 1e-9) * quantum

    points = {lo: plan(lo), hi: plan(hi)}
    for _ in range(tries):
        fit = max((x for x, r in points.items() if r.peak_bytes <= budget), default=None)
        fail = min((x for x, r in points.items() if r.peak_bytes > budget and (fit is None or x > fit)), default=None)
        if fit is not None and (
            points[fit].peak_bytes >= 0.995 * budget or fit >= ceiling or (fail is not None and fail - fit <= quantum)
        ):
            break
        if fit is not None and fail is not None:  # regula falsi inside the bracket
            a, b = (fit, points[fit].peak_bytes), (fail, points[fail].peak_bytes)
        else:  # the secant through the two largest points planned
            x1, x2 = sorted(points)[-2:] if fit is not None else sorted(points)[:2]
            a, b = (x1, points[x1].peak_bytes), (x2, points[x2].peak_bytes)
        slope = (b[1] - a[1]) / (b[0] - a[0])
        x = ceiling if slope <= 0 else a[0] + (budget - a[1]) / slope
        if fit is not None and fail is not None:  # and at least a quarter in from each end: the bracket shrinks
            w = fail - fit
            x = min(max(x, fit + w / 4), fail - w / 4)
        x = down(min(ceiling, x))
        if fail is not None:
            x = min(x, down(fail - quantum))
        if fit is not None and x <= fit:
            x = down(fit + quantum) if fail is None or fit + quantum < fail else fit
        if x < quantum or x in points:
            break
        points[x] = plan(x)
    fit = max((x for x, r in points.items() if r.peak_bytes <= budget), default=None)
    return (fit, points[fit]) if fit is not None else (None, None)


def budget_answers(
    model_spec: Model,
    methods: Sequence[Method],
    setting: Setting,
    rows: Sequence[Row],
    budget: int,
    pool: Optional["Pool"] = None,
) -> List[Dict]:
    """Per method: at every planned sequence, whether it fits and the largest delta (MISA) or rank (LoRA,
    DoRA) that does; and the longest sequence that fits at its own settings. Each of these searches is
    independent of the others: with a `pool` they run side by side."""
    pool = pool or Pool(1)
    searches = []
    for m in methods:
        mine = sorted((r for r in rows if r.method == m.entry), key=lambda r: r.seq)
        searches.append(
            (
                [pool.submit(_answer_at_seq, model_spec, m, setting, r, budget) for r in mine],
                pool.submit(_longest_seq, model_spec, m, setting, mine, budget),
            )
        )
    return [
        {"method": m.entry, "at_seq": [f.result() for f in at_seq], **longest.result()}
        for m, (at_seq, longest) in zip(methods, searches)
    ]


class Pool:
    """Planned steps side by side, one process each (a planned step is Python-bound: threads would not help).
    With one job everything runs here, in order, as it is submitted."""

    def __init__(self, jobs: int):
        self.jobs = jobs
        self._executor = None
        if jobs > 1:
            import concurrent.futures
            import multiprocessing

            # spawn: a forked torch can deadlock on its thread pools; each worker imports torch once
            self._executor = concurrent.futures.ProcessPoolExecutor(
                jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init
            )

    def submit(self, fn, *args, **kwargs):
        if self._executor is not None:
            return self._executor.submit(fn, *args, **kwargs)
        import concurrent.futures

        done: concurrent.futures.Future = concurrent.futures.Future()
        try:
            done.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed back through result(), as the executor does
            done.set_exception(exc)
        return done

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=exc[0] is not None)


def _worker_init() -> None:
    torch.set_num_threads(1)  # fake tensors compute nothing; one thread per process keeps them off each other


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def _cached(plan: Callable[[float], Row], known: Dict[float, Row]) -> Callable[[float], Row]:
    def planned(x):
        if x not in known:
            known[x] = plan(x)
        return known[x]

    return planned


def _answer_at_seq(model_spec: Model, method: Method, setting: Setting, row: Row, budget: int) -> Dict:
    """Whether `row` fits, and the largest delta (MISA) or rank (LoRA, DoRA) that does at its sequence."""
    at = Setting(**{**asdict(setting), "seq": row.seq})
    here: Dict = {"seq": row.seq, "fits": row.peak_bytes <= budget}
    if method.name == "misa":
        plan = _cached(lambda d: plan_step(model_spec, method, at, delta=d), {row.delta: row})
        delta, best = _largest(plan, row.delta, min(1.0, 2 * row.delta), budget, quantum=1e-3, ceiling=1.0)
        here.update(largest_delta=delta, peak_bytes_at_largest=best.peak_bytes if best else None)
    elif method.name in ("lora", "dora"):
        plan = _cached(
            lambda r: plan_step(model_spec, method, Setting(**{**asdict(at), "lora_r": int(r)})), {setting.lora_r: row}
        )
        rank, best = _largest(plan, setting.lora_r, 2 * setting.lora_r, budget, quantum=1, ceiling=65536)
        here.update(largest_rank=rank, peak_bytes_at_largest=best.peak_bytes if best else None)
    return here


def _longest_seq(model_spec: Model, method: Method, setting: Setting, mine: List[Row], budget: int) -> Dict:
    """The longest sequence that fits: from the two longest planned ones when there are two, else from one more."""
    longest = mine[-1]
    lo, hi = (mine[-2].seq, longest.seq) if len(mine) >= 2 else (longest.seq, 2 * longest.seq)
    plan = _cached(
        lambda s: plan_step(model_spec, method, Setting(**{**asdict(setting), "seq": int(s)}), delta=longest.delta),
        {r.seq: r for r in mine},
    )
    seq, best = _largest(plan, lo, hi, budget, quantum=SEQ_MULTIPLE, ceiling=1 << 20)
    return {"longest_seq": best.seq if best else None, "peak_bytes_at_longest_seq": best.peak_bytes if best else None}


# ----------------------------------------------------------------------------------------- the command
def build_parser() -> argparse.ArgumentParser:
    from .cli import HelpFormatter

    p = argparse.ArgumentParser(
        prog="python -m misa.plan", formatter_class=HelpFormatter, description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--model",
        default="llama3-8b",
        help=f"a built-in size, a shipped config ({', '.join(SHIPPED)}), or a HF config file or folder",
    )
    p.add_argument(
        "--methods",
        default="misa+delta=0.03,lora",
        help="comma-separated, as misa.finetune spells them: misa+delta=0.03+states=8bit+masters=kahan, "
        "lora, dora, lisa, badam, adamw",
    )
    p.add_argument("--seq", default="512,2048", help="sequence lengths, comma-separated")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block (non-reentrant)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=None, help="None: 2 x rank")
    p.add_argument(
        "--gpu",
        choices=sorted(GPUS),
        default="hopper",
        help="whose cuBLAS workspace and allocator to add (none: the CPU step as it is)",
    )
    p.add_argument(
        "--worst-set",
        choices=("auto", "largest", "search"),
        default="auto",
        help="MISA's planned set: the largest with the lowest layer, or the worst of the candidates "
        "measured (auto: search below 1B parameters)",
    )
    p.add_argument(
        "--fsdp",
        type=int,
        default=1,
        metavar="N",
        help="plan one rank's peak under FSDP2 over N ranks (every block and the root fully_shard-ed, "
        "MISA through misa.distributed.prepare); the batch is each rank's",
    )
    p.add_argument(
        "--budget",
        default=None,
        help="a GPU's memory (24GiB): what fits, the largest delta and rank, the longest sequence",
    )
    p.add_argument("--out", default=None, help="write plan.json and plan.png here")
    p.add_argument(
        "--jobs",
        type=int,
        default=default_jobs(),
        help="planned steps run side by side in this many processes (default: the CPUs available)",
    )
    return p


def validate(args) -> Tuple[Model, List[Method], List[int], Optional[int]]:
    seqs = parse_ints(args.seq, "--seq")
    if args.batch < 1:
        raise UsageError(f"--batch: expected a positive integer, got {args.batch}")
    if args.lora_r < 1:
        raise UsageError(f"--lora-r: expected a positive integer, got {args.lora_r}")
    if getattr(args, "fsdp", 1) < 1:
        raise UsageError(f"--fsdp: expected a number of ranks, 1 or more, got {args.fsdp}")
    if getattr(args, "jobs", 1) < 1:
        raise UsageError(f"--jobs: expected a positive integer, got {args.jobs}")
    budget = parse_size(args.budget) if args.budget is not None else None
    methods = parse_methods(args.methods)
    model_spec = load_model(args.model)
    if any(m.name in ("lora", "dora") for m in methods):
        try:
            import peft  # noqa: F401
        except ImportError:
            raise UsageError("--methods: LoRA and DoRA need peft: pip install misa-kernels[hf]") from None
    return model_spec, methods, seqs, budget


def plan(
    model: str = "llama3-8b",
    methods: str = "misa+delta=0.03,lora",
    seqs: Sequence[int] = (512, 2048),
    batch: int = 1,
    dtype: str = "bf16",
    checkpointing: bool = False,
    lora_r: int = 16,
    lora_alpha: Optional[float] = None,
    gpu: str = "hopper",
    worst_set: str = "auto",
    budget: Optional[str] = None,
    jobs: int = 1,
    fsdp: int = 1,
) -> Dict:
    """The plan as `python -m misa.plan` writes it to plan.json (`rows`, and `budget` when one is given).
    jobs > 1 plans side by side in that many processes."""
    args = argparse.Namespace(
        model=model,
        methods=methods,
        seq=",".join(map(str, seqs)),
        batch=batch,
        dtype=dtype,
        checkpointing=checkpointing,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        gpu=gpu,
        worst_set=worst_set,
        budget=budget,
        jobs=jobs,
        fsdp=fsdp,
    )
    return run(args, *validate(args))


def run(
    args,
    model_spec: Model,
    methods: List[Method],
    seqs: List[int],
    budget: Optional[int],
    echo: Callable[[str], None] = lambda s: None,
) -> Dict:
    base = Setting(
        seq=seqs[0],
        batch=args.batch,
        dtype=args.dtype,
        checkpointing=args.checkpointing,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        gpu=args.gpu,
        worst_set=args.worst_set,
        fsdp=getattr(args, "fsdp", 1),
    )
    n_tasks = len(methods) * len(seqs)
    with Pool(min(getattr(args, "jobs", 1), n_tasks)) as pool:
        futures = [
            pool.submit(plan_step, model_spec, method, Setting(**{**asdict(base), "seq": seq}))
            for method in methods
            for seq in seqs
        ]
        rows = []
        for future in futures:
            row = future.result()
            if budget is not None:
                row.fits = row.peak_bytes <= budget
            rows.append(row)
            echo(describe(row, budget))
        out = {"model": model_spec.name, "gpu": args.gpu, "budget_bytes": budget, "rows": [asdict(r) for r in rows]}
        if budget is not None:
            out["budget"] = budget_answers(model_spec, methods, base, rows, budget, pool)
    return out


def size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def describe(row: Row, budget: Optional[int]) -> str:
    parts = ", ".join(f"{k} {size(v)}" for k, v in row.parts.items() if v)
    gpu = f"; GPU {size(sum(row.gpu_terms.values()))}" if row.gpu_terms else ""
    fit = "" if row.fits is None else ("  fits" if row.fits else "  does not fit")
    ranks = f" fsdp {row.fsdp} (per rank)" if row.fsdp > 1 else ""
    return (
        f"{row.method} seq {row.seq} batch {row.batch}{' ckpt' if row.checkpointing else ''}{ranks}: "
        f"peak {size(row.peak_bytes)} ({parts}{gpu}){fit}  [{row.seconds:.0f} s]"
    )


def plot(result: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method in dict.fromkeys(r["method"] for r in result["rows"]):
        rows = sorted((r for r in result["rows"] if r["method"] == method), key=lambda r: r["seq"])
        ax.plot([r["seq"] for r in rows], [r["peak_bytes"] / 2**30 for r in rows], marker="o", label=method)
    if result.get("budget_bytes"):
        ax.axhline(result["budget_bytes"] / 2**30, color="k", ls="--", lw=1, label="budget")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("planned step peak (GiB)")
    ax.set_title(f"{result['model']}: step peak by sequence length", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.save_figure(fig, path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.out:  # the plot is the only use the planner has for the jobs' packages
            extras.require()
        model_spec, methods, seqs, budget = validate(args)
        result = run(args, model_spec, methods, seqs, budget, echo=lambda s: print(s, flush=True))
    except (UsageError, extras.ExtraMissing) as exc:
        print(f"misa-plan: error: {exc}", file=sys.stderr)
        return 2
    for answer in result.get("budget", []):
        print(describe_answer(answer, budget))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        import transformers

        from . import provenance

        result["meta"] = {
            "command": provenance.command("misa.plan", sys.argv[1:] if argv is None else argv),
            "commit": provenance.commit(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "device": "planned on fake CPU tensors (no GPU)",
        }
        files.write_text(out / "plan.json", json.dumps(result, indent=1))
        plot(result, out / PLOT)
        print(f"misa-plan: wrote {out / 'plan.json'} and {out / PLOT}")
    return 0


def describe_answer(a: Dict, budget: int) -> str:
    words = []
    for h in a["at_seq"]:
        word = f"seq {h['seq']}: {'fits' if h['fits'] else 'does not fit'}"
        if "largest_delta" in h:
            word += f", largest delta {h['largest_delta']:g}" if h["largest_delta"] else ", no delta fits"
        if "largest_rank" in h:
            word += f", largest rank {h['largest_rank']:g}" if h["largest_rank"] else ", no rank fits"
        words.append(word)
    words.append(f"longest sequence {a['longest_seq']}" if a["longest_seq"] else "no sequence fits")
    return f"{a['method']} in {size(budget)}: " + "; ".join(words)


if __name__ == "__main__":
    sys.exit(main())
