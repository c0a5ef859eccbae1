"""Predicted training-step peaks of LLaMA-3-8B under MISA δ=3% in every state format, against LoRA r=16.

The prediction starts from peaks measured on a GPU (a log of `MISA default` and `LoRA` rows, as the H200
run's mem8b check wrote them) and replaces what a format changes: the arena, sized by building MISA over
the 8B shape on the meta device (our own arena code, so the bytes per element and the alignment are the
real ones), and the gradients alive at once (every active one, or the largest tensor under release_grads).
`misa.memory.predict_peak` is the formula; `bench_train_step.py` records the same prediction next to each
measured row, so a GPU session checks it.

    python benchmarks/predict_memory.py --measured benchmarks/results/nvidia-h200-2026-11-30.mem8b.log
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train_step  # noqa: E402

import misa  # noqa: E402
from misa import memory, provenance  # noqa: E402

# name -> MISA keyword arguments; the first is the configuration the measured MISA rows ran
CONFIGS = {
    "fp32 states + fp32 master (default)": {},
    "fp32 states + Kahan": {"master_weights": "kahan"},
    "fp32 states + stochastic rounding": {"rounding": "stochastic"},
    "8-bit states + fp32 master": {"states": "8bit"},
    "8-bit states + Kahan": {"states": "8bit", "master_weights": "kahan"},
    "8-bit states + stochastic rounding": {"states": "8bit", "rounding": "stochastic"},
    "8-bit + Kahan + release_grads": {"states": "8bit", "master_weights": "kahan", "release_grads": True,
                                      "check_finite": False},
    "8-bit + stochastic rounding + release_grads": {"states": "8bit", "rounding": "stochastic",
                                                    "release_grads": True, "check_finite": False},
}
LINE = re.compile(r"(?P<model>\S+) bf16 (?P<method>misa|lora)\s+seq\s+(?P<seq>\d+) ckpt (?P<ckpt>True|False)\s*:"
                  r".*peak\s+(?P<peak>[\d.]+) GiB")


def measured_peaks(path: Path) -> Dict[tuple, float]:
    """{(method, seq, checkpointing): peak GiB} from a mem8b log."""
    out = {}
    for line in path.read_text().splitlines():
        m = LINE.search(line)
        if m:
            out[(m["method"], int(m["seq"]), m["ckpt"] == "True")] = float(m["peak"])
    return out


def meta_inputs(shape: str, delta: float) -> Dict[str, tuple]:
    """{config: (PeakInputs, MISA.formats)} of MISA built over `shape` on the meta device."""
    model = bench_train_step.build(shape, 128, torch.device("meta"), torch.bfloat16)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the frozen embedding/norms are the measured runs' choice too
        for name, kwargs in CONFIGS.items():
            opt = misa.MISA(model, lr=1e-5, delta=delta, interval=2, backend="torch", **kwargs)
            out[name] = (memory.peak_inputs(opt), opt.formats)
            del opt  # one live MISA per model
    return out


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--measured", required=True, help="a mem8b log of measured peaks (MISA default and LoRA rows)")
    p.add_argument("--delta", type=float, default=0.03)
    p.add_argument("--out", default="benchmarks/results/memory-8b-prediction.json")
    args = p.parse_args(argv)
    peaks = measured_peaks(Path(args.measured))
    if not peaks:
        p.error(f"--measured: no 'misa'/'lora' peak lines in {args.measured}")
    inputs = meta_inputs("8b", args.delta)
    reference = inputs[next(iter(CONFIGS))][0]
    rows: List[Dict] = []
    for (method, seq, ckpt), peak in sorted(peaks.items()):
        if method != "misa":
            continue
        lora = peaks.get(("lora", seq, ckpt))
        for name, (got, formats) in inputs.items():
            predicted = memory.predict_peak(peak * 2**30, reference, got) / 2**30
            rows.append({"config": name, "formats": formats, "release_grads": CONFIGS[name].get("release_grads", False),
                         "seq_len": seq, "grad_checkpointing": ckpt,
                         "arena_gib": got.arena_bytes / 2**30, "grads_gib": got.grad_bytes / 2**30,
                         "predicted_peak_gib": predicted, "measured_misa_default_gib": peak, "lora_r16_gib": lora,
                         "below_lora": None if lora is None else predicted < lora})
    result = {"what": "predicted LLaMA-3-8B step peaks (batch 1, bf16 weights) under MISA delta="
                      f"{args.delta:g} per state format, from measured peaks",
              "measured_from": provenance.portable(args.measured), "commit": provenance.commit(),
              "torch": torch.__version__, "script": "benchmarks/predict_memory.py", "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for r in rows:
        print(f"seq {r['seq_len']:5d} ckpt {str(r['grad_checkpointing']):5s} {r['config']:45s} arena "
              f"{r['arena_gib']:5.2f} grads {r['grads_gib']:4.2f} -> {r['predicted_peak_gib']:6.2f} GiB "
              f"(LoRA {r['lora_r16_gib']})")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
