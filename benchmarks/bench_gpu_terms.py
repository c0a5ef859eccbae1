"""What a GPU holds during a training step that fake CPU tensors do not show: the terms the memory planner
(issue 26) must model, measured one by one on the device.

    python benchmarks/bench_gpu_terms.py --out DIR

Run it first in a fresh process: the cuBLAS workspace is allocated at a handle's first product, so a process
that already multiplied shows none. Rows (bench "gpu_terms"):
- cublas_workspace: bytes the caching allocator gains at the first bf16 product (forward) and at the first
  backward, which autograd runs on its own thread and may give a handle and workspace of its own;
- allocator_rounding: bytes allocated for a request of n bytes (the caching allocator rounds up);
- sdpa: the kernel SDPA picks for LLaMA-3-8B attention in bf16 (causal, 32 heads, 8 kv heads, head dim 128)
  and the bytes it saves for backward beyond its inputs, with grouped heads passed as they are and repeated;
- misa_step_scratch: what a MISA step with our kernels allocates beyond what it began with (chunk tables,
  norm buffers), on the built-in model "base".
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def cublas_workspace(device: torch.device) -> dict:
    a = torch.randn(1024, 1024, device=device, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(1024, 1024, device=device, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = a @ b
    torch.cuda.synchronize()
    forward = torch.cuda.memory_allocated() - before - out.untyped_storage().nbytes()
    before = torch.cuda.memory_allocated()
    out.sum().backward()
    torch.cuda.synchronize()
    backward = torch.cuda.memory_allocated() - before - a.grad.untyped_storage().nbytes()
    return {"bench": "gpu_terms", "term": "cublas_workspace", "forward_bytes": forward, "backward_bytes": backward}


def allocator_rounding(device: torch.device) -> list:
    rows = []
    for n in (1, 512, 513, 4096 + 1, (1 << 20) - 1, (1 << 20) + 1, (10 << 20) + 1, (64 << 20) + 1):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        x = torch.empty(n, dtype=torch.uint8, device=device)
        rows.append(
            {
                "bench": "gpu_terms",
                "term": "allocator_rounding",
                "request_bytes": n,
                "allocated_bytes": torch.cuda.memory_allocated() - before,
            }
        )
        del x
    return rows


def _saved_bytes(fn, inputs) -> tuple:
    """Bytes of the storages autograd saves inside fn, beyond the inputs' own, and fn's backward node's name."""
    known = {t.untyped_storage().data_ptr() for t in inputs}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in known:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(saved.values()), type(out.grad_fn).__name__, out.untyped_storage().nbytes()


def sdpa(device: torch.device) -> list:
    rows = []
    for seq in (512, 2048):
        q = torch.randn(1, 32, seq, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, 8, seq, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(1, 8, seq, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
        cases = {
            "gqa": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
            "repeated_kv": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(
                q, k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1), is_causal=True
            ),
        }
        for name, fn in cases.items():
            try:
                saved, node, out_bytes = _saved_bytes(fn, (q, k, v))
                rows.append(
                    {
                        "bench": "gpu_terms",
                        "term": "sdpa",
                        "case": name,
                        "seq_len": seq,
                        "kernel": node,
                        "saved_beyond_inputs_bytes": saved,
                        "output_bytes": out_bytes,
                    }
                )
            except Exception as e:  # a case this torch refuses is a finding too
                rows.append(
                    {
                        "bench": "gpu_terms",
                        "term": "sdpa",
                        "case": name,
                        "seq_len": seq,
                        "error": f"{type(e).__name__}: {e}"[:300],
                    }
                )
    return rows


def misa_step_scratch(device: torch.device) -> list:
    import misa
    from misa.jobs.model import SIZES, LlamaForCausalLM

    rows = []
    for backend in ("cuda", "triton"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(SIZES["base"]).to(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                opt = misa.MISA(model, lr=1e-4, delta=0.1, interval=1000, backend=backend)
            except Exception as e:
                rows.append(
                    {
                        "bench": "gpu_terms",
                        "term": "misa_step_scratch",
                        "backend": backend,
                        "error": f"{type(e).__name__}: {e}"[:300],
                    }
                )
                continue
        batch = torch.randint(0, 256, (4, 129), device=device)
        scratch = []
        for _ in range(3):
            model.loss(batch).backward()
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            opt.step()
            torch.cuda.synchronize()
            scratch.append(torch.cuda.max_memory_allocated() - before)
            opt.zero_grad(set_to_none=True)
        rows.append(
            {
                "bench": "gpu_terms",
                "term": "misa_step_scratch",
                "backend": backend,
                "scratch_bytes_per_step": scratch,
                "trainable_elements": sum(p.numel() for p in model.parameters() if p.requires_grad),
            }
        )
        del model, opt
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu_terms.py measures a CUDA device: none is visible")
    device = torch.device("cuda")
    rows = [cublas_workspace(device)]  # first: the workspace appears at the process's first product
    rows += allocator_rounding(device) + sdpa(device) + misa_step_scratch(device)
    for r in rows:
        print(r)
    common.save(device, args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
