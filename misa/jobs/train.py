"""`python -m misa.train` (or `misa-train`): train a small LLaMA-architecture LM from scratch with MISA.

With no arguments it trains on Python's standard-library sources (bytes), needing no download, and
prints a summary; `--compare misa,lisa,badam,adamw` runs several optimizers on the same seeds and
data and draws them on one plot. Exit code 2 means bad input (nothing is written then).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from misa_kernels import BackendUnavailable
from misa_kernels.backends import resolve as resolve_backend

from ..baselines import BAdam, layers_within, lisa_kwargs
from ..memory import StepPeakMeter
from ..optimizer import MISA
from ..variants import PRESETS
from . import extras, files, provenance
from .cli import (  # noqa: F401  (train.UsageError, ...: the names the jobs used from here)
    HelpFormatter,
    UsageError,
    add_checkpointing_flag,
    add_flag,
    entry_list,
    eta_arg,
    pick_device,
    show_progress,
    transformers_module,
    validate_common,
)
from .data import DataError, TokenDataset, describe, load_corpus, tokenize
from .method import OPTIMIZERS, SWITCHES, Method, parse_optimizer  # noqa: F401  (train.SWITCHES: the jobs' name)
from .model import SIZES, LlamaConfig, LlamaForCausalLM

CHECKPOINT = "checkpoint.pt"
METER_EVERY = 50  # besides the steps that can hold the most, every 50th step's peak is measured


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="misa-train", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument(
        "--optimizer",
        default="misa",
        choices=OPTIMIZERS,
        help="misa; lisa (LMFlow's layer sampling); badam (block coordinate, one layer at a time); adamw (full AdamW)",
    )
    p.add_argument(
        "--compare",
        default=None,
        metavar="LIST",
        help="comma-separated optimizers to run with the same seeds and data, drawn on one plot",
    )
    add_flag(p, "--seeds", default=1, help="with --compare: seeds per optimizer (seed, seed+1, ...)")
    add_flag(p, "--delta", help="trainable-parameter budget (fraction of all params)")
    # Squared gradient norms of these small models are ~1e-5..1e-1 per module: eta=100 makes the
    # softmax over them informative (eta=1 would be nearly uniform). The authors pre-train with 500.
    add_flag(p, "--eta", help="sampling temperature on the raw gradient energies, or 'auto' (scaled by their mean)")
    add_flag(p, "--interval", help="optimizer steps per outer loop (T)")
    p.add_argument(
        "--granularity",
        default="module",
        choices=("module", "layer"),
        help="MISA's unit: each weight matrix, or each transformer layer",
    )
    add_flag(
        p,
        "--variant",
        help="MISA preset: default (best in our measurements), paper (Algorithm 1), official (authors' code)",
    )
    p.add_argument(
        "--flush",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="end-of-period momentum flush (default: the preset's)",
    )
    p.add_argument(
        "--keep-states",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="re-selected modules keep their Adam states (default: the preset's)",
    )
    p.add_argument(
        "--norm-power",
        type=int,
        default=None,
        choices=(1, 2),
        help="importance from squared norms (2) or norms (1) (default: the preset's)",
    )
    p.add_argument("--logit-cap", type=float, default=None, help="cap on the logits; inf: none (default: the preset's)")
    p.add_argument(
        "--states",
        default="fp32",
        choices=("fp32", "8bit"),
        help="MISA's Adam states: fp32, or blockwise 8-bit (2.03 B per element instead of 8)",
    )
    p.add_argument(
        "--masters",
        default="fp32",
        choices=("fp32", "kahan", "none"),
        help="MISA's master copy of bf16 weights: fp32 (4 B per element), a bf16 Kahan compensation "
        "(2 B), or none (with --rounding stochastic)",
    )
    p.add_argument(
        "--rounding",
        default="nearest",
        choices=("nearest", "stochastic"),
        help="how MISA writes fp32 results into bf16 weights",
    )
    add_flag(p, "--lisa-layers")
    p.add_argument(
        "--badam-order", default="descending", choices=("descending", "ascending", "random"), help="BAdam's switch mode"
    )
    add_flag(
        p,
        "--embeddings",
        default="every-step",
        help="the embedding and LM head: trained at every step (as the authors' code does; a model "
        "trained from scratch needs them early), sampled as modules, or frozen (fine-tuning)",
    )
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    add_flag(p, "--weight-decay")
    add_flag(p, "--warmup-steps")
    add_flag(p, "--max-grad-norm")
    add_flag(p, "--max-steps", default=300, help="optimizer steps in all (a resumed run continues to it)")
    add_flag(p, "--model-size")
    add_flag(p, "--config")
    add_flag(p, "--model", help="a local Hugging Face causal-LM folder to train instead (needs transformers)")
    add_flag(p, "--data", help="a text file or folder (default: Python's stdlib sources)")
    add_flag(p, "--seq-len", help="tokens per training sequence")
    add_flag(p, "--batch-size")
    add_flag(p, "--device")
    add_flag(p, "--dtype", help="parameter dtype")
    add_flag(p, "--checkpointing")
    add_flag(p, "--backend", help="misa_kernels backend (auto: cuda > triton > torch on a GPU, torch on the CPU)")
    add_flag(p, "--seed", help="seeds the model, the data order and the sampler")
    add_flag(p, "--eval-every", default=50, help="evaluate every N steps (and after the last one)")
    add_flag(
        p,
        "--eval-batches",
        default=64,
        help="batches of every evaluation: the same fixed held-out windows each time; the standard "
        "error over batches is reported as the evaluation noise",
    )
    add_flag(p, "--save-every", help="checkpoint every N steps (0: only at the end)")
    add_flag(p, "--out", help="output folder (default: runs/<optimizer>-<time>)")
    add_flag(p, "--resume", metavar="DIR", help="resume exactly from DIR/checkpoint.pt")
    add_flag(p, "--no-progress", help="no progress bar (plain log lines)")
    return p


# ----------------------------------------------------------------------------------------- validation
def validate(args) -> List[Method]:
    """Checks the options (UsageError naming the first that is wrong) and returns the optimizer entries, parsed:
    --compare's, or --optimizer."""
    validate_common(
        args,
        counts=("max_steps", "seq_len", "batch_size", "interval", "eval_every", "eval_batches", "seeds"),
        positive=("lr",),
        nonnegative=("weight_decay", "max_grad_norm"),
        paths=("config", "model"),
    )
    if args.masters in ("fp32", "kahan") and args.masters != "fp32" and args.rounding == "stochastic":
        raise UsageError(
            "--masters kahan and --rounding stochastic exclude each other: stochastic rounding is the "
            "memory-free alternative to a master copy (use --masters none)"
        )
    if args.seeds != 1 and args.compare is None:
        raise UsageError("--seeds: runs several seeds only with --compare (e.g. --compare misa,lisa --seeds 3)")
    methods = [parse_optimizer(args.optimizer)]
    if args.compare is not None:
        methods = entry_list(args.compare, "--compare", OPTIMIZERS, parse_optimizer)
        if args.resume:
            raise UsageError("--compare and --resume do not go together")
    if args.resume and not (Path(args.resume) / CHECKPOINT).is_file():
        raise UsageError(f"--resume: {Path(args.resume) / CHECKPOINT} does not exist")
    return methods


