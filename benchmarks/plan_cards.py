"""What fits on a 24 GB card (an RTX 4090, the paper's): the memory planner (`python -m misa.plan`) over
LLaMA-3-8B and LLaMA-3.2-1B, sequences 512 to 4096, with and without activation checkpointing, for MISA in its
three compact-to-default state formats at the largest delta that fits, LoRA r=16 and full AdamW. Every figure
is a planned training step (misa/jobs/plan.py), nothing is arithmetic; `tests/test_plan.py` checks the planner
against every 8B peak measured on a GPU.

    python benchmarks/plan_cards.py            # writes benchmarks/results/plan-24gib/<model>[-ckpt]/plan.json
    python benchmarks/plan_cards.py --formats  # the README's state formats: benchmarks/results/plan-8b-formats/
    python benchmarks/plan_cards.py --fsdp     # 8B at seq 4096 over 1-8 FSDP2 ranks: benchmarks/results/plan-8b-fsdp/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from misa.jobs import plan  # noqa: E402

MODELS = ("llama3-8b", "llama3.2-1b")
SEQS = "512,1024,2048,4096"
# MISA at delta=3% (the paper's 8B setting) in the default, the Kahan 8-bit and the smallest format; the budget
# search then finds each one's largest delta that fits
METHODS = ",".join(
    [
        "misa+delta=0.03",
        "misa+delta=0.03+states=8bit+masters=kahan",
        "misa+delta=0.03+states=8bit+rounding=stochastic+release_grads=true+check_finite=false",
        "lora",
        "adamw",
    ]
)


# every state format (README "State formats"), with release_grads where it changes the peak, beside LoRA r=16
FORMATS = ",".join(
    [
        "misa+delta=0.03",
        "misa+delta=0.03+masters=kahan",
        "misa+delta=0.03+rounding=stochastic",
        "misa+delta=0.03+states=8bit",
        "misa+delta=0.03+states=8bit+masters=kahan",
        "misa+delta=0.03+states=8bit+rounding=stochastic",
        "misa+delta=0.03+states=8bit+masters=kahan+release_grads=true+check_finite=false",
        "misa+delta=0.03+states=8bit+rounding=stochastic+release_grads=true+check_finite=false",
        "lora",
    ]
)


# how many 24 GB cards an 8B model needs at seq 4096: one rank's peak under FSDP2 over each number of ranks
FSDP_RANKS = (1, 2, 4, 8)
FSDP_METHODS = ",".join(["misa+delta=0.03", "misa+delta=0.03+states=8bit+masters=kahan", "lora", "adamw"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--seq", default=SEQS)
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--budget", default="24GiB")
    p.add_argument("--out", default=None, help="default: benchmarks/results/plan-24gib (plan-8b-formats)")
    p.add_argument(
        "--formats",
        action="store_true",
        help="plan every state format at 8B, seq 512 and 2048, with checkpointing, instead",
    )
    p.add_argument("--jobs", default=None, help="misa.plan's --jobs (default: the CPUs available)")
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="plan 8B at seq 4096 over 1, 2, 4 and 8 FSDP2 ranks, with and without checkpointing, instead",
    )
    args = p.parse_args(argv)
    jobs = ["--jobs", args.jobs] if args.jobs else []
    results = ROOT / "benchmarks" / "results"
    if args.formats:
        return plan.main(
            [
                "--model",
                "llama3-8b",
                "--dtype",
                "bf16",
                "--batch",
                "1",
                "--seq",
                "512,2048",
                "--methods",
                FORMATS,
                "--lora-r",
                "16",
                "--checkpointing",
                *jobs,
                "--out",
                args.out or str(results / "plan-8b-formats"),
            ]
        )
    if args.fsdp:
        for ranks in FSDP_RANKS:
            for ckpt in (False, True):
                out = Path(args.out or results / "plan-8b-fsdp") / f"ranks{ranks}{'-ckpt' if ckpt else ''}"
                print(f"== {ranks} rank(s) {'with' if ckpt else 'without'} checkpointing", flush=True)
                rc = plan.main(
                    [
                        "--model",
                        "llama3-8b",
                        "--dtype",
                        "bf16",
                        "--batch",
                        "1",
                        "--seq",
                        "4096",
                        "--methods",
                        FSDP_METHODS,
                        "--lora-r",
                        "16",
                        "--fsdp",
                        str(ranks),
                        "--out",
                        str(out),
                        *jobs,
                    ]
                    + (["--checkpointing"] if ckpt else [])
                )
                if rc:
                    return rc
        return 0
    args.out = args.out or str(results / "plan-24gib")
    for model in args.models.split(","):
        for ckpt in (False, True):
            out = Path(args.out) / f"{model}{'-ckpt' if ckpt else ''}"
            argv_plan = [
                "--model",
                model,
                "--dtype",
                "bf16",
                "--batch",
                "1",
                "--seq",
                args.seq,
                "--methods",
                args.methods,
                "--lora-r",
                "16",
                "--budget",
                args.budget,
                "--out",
                str(out),
                *jobs,
            ]
            if ckpt:
                argv_plan.append("--checkpointing")
            print(f"== {model} {'with' if ckpt else 'without'} checkpointing", flush=True)
            rc = plan.main(argv_plan)
            if rc:
                return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
