"""Which code produced a result: recorded in every results file (benchmarks, --compare runs)."""

import os
import subprocess
from pathlib import Path
from typing import Sequence


def commit() -> str:
    """The git commit of this checkout ("-dirty" if tracked files changed), or, outside a checkout (a
    plain pip install), the package version."""
    root = Path(__file__).resolve().parents[2]  # the checkout (misa/jobs/ -> the repository)
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return _version()
    if head.returncode != 0:
        return _version()
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def command(module: str, argv: Sequence[str]) -> str:
    """How to rerun this: `python -m module ...`, with paths relative to the working folder where
    possible (a results file should not carry one machine's absolute paths)."""
    return " ".join(["python", "-m", module, *map(portable, argv)])


def portable(arg: str) -> str:
    """An absolute path made fit for a results file: relative inside the working folder, elsewhere only
    its name (another machine's layout); anything else unchanged."""
    if not os.path.isabs(arg):
        return arg
    path, cwd = Path(arg), Path.cwd()
    return os.path.relpath(path, cwd) if cwd in path.parents else f".../{path.name}"


def _version() -> str:
    try:
        from importlib.metadata import version

        return f"misa-kernels {version('misa-kernels')} (no git checkout)"
    except Exception:
        return "unknown"
