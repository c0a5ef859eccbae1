"""`python -m misa.finetune`: fine-tune a pretrained base on a new domain with MISA, LISA, BAdam, full
AdamW, LoRA and DoRA, each at its own best learning rate, and report quality, forgetting and memory.

1. The base: pretrained once with AdamW on the main job's corpus (Python's standard-library sources) and
   cached on disk under a key of everything that determines it (config, steps, learning rate, seed,
   data, code, torch, device), so the next run starts at once; or --base DIR (ours), or --model (HF).
2. The new domain, shipped with Python: the Unicode character names (default), or the documentation
   topics (English prose), or --data. The base's loss on it and on its own domain are printed: the
   shift must be real.
3. Each method runs its learning-rate grid at the first seed; the rate with the lowest loss on the new
   domain's validation split is chosen (the test split is not even evaluated then), and --seeds seeds
   run at it. The table reports the test split, the old domain's loss (forgetting) and the memory
   each method held at its peak (misa.memory: exact bytes; the measured peak too on a GPU).
4. --equal-memory adds MISA at LoRA's accounted memory (its delta set to fit), and LISA with as many
   layers as fit in it (or says that not one does).
Exit code 2 means bad input; nothing is written then.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import unicodedata
import warnings
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from misa_kernels import BackendUnavailable
from misa_kernels.backends import resolve as resolve_backend

from ..integrations.lora import PEFT_MISSING, PeftMissing, attach_lora, peft_available
from ..memory import MemoryMeter
from ..optimizer import capacity
from ..partition import partition
from . import cli, extras, files, provenance, train
from .data import DOMAINS, DataError, TokenDataset, load_corpus, tokenize
from .finetune_report import advice, paired_se, regime, summarize, table, verdict
from .method import EQUAL, METHODS, Method, method_name, parse_entry
from .pretrained import base_weights, check_fits, pretrained_base
from .worst_set import worst_case_peak

# Rates a small grid spans for each method, centred on each one's best in a wide pilot over 1e-4..1e-2 (the
# built-in small model, 200 steps on the default domain): real LLMs fine-tune at far smaller rates, so pass
# --lr-grid for them. Adapters and the sampled methods (few weights trained for a while) take larger rates.
DEFAULT_GRIDS = {
    "misa": (3e-3, 1e-2, 3e-2),
    "lisa": (1e-3, 3e-3, 1e-2),
    "badam": (1e-3, 3e-3, 1e-2),
    "adamw": (1e-3, 3e-3, 1e-2),
    "lora": (3e-3, 1e-2, 3e-2),
    "dora": (3e-3, 1e-2, 3e-2),
}
TEST_FRACTION = 0.1
ROW_FILE, REPORT_FILE = "row.json", "report.json"  # a finished run's row, and its test and old-domain losses
SETTINGS_FILE = "settings.json"  # what a comparison was started with: a resume must match it
OUTPUTS = ("finetune.json", "finetune.md", "finetune.png")  # written last: a comparison that has them is done
EQUAL_PEAK_ITERATIONS = 12  # bisection steps of delta for the equal peak: 1/4096 of the range
# the MISA formats --equal-memory peak sizes to LoRA's peak: the default, and the compact one that buys a larger delta
EQUAL_PEAK_FORMATS = ("misa", "misa+states=8bit+masters=kahan")
UsageError = cli.UsageError


# ----------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m misa.finetune", description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter
    )
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated: misa, lisa, badam, adamw, lora, dora; misa may carry a preset and switches "
        "(misa-official, misa+delta=0.1+interval=50+embeddings=every-step+train_norms=true)",
    )
    p.add_argument(
        "--lr-grid",
        default=None,
        metavar="GRID",
        help="learning rates to try: '1e-4,3e-4' for every method, or per method "
        "'misa=3e-4,1e-3;lora=1e-3,3e-3' (others keep their default grid, "
        + "; ".join(f"{m} {','.join(f'{r:g}' for r in g)}" for m, g in DEFAULT_GRIDS.items())
        + ")",
    )
    cli.add_flag(p, "--seeds", default=3, help="seeds at the chosen rate (the grid runs the first)")
    p.add_argument(
        "--grid-extensions",
        type=int,
        default=2,
        help="times a grid is extended past an edge that was chosen (by the grid's own ratio)",
    )
    p.add_argument(
        "--equal-memory",
        nargs="?",
        const="peak",
        default=None,
        choices=tuple(EQUAL),
        help="add MISA, in the default format and in 8-bit states + Kahan, and LISA sized to LoRA's "
        "memory: 'peak' (the default when the flag is given) matches the measured step peak for "
        "the worst active set their budget allows (delta bisected, LISA's layers counted); "
        "'accounted' matches the ledger (adapters + gradients + states + masters)",
    )
    p.add_argument("--lora-r", type=int, default=8, help="LoRA/DoRA rank, on all seven projections")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA/DoRA alpha (default: 2 x rank)")
    cli.add_flag(p, "--delta", help="MISA's budget (fraction of all parameters)")
    cli.add_flag(p, "--eta", help="MISA's sampling temperature, or 'auto'")
    cli.add_flag(p, "--interval", help="optimizer steps per outer loop (MISA, LISA, BAdam)")
    cli.add_flag(p, "--variant", help="MISA preset")
    cli.add_flag(
        p,
        "--embeddings",
        default="frozen",
        help="embedding and LM head during fine-tuning: frozen (as LoRA leaves them), trained at every "
        "step, or sampled as MISA modules",
    )
    p.add_argument("--train-norms", action="store_true", help="MISA trains the norms at every step")
    cli.add_flag(p, "--lisa-layers")
    # 600 steps of 8 x 128 bytes are about 0.7 epoch of the default domain. At 200 steps MISA at LoRA's memory
    # had trained each weight matrix for too few steps and lost to LoRA (benchmarks/results/finetune-ablation-*).
    cli.add_flag(p, "--max-steps", default=600, help="fine-tuning steps of every run")
    for flag in ("--warmup-steps", "--weight-decay", "--max-grad-norm", "--model-size", "--config"):
        cli.add_flag(p, flag)
    cli.add_flag(p, "--model", help="a local Hugging Face causal-LM folder: the base itself")
    p.add_argument(
        "--base",
        default=None,
        metavar="DIR",
        help="pretrained weights for the built-in model: a folder with base.pt (this command's) or "
        "checkpoint.pt (misa.train's) (default: pretrain once and cache)",
    )
    p.add_argument("--base-steps", type=int, default=1000, help="AdamW steps of the cached base's pretraining")
    p.add_argument("--base-lr", type=float, default=3e-3, help="learning rate of the cached base's pretraining")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where pretrained bases are cached (default: $MISA_CACHE_DIR, else ~/.cache/misa)",
    )
    p.add_argument(
        "--domain",
        default="unicode-names",
        choices=tuple(DOMAINS),
        help="fine-tuning text shipped with Python: the Unicode character names (a register code does "
        "not hold) or the documentation topics (English prose the base already models about as "
        "well as code)",
    )
    cli.add_flag(p, "--data", help="fine-tuning text of your own, a file or folder (replaces --domain)")
    cli.add_flag(p, "--seq-len", help="tokens per sequence")
    cli.add_flag(p, "--batch-size")
    cli.add_flag(p, "--device")
    cli.add_flag(
        p, "--dtype", help="weights during fine-tuning (bf16: MISA/LISA/BAdam keep fp32 masters, LoRA fp32 adapters)"
    )
    cli.add_flag(p, "--checkpointing")
    cli.add_flag(p, "--backend", help="misa_kernels backend")
    cli.add_flag(p, "--seed", help="first seed (model-independent: data order, sampler)")
    cli.add_flag(p, "--eval-every", default=200, help="evaluate the new domain every N steps")
    cli.add_flag(p, "--eval-batches", default=32, help="batches of every evaluation (fixed windows)")
    cli.add_flag(p, "--out", help="output folder (default: runs/finetune-<time>)")
    cli.add_flag(
        p,
        "--resume",
        metavar="OUT",
        help="continue the comparison in OUT: finished runs are read back, the run in progress resumes "
        "from its checkpoint; the settings must be those OUT was started with",
    )
    cli.add_flag(
        p,
        "--save-every",
        help="every run checkpoints every N steps into OUT/runs (what --resume continues from)",
    )
    p.add_argument(
        "--keep-runs",
        action="store_true",
        help="keep every run's own outputs (checkpoint, history, plot) under OUT/runs",
    )
    cli.add_flag(p, "--no-progress", help="plain log lines")
    return p


def parse_grid(text: Optional[str], methods: Sequence[str]) -> Dict[str, Tuple[float, ...]]:
    """{method entry: rates}. Every rate must be a finite number > 0."""
    grids = {m: DEFAULT_GRIDS[method_name(m)] for m in methods}
    if text is None:
        return grids

    def rates(part: str, where: str) -> Tuple[float, ...]:
        out = []
        for item in part.split(","):
            try:
                value = float(item)
            except ValueError:
                raise UsageError(f"--lr-grid: {item!r} in {where!r} is not a number") from None
            if not (math.isfinite(value) and value > 0):
                raise UsageError(f"--lr-grid: every rate must be a finite number > 0, got {item!r} in {where!r}")
            out.append(value)
        if not out:
            raise UsageError(f"--lr-grid: no rate in {where!r}")
        return tuple(out)

    if "=" not in text:
        every = rates(text, text)
        return {m: every for m in methods}
    for part in filter(None, (x.strip() for x in text.split(";"))):
        name, _, values = part.partition("=")
        targets = [m for m in methods if m == name.strip() or method_name(m) == name.strip()]
        if not targets:
            raise UsageError(f"--lr-grid: {name.strip()!r} is not one of --methods ({', '.join(methods)})")
        for m in targets:
            grids[m] = rates(values, part)
    return grids


def validate(args) -> List[Method]:
    cli.validate_common(
        args,
        counts=(
            "max_steps",
            "seq_len",
            "batch_size",
            "interval",
            "eval_every",
            "eval_batches",
            "seeds",
            "lora_r",
            "base_steps",
        ),
        positive=("base_lr",),
        nonnegative=("weight_decay", "max_grad_norm"),
        paths=("config", "model", "data", "base"),
    )
    if args.save_every < 0:
        raise UsageError(f"--save-every: expected an integer >= 0 (0: only at the end), got {args.save_every}")
    if args.grid_extensions < 0:
        raise UsageError(f"--grid-extensions: expected an integer >= 0, got {args.grid_extensions}")
    if args.lora_alpha is not None and not (math.isfinite(args.lora_alpha) and args.lora_alpha > 0):
        raise UsageError(f"--lora-alpha: expected a finite number > 0, got {args.lora_alpha}")
    methods = cli.entry_list(args.methods, "--methods", METHODS, parse_entry)
    if any(m.name in ("lora", "dora") for m in methods) or args.equal_memory:
        if not peft_available():
            raise UsageError(f"--methods {args.methods}: {PEFT_MISSING}")
    if args.equal_memory and "lora" not in [m.entry for m in methods]:
        raise UsageError("--equal-memory: matches LoRA's memory, so --methods must include lora")
    if args.base and args.model:
        raise UsageError("--base and --model exclude each other: a Hugging Face model is its own base")
    return methods


def run_args(args, lr: float, seed: int, overrides: Dict, out: Path) -> SimpleNamespace:
    """The settings train.run and train.build_optimizer read, for one fine-tuning run."""
    fields = dict(vars(args))
    fields.update(
        lr=lr,
        seed=seed,
        save_every=getattr(args, "save_every", 0),
        resume=None,
        out=str(out),
        granularity="module",
        flush=None,
        keep_states=None,
        norm_power=None,
        logit_cap=None,
        badam_order="descending",
        compare=None,
    )
    fields.update(overrides)
    return SimpleNamespace(**fields)


# ----------------------------------------------------------------------------------------- methods
def build_method(method: Method, rargs, base: Dict[str, torch.Tensor], device):
    """(model loaded from the base, optimizer, parameters of the base model) for one method."""
    name = method.name
    model = train.build_model(rargs, device)
    if base is not None:
        model.load_state_dict(base)
    base_params = list(model.parameters())
    if name in ("lora", "dora"):
        adapters = attach_lora(model, rargs.lora_r, rargs.lora_alpha or 2.0 * rargs.lora_r, dora=name == "dora")
        model.to(device)
        opt = torch.optim.AdamW(adapters, lr=rargs.lr, weight_decay=rargs.weight_decay, fused=device.type == "cuda")
        return model, opt, base_params
    return model, train.build_optimizer(method, model, rargs), base_params


def _capacity(args, overrides: Dict, layers: Optional[int] = None):
    """The bound of MISA (or LISA with `layers`) at any delta, read off a meta model: no optimizer is built."""
    rargs = run_args(args, 1e-3, 0, {**overrides, "lisa_layers": layers}, Path("."))
    model = train.build_model(rargs, "meta") if args.model else train.build_model(rargs, "cpu").to("meta")
    kwargs = train.misa_kwargs("lisa" if layers else "misa", {}, model, rargs)
    return capacity(model, **kwargs), kwargs["delta"]


def _bound(held: Dict[str, int]) -> int:
    return held["states"] + held["masters"] + held["gradients"]


def misa_bound(args, delta: float, overrides: Dict, layers: Optional[int] = None) -> int:
    """The most MISA (or LISA with `layers`, whose delta its layers fix) can hold at `delta`: its arena,
    allocated up front, plus gradients for a full budget of active parameters and whatever trains at every
    step."""
    held, own_delta = _capacity(args, {**overrides, "delta": delta}, layers)
    return _bound(held.bytes_at(own_delta))


def delta_at(args, budget_bytes: int, overrides: Dict) -> Optional[float]:
    """The largest delta whose bound fits in `budget_bytes` (bisection over the bound as a function of delta,
    misa.optimizer.capacity), or None if no module fits."""
    held, _ = _capacity(args, overrides)
    lo, hi = held.smallest_module / held.total_params * (1 + 1e-9), 1.0
    if _bound(held.bytes_at(lo)) > budget_bytes:
        return None
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _bound(held.bytes_at(mid)) <= budget_bytes else (lo, mid)
    return lo


def lisa_layers_at(args, budget_bytes: int, overrides: Dict) -> Tuple[int, int]:
    """(the most LISA layers whose bound fits in `budget_bytes`, or 0; the bound of one layer)."""
    meta = train.build_model(run_args(args, 1e-3, 0, overrides, Path(".")), "meta")
    n_layers = sum(m.kind == "block" for m in partition(meta, granularity="layer").modules)
    one = misa_bound(args, 1.0, overrides, layers=1)
    best = 0
    for k in range(1, n_layers + 1):
        if misa_bound(args, 1.0, overrides, layers=k) <= budget_bytes:
            best = k
    return best, one


def peak_at(args, method: Method, base, data: TokenDataset, device) -> Tuple[int, Dict, List[int]]:
    """(peak bytes, parts by kind, active set) of a training step of `method` on the worst active set its
    budget allows (worst_set.py), measured on a throwaway copy of the model from the base."""
    rargs = run_args(args, 1e-3, args.seed, method.overrides, Path("."))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, _ = build_method(method, rargs, base, device)
    batch = data.batch(0, args.batch_size, args.seed)

    def step():
        train.train_step(model, opt, batch, rargs)

    if method.name == "lisa":  # every layer is alike: the lowest ones make backward the longest
        return worst_case_peak(model, opt, step, None, sets=[list(range(_lisa_count(opt)))])
    return worst_case_peak(model, opt, step, lambda: model.loss(batch))


def _lisa_count(opt) -> int:
    sizes = opt.sampler.sizes
    return max(k for k in range(1, len(sizes) + 1) if sum(sorted(sizes)[:k]) <= opt.budget)


def delta_at_peak(args, target: int, method: Method, base, data, device) -> Optional[Dict]:
    """The largest delta whose worst set's measured step peak fits in `target` bytes (bisection over the
    measured peaks), with the peaks on both sides of it; None if not even the smallest module fits."""
    meta = train.build_model(run_args(args, 1e-3, 0, {}, Path(".")), "meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sizes = [m.numel for m in partition(meta).modules]
    total = sum(p.numel() for p in meta.parameters())
    lo, hi = min(sizes) / total * (1 + 1e-9), 1.0
    probe = {}

    def peak(delta):
        probe[delta] = peak_at(args, replace(method, overrides={"delta": delta}), base, data, device)
        return probe[delta][0]

    if peak(lo) > target:
        return None
    if peak(hi) <= target:
        lo = hi
    else:
        for _ in range(EQUAL_PEAK_ITERATIONS):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if peak(mid) <= target else (lo, mid)
    found = {
        "delta": lo,
        "peak_bytes": probe[lo][0],
        "parts": probe[lo][1],
        "target_bytes": target,
        "worst_set": probe[lo][2],
    }
    if hi in probe and hi != lo:
        found.update(next_delta=hi, next_peak_bytes=probe[hi][0])
    return found


def lisa_layers_at_peak(args, target: int, base, data, device) -> Tuple[int, List[int]]:
    """(the most LISA layers whose measured step peak fits in `target`, or 0; the peak of each count)."""
    meta = train.build_model(run_args(args, 1e-3, 0, {}, Path(".")), "meta")
    n_layers = sum(m.kind == "block" for m in partition(meta, granularity="layer").modules)
    peaks = []
    for k in range(1, n_layers + 1):
        peaks.append(peak_at(args, Method("lisa", "lisa", overrides={"lisa_layers": k}), base, data, device)[0])
        if peaks[-1] > target:
            break
    return sum(p <= target for p in peaks), peaks


# ----------------------------------------------------------------------------------------- running
def one_run(
    args, method: Method, lr: float, seed: int, out: Path, new: TokenDataset, base, device
) -> Tuple[Dict, torch.nn.Module]:
    """One fine-tuning run, evaluated on the new domain's validation split only: (its row, its model). A run
    a killed comparison finished is read back from its folder (its model None: `load_model` has it); one it
    had begun resumes from its own checkpoint (saved every --save-every steps)."""
    if (out / ROW_FILE).is_file():
        return json.loads((out / ROW_FILE).read_text()), None
    rargs = run_args(args, lr, seed, method.overrides, out)
    model, opt, base_params = build_method(method, rargs, base, device)
    ledger = MemoryMeter(model, base_params)
    checkpoint = None
    if (out / train.CHECKPOINT).is_file():
        checkpoint = torch.load(out / train.CHECKPOINT, map_location="cpu", weights_only=False)
    result = train.run(
        rargs,
        method.entry,
        out,
        new,
        device,
        progress=cli.show_progress(args),
        model=model,
        opt=opt,
        ledger=ledger,
        checkpoint=checkpoint,
    )
    summary = result["summary"]
    memory = dict(
        ledger.peak.as_dict(),
        step_peak_bytes=summary["step_peak_bytes"],
        step_peak_parts=summary["step_peak_parts"],
        metered_steps=summary["metered_steps"],
    )
    row = {
        "method": method.entry,
        "lr": lr,
        "seed": seed,
        "val_loss": summary["final_val_loss"],
        "history": result["history"],
        "memory": memory,
        "step_ms": summary["step_ms"],
        "tokens_per_s": summary["step_tokens_per_s"],
    }
    files.write_json(out / ROW_FILE, row)
    return row, model


def load_model(args, method: Method, lr: float, seed: int, folder: Path, base, device):
    """The trained model of a finished run, from the checkpoint it left in its folder."""
    rargs = run_args(args, lr, seed, method.overrides, folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _, _ = build_method(method, rargs, base, device)
    model.load_state_dict(torch.load(folder / train.CHECKPOINT, map_location="cpu", weights_only=False)["model"])
    return model


def report(
    args, row: Dict, model, new: TokenDataset, old: TokenDataset, folder: Optional[Path] = None, load=None
) -> Dict:
    """Adds the test split and the old domain to a run's row: only for runs at the chosen rate. Kept in the
    run's folder, so that a resumed comparison reads it back; `load()` gives the model of a run read back."""
    done = folder / REPORT_FILE if folder is not None else None
    if done is not None and done.is_file():
        row.update(json.loads(done.read_text()))
    else:
        model = load() if model is None else model
        rargs = run_args(args, row["lr"], row["seed"], {}, Path("."))
        found = dict(
            zip(
                ("test_loss", "test_sem", "test_batch_losses"),
                train.evaluate_with_error(model, new, rargs, split="test"),
            )
        )
        found["old_loss"] = train.evaluate(model, old, rargs)
        row.update(found)
        if done is not None:
            done.parent.mkdir(parents=True, exist_ok=True)
            files.write_json(done, found)
    print(
        f"[{row['method']} lr={row['lr']:g} seed={row['seed']}] val {row['val_loss']:.4f} test "
        f"{row['test_loss']:.4f} old-domain {row['old_loss']:.4f} accounted "
        f"{row['memory']['total_bytes'] / 2**20:.2f} MiB",
        flush=True,
    )
    return row


