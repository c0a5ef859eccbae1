"""Atomic writes: each file is written beside its destination under a name of this process's own and renamed
into place (`os.replace` is atomic on one file system), so a job killed at any instant leaves either the
old file or the new one. A resumed job trusts every file it finds."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Union


def _replace(path: Path, write: Callable[[Path], None]) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: Union[str, Path], text: str) -> None:
    _replace(Path(path), lambda tmp: tmp.write_text(text))


def write_json(path: Union[str, Path], obj, indent=None) -> None:
    write_text(path, json.dumps(obj, indent=indent))


def save_figure(fig, path: Union[str, Path], **kwargs) -> None:
    """matplotlib's savefig, atomically (the format from the destination's suffix)."""
    path = Path(path)
    _replace(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **kwargs))


def torch_save(obj, path: Union[str, Path]) -> None:
    import torch

    _replace(Path(path), lambda tmp: torch.save(obj, tmp))
