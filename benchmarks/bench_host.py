"""Host time per op call: what the CPU spends in one `adamw_step_` before the GPU has work, against
torch.optim.AdamW(fused=True) (+ torch._foreach_norm, the norms MISA needs) on the same tensors.

Tensors are tiny (the device work is a few microseconds), so a call's wall time is its host time: the
loop runs without a sync and the time per call is taken over many calls, with one sync at the end. The
8 / 64 / 2048-tensor cases are the issue's (bf16 parameters, fp32 states and masters, norms asked,
steady step: what MISA.step issues).

On a machine without a GPU, `--stub-launch` measures the same Python path with the final launch
replaced by a no-op (the CUDA extension call, the Triton launcher): checks, the validation cache,
backend choice, chunk-table lookup, scalar folding. The rows say so (`launch: "stubbed"`); torch's
fused AdamW there runs its CPU kernel on one-element tensors, its own host path plus a tiny kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import time
import types
import warnings
from pathlib import Path
from typing import Callable, Dict, List

import torch

import misa_kernels as mk
from misa_kernels import backends

try:
    from . import common
except ImportError:
    import common

CASES = (8, 64, 2048)


def _inputs(n: int, numel: int, device, dtype=torch.bfloat16):
    gen = torch.Generator(device="cpu").manual_seed(n)
    p = [torch.randn(numel, generator=gen).to(device=device, dtype=dtype) for _ in range(n)]
    g = [torch.randn(numel, generator=gen).to(device=device, dtype=dtype) for _ in range(n)]
    m = [torch.zeros(numel, device=device) for _ in range(n)]
    v = [torch.zeros(numel, device=device) for _ in range(n)]
    w = [t.float() for t in p]
    return p, g, m, v, w


def per_call_us(fn, device, calls: int, repeats: int = 5) -> float:
    """Median over `repeats` of (wall time of `calls` back-to-back calls) / calls, in microseconds."""
    fn()
    fn()
    common.synchronize(device)
    samples = []
    with common.gc_off():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples.append((time.perf_counter() - t0) / calls * 1e6)
            common.synchronize(device)
    return sorted(samples)[len(samples) // 2]


class _StubbedLaunch:
    """Replaces the last step of each fused backend (the extension call, the Triton launcher) by a no-op,
    so that a CPU measures the Python path a GPU call takes up to its launch."""

    def __enter__(self):
        from misa_kernels import cuda
        from misa_kernels.triton import ops as triton_ops

        noop = lambda *a, **k: None  # noqa: E731
        self.saved = [(cuda, "extension", cuda.extension), (backends, "resolve", backends.resolve)]
        norms = lambda first, *a, **k: torch.zeros(len(first))  # noqa: E731  (older bindings returned the norms)
        cuda.extension = lambda: types.SimpleNamespace(adamw_step_=noop, grad_sq_norms=norms, momentum_flush_=noop)
        for name in (
            "adamw_kernel",
            "flush_kernel",
            "adamw8_kernel",
            "flush8_kernel",
            "reduce_partials_kernel",
            "sq_norm_partials_kernel",
        ):
            self.saved.append((triton_ops, name, getattr(triton_ops, name)))
            setattr(triton_ops, name, _Launcher())
        backends.resolve = lambda requested, device: requested  # the backend asked for, on any device
        return self

    def __exit__(self, *exc):
        for obj, name, value in self.saved:
            setattr(obj, name, value)


class _Launcher:
    def __getitem__(self, grid):
        return lambda *a, **k: None


def bench(args) -> Path:
    device = common.pick_device(args.device)
    stub = args.stub_launch or device.type != "cuda"
    impls = ["cuda", "triton"] if stub else [b for b in ("cuda", "triton") if b in mk.available_backends(device)]
    rows: List[Dict] = []
    numel = 1 if device.type == "cpu" else args.numel
    for n in args.cases:
        calls = max(3, args.calls // n)
        p, g, m, v, w = _inputs(n, numel, device)
        norms = torch.zeros(n, device=device)
        for impl in impls:

            def fn(impl=impl, p=p, g=g, m=m, v=v, w=w, norms=norms):
                mk.adamw_step_(p, g, m, v, lr=1e-5, step=5, grad_sq_norms=norms, master_params=w, backend=impl)

            if stub:
                with _StubbedLaunch():
                    us = per_call_us(fn, device, calls)
            else:
                us = per_call_us(fn, device, calls)
            rows.append(
                dict(
                    bench="host_time",
                    impl=impl,
                    n_tensors=n,
                    numel_each=numel,
                    us_per_call=us,
                    launch="stubbed" if stub else "real",
                    what="adamw_step_ bf16 + fp32 masters + norms",
                )
            )
        params = [torch.nn.Parameter(t.clone()) for t in p]
        for q, gg in zip(params, g):
            q.grad = gg.clone()
        opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
        grads = [q.grad for q in params]
        rows.append(
            dict(
                bench="host_time",
                impl="torch_fused_adamw",
                n_tensors=n,
                numel_each=numel,
                us_per_call=per_call_us(opt.step, device, calls),
                launch="real",
                what="torch.optim.AdamW(fused=True).step, bf16 states",
            )
        )
        rows.append(
            dict(
                bench="host_time",
                impl="torch_fused_adamw+foreach_norm",
                n_tensors=n,
                numel_each=numel,
                us_per_call=per_call_us(
                    lambda opt=opt, grads=grads: (opt.step(), torch._foreach_norm(grads)), device, calls
                ),
                launch="real",
                what="the same + torch._foreach_norm(grads)",
            )
        )
    if args.misa:
        rows += misa_rows(device, stub)
    path = common.save(device, args.out, rows)
    for r in rows:
        print(f"{r['impl']:46s} {r['n_tensors']:5d} tensors  {r['us_per_call']:9.1f} us/call  launch={r['launch']}")
    return path


def interleaved_us(fns: Dict[str, Callable[[], None]], device, calls: int, rounds: int = 9) -> Dict[str, List[float]]:
    """Per-call times of each function over `rounds` rounds, the functions taking turns within a round, so
    that a drift of the machine's speed touches them alike (a comparison of numbers taken minutes apart on a
    shared CPU is noise-bound). Returns each function's per-round microseconds."""
    for fn in fns.values():
        fn()
        fn()
    common.synchronize(device)
    out: Dict[str, List[float]] = {name: [] for name in fns}
    with common.gc_off():
        for _ in range(rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                common.synchronize(device)
                out[name].append((time.perf_counter() - t0) / calls * 1e6)
    return out


def _median(xs: List[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def misa_rows(device, stub: bool) -> List[Dict]:
    """MISA.step's host time on a many-layer model with tiny matrices (so that the device work is
    negligible), bf16 with masters, default configuration, steady steps (no switch in the timed ones).
    Beside it, in the same rounds, the issue's bars on the same tensors: one `adamw_step_` call over the
    active tensors with their states and masters (host step count, norms asked), and
    torch.optim.AdamW(fused=True).step() on the active parameters (bf16 states: not the same work, the
    same call count). `overhead_us` is the median over rounds of MISA.step minus that adamw_step_."""
    from misa.jobs.model import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=32, num_heads=2)
    model = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16)
    out = []
    for backend in ["cuda", "triton"] if stub else mk.available_backends(device):
        with _StubbedLaunch() if stub else contextlib.nullcontext():
            opt = _steady_misa(model, backend)
            switches = len(opt.switch_log)
            fns = {f"MISA.step[{backend}]": opt.step}
            active = [p for p in model.parameters() if p.requires_grad]
            if opt._plan is not None or backend == "torch":
                fns.update(_same_tensors(opt, active, backend, device))
            times = interleaved_us(fns, device, calls=100)
            assert len(opt.switch_log) == switches, "a timed step switched the active set"
        misa_us = times[f"MISA.step[{backend}]"]
        bar = times.get(f"adamw_step_[{backend}] same tensors")
        what = {
            f"MISA.step[{backend}]": "MISA.step, steady, default configuration, 32-layer toy model, bf16 with masters",
            f"adamw_step_[{backend}] same tensors": "one adamw_step_ over MISA's active tensors, their states and "
            "masters, host step count, norms asked",
            f"adamw_step_[{backend}] same tensors, device step": "the same call with the step count (0-d, float64) "
            "and the skip flag on the device, as MISA "
            "passes them: the step scalars are folded there",
            "torch_fused_adamw same params": "torch.optim.AdamW(fused=True).step on MISA's active parameters "
            "(bf16 states: not the same work)",
        }
        for name, us in times.items():
            row = dict(
                bench="host_time",
                case="misa_step",
                backend=backend,
                impl=name,
                n_tensors=len(active),
                numel_each=None,
                us_per_call=_median(us),
                launch="real" if name.startswith("torch") else ("stubbed" if stub else "real"),
                what=what[name],
                rounds=len(us),
                us_rounds=[round(x, 1) for x in us],
            )
            if name.startswith("MISA") and bar is not None:
                row["overhead_us"] = _median([a - b for a, b in zip(misa_us, bar)])
            out.append(row)
        del opt, fns  # the bound step holds the optimizer: both go before the next one claims the model
        if not stub and backend != "torch":
            out.append(_graphed_row(model, backend, device))
    return out


def _steady_misa(model, backend: str, **kwargs):
    """MISA (default configuration, the norms and embedding frozen by choice) past the schedule's first draws,
    every active tensor with a gradient: the next steps are steady and update all of them."""
    import misa

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt = misa.MISA(model, lr=1e-5, delta=0.3, interval=10**6, backend=backend, always_train=[], **kwargs)
    # The default schedule switches at every step until each module was drawn once: step past that.
    while opt.sampler.never_selected():
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-2 if p.requires_grad else None
        opt.step()
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-2 if p.requires_grad else None
    return opt


def _graphed_row(model, backend: str, device) -> Dict:
    """MISA(cuda_graph=True): the steady step replayed from a recorded CUDA graph (a GPU only)."""
    opt = _steady_misa(model, backend, cuda_graph=True)
    for _ in range(4):  # the fresh step, two warm steps, the recording
        opt.step()
    recordings = opt.graph.recordings
    us = per_call_us(opt.step, device, calls=200)
    assert opt.graph.recordings == recordings, "a timed step recorded a graph again"
    n = sum(1 for p in model.parameters() if p.requires_grad)
    del opt
    return dict(
        bench="host_time",
        case="misa_step",
        backend=backend,
        impl=f"MISA.step[{backend}, cuda_graph]",
        n_tensors=n,
        numel_each=None,
        us_per_call=us,
        launch="real",
        what="MISA(cuda_graph=True).step, steady: one graph replay, 32-layer toy model, bf16 with masters",
    )


def _same_tensors(opt, active, backend: str, device) -> Dict[str, Callable[[], None]]:
    """The issue's bars on MISA's own active tensors: one adamw_step_ call (as a caller who keeps lists
    calls the public op) and torch's fused AdamW step."""
    states = [opt.state[p] for p in active]
    params, grads = list(active), [p.grad for p in active]
    m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
    masters = [s["master"] for s in states] if "master" in states[0] else None
    norms = torch.zeros(len(params), device=device)

    step, skip = torch.full((), 5.0, dtype=torch.float64, device=device), torch.zeros((), device=device)

    def one_call():
        mk.adamw_step_(
            params, grads, m, v, lr=1e-5, step=5, grad_sq_norms=norms, master_params=masters, backend=backend
        )

    def device_step():  # the step count and the skip flag on the device, as MISA hands them over
        mk.adamw_step_(
            params,
            grads,
            m,
            v,
            lr=1e-5,
            step=step,
            grad_sq_norms=norms,
            master_params=masters,
            skip=skip,
            backend=backend,
        )

    twins = [torch.nn.Parameter(p.detach().clone()) for p in active]
    for t, g in zip(twins, grads):
        t.grad = g.clone()
    fused = torch.optim.AdamW(twins, lr=1e-5, fused=True)
    return {
        f"adamw_step_[{backend}] same tensors": one_call,
        f"adamw_step_[{backend}] same tensors, device step": device_step,
        "torch_fused_adamw same params": fused.step,
    }


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--numel", type=int, default=256, help="elements per tensor on a GPU (tiny: host-bound)")
    p.add_argument("--calls", type=int, default=8192, help="calls per timing sample, divided by the tensor count")
    p.add_argument(
        "--cases",
        type=lambda t: [int(x) for x in t.split(",")],
        default=list(CASES),
        help="tensor counts, comma-separated",
    )
    p.add_argument("--stub-launch", action="store_true", help="no-op launches (default on a CPU)")
    p.add_argument("--no-misa", dest="misa", action="store_false", help="skip the MISA.step rows")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    return bench(p.parse_args(argv))


if __name__ == "__main__":
    main()