def choose_rate(grid_rows: Sequence[Dict]) -> float:
    """The rate with the lowest validation loss (a tie goes to the smaller rate). Reads validation only:
    grid rows carry no test loss at all."""
    return min(grid_rows, key=lambda r: (r["val_loss"], r["lr"]))["lr"]


def run_method(args, method: Method, rates, new, old, base, device, out: Path) -> Dict:
    """The grid at the first seed, the choice on validation, then the other seeds at the chosen rate
    (the first seed's run at that rate is reused, and only then evaluated on the test split). A choice at
    the edge of the grid extends it by the grid's own ratio, up to `--grid-extensions` times, so that the
    chosen rate is a minimum on validation rather than a boundary."""
    rates = sorted(rates)
    grid, models = [], {}
    entry = method.entry

    def folder(lr, seed):
        return out / f"{entry}-lr{lr:g}-seed{seed}"

    def loader(lr, seed):
        return lambda: load_model(args, method, lr, seed, folder(lr, seed), base, device)

    def trial(lr):
        row, models[lr] = one_run(args, method, lr, args.seed, folder(lr, args.seed), new, base, device)
        print(f"[{entry} lr={lr:g} seed={args.seed}] val {row['val_loss']:.4f} (grid)", flush=True)
        grid.append(row)

    for lr in rates:
        trial(lr)
    ratio = rates[1] / rates[0] if len(rates) > 1 else None
    for _ in range(args.grid_extensions if ratio else 0):
        chosen, tried = choose_rate(grid), sorted(r["lr"] for r in grid)
        if chosen == tried[0]:
            trial(tried[0] / ratio)
        elif chosen == tried[-1]:
            trial(tried[-1] * ratio)
        else:
            break
        models = {lr: m for lr, m in models.items() if lr == choose_rate(grid)}  # keep one model in memory
    chosen = choose_rate(grid)
    first = dict(next(r for r in grid if r["lr"] == chosen))
    finals = [report(args, first, models.pop(chosen), new, old, folder(chosen, args.seed), loader(chosen, args.seed))]
    models.clear()
    for k in range(1, args.seeds):
        seed = args.seed + k
        row, model = one_run(args, method, chosen, seed, folder(chosen, seed), new, base, device)
        finals.append(report(args, row, model, new, old, folder(chosen, seed), loader(chosen, seed)))
    tried = sorted(r["lr"] for r in grid)
    return summarize(
        entry,
        tried,
        sorted((({k: v for k, v in r.items() if k != "history"}) for r in grid), key=lambda r: r["lr"]),
        chosen,
        finals,
        method.overrides,
    )


