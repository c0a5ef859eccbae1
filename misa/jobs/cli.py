"""What the jobs' command lines share: the error they exit 2 with, the help formatter, argument types, the
checks both `misa.train` and `misa.finetune` make, the flags they both take, the device and the progress bar."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from ..variants import PRESETS
from .model import SIZES, LlamaConfig


class UsageError(ValueError):
    pass


def eta_arg(text: str):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    # Shows every real default, and no "(default: None)" where the help already says what None means.
    def _get_help_string(self, action):
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def entry_list(text: str, flag: str, choices, parse) -> list:
    """A comma-separated list of method entries (--compare, misa.finetune's --methods), each parsed (`parse`
    raises UsageError naming what is wrong): not empty, no entry twice (seeds are for repeats)."""
    entries = [e.strip() for e in text.split(",") if e.strip()]
    if not entries:
        raise UsageError(f"{flag}: nothing given; choose from {', '.join(choices)}")
    if len(set(entries)) != len(entries):
        raise UsageError(f"{flag}: {text!r} names a method twice; use --seeds for repeats")
    return [parse(entry) for entry in entries]


def validate_common(args, counts, positive, nonnegative, paths) -> None:
    """The checks the main job and misa.finetune share: counts >= 1, finite rates, MISA's --delta and
    --eta, --out, a readable --config, paths that exist, a usable --device."""
    if not 0 < args.delta <= 1:
        raise UsageError(f"--delta: expected a fraction in (0, 1], got {args.delta}")
    if args.eta != "auto" and not (math.isfinite(args.eta) and args.eta >= 0):
        raise UsageError(f"--eta: expected a finite eta >= 0 or 'auto', got {args.eta}")
    for name in counts:
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {getattr(args, name)}")
    for name in positive + nonnegative:
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0 or (name in positive and value == 0):
            raise UsageError(
                f"--{name.replace('_', '-')}: expected a finite number "
                f"{'> 0' if name in positive else '>= 0'}, got {value}"
            )
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out: {args.out} is an existing file; name a folder")
    if args.config is not None and Path(args.config).is_file():
        try:
            fields = json.loads(Path(args.config).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"--config: {args.config} is not valid JSON ({exc})") from None
        if not isinstance(fields, dict):
            raise UsageError(f"--config: {args.config} must hold a JSON object of LlamaConfig fields")
        unknown = set(fields) - set(LlamaConfig().to_dict())
        if unknown:
            raise UsageError(
                f"--config: unknown field(s) {', '.join(sorted(unknown))}; LlamaConfig has "
                f"{', '.join(LlamaConfig().to_dict())}"
            )
    for name in paths:
        path = getattr(args, name)
        if path is not None and not Path(path).exists():
            raise UsageError(f"--{name}: {path} does not exist")
    if args.device is not None:
        try:
            dev = torch.device(args.device)
        except RuntimeError as exc:
            raise UsageError(f"--device: {exc}") from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: no CUDA device is available")


def pick_device(args) -> torch.device:
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise UsageError("--model needs transformers: pip install misa-kernels[hf]") from None
    return transformers


# The flags misa.train and misa.finetune both take, defined here once: their kind (type, choices, action) and,
# where both jobs mean the same, their default and help. A job adds one with add_flag, giving what differs for it
# (a default, a help text that speaks of that job).
FLAGS = {
    "--seeds": dict(type=int),
    "--delta": dict(type=float, default=0.25),
    "--eta": dict(type=eta_arg, default=100.0),
    "--interval": dict(type=int, default=20),
    "--variant": dict(default="default", choices=tuple(PRESETS)),
    "--embeddings": dict(choices=("every-step", "module", "frozen")),
    "--lisa-layers": dict(
        type=int, default=None, help="layers LISA trains at once (default: as many as fit in --delta, at least 1)"
    ),
    "--max-steps": dict(type=int),
    "--warmup-steps": dict(type=int, default=10, help="linear learning-rate warm-up"),
    "--weight-decay": dict(type=float, default=0.0, help="AdamW's decoupled weight decay"),
    "--max-grad-norm": dict(type=float, default=1.0, help="0 disables clipping"),
    "--model-size": dict(default="small", choices=sorted(SIZES), help="built-in LLaMA-style model"),
    "--config": dict(default=None, help="JSON file with LlamaConfig fields (overrides --model-size)"),
    "--model": dict(default=None),
    "--data": dict(default=None),
    "--seq-len": dict(type=int, default=128),
    "--batch-size": dict(type=int, default=8, help="sequences per optimizer step"),
    "--device": dict(default=None, help="cpu, cuda, cuda:1 ...; when omitted: cuda if available, else cpu"),
    "--dtype": dict(default="fp32", choices=("fp32", "bf16")),
    "--checkpointing": dict(
        action="store_true",
        help="activation checkpointing per block (non-reentrant torch.utils.checkpoint; "
        "gradient_checkpointing_enable for a Hugging Face model): each block keeps only its input "
        "and is recomputed in backward",
    ),
    "--backend": dict(default="auto", choices=("auto", "torch", "triton", "cuda")),
    "--seed": dict(type=int, default=0),
    "--eval-every": dict(type=int),
    "--eval-batches": dict(type=int),
    "--out": dict(default=None),
    "--resume": dict(default=None),
    "--save-every": dict(type=int, default=100),
    "--no-progress": dict(action="store_true"),
}


def add_flag(p: argparse.ArgumentParser, flag: str, **differences) -> None:
    """Adds a flag of FLAGS to `p`, with what differs for this job (default, help, metavar)."""
    p.add_argument(flag, **{**FLAGS[flag], **differences})


def add_checkpointing_flag(p: argparse.ArgumentParser) -> None:
    add_flag(p, "--checkpointing")


def show_progress(args) -> bool:
    # A progress bar on a terminal; plain lines in a log file or a pipe.
    return not args.no_progress and sys.stdout.isatty()
