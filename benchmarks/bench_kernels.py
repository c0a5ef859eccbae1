"""Kernel microbenchmarks: adamw_step_ (steady and fresh), grad_sq_norms, momentum_flush_.

Our cuda and triton backends against the pure-torch path, torch.optim.AdamW(fused=True) followed by
torch._foreach_norm (the usual way to get norms), and, where installed, bitsandbytes' 32-bit AdamW and
torchao's AdamW; bf16 rows also time our fp32-master-weight step and our 8-bit states with a Kahan
compensation (fp32 rows: 8-bit states). Every row prints time, the bytes that implementation's own step
moves (its state format: torch's fused AdamW keeps bf16 states for bf16 parameters, ours fp32, or 8-bit
codes with one fp32 scale per 256 elements), GB/s and % of the copy bandwidth measured in the same run,
and is saved to benchmarks/results/<device>-<date>.json with a plot beside it. The same-work comparisons: fp32
parameters against torch's fused AdamW; bf16 parameters with fp32 states against the torch path
(torch's fused AdamW cannot keep fp32 states for bf16 parameters).

    python benchmarks/bench_kernels.py            # on a GPU
    python benchmarks/bench_kernels.py --quick    # seconds, on a CPU: checks the script, claims nothing
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import misa_kernels as mk  # noqa: E402

import common  # noqa: E402

# LLaMA-3-8B: one layer's module shapes (8.03B parameters in all, 218M per layer).
LLAMA3_8B_LAYER = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]
LLAMA3_8B_PARAMS = 8_030_261_248
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
L2_BYTES = 64 * 2**20  # more than any current GPU's L2: rotate buffers until a set exceeds this


def active_set(target_numel: int) -> List[tuple]:
    """Module shapes of consecutive LLaMA-3-8B layers until `target_numel` is reached (the last cut to fit)."""
    shapes, total, i = [], 0, 0
    while total < target_numel:
        rows, cols = LLAMA3_8B_LAYER[i % len(LLAMA3_8B_LAYER)]
        take = min(rows * cols, target_numel - total)
        shapes.append((take,) if take != rows * cols else (rows, cols))
        total += take
        i += 1
    return shapes


def cases(quick: bool) -> List[Dict]:
    if quick:
        return [{"name": "uniform-64K", "shapes": [(16384,)] * 4}, {"name": "many-small", "shapes": [(256,)] * 64}]
    out = [
        {"name": f"uniform-{n >> 20}M", "shapes": [(n // 4,)] * 4}
        for n in (1 << 20, 1 << 22, 1 << 24, 1 << 26, 1 << 28, 1 << 29)
    ]
    for delta in (0.01, 0.03):
        out.append({"name": f"llama3-8b-delta{int(delta * 100)}%", "shapes": active_set(int(delta * LLAMA3_8B_PARAMS))})
    layer = sum(r * c for r, c in LLAMA3_8B_LAYER)
    for frac in (0.25, 1.0):  # 25% and 100% of one layer's modules
        out.append({"name": f"llama3-8b-layer{int(frac * 100)}%", "shapes": active_set(int(frac * layer))})
    out.append({"name": "many-small", "shapes": [(4096,)] * 2048})
    return out


STATE_DTYPE = {
    "cuda": "fp32",
    "triton": "fp32",
    "torch_reference": "fp32",
    "torch_fused_adamw": "param",
    "bnb_adamw32bit": "fp32",
    "torchao_adamw": "param",
}
SEPARATE_NORM_PASS = {"torch_reference", "torch_fused_adamw", "bnb_adamw32bit", "torchao_adamw"}
PSIZE = {"bf16": 2, "fp32": 4}


def adamw_bytes_per_element(
    impl: str, param_dtype: str, fresh: bool, master: bool = False, states: str = "fp32", kahan: bool = False
) -> float:
    """The bytes each implementation's own step must move per element (its floor): every
    implementation is counted with the state dtype it keeps and the passes it makes.

    ours: p r/w, g r, m and v written (and read unless fresh); with a master: master r/w (on a fresh
    step p is read and the master only written), p written. Peers add their separate norm pass (a
    read of g); torch's fused AdamW keeps states in the parameter dtype, and a fresh step for it means
    just-created states, which it zero-fills before reading them."""
    psize = PSIZE[param_dtype]
    if states == "8bit":  # ours only: codes (1 B each) and block scales (4 B per 256) of m and v
        ssize = 1 + 4 / 256
    else:
        ssize = psize if STATE_DTYPE[impl] == "param" else 4
    if master:
        param = (psize + 4 + psize) if fresh else (8 + psize)
    elif kahan:  # p r/w and the bf16 compensation r/w (written only on a fresh step)
        param = 2 * psize + (2 if fresh else 4)
    else:
        param = 2 * psize
    states = 2 * ssize * (1 if fresh and impl in ("cuda", "triton", "torch_reference") else 2)
    if fresh and impl not in ("cuda", "triton", "torch_reference"):
        states += 2 * ssize  # zero-filling the new states
    return param + psize + states + (psize if impl in SEPARATE_NORM_PASS else 0)


def row_bytes(row: Dict) -> int:
    """Bytes of a saved kernel row, recomputed from what it ran (results files keep older counts)."""
    if row["bench"] == "adamw_step":
        return row["numel"] * adamw_bytes_per_element(
            row["impl"],
            row["param_dtype"],
            row["fresh"],
            row.get("master", False),
            row.get("states", "fp32"),
            row.get("kahan", False),
        )
    if row["bench"] == "grad_sq_norms":
        return row["numel"] * PSIZE[row["param_dtype"]]
    if row["bench"] == "momentum_flush":
        psize = PSIZE[row["param_dtype"]]
        return row["numel"] * ((8 + psize) if row.get("master") else 2 * psize) + row["numel"] * 8
    return row["bytes"]


def make_sets(shapes, dtype, device, n_sets):
    sets = []
    for s in range(n_sets):
        g = torch.Generator(device=device).manual_seed(s)
        params = [torch.randn(sh, generator=g, device=device).to(dtype) for sh in shapes]
        grads = [torch.randn(sh, generator=g, device=device).to(dtype) for sh in shapes]
        m = [torch.randn(sh, generator=g, device=device) * 0.01 for sh in shapes]
        v = [torch.rand(sh, generator=g, device=device) * 1e-4 for sh in shapes]
        sets.append((params, grads, m, v))
    return sets


def impls(device: torch.device, quick: bool) -> List[str]:
    names = [b for b in ("cuda", "triton") if b in mk.available_backends(device)] if device.type == "cuda" else []
    names += ["torch_reference", "torch_fused_adamw"]
    if device.type == "cuda" and not quick:
        try:
            import bitsandbytes  # noqa: F401

            names.append("bnb_adamw32bit")
        except Exception:
            pass
        try:
            import torchao.optim  # noqa: F401

            names.append("torchao_adamw")
        except Exception:
            pass
    return names


def _eight_bit(sets):
    """The sets' fp32 states as 8-bit codes and block scales (quant.py), per set: (codes m, codes v, scales m,
    scales v)."""
    from misa_kernels import quant

    out = []
    for _, _, m, v in sets:
        qs, qu = quant.maps(m[0].device)
        cm, am = zip(*(quant.quantize(t, qs) for t in m))
        cv, av = zip(*(quant.quantize(t, qu) for t in v))
        out.append((list(cm), list(cv), list(am), list(av)))
    return out


def adamw_runner(impl: str, sets, fresh: bool, master: bool = False, states: str = "fp32", kahan: bool = False):
    """Returns fn(i) doing one step (with squared grad norms) on buffer set i % len(sets)."""
    hyper = dict(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    if impl in ("cuda", "triton", "torch_reference"):
        backend = "torch" if impl == "torch_reference" else impl
        masters = [[t.float() for t in s[0]] for s in sets] if master else None
        comps = [[torch.zeros_like(t, dtype=torch.bfloat16) for t in s[0]] for s in sets] if kahan else None
        eight = _eight_bit(sets) if states == "8bit" else None

        def run(i):
            p, g, m, v = sets[i % len(sets)]
            extra = {}
            if eight is not None:
                m, v, am, av = eight[i % len(sets)]
                extra = dict(exp_avg_absmax=am, exp_avg_sq_absmax=av)
            norms = torch.zeros(len(p), device=p[0].device)
            mk.adamw_step_(
                p,
                g,
                m,
                v,
                **hyper,
                step=1 if fresh else 10,
                fresh=fresh,
                grad_sq_norms=norms,
                master_params=masters[i % len(sets)] if master else None,
                compensation=comps[i % len(sets)] if kahan else None,
                backend=backend,
                **extra,
            )

        return run
    # Peers: torch.optim-style optimizers over the same tensors, norms by torch._foreach_norm. A fresh
    # step for them means states that were just allocated (their first step zero-fills them).
    optimizers = []
    for p, g, _, _ in sets:
        params = [torch.nn.Parameter(t) for t in p]
        for q, gg in zip(params, g):
            q.grad = gg
        if impl == "torch_fused_adamw":
            # torch's fused AdamW keeps states in the parameter dtype: bf16 states for bf16 params.
            opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)
        elif impl == "bnb_adamw32bit":
            import bitsandbytes as bnb

            opt = bnb.optim.AdamW32bit(params, lr=1e-4, weight_decay=0.01)
        else:
            import torchao.optim

            opt = torchao.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
        opt.step()  # create the states outside the timed region
        optimizers.append((opt, [q.grad for q in params]))

    def run(i):
        opt, grads = optimizers[i % len(optimizers)]
        if fresh:
            opt.state.clear()
        torch._foreach_norm(grads)
        opt.step()

    return run


def variants_of(impls_here: List[str], dname: str) -> List[tuple]:
    """(impl, fp32 master, state format, Kahan compensation) of every adamw row for one parameter dtype."""
    variants = [(impl, False, "fp32", False) for impl in impls_here]
    ours = [impl for impl in impls_here if impl in ("cuda", "triton", "torch_reference")]
    if dname == "bf16":  # master weights: ours only (torch's fused AdamW has none)
        variants += [(impl, True, "fp32", False) for impl in ours]
        variants += [(impl, False, "8bit", True) for impl in ours]  # the compact format: 4.03 B held
    else:
        variants += [(impl, False, "8bit", False) for impl in ours]
    return variants


def warm_up(device: torch.device, impls_here: List[str], dnames: List[str]) -> None:
    """Every kernel specialization the rows will time, run once on a small case first: Triton compiles and
    tunes on a mode's first call (seconds, allocating and freeing gigabytes of scratch), and the first timed
    row used to absorb what followed (the H200 run's first Triton row, bf16 at 1M elements, took 0.326 ms at
    the median with p20 0.216 and p80 0.505, where every row around it spread by 15%)."""
    for dname in dnames:
        sets = make_sets([(1 << 16,)] * 4, DTYPES[dname], device, 1)
        for impl, master, states, kahan in variants_of(impls_here, dname):
            for fresh in (False, True):
                try:
                    adamw_runner(impl, sets, fresh, master, states, kahan)(0)
                except Exception:  # a peer that cannot take this case: its row says so later
                    pass
        for backend in [b for b in ("cuda", "triton") if b in impls_here]:
            mk.grad_sq_norms(sets[0][1], backend=backend)
            mk.momentum_flush_(sets[0][0], sets[0][2], sets[0][3], lr=1e-4, step=50, backend=backend)
        del sets
    common.synchronize(device)


def bench(args) -> Path:
    device = common.pick_device(args.device)
    bw = common.copy_bandwidth_gbps(device, (1 << 16) if args.quick else (1 << 28))
    dnames = ["fp32"] if args.quick else ["bf16", "fp32"]
    warm_up(device, impls(device, args.quick), dnames)
    rows: List[Dict] = []
    deadline = time.monotonic() + args.budget_s
    for case in cases(args.quick):
        numel = sum(torch.Size(s).numel() for s in case["shapes"])
        for dname in dnames:
            dtype = DTYPES[dname]
            psize = torch.tensor([], dtype=dtype).element_size()
            set_bytes = numel * (2 * psize + 8)
            n_sets = max(1, min(4, -(-L2_BYTES // set_bytes)))
            if device.type == "cuda" and set_bytes * n_sets * 2.5 > torch.cuda.mem_get_info(device)[0]:
                print(f"skip {case['name']} {dname}: does not fit in memory")
                continue
            sets = make_sets(case["shapes"], dtype, device, n_sets)
            for impl, master, states, kahan in variants_of(impls(device, args.quick), dname):
                for fresh in (False, True):
                    if time.monotonic() > deadline:
                        print("time budget reached: remaining rows skipped")
                        break
                    try:
                        t = common.time_ms(
                            adamw_runner(impl, sets, fresh, master, states, kahan), device, args.reps, args.warmup
                        )
                    except Exception as exc:  # a peer that cannot take this case (e.g. dtype)
                        print(f"{impl} {case['name']} {dname}: {type(exc).__name__}: {exc}")
                        continue
                    nbytes = numel * adamw_bytes_per_element(impl, dname, fresh, master, states, kahan)
                    r = row("adamw_step", impl, dname, case, numel, fresh, t, nbytes, bw)
                    state_dtype = "8bit" if states == "8bit" else dname if STATE_DTYPE[impl] == "param" else "fp32"
                    r.update(master=master, states=states, kahan=kahan, state_dtype=state_dtype)
                    rows.append(r)
            for impl in [b for b in ("cuda", "triton") if b in impls(device, args.quick)] + [
                "torch_reference",
                "torch_foreach_norm",
            ]:
                grads = [s[1] for s in sets]
                if impl == "torch_foreach_norm":
                    fn = lambda i, grads=grads: torch._foreach_norm(grads[i % len(grads)])
                else:
                    backend = "torch" if impl == "torch_reference" else impl
                    fn = lambda i, b=backend, grads=grads: mk.grad_sq_norms(grads[i % len(grads)], backend=b)
                t = common.time_ms(fn, device, args.reps, args.warmup)
                rows.append(row("grad_sq_norms", impl, dname, case, numel, False, t, numel * psize, bw))
            for impl in [b for b in ("cuda", "triton") if b in impls(device, args.quick)] + ["torch_reference"]:
                backend = "torch" if impl == "torch_reference" else impl

                def fn(i, b=backend, sets=sets):
                    p, _, m, v = sets[i % len(sets)]
                    mk.momentum_flush_(p, m, v, lr=1e-4, step=50, backend=b)

                t = common.time_ms(fn, device, args.reps, args.warmup)
                rows.append(row("momentum_flush", impl, dname, case, numel, False, t, numel * (2 * psize + 8), bw))
            del sets
            if device.type == "cuda":
                torch.cuda.empty_cache()
    path = common.save(
        device, args.out, rows, {"copy_bandwidth_gbps": bw, "quick": args.quick, "triton_configs": triton_configs()}
    )
    for r in rows:
        value = "+w" if r.get("master") else "+k" if r.get("kahan") else "  "
        fmt = " 8b" if r.get("states") == "8bit" else "   "
        print(
            f"{r['bench']:15s} {r['impl']:18s} {r['param_dtype']:4s}{value}{fmt} "
            f"{r['case']:22s} fresh={r['fresh']!s:5s} "
            f"{r['ms_p50']:9.3f} ms  {r['gbps']:8.1f} GB/s  {r['pct_copy_bw']:5.1f}% of copy"
        )
    plot(rows, path.with_suffix(".kernels.png"), common.device_name(device))
    print(f"copy bandwidth {bw:.1f} GB/s")
    return path


def triton_configs() -> Dict[str, object]:
    """The Triton launch configs this run used (tuned per kernel, dtype and masters; triton/tune.py), with
    the candidates' timings where this process tuned them, so that every Triton row says what ran."""
    try:
        from misa_kernels.triton import tune
    except Exception:  # no triton here
        return {}
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    saved, how = tune.saved_timings(name), tune.saved_timings(name, part=3)
    out = {}
    for (kernel, _, dtype, master), config in tune.chosen().items():
        kind = (str(dtype).replace("torch.", ""), master)
        out[f"{kernel}|{kind[0]}|master={master}"] = {
            "config": list(config),
            "timings_ms": saved.get(kernel, {}).get(kind),
            "decision": how.get(kernel, {}).get(kind),
        }
    return out