def plot_loss_and_time(
    curves: Dict[str, List[Dict]], step_ms: Dict[str, Optional[float]], path: Path, title: str
) -> None:
    """Validation loss against optimizer steps and against wall-clock time (the paper's Figure 3): the time of
    an evaluation point is its step times the method's median time per step (evaluations not counted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, runs in curves.items():
        steps = torch.tensor(runs[0]["val_step"], dtype=torch.float64)
        values = torch.tensor([r["val_loss"] for r in runs], dtype=torch.float64)
        (line,) = axes[0].plot(steps.tolist(), values.mean(0).tolist(), label=f"{name} (n={len(runs)})")
        if step_ms.get(name):
            axes[1].plot(
                (steps * step_ms[name] / 1000).tolist(),
                values.mean(0).tolist(),
                color=line.get_color(),
                label=f"{name} ({step_ms[name]:.0f} ms/step)",
            )
    axes[0].set_xlabel("optimizer step")
    axes[1].set_xlabel("training time (s): step x median ms per step")
    for ax in axes:
        ax.set_ylabel("validation loss (new domain)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    files.save_figure(fig, path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        extras.require()
    except extras.ExtraMissing as exc:
        print(f"misa-finetune: error: {exc}", file=sys.stderr)
        return 2
    try:
        command = resume_settings(args, argv)
        if args.resume is not None and all((Path(args.out) / name).is_file() for name in OUTPUTS):
            print(f"misa-finetune: {args.out} is finished ({', '.join(OUTPUTS)} written): nothing to do")
            return 0
        prepared = prepare(args)
    except (UsageError, DataError, BackendUnavailable, PeftMissing, ValueError, TypeError) as exc:
        print(f"misa-finetune: error: {exc}", file=sys.stderr)
        return 2
    return finetune(args, command, *prepared)


# Options that may differ between a comparison and its resume: where it is, how it prints, what it keeps
RESUMABLE = ("resume", "out", "no_progress", "keep_runs")


def settings_of(args) -> Dict:
    return {k: v for k, v in sorted(vars(args).items()) if k not in RESUMABLE}


def _without_resume(argv: List[str]) -> List[str]:
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
        elif tok == "--resume":
            skip = True
        elif not tok.startswith("--resume="):
            out.append(tok)
    return out


def resume_settings(args, argv: List[str]) -> List[str]:
    """With --resume OUT: OUT must hold a comparison started with these settings (a requeued job runs the
    same command plus --resume); they are compared by name. Returns the command line to record: the first
    one, so that a resumed comparison writes what an uninterrupted one would."""
    if args.resume is None:
        return argv
    folder = Path(args.resume)
    path = folder / SETTINGS_FILE
    if not folder.exists():  # a requeued job whose first attempt died before it wrote anything: start it
        print(f"misa-finetune: {folder} does not exist yet: nothing to resume, the comparison starts there", flush=True)
        args.out, args.resume = str(folder), None
        return _without_resume(argv)
    if not path.is_file():
        raise UsageError(f"--resume: {path} does not exist: {folder} holds no comparison of misa.finetune")
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--resume: {path} is not readable ({exc})") from None
    if args.out is not None and Path(args.out).resolve() != folder.resolve():
        raise UsageError(f"--out {args.out}: a resumed comparison stays in its folder, {folder}")
    now = json.loads(json.dumps(settings_of(args)))
    changed = [k for k in sorted(set(now) | set(saved["settings"])) if now.get(k) != saved["settings"].get(k)]
    if changed:
        detail = ", ".join(
            f"--{k.replace('_', '-')} (saved: {saved['settings'].get(k)!r}, now: {now.get(k)!r})" for k in changed
        )
        raise UsageError(
            f"--resume: {folder} was started with other settings: {detail}; run the command it was "
            "started with (plus --resume), or start a new comparison"
        )
    args.out = str(folder)
    return saved["argv"]


def prepare(args):
    """Everything that can fail on bad input, before anything is written."""
    methods = validate(args)  # each entry parsed once, here: a Method from then on
    grids = parse_grid(args.lr_grid, [m.entry for m in methods])
    device = cli.pick_device(args)
    if any(m.name in ("misa", "lisa", "badam") for m in methods):
        resolve_backend(args.backend, device)
    if args.model:
        cli.transformers_module()
    old_corpus = load_corpus(None)
    new_corpus = load_corpus(args.data) if args.data else DOMAINS[args.domain]()
    if not new_corpus:
        raise DataError(f"--domain {args.domain}: this Python ships no such text; pass --data")
    old = TokenDataset(tokenize(old_corpus, args.model), args.seq_len, device)
    new = TokenDataset(tokenize(new_corpus, args.model), args.seq_len, device, test_fraction=TEST_FRACTION)
    base = None
    if args.base:
        base = base_weights(Path(args.base))
    probe = run_args(args, 1e-3, args.seed, {}, Path("."))
    model = train.build_model(probe, "meta") if args.model else train.build_model(probe, "cpu")
    if base is not None:
        check_fits(base, model, args.base)
    for m in methods:  # every optimizer builds (bad switches, budgets that fit no module) before any run
        rargs = run_args(args, 1e-3, args.seed, m.overrides, Path("."))
        if m.name not in ("lora", "dora"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                train.build_optimizer(
                    m,
                    train.build_model(rargs, "cpu").to("meta") if not args.model else train.build_model(rargs, "meta"),
                    rargs,
                )
    return methods, grids, device, old_corpus, old, new, base


def sized_rows(args, rows: List[Dict], grids, new, old, base, device, runs: Path) -> Tuple[List[str], Dict]:
    """--equal-memory: MISA's rows sized to LoRA's row (its measured step peak, or its accounted memory) and
    LISA's with the most layers that fit, each run and appended to `rows`. Returns (a note per sized row, what
    the peak search found: {entry: its probe})."""
    notes, equal_peak = [], {}
    if args.equal_memory is None:
        return notes, equal_peak
    lora = next(r for r in rows if r["method"] == "lora")

    def add(entry: str, overrides: Dict) -> None:
        method = replace(parse_entry(entry), overrides=overrides)
        grid = grids.get(method.name, DEFAULT_GRIDS[method.name])
        rows.append(run_method(args, method, grid, new, old, base, device, runs))

    if args.equal_memory == "peak":
        target = lora["memory"]["step_peak_bytes"]
        where, measure = f"LoRA's measured step peak, {target / 2**20:.2f} MiB", "step peak"
        for spec in EQUAL_PEAK_FORMATS:
            head, *switches = spec.split("+")
            entry = "+".join([head + EQUAL["peak"]] + switches)
            found = delta_at_peak(args, target, parse_entry(spec), base, new, device)
            equal_peak[entry] = found
            if found is None:
                notes.append(f"{entry}: not even the smallest module's worst step fits in {where}.")
                continue
            add(entry, {"delta": found["delta"]})
            notes.append(
                f"{entry}: delta {found['delta']:.4f}, the largest whose worst active set's step peak "
                f"({found['peak_bytes'] / 2**20:.2f} MiB) fits in {where}."
            )
        layers, peaks = lisa_layers_at_peak(args, target, base, new, device)
        equal_peak["lisa" + EQUAL["peak"]] = {"layers": layers, "peaks_by_layers": peaks, "target_bytes": target}
        one, held = peaks[0], "peaks at"
        fits = peaks[layers - 1] if layers else None
    else:
        budget = lora["memory"]["total_bytes"]
        where, measure = f"LoRA's {budget / 2**20:.2f} MiB", "bound"
        delta = delta_at(args, budget, {})
        if delta is None:
            notes.append("MISA: not even the smallest module fits in LoRA's accounted memory.")
        else:
            entry = "misa" + EQUAL["accounted"]
            add(entry, {"delta": delta})
            notes.append(f"{entry}: delta {delta:.4f}, the largest whose bound fits in {where}.")
        layers, one = lisa_layers_at(args, budget, {})
        held, fits = "holds", None
    if layers == 0:
        notes.append(
            f"LISA: one layer (with the embedding and head it trains at every step) {held} "
            f"{one / 2**20:.2f} MiB, more than {where}: no LISA row fits."
        )
    else:
        entry = "lisa" + EQUAL[args.equal_memory]
        add(entry, {"lisa_layers": layers})
        measured = f" ({fits / 2**20:.2f} MiB)" if fits is not None else ""
        notes.append(f"{entry}: {layers} layer(s), the most whose {measure}{measured} fits in {where}.")
    return notes, equal_peak


def finetune(args, argv, methods, grids, device, old_corpus, old, new, base) -> int:
    commit = provenance.commit()  # the code that runs, read before a long run gives time for edits
    out = Path(args.out or Path("runs") / f"finetune-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.resume is None:
        out.mkdir(parents=True, exist_ok=True)
        files.write_json(out / SETTINGS_FILE, {"argv": argv, "settings": settings_of(args)}, indent=1)
    base_note = provenance.portable(str(Path(args.model or args.base).resolve())) if args.model or args.base else ""
    where = base_note
    if base is None and not args.model:
        folder, cached = pretrained_base(args, old, old_corpus, device)
        base = base_weights(folder)
        base_note = f"pretrained {folder.name} ({'cached' if cached else 'made now'})"
        where = f"{base_note} in {folder.parent}"
    probe = run_args(args, 1e-3, args.seed, {}, out)
    model = train.build_model(probe, device)
    if base is not None:
        model.load_state_dict(base)
    base_losses = {"old": train.evaluate(model, old, probe), "new": train.evaluate(model, new, probe)}
    del model
    what = args.model or f"model {args.model_size}" + (f" + {args.config}" if args.config else "")
    new_name = (
        args.data
        or {
            "unicode-names": f"the Unicode character names (unicodedata {unicodedata.unidata_version})",
            "python-docs": "Python's documentation topics (pydoc_data, English prose)",
        }[args.domain]
    )
    print(
        f"misa-finetune: {what} ({args.dtype}) from base {where}; fine-tuning on {new_name}, "
        f"{args.max_steps} steps of {args.batch_size} x {args.seq_len}, device {device}; the base's loss: "
        f"{base_losses['old']:.4f} on its own domain (Python sources), {base_losses['new']:.4f} on the new one; "
        f"embeddings and head {args.embeddings}, norms {'trained' if args.train_norms else 'frozen'} (MISA); "
        f"methods {', '.join(m.entry for m in methods)}; writing to {out}",
        flush=True,
    )
    if base_losses["new"] <= base_losses["old"] + 0.1:
        print(
            f"misa-finetune: note: the base models {new_name} about as well as its own domain or better: this "
            "measures continued training more than adaptation to a new domain",
            flush=True,
        )
    out.mkdir(parents=True, exist_ok=True)
    runs = out / "runs"
    rows = []
    for method in methods:
        rows.append(run_method(args, method, grids[method.entry], new, old, base, device, runs))
    notes, equal_peak = sized_rows(args, rows, grids, new, old, base, device, runs)
    for r in rows:
        r["paired_se"] = {o["method"]: paired_se(r["runs"], o["runs"]) for o in rows}
    meta = {
        "command": provenance.command("misa.finetune", argv),
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),  # the shipped domains are this Python's own texts
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": what,
        "dtype": args.dtype,
        "base": base_note,
        "base_loss_old": base_losses["old"],
        "base_loss_new": base_losses["new"],
        "new_domain": new_name,
        "domain": args.data or args.domain,
        "steps": args.max_steps,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "delta": args.delta,
        "eta": args.eta,
        "interval": args.interval,
        "embeddings": args.embeddings,
        "train_norms": args.train_norms,
        "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha or 2.0 * args.lora_r,
        "notes": notes,
        "eval_batches": args.eval_batches,
        "checkpointing": args.checkpointing,
        "equal_memory": args.equal_memory,
        "equal_peak": equal_peak,
        "threads": torch.get_num_threads(),
    }
    curves = {r["method"]: r.pop("val_curves") for r in rows}
    files.write_json(out / "finetune.json", {"meta": meta, "rows": rows}, indent=2)
    text = table(rows, base_losses)
    files.write_text(
        out / "finetune.md",
        f"Written by `{meta['command']}`\n\n"
        + "\n".join(notes)
        + "\n\n"
        + text
        + "\n\n"
        + verdict(rows)
        + "\n\n"
        + advice(rows, base_losses["old"], meta)
        + "\n",
    )
    plot_loss_and_time(
        curves,
        {r["method"]: r.get("step_ms") for r in rows},
        out / "finetune.png",
        title=f"fine-tuning {what} on {new_name} ({regime(meta)})",
    )
    if not args.keep_runs:
        import shutil

        shutil.rmtree(runs, ignore_errors=True)
    print(text)
    print(f"wrote {out / 'finetune.md'}, {out / 'finetune.json'}, {out / 'finetune.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