# ----------------------------------------------------------------------------------------- building
def enable_checkpointing(model, args) -> None:
    """Per-block activation checkpointing, non-reentrant: blocks behind a frozen embedding still get their
    gradients (a reentrant checkpoint would give them none unless the inputs require grad)."""
    if not getattr(args, "checkpointing", False):
        return
    if not getattr(model, "supports_gradient_checkpointing", True) or not hasattr(
        model, "gradient_checkpointing_enable"
    ):
        raise UsageError(
            f"--checkpointing: {type(model).__name__} cannot checkpoint its activations (it has no "
            "gradient_checkpointing_enable, or says it does not support it)"
        )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "config") and hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # a cache is for generation, and transformers refuses it with checkpointing


def build_model(args, device):
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.model:
        transformers = transformers_module()
        if torch.device(device).type == "meta":  # validation: the architecture, without the weights
            config = transformers.AutoConfig.from_pretrained(args.model, local_files_only=True)
            with torch.device("meta"):
                model = transformers.AutoModelForCausalLM.from_config(config)
            enable_checkpointing(model, args)
            return model
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=dtype, local_files_only=True)
        enable_checkpointing(model, args)

        def loss_fn(batch):
            logits = model(input_ids=batch[:, :-1]).logits
            return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())

        model.loss = loss_fn
        return model.to(device)
    cfg = model_config(args)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    enable_checkpointing(model, args)
    return model


def model_config(args) -> LlamaConfig:
    fields = SIZES[args.model_size].to_dict()
    if args.config:
        fields.update(json.loads(Path(args.config).read_text()))
    fields["max_seq_len"] = max(fields["max_seq_len"], args.seq_len)
    try:
        return LlamaConfig(**fields)
    except ValueError as exc:
        raise UsageError(f"--config: {exc}") from None


