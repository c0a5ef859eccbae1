"""Render the README's result tables from the JSON files the benchmark scripts wrote (never by hand).

    python benchmarks/render_readme.py                 # rewrite the marked README sections
    python benchmarks/render_readme.py --check-only F  # validate results files against the schema
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
REQUIRED_TOP = ("device", "torch", "commit", "date", "rows")
REQUIRED_KERNEL_ROW = ("bench", "impl", "param_dtype", "numel", "n_tensors", "fresh", "ms_p50", "ms_p20", "ms_p80",
                       "bytes", "gbps", "pct_copy_bw")


def check(path: Path) -> list:
    data = json.loads(path.read_text())
    problems = [f"{path}: missing {k}" for k in REQUIRED_TOP if k not in data]
    for i, row in enumerate(data.get("rows", [])):
        if row.get("bench") in ("adamw_step", "grad_sq_norms", "momentum_flush"):
            problems += [f"{path}: row {i} misses {k}" for k in REQUIRED_KERNEL_ROW if k not in row]
    return problems


def compare_section() -> str:
    files = sorted(RESULTS.glob("compare-*/compare.json"))
    if not files:
        return "_No comparison run is recorded yet._"
    parts = []
    for f in files:
        data = json.loads(f.read_text())
        meta = data["meta"]
        rel = f.parent.relative_to(ROOT)
        lines = [f"**{rel.name}** ({meta['device']}, torch {meta['torch']}, commit {meta.get('commit', '?')[:10]}, "
                 f"{meta['date']}): "
                 f"model {meta['model_size']}, {meta['steps']} steps, delta={meta['delta']}, eta={meta['eta']}, "
                 f"T={meta['interval']}, "
                 f"lr={meta['lr']}, seq {meta['seq_len']} x batch {meta['batch_size']}; written by "
                 f"`{meta['command']}`; plot `{rel}/compare.png`.", "",
                 "| optimizer | seeds | final val loss, mean ± std | min | max | val perplexity |",
                 "|---|---|---|---|---|---|"]
        for r in sorted(data["rows"], key=lambda r: r["val_loss_mean"]):
            lines.append(f"| {r['optimizer']} | {r['seeds']} | {r['val_loss_mean']:.4f} ± {r['val_loss_std']:.4f} | "
                         f"{r['val_loss_min']:.4f} | {r['val_loss_max']:.4f} | {r['val_ppl_mean']:.2f} |")
        lines += ["", verdict(data["rows"])]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def verdict(rows) -> str:
    """Whether MISA beats each baseline here, judged against the spread over seeds (computed, not typed)."""
    by = {r["optimizer"]: r for r in rows}
    if "misa" not in by:
        return ""
    misa = by["misa"]
    out = []
    for name in ("lisa", "badam", "adamw"):
        if name not in by:
            continue
        other = by[name]
        diff = other["val_loss_mean"] - misa["val_loss_mean"]
        spread = max(misa["val_loss_std"], other["val_loss_std"])
        word = "lower" if diff > 0 else "higher"
        judged = "larger than" if abs(diff) > spread else "within"
        out.append(f"MISA's mean final validation loss is {abs(diff):.4f} {word} than {name}'s, {judged} the "
                   f"spread over seeds (largest std {spread:.4f}).")
    return " ".join(out)


def kernels_section() -> str:
    gpu_files = []
    for f in sorted(RESULTS.glob("*.json")):
        data = json.loads(f.read_text())
        if not data.get("quick") and not str(data.get("device", "cpu")).startswith("cpu") and any(
                r.get("bench") == "adamw_step" for r in data.get("rows", [])):
            gpu_files.append((f, data))
    if not gpu_files:
        return ("_No GPU kernel results are recorded yet: run `bash benchmarks/gpu_check.sh` on a GPU and commit "
                "the JSON it writes._")
    f, data = gpu_files[-1]
    lines = [f"`{f.relative_to(ROOT)}`: {data['device']}, torch {data['torch']}, triton {data.get('triton')}, "
             f"commit {data['commit'][:10]}, {data['date']}; "
             f"copy bandwidth {data['copy_bandwidth_gbps']:.0f} GB/s.", "",
             "| case | dtype | fresh | impl | ms (p50) | GB/s | % of copy bw |", "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if r["bench"] == "adamw_step":
            lines.append(f"| {r['case']} | {r['param_dtype']} | {r['fresh']} | {r['impl']} | {r['ms_p50']:.3f} | "
                         f"{r['gbps']:.0f} | {r['pct_copy_bw']:.1f} |")
    return "\n".join(lines)


def ddp_section() -> str:
    found = None
    for f in sorted(RESULTS.glob("*.json")):
        data = json.loads(f.read_text())
        rows = [r for r in data.get("rows", []) if r.get("bench") == "ddp_step"]
        if rows:
            found = (f, data, rows)
    if found is None:
        return "_No DDP measurement is recorded yet: run `python benchmarks/bench_ddp_rebuild.py`._"
    f, data, rows = found
    lines = [f"`{f.relative_to(ROOT)}` ({data['device']}, torch {data['torch']}, commit {data['commit'][:10]}, "
             f"{data['date']}; 2 processes, {rows[0]['process_device']}):", "",
             "| strategy | model | steps | T | mean step ms | median step ms | rebuilds | median rebuild ms | error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mean = r.get("step_ms_mean", float("nan"))
        lines.append(f"| {r['impl']} | {r['model']} | {r['steps']} | {r['interval']} | {mean:.1f} "
                     f"| {r['step_ms_p50']:.1f} | {r['rebuilds']} | {r['rebuild_ms_p50']:.1f} | {r['error'] or ''} |")
    return "\n".join(lines)


def render(readme: Path) -> None:
    text = readme.read_text()
    for name, body in (("compare", compare_section()), ("kernels", kernels_section()), ("ddp", ddp_section())):
        begin, end = f"<!-- results:{name}:begin -->", f"<!-- results:{name}:end -->"
        if begin not in text:
            continue
        head, rest = text.split(begin)
        _, tail = rest.split(end)
        text = f"{head}{begin}\n{body}\n{end}{tail}"
    readme.write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--check-only", nargs="*", default=None)
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    args = p.parse_args(argv)
    if args.check_only is not None:
        problems = [msg for f in args.check_only for msg in check(Path(f))]
        print("\n".join(problems) or "results files are well-formed")
        return 1 if problems else 0
    render(Path(args.readme))
    return 0


if __name__ == "__main__":
    sys.exit(main())
