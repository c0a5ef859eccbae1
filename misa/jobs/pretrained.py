"""The pretrained base that `python -m misa.finetune` starts from: made once with AdamW on the main job's
corpus and cached on disk under a key of everything that determines its weights (the model config, the
pretraining recipe, a digest of the data and of the code that trains it, torch's version, the device and, on
the CPU, the thread count), or weights the user brings (`--base`), checked against the model before anything
runs."""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, Tuple

import torch

from . import cli, train
from .data import TokenDataset

BASE_FILE = "base.pt"
BASE_VERSION = 1  # bump when the pretraining recipe below changes
UsageError = cli.UsageError


def cache_dir(args) -> Path:
    return Path(args.cache_dir or os.environ.get("MISA_CACHE_DIR") or Path.home() / ".cache" / "misa")


def _code_digest() -> str:
    """A digest of the code that determines the base's weights: the model, the batches, the training loop,
    the optimizer it builds and the recipe below; not the command lines around them, whose edits would
    pretrain again for nothing."""
    from . import data, model

    h = hashlib.sha256(str(BASE_VERSION).encode())
    for part in (
        model,
        data.TokenDataset,
        train.run,
        train.build_model,
        train.build_optimizer,
        train.lr_lambda,
        pretrained_base,
    ):
        h.update(inspect.getsource(part).encode())
    return h.hexdigest()[:16]


def base_key(args, corpus: bytes, device: torch.device) -> Dict:
    """Everything that determines the pretrained base: the same key, the same weights."""
    return {
        "config": train.model_config(args).to_dict(),
        "steps": args.base_steps,
        "lr": args.base_lr,
        "seed": 0,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "warmup_steps": 10,
        "max_grad_norm": 1.0,
        "data": hashlib.sha256(corpus).hexdigest()[:16],
        "code": _code_digest(),
        "torch": ".".join(torch.__version__.split("+")[0].split(".")[:2]),
        "device": device.type,
        # CPU kernels split their sums by thread count, so the same recipe at another count gives other weights
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
    }


def key_digest(key: Dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def pretrained_base(args, old: TokenDataset, corpus: bytes, device: torch.device) -> Tuple[Path, bool]:
    """The cached base for these settings: (its folder, whether it was already there). Made once with
    AdamW on the main job's corpus, written atomically (a folder renamed into place)."""
    key = base_key(args, corpus, device)
    folder = cache_dir(args) / "bases" / key_digest(key)
    if (folder / BASE_FILE).is_file():
        return folder, True
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Two comparisons started together make the base once: the second waits for the first's lock, then finds it.
    locks = folder.parent.parent / "locks"
    locks.mkdir(exist_ok=True)
    with open(locks / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / BASE_FILE).is_file():
            return folder, True
        return _pretrain(args, old, key, folder, device), False


def _pretrain(args, old: TokenDataset, key: Dict, folder: Path, device: torch.device) -> Path:
    work = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    pre = SimpleNamespace(
        **{
            **vars(args),
            "lr": args.base_lr,
            "seed": 0,
            "max_steps": args.base_steps,
            "warmup_steps": 10,
            "max_grad_norm": 1.0,
            "dtype": "fp32",
            "eval_every": args.base_steps,
            "weight_decay": 0.0,
            "model": None,
            "save_every": 0,
            "out": str(work),
            "checkpointing": False,
        }
    )  # the same base whatever the fine-tuning regime
    print(
        f"misa-finetune: pretraining the base once ({args.base_steps} AdamW steps on the main job's corpus); "
        f"cached in {folder}",
        flush=True,
    )
    model = train.build_model(pre, device)
    train.run(pre, "adamw", work, old, device, progress=cli.show_progress(args), model=model)
    torch.save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "key": key}, work / BASE_FILE)
    (work / "base.json").write_text(json.dumps({"key": key, "digest": key_digest(key)}, indent=2))
    for extra in ("checkpoint.pt", "loss.png"):
        (work / extra).unlink(missing_ok=True)
    try:
        os.replace(work, folder)
    except OSError:  # another process cached it meanwhile: theirs is the same weights
        shutil.rmtree(work, ignore_errors=True)
    return folder


def base_weights(path: Path) -> Dict[str, torch.Tensor]:
    """The model weights in a base folder (base.pt of this command, checkpoint.pt of misa.train) or file."""
    candidates = [path] if path.is_file() else [path / BASE_FILE, path / train.CHECKPOINT]
    for f in candidates:
        if f.is_file():
            try:
                saved = torch.load(f, map_location="cpu", weights_only=False)
            except Exception as exc:
                raise UsageError(f"--base: {f} is not a readable checkpoint ({type(exc).__name__})") from None
            if isinstance(saved, dict) and isinstance(saved.get("model"), dict):
                return saved["model"]
            raise UsageError(f"--base: {f} holds no model weights (expected a dict with 'model')")
    raise UsageError(f"--base: {path} holds neither {BASE_FILE} nor {train.CHECKPOINT}")


def check_fits(weights: Dict[str, torch.Tensor], model, where: str) -> None:
    """Refuses weights that do not fit the model, naming the first difference."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    if missing or unexpected:
        raise UsageError(
            f"--base: {where} does not fit this model (missing {missing[:2]}, unexpected "
            f"{unexpected[:2]}); pass the --model-size/--config it was trained with"
        )
    for k, v in own.items():
        if tuple(weights[k].shape) != tuple(v.shape):
            raise UsageError(
                f"--base: {where} does not fit this model ({k} is {list(weights[k].shape)} there, "
                f"{list(v.shape)} here); pass the --model-size/--config it was trained with"
            )