def step_memory_bytes(cfg: LlamaConfig, args) -> Dict[str, float]:
    """A generous estimate of one training step's memory: weights, gradients and AdamW states of every
    parameter (the full-AdamW bound), activations kept for the backward pass, and the attention matrices
    (the math attention kernels on the CPU materialise them: seq_len**2 per head, per layer)."""
    d, f, L, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads
    params = cfg.vocab_size * d * 2 + L * (4 * d * d + 3 * d * f + 2 * d) + d
    b, t = args.batch_size, args.seq_len
    size = 2 if args.dtype == "bf16" else 4
    return {
        "states": params * (size * 2 + 8),
        "activations": b * t * L * (10 * d + 3 * f) * size + b * t * 256 * 12,
        "attention": 2 * L * b * h * t * t * size,
    }


def available_memory_bytes(device) -> float:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_method(entry):
    """(name, options) of an optimizer entry: a Method parsed already (method.py: parsed once, read here), or
    a --compare entry such as 'misa-official+flush=true' -> ('misa', {'variant': 'official', 'flush': True})."""
    method = entry if isinstance(entry, Method) else parse_optimizer(entry)
    return method.name, method.options


def build_optimizer(entry: str, model, args):
    name, options = parse_method(entry)
    if name == "adamw":
        fused = next(model.parameters()).is_cuda
        return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=fused)
    with warnings.catch_warnings():
        # What stays frozen is this job's choice, said in words in its header (frozen_in_words), not an accident
        # to warn about; the warning stays for library users who did not choose it.
        warnings.filterwarnings("ignore", message="MISA: .* stay frozen", category=UserWarning)
        return _build_misa(name, options, model, args)


def _build_misa(name: str, options: Dict, model, args):
    if name == "badam":
        every_step = args.embeddings == "every-step"
        common = dict(lr=args.lr, weight_decay=args.weight_decay, seed=args.seed, backend=args.backend)
        return BAdam(
            model, interval=args.interval, switch_mode=args.badam_order, train_outside_layers=every_step, **common
        )
    return MISA(model, **misa_kwargs(name, options, model, args))


def misa_kwargs(name: str, options: Dict, model, args) -> Dict:
    """MISA's arguments for "misa" (with its +switch options) or "lisa" on `model`: what build_optimizer
    constructs, and what misa.optimizer.capacity reads a bound from without constructing anything."""
    common = dict(lr=args.lr, weight_decay=args.weight_decay, seed=args.seed, backend=args.backend)
    every_step = args.embeddings == "every-step"
    if name == "lisa":
        # LISA trains the embedding, head and final norm at every step by design.
        if args.lisa_layers:
            layers = min(args.lisa_layers, len(model.model.layers))
        else:
            layers = layers_within(model, args.delta)
        return lisa_kwargs(model, n_layers=layers, interval=args.interval, **common)
    as_modules = args.embeddings == "module"
    always = [p for n, p in model.named_parameters() if "embed" in n or "lm_head" in n] if every_step else None
    switches = dict(
        variant=args.variant,
        flush=args.flush,
        keep_states=args.keep_states,
        norm_power=args.norm_power,
        logit_cap=args.logit_cap,
        states=getattr(args, "states", "fp32"),
        rounding=getattr(args, "rounding", "nearest"),
    )
    switches.update(options)
    eta = switches.pop("eta", args.eta)
    masters = switches.pop("masters", getattr(args, "masters", "fp32"))
    chosen = "masters" in options or getattr(args, "masters", "fp32") != "fp32"
    if chosen or switches["rounding"] == "nearest":  # stochastic rounding alone means no master copy
        switches["master_weights"] = False if masters == "none" else masters
    return dict(
        delta=args.delta,
        eta=eta,
        interval=args.interval,
        granularity=args.granularity,
        include_embedding=as_modules,
        include_lm_head=as_modules,
        always_train=always,
        train_1d=getattr(args, "train_norms", False),
        **switches,
        **common,
    )


def frozen_in_words(opt) -> str:
    """What a MISA-family optimizer never trains, in words: 'frozen for the whole run: norms (9 tensors),
    1,152 params, 0.13%'."""
    frozen = opt._never_trained()
    if not frozen:
        return "nothing frozen for the whole run"

    def kind(name: str, p) -> str:  # the first description that fits
        if "embed" in name:
            return "embedding"
        if "lm_head" in name:
            return "LM head"
        if p.dim() == 1:
            return "norms" if "norm" in name else "other 1-D parameters"
        return "other weights"

    counts: Dict[str, int] = {}
    for name, p in frozen:
        counts[kind(name, p)] = counts.get(kind(name, p), 0) + 1
    n = sum(p.numel() for _, p in frozen)
    words = ", ".join(f"{label} ({c} tensor{'s' if c > 1 else ''})" for label, c in counts.items())
    return f"frozen for the whole run: {words}, {n:,} params, {n / opt.partition.total_params:.2%}"


