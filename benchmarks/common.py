"""Shared by the benchmark scripts: environment facts, timing, copy bandwidth, the results file.

Timing (METHOD.md): warm-up, then each run timed on its own with CUDA events (perf_counter on the
CPU), reported as p20/p50/p80 in milliseconds. Callers rotate input buffers so that one set of
inputs never sits in L2 between runs.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from misa.jobs import provenance

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def environment(device: torch.device) -> Dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    from misa_kernels import cuda as cuda_backend

    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cuda_backend": cuda_backend.load_error() or "ready",
        "commit": provenance.commit(),
        "date": time.strftime("%Y-%m-%d"),
        "time": time.strftime("%H:%M:%S"),
        "python": platform.python_version(),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantiles(times: List[float]) -> Dict[str, float]:
    if not times:
        return {"ms_p20": float("nan"), "ms_p50": float("nan"), "ms_p80": float("nan")}
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    return {"ms_p20": float(q[0]), "ms_p50": float(q[1]), "ms_p80": float(q[2])}


def time_ms(fn: Callable[[int], None], device: torch.device, reps: int, warmup: int) -> Dict[str, float]:
    """Runs fn(i) warmup + reps times; returns p20/p50/p80 of the timed runs in milliseconds."""
    return quantiles(time_each_ms(fn, device, reps, warmup))


def time_each_ms(fn: Callable[[int], None], device: torch.device, reps: int, warmup: int) -> List[float]:
    """Runs fn(i) warmup + reps times; returns the time of each timed run in milliseconds."""
    for i in range(warmup):
        fn(i)
    synchronize(device)
    times: List[float] = []
    with gc_off():
        for i in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(warmup + i)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn(warmup + i)
                times.append((time.perf_counter() - t0) * 1e3)
    return times


@contextlib.contextmanager
def gc_off():
    """The garbage collector off for a timed region (collected just before): a collection inside a timed
    run is the interpreter's time, not the op's; timeit does the same."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def copy_bandwidth_gbps(device: torch.device, numel: int, reps: int = 20) -> float:
    """Device-to-device copy bandwidth, counting the read and the write."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    t = time_ms(lambda i: dst.copy_(src), device, reps=reps, warmup=3)
    return 2 * numel * 4 / (t["ms_p50"] * 1e-3) / 1e9


def results_path(device: torch.device, out: Optional[str]) -> Path:
    folder = Path(out) if out else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in device_name(device).lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return folder / f"{slug}-{time.strftime('%Y-%m-%d')}.json"


def write_rows(path: Path, env: Dict, rows: List[Dict], extra: Optional[Dict] = None) -> None:
    """Merge rows into the results file (one file per device and day, all benchmarks together)."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(env)
    data.update(extra or {})
    benches = {r["bench"] for r in rows}
    data["rows"] = [r for r in data.get("rows", []) if r["bench"] not in benches] + rows
    path.write_text(json.dumps(data, indent=1))


def save(device: torch.device, out: Optional[str], rows: List[Dict], extra: Optional[Dict] = None) -> Path:
    """Write rows (with the environment) to the day's results file for this device; returns its path."""
    path = results_path(device, out)
    write_rows(path, environment(device), rows, extra)
    print(f"wrote {path}")
    return path


def pick_device(name: Optional[str]) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
