"""Launch configs for the Triton kernels (elements per block step, warps per program), chosen per device.

The kernels are memory-bound; what a config changes is the registers each thread holds (the H100 run
measured 106 per thread for BLOCK=1024 on 4 warps, 25% occupancy) and so how many loads an SM keeps in
flight. The best config depends on the GPU, so the first launch of a kernel on a device times each
candidate on scratch tensors (never the caller's: the kernels update in place) large enough to be
bandwidth-bound, in interleaved rounds, keeps the fastest median (a tie within 2% goes to the default, so
the choice is reproducible), and remembers it with the timings and the margin of the choice in memory
and in a small JSON file keyed by device name, Triton version and the kernels' source. The
choice depends on the kernel, the parameter dtype and whether masters are used, not on the other mode
flags (one tuning per kind of call, about a second once per machine).

MISA_TRITON_CONFIG="BLOCK,num_warps" forces one config; MISA_TRITON_AUTOTUNE=0 keeps the default. No
tuning happens under Triton's interpreter or during CUDA-graph capture.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

Config = Tuple[int, int]  # (BLOCK, num_warps)

DEFAULT: Config = (1024, 8)
CANDIDATES: Tuple[Config, ...] = ((1024, 4), (1024, 8), (2048, 8), (512, 4), (2048, 16))
CONFIG_ENV = "MISA_TRITON_CONFIG"
AUTOTUNE_ENV = "MISA_TRITON_AUTOTUNE"
CACHE_ENV = "MISA_KERNELS_CACHE_DIR"
# 64M scratch elements: the kernels are bandwidth-bound from there (the H200 run: host-bound below ~64M), so a
# timing measures the kernel, not its launch; on 16M (before) the candidates' differences were launch noise.
SCRATCH_TENSORS, SCRATCH_NUMEL = 8, 1 << 23
MIN_SCRATCH_NUMEL = 1 << 20  # per tensor, when memory is short
ROUNDS = 5  # interleaved rounds per candidate; the median is kept
TIE = 0.02  # candidates within 2% of the fastest tie, and a tie goes to the default: a reproducible choice
_chosen: Dict[tuple, Config] = {}

# Makes the scratch operands of one kind of call, and launches the kernel on a table of them.
Launch = Callable[[object, int, int], None]


def _forced() -> Optional[Config]:
    text = os.environ.get(CONFIG_ENV)
    if not text:
        return None
    try:
        block, warps = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{CONFIG_ENV}: expected 'BLOCK,num_warps' (e.g. '1024,8'), got {text!r}") from None
    if block < 16 or block & (block - 1) or warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(
            f"{CONFIG_ENV}: BLOCK must be a power of two >= 16 and num_warps one of 1..32 (powers of two), got {text!r}"
        )
    return block, warps


def _fit(config: Config, chunk: int) -> Config:
    # A chunk's start must be a multiple of the block (the kernels promise it to the compiler).
    return min(config[0], chunk), config[1]


def _cache_file() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "misa_kernels"
    )
    return Path(root) / "triton_configs.json"


def _source_tag() -> str:
    import triton

    from . import kernels

    text = Path(kernels.__file__).read_bytes() + triton.__version__.encode()
    return hashlib.sha1(text).hexdigest()[:12]


def _file_key(key: tuple) -> str:
    kernel, device_name, dtype, master = key
    return f"{_source_tag()}|{device_name}|{kernel}|{dtype}|master={master}"


def _load(key: tuple) -> Optional[Config]:
    try:
        entry = json.loads(_cache_file().read_text()).get(_file_key(key))
        return (int(entry[0]), int(entry[1])) if entry else None
    except (OSError, ValueError, TypeError, IndexError):
        return None


def _save(key: tuple, config: Config, timings: Dict[str, float], info: Optional[Dict] = None) -> None:
    path = _cache_file()
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
        data[_file_key(key)] = [config[0], config[1], timings] + ([info] if info else [])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except (OSError, ValueError):
        pass  # a read-only home only costs a re-tune in the next process


def config(
    kernel: str,
    device: torch.device,
    dtype: torch.dtype,
    chunk: int,
    mode: dict,
    scratch_dtypes: Sequence[torch.dtype] = (),
    launch: Optional[Launch] = None,
) -> Config:
    """(BLOCK, num_warps) for `kernel` on `device`; tunes on first use when `launch` is given.
    `scratch_dtypes` may be a callable returning them (made only when tuning)."""
    forced = _forced()
    if forced is not None:
        return _fit(forced, chunk)
    if device.type != "cuda" or os.environ.get(AUTOTUNE_ENV, "1") == "0" or launch is None:
        return _fit(DEFAULT, chunk)
    fast = (kernel, device.index, dtype, bool(mode.get("MASTER")))
    found = _chosen.get(fast)
    if found is None:
        if torch.cuda.is_current_stream_capturing():
            return _fit(DEFAULT, chunk)
        key = (kernel, torch.cuda.get_device_name(device), str(dtype).replace("torch.", ""), fast[3])
        found = _load(key)
        if found is None:
            found, timings = measure(
                device, scratch_dtypes() if callable(scratch_dtypes) else scratch_dtypes, chunk, launch
            )
            _save(key, found, timings, measured())
        _chosen[fast] = found
    return _fit(found, chunk)


def chosen() -> Dict[tuple, Config]:
    """The configs chosen so far in this process: {(kernel, device index, dtype, master): (BLOCK, warps)}."""
    return dict(_chosen)


def saved_timings(device_name: Optional[str] = None, part: int = 2) -> Dict[str, Dict[tuple, Dict]]:
    """The candidates' timings recorded in the cache file for this source and Triton version (and device,
    if named): {kernel: {(dtype, master): {config: ms}}}; part=3: how each choice was made instead
    (`measured()`: margin, noise, tie, scratch size)."""
    try:
        data = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}
    out: Dict[str, Dict[tuple, Dict[str, float]]] = {}
    for key, entry in data.items():
        parts = key.split("|")
        if (
            len(parts) == 5
            and isinstance(entry, list)
            and len(entry) >= 3
            and parts[0] == _source_tag()
            and (device_name is None or parts[1] == device_name)
        ):
            _, _, kernel, dtype, master = parts
            out.setdefault(kernel, {})[(dtype, master == "master=True")] = entry[part] if len(entry) > part else {}
    return out


_last_measure: Dict = {}


def measured() -> Dict:
    """How the latest `measure` decided: the margin of the fastest candidate over the next (relative), the
    largest spread of one candidate's rounds (relative: the noise the margin is held against), whether a tie
    went to the default, and the scratch size and repetitions it timed."""
    return dict(_last_measure)


def measure(
    device: torch.device,
    dtypes: Sequence[torch.dtype],
    chunk: int,
    launch: Launch,
    candidates: Sequence[Config] = CANDIDATES,
    reps: int = 10,
    rounds: int = ROUNDS,
    timer: Optional[Callable[[Callable[[], None], int], float]] = None,
) -> Tuple[Config, Dict[str, float]]:
    """Times each candidate on bandwidth-bound scratch tensors (one list per dtype in `dtypes`), in `rounds`
    interleaved rounds of `reps` launches, and returns the fastest by median with every median (ms per
    launch). Candidates within TIE of the fastest tie and the default wins a tie, so a rerun on the same
    GPU picks the same config. A candidate that fails to compile or launch is skipped."""
    from .. import tables

    timer = timer or _cuda_time
    gen = torch.Generator(device=device).manual_seed(0)
    numel = SCRATCH_NUMEL
    while True:
        try:
            lists = [
                [torch.rand(numel, generator=gen, device=device).to(dt) for _ in range(SCRATCH_TENSORS)]
                for dt in dtypes
            ]
            break
        except torch.OutOfMemoryError:
            numel //= 2
            if numel < MIN_SCRATCH_NUMEL:
                return DEFAULT, {}
    table = tables.build(lists, chunk)
    samples: Dict[Config, list] = {c: [] for c in candidates if c[0] <= chunk}
    for _ in range(rounds):  # interleaved: a drift of clocks or temperature hits every candidate alike
        for c in list(samples):
            try:
                samples[c].append(timer(lambda b=c[0], w=c[1]: launch(table, b, w), reps))
            except Exception:  # a config this GPU or Triton cannot run is simply not a candidate
                del samples[c]
    medians = {c: statistics.median(v) for c, v in samples.items()}
    if not medians:
        return DEFAULT, {}
    fastest = min(medians.values())
    tied = [c for c, t in medians.items() if t <= fastest * (1 + TIE)]
    best = DEFAULT if DEFAULT in tied else min(tied, key=medians.get)
    ordered = sorted(medians.values())
    _last_measure.clear()
    _last_measure.update(
        margin=ordered[1] / ordered[0] - 1 if len(ordered) > 1 else None,
        noise=max((max(v) - min(v)) / statistics.median(v) for v in samples.values()),
        tie_to_default=best == DEFAULT and medians[DEFAULT] > fastest,
        scratch_elements=numel * SCRATCH_TENSORS,
        rounds=rounds,
        reps=reps,
    )
    return best, {f"{b},{w}": t for (b, w), t in medians.items()}


def _cuda_time(fn: Callable[[], None], reps: int) -> float:
    fn()  # compiles
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps
