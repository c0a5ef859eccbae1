"""A digest of what MISA's step computes, to check that a change to the host path left it unchanged to the bit.

A bf16 two-layer model is stepped 14 times by MISA (interval 3: several switches; a NaN gradient at step 7: a
skipped step; optionally clipped before every step) on the Triton interpreter (the planned path of the fused
backends) and on the torch backend (the grouped path). The digest hashes the parameters' bytes, the
importance, the skip count and the switch log. Run it against another tree with that tree first on the path
(a worktree of an older commit), from outside the repository:

    git worktree add /tmp/old <commit>
    cd /tmp && PYTHONPATH=/tmp/old python <repo>/benchmarks/step_digest.py --tree /tmp/old
    cd /tmp && PYTHONPATH=<repo> python <repo>/benchmarks/step_digest.py --tree <repo>
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import warnings


def digest(tree: str, clip: bool) -> dict:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("MISA_CHUNK", "1024")
    sys.path[:0] = [tree, os.path.join(tree, "tests")]
    import torch
    from test_misa_optimizer import synthetic_grads

    import misa

    from models import tiny_lm

    out = {"misa": misa.__file__}
    for backend in ("triton", "torch"):
        model = tiny_lm(seed=4, d=8, ff=8, layers=2).to(torch.bfloat16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            opt = misa.MISA(model, lr=1e-2, delta=0.4, interval=3, backend=backend, seed=2)
        gen = torch.Generator().manual_seed(0)
        warnings.filterwarnings("ignore", message="MISA: 1 of the last", category=RuntimeWarning)  # the NaN step
        for step in range(14):
            synthetic_grads(model, gen)
            if step == 7:
                next(p for p in model.parameters() if p.grad is not None).grad[0] = float("nan")
            if clip:
                opt.clip_grad_norm_(0.5)
            opt.step()
            opt.zero_grad()
        h = hashlib.sha256()
        for p in model.parameters():
            h.update(p.detach().float().numpy().tobytes())
        h.update(opt.importance.numpy().tobytes())
        h.update(repr((opt.skipped_steps, [s["active_modules"] for s in opt.switch_log])).encode())
        out[backend] = h.hexdigest()[:16]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", required=True, help="the repository tree whose misa, misa_kernels and tests run")
    p.add_argument("--no-clip", dest="clip", action="store_false", help="no clip_grad_norm_ before the steps")
    args = p.parse_args(argv)
    result = digest(os.path.abspath(args.tree), args.clip)
    print(result)
    return result


if __name__ == "__main__":
    main()