def lr_lambda(warmup: int):
    return lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


# ----------------------------------------------------------------------------------------- running
@torch.no_grad()
def evaluate(model, data: TokenDataset, args, batches: Optional[int] = None) -> float:
    return evaluate_with_error(model, data, args, batches)[0]


@torch.no_grad()
def evaluate_with_error(model, data: TokenDataset, args, batches: Optional[int] = None, split: str = "val"):
    """Mean validation (or test) loss over a fixed set of held-out windows, its standard error over batches,
    and the per-batch losses (the same windows every time, so methods can be compared batch by batch)."""
    was_training = model.training
    model.eval()
    losses = torch.tensor(
        [float(model.loss(b)) for b in data.val_batches(args.batch_size, batches or args.eval_batches, split)],
        dtype=torch.float64,
    )
    model.train(was_training)
    sem = float(losses.std() / len(losses) ** 0.5) if len(losses) > 1 else float("nan")
    return float(losses.mean()), sem, losses.tolist()


def peak_memory_mb(device) -> Dict[str, float]:
    if device.type == "cuda":
        return {
            "peak_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20,
            "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20,
        }
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run(
    args,
    optimizer_name: str,
    out: Path,
    data: TokenDataset,
    device,
    progress: bool = True,
    checkpoint: Optional[Dict] = None,
    model=None,
    opt=None,
    ledger=None,
) -> Dict:
    """Trains one run and writes its outputs to `out`. A caller may hand in the model and optimizer
    (fine-tuning builds them from a base) and a `misa.memory.MemoryMeter` (the ledger) that reads every step.

    The step's peak memory is measured (`misa.memory.StepPeakMeter`) on the steps that can hold the most:
    the first two (optimizer states appear in the first), the first step of every new active set (a MISA-family
    optimizer's peak depends on which modules are active), and every METER_EVERY-th. The time per step is
    the median over the other steps, which run unmetered: the tracker slows the steps it watches."""
    model = build_model(args, device) if model is None else model
    opt = build_optimizer(optimizer_name, model, args) if opt is None else opt
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.warmup_steps))
    start, history = 0, {"step": [], "train_loss": [], "val_step": [], "val_loss": []}
    peak_meter = StepPeakMeter(model, opt)
    # What the summary measures beyond the losses, kept in every checkpoint so that a resumed run (or one
    # finished after a kill) reports what the uninterrupted run would have
    measured = {"step_seconds": [], "elapsed_s": 0.0, "trained_steps": 0}
    if checkpoint is not None:
        ckpt = checkpoint
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start, history = ckpt["step"], ckpt["history"]
        saved = ckpt.get("measured")
        if saved is not None:
            measured = {k: saved[k] for k in measured}
            peak_meter.load_state_dict(saved["step_peaks"])
            if ledger is not None and saved.get("ledger") is not None:
                ledger.load_state_dict(saved["ledger"])
    out.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tokens_per_step = args.batch_size * args.seq_len
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=args.max_steps, initial=start, desc=optimizer_name, dynamic_ncols=True, file=sys.stdout)
    t0 = time.perf_counter()
    step_seconds = measured["step_seconds"]
    switches_seen = None

    def save(step):
        measured.update(
            elapsed_s=elapsed0 + time.perf_counter() - t0,
            step_peaks=peak_meter.state_dict(),
            ledger=ledger.state_dict() if ledger is not None else None,
        )
        save_checkpoint(out, model, opt, sched, step, history, args, measured)

    elapsed0 = measured["elapsed_s"]
    model.train()
    for step in range(start, args.max_steps):
        switches = len(opt.switch_log) if isinstance(opt, MISA) else 0
        metered = step - start < 2 or switches != switches_seen or (step + 1) % METER_EVERY == 0
        switches_seen = switches
        began = time.perf_counter()
        with peak_meter.step() if metered else contextlib.nullcontext():
            loss = train_step(model, opt, data.batch(step, args.batch_size, args.seed), args, ledger)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if not metered:
            step_seconds.append(time.perf_counter() - began)
        sched.step()
        measured["trained_steps"] += 1
        loss_value = float(loss.detach())
        history["step"].append(step + 1)
        history["train_loss"].append(loss_value)
        done = step + 1
        if done % args.eval_every == 0 or done == args.max_steps:  # always after the last step too
            val, sem, per_batch = evaluate_with_error(model, data, args)
            history["val_step"].append(done)
            history["val_loss"].append(val)
            history["final_val_sem"] = sem
            history["final_val_batch_losses"] = per_batch
        elapsed = elapsed0 + time.perf_counter() - t0
        status = {"loss": f"{loss_value:.3f}", "tok/s": f"{measured['trained_steps'] * tokens_per_step / elapsed:.0f}"}
        if device.type == "cuda":
            status["mem"] = f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f}MB"
        else:
            status["rss"] = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}MB"
        if isinstance(opt, MISA):
            status["active"] = len(opt.active_modules)
        if history["val_loss"]:
            status["val_ppl"] = f"{math.exp(min(history['val_loss'][-1], 50)):.2f}"
        if bar is not None:
            bar.set_postfix(status, refresh=False)
            bar.update(1)
        elif done % args.eval_every == 0 or done == args.max_steps:
            print(
                f"[{optimizer_name}] step {done}/{args.max_steps} "
                + " ".join(f"{k}={v}" for k, v in status.items())
                + f" val_loss={history['val_loss'][-1]:.4f}",
                flush=True,
            )
        if args.save_every and done % args.save_every == 0 and done < args.max_steps:
            save(done)
    if bar is not None:
        bar.close()
    if start < args.max_steps:  # a run resumed at its last step (killed before its outputs) has it already
        save(args.max_steps)
    elapsed = measured["elapsed_s"]
    val_loss = history["val_loss"][-1] if history["val_loss"] else evaluate(model, data, args)
    summary = {
        "optimizer": optimizer_name,
        "seed": args.seed,
        "steps": args.max_steps,
        "final_train_loss": history["train_loss"][-1] if history["train_loss"] else None,
        "final_val_loss": val_loss,
        "final_val_perplexity": math.exp(min(val_loss, 50)),
        "final_val_sem": history.get("final_val_sem"),
        "tokens_per_s": measured["trained_steps"] * tokens_per_step / elapsed if elapsed > 0 else None,
        "params": sum(p.numel() for p in model.parameters()),
        "device": str(device),
        **peak_memory_mb(device),
    }
    step_ms = 1000 * statistics.median(step_seconds) if step_seconds else None
    if "peak_allocated_mb" in summary:  # the meter resets the allocator's peak at each metered step
        summary["peak_allocated_mb"] = max(summary["peak_allocated_mb"], peak_meter.peak_bytes / 2**20)
    summary.update(
        step_peak_bytes=peak_meter.peak_bytes,
        step_peak_parts=peak_meter.peak_parts,
        metered_steps=len(peak_meter.steps),
        step_ms=step_ms,
        step_tokens_per_s=tokens_per_step / step_ms * 1000 if step_ms else None,
    )
    if isinstance(opt, MISA):
        summary.update(
            trainable_fraction=opt.trainable_fraction,
            switches=len(opt.switch_log),
            skipped_steps=opt.skipped_steps,
            active_modules=opt.active_modules,
        )
    files.write_json(out / "summary.json", summary, indent=2)
    files.write_json(out / "history.json", history)
    plot({optimizer_name: [history]}, out / "loss.png", title=f"{optimizer_name} on {describe(args.data)}")
    return {"summary": summary, "history": history}


