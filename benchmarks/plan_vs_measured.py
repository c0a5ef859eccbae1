"""The memory planner's peak beside every 8B peak measured on a GPU: what `tests/test_plan.py` checks (within
1%) on the committed files, and what `gpu_check.sh`'s mem8b stage prints for the rows it has just measured.

    python benchmarks/plan_vs_measured.py                         # the committed measurements
    python benchmarks/plan_vs_measured.py --measured RESULTS.json # a new bench_train_step file
    python benchmarks/plan_vs_measured.py --save-plan P.json      # plan the mem8b stage's rows now (no GPU needed)
    python benchmarks/plan_vs_measured.py --measured RESULTS.json --planned P.json  # and compare them later

gpu_check.sh plans while the GPU stages run (the planner needs only the CPU) and compares after mem8b.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
# bench_train_step's names for what it measured -> the planner's method entries
METHODS = {
    "misa_kernels": "misa+delta=0.03",
    "misa_8bit_kahan": "misa+delta=0.03+states=8bit+masters=kahan",
    "misa_8bit_sr_release": "misa+delta=0.03+states=8bit+rounding=stochastic+release_grads=true+check_finite=false",
    "lora_r16": "lora",
}
Peak = Tuple[str, int, bool, float, str]  # method entry, seq, checkpointing, measured bytes, source


def train_step_peaks(
    path: Path, only_lora_without_checkpointing: bool = False, drop_construction_peak: bool = False
) -> List[Peak]:
    """The 8B bf16 batch-1 rows of a bench_train_step file. drop_construction_peak leaves out the rows whose
    peak is the file's most common 8B peak: in a file that measured the model's construction instead of the
    step, that value is the construction's, not any step's."""
    data = json.loads(path.read_text())
    construction = None
    if drop_construction_peak:
        peaks = [
            r["peak_allocated_gb"]
            for r in data["rows"]
            if r.get("bench") == "train_step" and r.get("model") == "8b" and "peak_allocated_gb" in r
        ]
        construction = Counter(peaks).most_common(1)[0][0] if peaks else None
    out = []
    for r in data["rows"]:
        if (
            r.get("bench") != "train_step"
            or r.get("model") != "8b"
            or r.get("impl") not in METHODS
            or r.get("oom")
            or "peak_allocated_gb" not in r
            or r.get("batch", 1) != 1
        ):
            continue
        if only_lora_without_checkpointing and (r["impl"] != "lora_r16" or r["grad_checkpointing"]):
            continue
        if construction is not None and r["peak_allocated_gb"] == construction:
            continue
        out.append(
            (
                METHODS[r["impl"]],
                r["seq_len"],
                r["grad_checkpointing"],
                r["peak_allocated_gb"] * 2**30,
                f"{path.name} ({data['device']})",
            )
        )
    return out


def committed_peaks() -> List[Peak]:
    """Every usable 8B peak we measured: the H200's train_step rows; the H200's mem8b log for the row no JSON
    has (MISA without checkpointing); the H100's LoRA row without checkpointing (that file's other 8B rows are
    the model construction's peak, a bug fixed since; at seq 512 so is its LoRA row)."""
    out = train_step_peaks(RESULTS / "nvidia-h200-2026-12-04.json")
    log = RESULTS / "nvidia-h200-2026-11-30.mem8b.log"
    for method, seq, ckpt, peak in re.findall(
        r"8B bf16 (\w+)\s+seq\s+(\d+) ckpt (\w+)\s*:.*peak\s+([\d.]+) GiB", log.read_text()
    ):
        if method == "misa" and ckpt == "False":
            out.append(("misa+delta=0.03", int(seq), False, float(peak) * 2**30, log.name))
    out += train_step_peaks(
        RESULTS / "nvidia-h100-80gb-hbm3-2026-11-25.json",
        only_lora_without_checkpointing=True,
        drop_construction_peak=True,
    )
    return out


MEM8B_ROWS = [(entry, seq, True) for entry in METHODS.values() for seq in (512, 2048)]  # gpu_check.sh's mem8b


def planned_peaks(rows) -> Dict[Tuple[str, int, bool], int]:
    """{(method entry, seq, checkpointing): planned bytes} of LLaMA-3-8B bf16 at batch 1."""
    from misa.jobs import plan

    model = plan.load_model("llama3-8b")
    return {
        (entry, seq, ckpt): plan.plan_step(
            model, plan.parse_methods(entry)[0], plan.Setting(seq=seq, batch=1, dtype="bf16", checkpointing=ckpt)
        ).peak_bytes
        for entry, seq, ckpt in rows
    }


def compare(peaks: List[Peak], planned: Optional[Dict] = None) -> List[dict]:
    planned = dict(planned or {})
    missing = [(e, s, c) for e, s, c, _, _ in peaks if (e, s, c) not in planned]
    planned.update(planned_peaks(missing))
    return [
        {
            "method": e,
            "seq": s,
            "checkpointing": c,
            "measured_bytes": m,
            "planned_bytes": planned[(e, s, c)],
            "error": planned[(e, s, c)] / m - 1,
            "source": src,
        }
        for e, s, c, m, src in peaks
    ]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--measured", default=None, help="a bench_train_step results file (default: the committed ones)")
    p.add_argument("--save-plan", default=None, help="plan the mem8b stage's rows into this JSON file, and stop")
    p.add_argument("--planned", default=None, help="planned peaks saved by --save-plan (the rest are planned now)")
    args = p.parse_args(argv)
    if args.save_plan:
        saved = planned_peaks(MEM8B_ROWS)
        Path(args.save_plan).write_text(json.dumps([[e, s, c, b] for (e, s, c), b in saved.items()]))
        print(f"plan_vs_measured: planned {len(saved)} rows into {args.save_plan}")
        return 0
    planned = {}
    if args.planned and Path(args.planned).is_file():
        planned = {(e, s, c): b for e, s, c, b in json.loads(Path(args.planned).read_text())}
    peaks = train_step_peaks(Path(args.measured)) if args.measured else committed_peaks()
    if not peaks:
        print("plan_vs_measured: no 8B bf16 batch-1 rows to compare", file=sys.stderr)
        return 2
    for r in compare(peaks, planned):
        print(
            f"{r['method']:88s} seq {r['seq']:5d} ckpt {r['checkpointing']!s:5s}: measured "
            f"{r['measured_bytes'] / 2**30:6.2f} GiB, planned {r['planned_bytes'] / 2**30:6.2f} GiB "
            f"({r['error']:+.2%})  [{r['source']}]",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
