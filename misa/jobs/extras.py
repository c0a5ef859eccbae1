"""The packages the jobs need beyond the library's torch and numpy: the `jobs` extra of pyproject.toml. Checked
when a job starts, so that a run does not train for an hour and fail at its plot."""

from __future__ import annotations

import importlib.util
from typing import List

JOB_PACKAGES = ("matplotlib", "tqdm")  # the figures; the progress bar


class ExtraMissing(RuntimeError):
    pass


def missing() -> List[str]:
    out = []
    for name in JOB_PACKAGES:
        try:
            if importlib.util.find_spec(name) is None:
                out.append(name)
        except (ImportError, ValueError):  # a blocked or half-installed package
            out.append(name)
    return out


def require() -> None:
    """Raises ExtraMissing, naming what to install, unless every package of the `jobs` extra is importable."""
    absent = missing()
    if absent:
        raise ExtraMissing(
            f"the jobs need {' and '.join(absent)}, which the library alone does not install: "
            "pip install misa-kernels[jobs]"
        )