def train_step(model, opt, batch, args, ledger=None):
    """One optimizer step: forward, backward, clipping, the update, gradients freed. Returns the loss."""
    loss = model.loss(batch)
    loss.backward()
    if args.max_grad_norm > 0:
        if isinstance(opt, MISA):
            opt.clip_grad_norm_(args.max_grad_norm)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    if ledger is not None:
        ledger.before_step()
    opt.step()
    if ledger is not None:
        ledger.after_step(opt)
    opt.zero_grad(set_to_none=True)
    return loss


def save_checkpoint(out: Path, model, opt, sched, step: int, history, args, measured=None) -> None:
    files.torch_save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "step": step,
            "history": history,
            "args": vars(args),
            "measured": measured,
        },
        out / CHECKPOINT,
    )


def plot(curves: Dict[str, List[Dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, runs in curves.items():
        for key, ax in (("train_loss", axes[0]), ("val_loss", axes[1])):
            steps = runs[0]["step"] if key == "train_loss" else runs[0]["val_step"]
            values = torch.tensor([r[key] for r in runs], dtype=torch.float64)
            if key == "train_loss" and values.shape[1] > 20:  # smooth the noisy training curve
                k = max(1, values.shape[1] // 50)
                values = torch.nn.functional.avg_pool1d(values[:, None], k, 1, padding=0)[:, 0]
                steps = steps[k - 1 :]
            mean = values.mean(0)
            (line,) = ax.plot(steps, mean.tolist(), label=f"{name} (n={len(runs)})")
            if len(runs) > 1:
                ax.fill_between(
                    steps,
                    values.min(0).values.tolist(),
                    values.max(0).values.tolist(),
                    color=line.get_color(),
                    alpha=0.2,
                )
    axes[0].set_title("training loss (smoothed)")
    axes[1].set_title("validation loss")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    files.save_figure(fig, path, dpi=110)
    plt.close(fig)


def paired_eval_se(runs, reference_runs) -> float:
    """The evaluation noise of a difference between two methods: every run is evaluated on the same
    windows, so the standard error of the per-window difference of their seed-mean losses."""
    a = torch.tensor([r["history"].get("final_val_batch_losses", []) for r in runs], dtype=torch.float64)
    b = torch.tensor([r["history"].get("final_val_batch_losses", []) for r in reference_runs], dtype=torch.float64)
    if a.numel() == 0 or a.shape[1:] != b.shape[1:] or a.shape[1] < 2:
        return float("nan")
    diff = a.mean(0) - b.mean(0)
    return float(diff.std() / diff.numel() ** 0.5)


def compare(args, data, device, out: Path, argv: Optional[List[str]] = None, prepared=None) -> Dict:
    """Every --compare entry over --seeds seeds. `prepared`: what prepare() made, the parsed entries and the
    first seed's (model, optimizer) of each (used, not made again); the other seeds' are made here."""
    if prepared is None:
        prepared = Prepared([parse_optimizer(n.strip()) for n in args.compare.split(",") if n.strip()])
    methods, built = prepared.methods, prepared.built
    names = [m.entry for m in methods]
    results: Dict[str, List[Dict]] = {n: [] for n in names}
    base_seed = args.seed
    for method in methods:
        for k in range(args.seeds):
            args.seed = base_seed + k
            model, opt = built.pop(method.entry, (None, None)) if k == 0 else (None, None)
            if opt is None:
                model = build_model(args, device)
                opt = build_optimizer(method, model, args)
            folder = out / f"{method.entry}-seed{args.seed}"
            res = run(args, method.entry, folder, data, device, progress=show_progress(args), model=model, opt=opt)
            del model, opt
            results[method.entry].append(res)
    args.seed = base_seed
    rows = []
    for name, runs in results.items():
        vals = torch.tensor([r["summary"]["final_val_loss"] for r in runs], dtype=torch.float64)
        rows.append(
            {
                "optimizer": name,
                "seeds": len(runs),
                "val_loss_mean": float(vals.mean()),
                "val_loss_std": float(vals.std()) if len(runs) > 1 else 0.0,
                "val_loss_min": float(vals.min()),
                "val_loss_max": float(vals.max()),
                "val_ppl_mean": float(vals.exp().mean()),
                "eval_sem_mean": float(
                    torch.tensor([r["summary"].get("final_val_sem") or float("nan") for r in runs]).mean()
                ),
                "eval_se_paired_vs_first": paired_eval_se(runs, results[names[0]]),
                "tokens_per_s": sum(r["summary"]["tokens_per_s"] for r in runs) / len(runs),
                "step_peak_bytes": max(r["summary"]["step_peak_bytes"] for r in runs),
                "step_ms": statistics.median(r["summary"]["step_ms"] for r in runs if r["summary"]["step_ms"])
                if any(r["summary"]["step_ms"] for r in runs)
                else None,
            }
        )
    meta = {
        "command": provenance.command("misa.train", sys.argv[1:] if argv is None else argv),
        "device": str(device),
        "torch": torch.__version__,
        "commit": provenance.commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "variant_default": repr(PRESETS["default"]),
        "eval_batches": args.eval_batches,
        "model_size": args.model_size,
        "steps": args.max_steps,
        "delta": args.delta,
        "eta": args.eta,
        "interval": args.interval,
        "granularity": args.granularity,
        "lr": args.lr,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "data": describe(args.data),
        "checkpointing": getattr(args, "checkpointing", False),
    }
    files.write_json(out / "compare.json", {"meta": meta, "rows": rows}, indent=2)
    lines = [
        "| optimizer | seeds | final val loss (mean ± std) | min | max | eval s.e. (paired vs first) | "
        "val ppl | tokens/s | step peak MiB | ms / step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["val_loss_mean"]):
        ms = f"{r['step_ms']:.0f}" if r["step_ms"] else ""
        lines.append(
            f"| {r['optimizer']} | {r['seeds']} | {r['val_loss_mean']:.4f} ± {r['val_loss_std']:.4f} | "
            f"{r['val_loss_min']:.4f} | {r['val_loss_max']:.4f} | {r['eval_sem_mean']:.4f} "
            f"({r['eval_se_paired_vs_first']:.4f}) | {r['val_ppl_mean']:.3f} | {r['tokens_per_s']:.0f} | "
            f"{r['step_peak_bytes'] / 2**20:.2f} | {ms} |"
        )
    settings = ", ".join(f"{k}={v}" for k, v in meta.items() if k != "command")
    files.write_text(out / "compare.md", f"Written by `{meta['command']}`\n\n{settings}\n\n" + "\n".join(lines) + "\n")
    plot(
        {n: [r["history"] for r in runs] for n, runs in results.items()},
        out / "compare.png",
        title=f"{args.model_size} model, delta={args.delta}, {args.max_steps} steps, {args.seeds} seed(s)",
    )
    print("\n".join(lines))
    return {"rows": rows, "meta": meta}


RESUMABLE = ("max_steps", "resume", "out", "no_progress", "device", "backend", "eval_every", "save_every")


def explicit_options(parser: argparse.ArgumentParser, argv: List[str]) -> set:
    """The destinations of the options the user typed (as opposed to defaults)."""
    given = set()
    for action in parser._actions:
        for opt in action.option_strings:
            if any(tok == opt or tok.startswith(opt + "=") for tok in argv):
                given.add(action.dest)
    return given


OUTPUTS = ("summary.json", "history.json", "loss.png")


def finished(folder: Path, step: int) -> bool:
    """Whether a run's outputs are all written for its checkpoint at `step` (a requeued job has nothing to do)."""
    summary = folder / "summary.json"
    if not all((folder / name).is_file() for name in OUTPUTS):
        return False
    try:
        return json.loads(summary.read_text()).get("steps") == step
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def load_resume(args, parser, argv):
    """The saved run's settings and checkpoint. The checkpoint's settings win: options that would change
    them are refused (start a new run for those). A checkpoint at --max-steps whose outputs were not all
    written (killed after its last checkpoint) is finished: the final evaluation and outputs, no step."""
    path = Path(args.resume) / CHECKPOINT
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated, empty or foreign files fail in many ways
        raise UsageError(
            f"--resume: {path} is not a readable checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'empty'})"
        ) from None
    needed = {"model", "optimizer", "scheduler", "step", "history", "args"}
    if not isinstance(ckpt, dict) or not needed <= set(ckpt):
        raise UsageError(
            f"--resume: {path} is not a misa-train checkpoint (it lacks "
            f"{', '.join(sorted(needed - set(ckpt))) if isinstance(ckpt, dict) else 'everything'})"
        )
    saved = ckpt["args"]
    changed = [
        k for k in sorted(explicit_options(parser, argv)) if k not in RESUMABLE and getattr(args, k) != saved.get(k)
    ]
    if changed:
        detail = ", ".join(f"--{k.replace('_', '-')} (saved: {saved.get(k)!r})" for k in changed)
        raise UsageError(
            f"--resume: the checkpoint's settings win and cannot change mid-run: {detail}; start a new "
            f"run to change them (only {', '.join('--' + k.replace('_', '-') for k in RESUMABLE)} "
            "may differ)"
        )
    if args.max_steps < ckpt["step"]:
        raise UsageError(
            f"--max-steps {args.max_steps}: {path} is at step {ckpt['step']}, past it; a resumed run "
            "cannot train fewer steps than it has done"
        )
    keep = {k: getattr(args, k) for k in RESUMABLE}
    merged = argparse.Namespace(**{**saved, **keep})
    merged.out = merged.out or merged.resume
    return merged, ckpt


def prepare(args, parser, argv):
    """Everything that can fail on bad input, before anything is written: arguments, the checkpoint to
    resume, the data, the backend, the cost of a step, and each model and optimizer (built on the meta
    device). Returns what the run needs and the header line."""
    methods = validate(args)
    checkpoint = None
    if args.resume:
        args, checkpoint = load_resume(args, parser, argv)
        methods = [parse_optimizer(args.optimizer)]  # the checkpoint's
        if checkpoint["step"] == args.max_steps and finished(Path(args.out), checkpoint["step"]):
            return args, None, None, checkpoint, None, None
    device = pick_device(args)
    if any(m.name != "adamw" for m in methods):
        resolve_backend(args.backend, device)  # raises BackendUnavailable with the reason
    if args.model:
        transformers_module()
    data = TokenDataset(tokenize(load_corpus(args.data), args.model), args.seq_len, device)
    estimate = ""
    if not args.model:
        need = step_memory_bytes(model_config(args), args)
        total, have = sum(need.values()), available_memory_bytes(device)
        if total > 0.8 * have:
            raise UsageError(
                f"--seq-len {args.seq_len} --batch-size {args.batch_size}: one training step would need "
                f"about {total / 2**30:.1f} GiB (attention {need['attention'] / 2**30:.1f} GiB), "
                f"more than this {device.type} device's {have / 2**30:.1f} GiB; use a shorter --seq-len "
                "or a smaller --batch-size"
            )
        estimate = f", about {total / 2**30:.2f} GiB per step"
    # each optimizer is built once, here, on the model it trains: bad options fail before anything is written,
    # the header describes what runs, and run() (or compare()'s first seed) trains these very ones
    prepared = Prepared(methods)
    described = []
    for method in prepared.methods:
        model = build_model(args, device)
        opt = build_optimizer(method, model, args)
        prepared.built[method.entry] = (model, opt)
        described.append(f"{opt!r}, {frozen_in_words(opt)}" if isinstance(opt, MISA) else f"AdamW(lr={args.lr:g})")
    params = sum(p.numel() for p in model.parameters())
    what = args.model or (f"model {args.model_size}" + (f" + {args.config}" if args.config else ""))
    header = (
        f"misa-train: {what} ({params:,} params, {args.dtype}) on {describe(args.data)} "
        f"({len(data.train):,} training tokens), device {device}, backend {args.backend}, "
        f"{args.max_steps} steps of {args.batch_size} x {args.seq_len} tokens, lr {args.lr:g}{estimate}; "
        + "; ".join(f"{m.entry}: {d}" for m, d in zip(methods, described))
    )
    return args, device, data, checkpoint, header, prepared


@dataclass
class Prepared:
    """The parsed optimizer entries and, for each, the (model, optimizer) prepare() built for its first run."""

    methods: List[Method]
    built: Dict[str, Tuple] = field(default_factory=dict)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)  # argparse exits with code 2 on unknown options and choices
    try:
        extras.require()
    except extras.ExtraMissing as exc:
        print(f"misa-train: error: {exc}", file=sys.stderr)
        return 2
    try:
        args, device, data, checkpoint, header, prepared = prepare(args, parser, argv)
    except (UsageError, DataError, BackendUnavailable) as exc:
        print(f"misa-train: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as exc:  # raised by a constructor on a bad combination of options
        print(f"misa-train: error: {exc}", file=sys.stderr)
        return 2
    if header is None:  # resumed a run that is done: a requeue loop may resume unconditionally
        print(
            f"misa-train: {args.out} is finished (step {checkpoint['step']} of {args.max_steps}; "
            f"{', '.join(OUTPUTS)} written): nothing to do"
        )
        return 0
    name = args.compare.replace(",", "-").replace("+", "_") if args.compare else args.optimizer
    out = Path(args.out or Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"{header}; writing to {out}", flush=True)
    if args.compare:
        compare(args, data, device, out, argv, prepared)
        print(f"wrote {out / 'compare.md'}, {out / 'compare.json'}, {out / 'compare.png'}")
        return 0
    model, opt = prepared.built.pop(prepared.methods[0].entry)
    progress = show_progress(args)
    result = run(args, args.optimizer, out, data, device, progress, checkpoint=checkpoint, model=model, opt=opt)
    s = result["summary"]
    mem = ", ".join(f"{k} {v:.0f}" for k, v in s.items() if k.startswith("peak_"))
    print(
        f"done: {s['steps']} steps of {args.optimizer} on {describe(args.data)} ({s['params']:,} params, {device})\n"
        f"final train loss {s['final_train_loss']:.4f}, val loss {s['final_val_loss']:.4f} "
        f"(± {s['final_val_sem']:.4f} eval s.e.), val perplexity {s['final_val_perplexity']:.3f}, "
        f"{s['tokens_per_s']:.0f} tokens/s, {mem}\n"
        f"wrote {out / 'summary.json'}, {out / 'history.json'}, {out / 'loss.png'}, {out / CHECKPOINT}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