def row(bench_name, impl, dname, case, numel, fresh, t, nbytes, bw) -> Dict:
    gbps = nbytes / (t["ms_p50"] * 1e-3) / 1e9
    return {
        "bench": bench_name,
        "impl": impl,
        "param_dtype": dname,
        "case": case["name"],
        "numel": numel,
        "n_tensors": len(case["shapes"]),
        "fresh": fresh,
        **t,
        "bytes": nbytes,
        "gbps": gbps,
        "pct_copy_bw": 100 * gbps / bw,
    }


def plot(rows, path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r["bench"] == "adamw_step" and r["case"].startswith("uniform") and not r["fresh"]]
    if not sel:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    # One line per (implementation, dtype, masters): bf16 with fp32 masters moves 28 B/elem, plain bf16 22 B,
    # so drawing both on one line zigzags between two different kernels.
    # A colour per implementation, a line style per parameter format.
    impls_seen = sorted({r["impl"] for r in sel})
    colours = {impl: f"C{i}" for i, impl in enumerate(impls_seen)}

    def kind(r):
        return r["impl"], r["param_dtype"], bool(r.get("master")), r.get("states", "fp32")

    for impl, dname, master, states in sorted({kind(r) for r in sel}):
        pts = sorted(
            (r["numel"], r["ms_p50"], r["pct_copy_bw"]) for r in sel if kind(r) == (impl, dname, master, states)
        )
        label = (
            f"{impl} {dname}"
            + (" + fp32 master" if master else "")
            + (" 8-bit" + (" + Kahan" if dname == "bf16" else "") if states == "8bit" else "")
        )
        style = dict(
            color=colours[impl],
            linestyle="-." if states == "8bit" else ":" if master else ("-" if dname == "fp32" else "--"),
            marker="x" if states == "8bit" else "s" if master else ("o" if dname == "fp32" else "^"),
        )
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], label=label, **style)
    axes[0].set(xscale="log", yscale="log", xlabel="elements", ylabel="ms (p50)", title="adamw_step (steady)")
    axes[1].set(xscale="log", xlabel="elements", ylabel="% of copy bandwidth", title="achieved bandwidth")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(device)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, fp32, few runs: a CPU smoke run")
    p.add_argument("--device", default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--budget-s", type=float, default=240.0, help="stop adding rows after this many seconds")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument(
        "--replot",
        default=None,
        metavar="JSON",
        help="only redraw the plot of a results file this script wrote (beside it, .kernels.png)",
    )
    args = p.parse_args(argv)
    if args.replot:
        path = Path(args.replot)
        data = json.loads(path.read_text())
        plot(data["rows"], path.with_suffix(".kernels.png"), data["device"])
        return path.with_suffix(".kernels.png")
    args.reps = args.reps or (3 if args.quick else 30)
    args.warmup = args.warmup or (1 if args.quick else 5)
    return bench(args)


if __name__ == "__main__":
    main()
