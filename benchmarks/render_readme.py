"""Render the README's result tables from the JSON files the benchmark scripts wrote (never by hand).

python benchmarks/render_readme.py                 # rewrite the marked README sections
python benchmarks/render_readme.py --check-only F  # validate results files against the schema
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
REQUIRED_TOP = ("device", "torch", "commit", "date", "rows")
REQUIRED_KERNEL_ROW = (
    "bench",
    "impl",
    "param_dtype",
    "numel",
    "n_tensors",
    "fresh",
    "ms_p50",
    "ms_p20",
    "ms_p80",
    "bytes",
    "gbps",
    "pct_copy_bw",
)


def check(path: Path) -> list:
    data = json.loads(path.read_text())
    problems = [f"{path}: missing {k}" for k in REQUIRED_TOP if k not in data]
    for i, row in enumerate(data.get("rows", [])):
        if row.get("bench") in ("adamw_step", "grad_sq_norms", "momentum_flush"):
            problems += [f"{path}: row {i} misses {k}" for k in REQUIRED_KERNEL_ROW if k not in row]
    return problems


def compare_section() -> str:
    files = sorted(RESULTS.glob("*/compare.json"))
    if not files:
        return "_No comparison run is recorded yet._"
    parts = []
    for f in files:
        data = json.loads(f.read_text())
        meta = data["meta"]
        rel = f.parent.relative_to(ROOT)
        measured = all("step_peak_bytes" in r for r in data["rows"])  # runs since the step-peak meter
        lines = [
            f"**{rel.name}** ({meta['device']}, torch {meta['torch']}, commit {meta.get('commit', '?')[:10]}, "
            f"{meta['date']}): "
            f"model {meta['model_size']}, {meta['steps']} steps, delta={meta['delta']}, eta={meta['eta']}, "
            f"T={meta['interval']}, "
            f"lr={meta['lr']}, seq {meta['seq_len']} x batch {meta['batch_size']}; written by "
            f"`{meta['command']}`; plot `{rel}/compare.png`.",
            "",
            "| optimizer | seeds | final val loss, mean ± std | min | max | eval s.e. (of the difference to "
            f"{data['rows'][0]['optimizer']}) | val perplexity |"
            + (" step peak MiB | ms / step |" if measured else ""),
            "|---|---|---|---|---|---|---|" + ("---|---|" if measured else ""),
        ]
        for r in sorted(data["rows"], key=lambda r: r["val_loss_mean"]):
            sem = r.get("eval_sem_mean", float("nan"))
            paired = r.get("eval_se_paired_vs_first", float("nan"))
            lines.append(
                f"| {r['optimizer']} | {r['seeds']} | {r['val_loss_mean']:.4f} ± {r['val_loss_std']:.4f} | "
                f"{r['val_loss_min']:.4f} | {r['val_loss_max']:.4f} | {sem:.4f} ({paired:.4f}) | "
                f"{r['val_ppl_mean']:.2f} |"
                + (f" {r['step_peak_bytes'] / 2**20:.2f} | {r['step_ms'] or float('nan'):.0f} |" if measured else "")
            )
        if "variant_default" in meta:
            lines += [
                "",
                f'`misa` is `variant="default"` as it stood for this run: `{meta["variant_default"]}`; '
                "`misa-<preset>+switch=value` rows override the named preset.",
            ]
        lines += ["", verdict(data["rows"])]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def finetune_section() -> str:
    """Every committed `python -m misa.finetune` run: its table, notes and computed verdict."""
    from misa.jobs import finetune_report

    # The comparisons first, then the ablations.
    files = sorted(RESULTS.glob("*/finetune.json"), key=lambda f: ("ablation" in f.parent.name, f.parent.name))
    if not files:
        return "_No fine-tuning comparison is recorded yet._"
    parts = []
    for f in files:
        data = json.loads(f.read_text())
        meta, rows = data["meta"], data["rows"]
        rel = f.parent.relative_to(ROOT)
        lines = [
            f"**{rel.name}** ({meta['device']}, torch {meta['torch']}, commit {meta['commit'][:10]}, "
            f"{meta['date']}): {meta['model']} ({meta['dtype']}), base {meta['base']}: "
            f"loss {meta['base_loss_old']:.4f} on its own domain (Python sources), {meta['base_loss_new']:.4f} "
            f"on the new one, {meta['new_domain']}; {meta['steps']} steps of {meta['batch_size']} x "
            f"{meta['seq_len']}; LoRA/DoRA r={meta['lora_r']}, alpha={meta['lora_alpha']:g}; MISA delta="
            f"{meta['delta']}, eta={meta['eta']}, T={meta['interval']}, embeddings {meta['embeddings']}; written "
            f"by `{meta['command']}`; plot `{rel}/finetune.png`.",
            "",
        ]
        lines += [f"- {note}" for note in meta.get("notes", [])]
        lines += [
            "",
            finetune_report.table(rows, {"old": meta["base_loss_old"]}),
            "",
            finetune_report.verdict(rows),
            "",
            "**When to choose what, from this run:** " + finetune_report.advice(rows, meta["base_loss_old"], meta),
        ]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def equal_peak_files(domain=None):
    """The committed `--equal-memory` (peak) comparisons' finetune.json files, of one domain or of all."""
    metas = {f: json.loads(f.read_text())["meta"] for f in sorted(RESULTS.glob("*/finetune.json"))}
    return [f for f, m in metas.items() if m.get("equal_memory") == "peak" and domain in (None, m.get("domain"))]


def equal_peak_section() -> str:
    """MISA or LoRA at LoRA's measured step peak: one row per committed `--equal-memory` (peak) comparison, each
    domain and regime, and the verdict sentences computed from them."""
    from misa.jobs import finetune_report as fr

    files = equal_peak_files()
    if not files:
        return "_No equal-peak comparison is recorded yet._"

    def cell(r, lora):
        if r is None:
            return "does not fit"
        what = fr.sized(r)
        peak, lora_peak = r["memory"]["step_peak_bytes"], lora["memory"]["step_peak_bytes"]
        return (
            f"{what}: {r['test_loss_mean']:.4f} ± {r['test_loss_std']:.4f}, {peak / 2**20:.1f} MiB "
            f"({peak / lora_peak:.2f}x), {r['step_ms']:.0f} ms"
        )

    lines = [
        "| comparison | domain | checkpointing | LoRA r=8: test loss, step peak, ms/step | best MISA within "
        "LoRA's peak | LISA at LoRA's peak | full AdamW | at LoRA's peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    sentences = []
    for f in files:
        data = json.loads(f.read_text())
        meta, rows = data["meta"], data["rows"]
        found = fr.at_lora_peak(rows)
        if found is None:
            continue
        lora = found["lora"]
        best_cell = (
            cell(found["misa"], lora)
            if found["misa"] or not found["over"]
            else "none; above it: " + cell(found["over"], lora)
        )
        lines.append(
            f"| `{f.parent.relative_to(ROOT)}` | {meta['domain']} | "
            f"{'yes' if meta['checkpointing'] else 'no'} | "
            f"{lora['test_loss_mean']:.4f} ± {lora['test_loss_std']:.4f}, "
            f"{lora['memory']['step_peak_bytes'] / 2**20:.1f} MiB, {lora['step_ms']:.0f} ms | "
            f"{best_cell} | "
            f"{cell(found['lisa'], lora)} | "
            f"{cell(found['adamw'], lora) if found['adamw'] else ''} | {found.get('winner', 'no MISA row')} |"
        )
        sentences.append(fr.equal_peak_line(meta, found))
    first = json.loads(files[0].read_text())["meta"]
    head = (
        f"{first['model']} ({first['dtype']}), {first['steps']} steps of {first['batch_size']} x "
        f"{first['seq_len']}, "
        f"{first['device']}, {first.get('threads', '?')} thread(s) per run; step peak: the worst step of every "
        "seed's run, measured by `misa.memory.StepPeakMeter` (activations included); ms: median time of an "
        "unmetered step."
    )
    return "\n".join([head, ""] + lines + [""] + [f"- {s}" for s in sentences])


def choose_section() -> str:
    """The README's "MISA or LoRA?": the default domain's equal-peak comparisons, one table per regime (method,
    test loss, step peak and x LoRA, ms per step, forgetting), each with its verdict in at most three sentences."""
    from misa.jobs import finetune_report as fr

    files = equal_peak_files(domain="unicode-names")
    if not files:
        return "_No equal-peak comparison is recorded yet: see docs/finetune.md._"
    out = []
    for f in sorted(files, key=lambda f: json.loads(f.read_text())["meta"]["checkpointing"]):
        data = json.loads(f.read_text())
        meta, rows = data["meta"], data["rows"]
        found = fr.at_lora_peak(rows)
        if found is None:
            continue
        lora_peak = found["lora"]["memory"]["step_peak_bytes"]
        out += [
            f"**{fr.regime(meta).capitalize()}** (`{f.parent.relative_to(ROOT)}`, {len(rows)} methods, "
            f"{max(r.get('seeds', 0) for r in rows)} seeds, commit {meta['commit'][:10]}):",
            "",
            "| method | test loss | step peak MiB (x LoRA) | ms / step | old-domain loss (base "
            f"{meta['base_loss_old']:.4f}) |",
            "|---|---|---|---|---|",
        ]
        for r in sorted(rows, key=lambda r: r["test_loss_mean"]):
            peak = r["memory"]["step_peak_bytes"]
            ms = f"{r['step_ms']:.0f}" if r.get("step_ms") else ""
            out.append(
                f"| {r['method']} | {r['test_loss_mean']:.4f} ± {r['test_loss_std']:.4f} | {peak / 2**20:.2f} "
                f"({peak / lora_peak:.3f}x) | {ms} | {r['old_loss_mean']:.4f} |"
            )
        line = fr.equal_peak_line(meta, found)
        said = [line[:1].upper() + line[1:]]
        for r in rows:  # the other rows sized to LoRA's peak: how each format fares there
            if r["method"].startswith("misa@lora-peak") and r is not found["misa"]:
                d, spread = fr._gap(r, found["lora"])
                word = (
                    "like LoRA (within the seed spread)"
                    if abs(d) <= spread
                    else f"{'better' if d > 0 else 'worse'} than LoRA (beyond the seed spread)"
                )
                said.append(
                    f"{fr.sized(r)}, at {r['memory']['step_peak_bytes'] / lora_peak:.3f}x, trains {word}: "
                    f"{r['test_loss_mean']:.4f} ± {r['test_loss_std']:.4f}."
                )
        out += ["", " ".join(said), ""]
    first = json.loads(files[0].read_text())
    meta = first["meta"]
    rows = [r for f in files for r in json.loads(f.read_text())["rows"]]
    chosen = sorted({r["lr"] for r in rows})
    tried = sorted({float(lr) for r in rows for lr in r["grid"]})
    if len(tried) == 1:
        rate = f"every method at lr {chosen[0]:g} (no grid)"
    else:
        rate = (
            f"every method at its own rate, chosen on validation over its grid ({', '.join(f'{lr:g}' for lr in tried)}"
            + (f"): each chose {chosen[0]:g}" if len(chosen) == 1 else "): see docs/finetune.md")
        )
    out.append(
        f"The built-in {meta['model']} ({meta['dtype']}), pretrained on Python sources, fine-tuned for {meta['steps']} "
        f"steps of {meta['batch_size']} x {meta['seq_len']} tokens on the Unicode character names, "
        f"{meta['device']}, {meta.get('threads', '?')} thread(s) per run, {rate}; step peak: the worst metered step, "
        "activations included (`misa.memory.StepPeakMeter`); ms: the median unmetered step. `misa@lora-peak` rows "
        "are sized so that the worst active set their budget allows fits LoRA's peak."
    )
    return "\n".join(out)


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
        noise = other.get("eval_se_paired_vs_first", float("nan"))  # misa is the first row of a comparison
        word = "lower" if diff > 0 else "higher"
        judged = "larger than" if abs(diff) > spread else "within"
        out.append(
            f"MISA's mean final validation loss is {abs(diff):.4f} {word} than {name}'s, {judged} the "
            f"spread over seeds (largest std {spread:.4f}; evaluation noise of the difference "
            f"{noise:.4f})."
        )
    return " ".join(out)


def _gpu_file(bench: str):
    """The newest non-quick GPU results file holding rows of `bench`."""
    found = None
    for f in sorted(RESULTS.glob("*.json")):
        data = json.loads(f.read_text())
        if (
            not data.get("quick")
            and not str(data.get("device", "cpu")).startswith("cpu")
            and any(str(r.get("bench")).startswith(bench) for r in data.get("rows", []))
        ):
            found = (f, data)
    return found


def _header(f: Path, data) -> str:
    return (
        f"`{f.relative_to(ROOT)}`: {data['device']}, torch {data['torch']}, triton {data.get('triton')}, "
        f"commit {data['commit'][:10]}, {data['date']}"
    )


KERNEL_CASES = ("uniform-64M", "llama3-8b-delta3%", "many-small")


def kernels_section() -> str:
    """adamw_step and grad_sq_norms on a few telling cases. Bytes and bandwidth are recomputed from
    what each row ran (bench_kernels.row_bytes), so every implementation is charged its own traffic
    (state dtype, separate norm pass) whatever count the file was written with."""
    import bench_kernels

    found = _gpu_file("adamw_step")
    if found is None:
        return (
            "_No GPU kernel results are recorded yet: run `bash benchmarks/gpu_check.sh` on a GPU and commit "
            "the JSON it writes._"
        )
    f, data = found
    bw = data["copy_bandwidth_gbps"]
    lines = [
        f"{_header(f, data)}; copy bandwidth {bw:.0f} GB/s. Each row's bytes are that implementation's "
        "own (its state dtype; peers' separate norm pass included); same work: fp32 rows against "
        "`torch_fused_adamw`, bf16 rows with fp32 states against `torch_reference`.",
        "",
        "| op | case | params | states | fresh | impl | ms (p50) | B/elem | GB/s | % of copy bw |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        if r["bench"] not in ("adamw_step", "grad_sq_norms") or r["case"] not in KERNEL_CASES:
            continue
        nbytes = bench_kernels.row_bytes(r)
        gbps = nbytes / (r["ms_p50"] * 1e-3) / 1e9
        if r["bench"] == "adamw_step":
            states = r["param_dtype"] if bench_kernels.STATE_DTYPE[r["impl"]] == "param" else "fp32"
            states += " + fp32 master" if r.get("master") else ""
        else:
            states = "-"
        lines.append(
            f"| {r['bench']} | {r['case']} | {r['param_dtype']} | {states} | {r['fresh']} | {r['impl']} | "
            f"{r['ms_p50']:.3f} | {nbytes / r['numel']:.0f} | {gbps:.0f} | {100 * gbps / bw:.1f} |"
        )
    return "\n".join(lines)


def train_step_section() -> str:
    """Training-step time and memory. Memory is shown only for rows measured with the build in the
    training dtype and the peak counter reset after it (`memory_method`); older rows counted the
    fp32 construction and are withheld."""
    found = _gpu_file("train_step")
    if found is None:
        return "_No GPU training-step results are recorded yet._"
    f, data = found
    rows = [r for r in data["rows"] if str(r.get("bench")).startswith("train_step")]
    measured = any("memory_method" in r for r in rows)
    lines = [
        f"{_header(f, data)}; batch 1, bf16 weights."
        + (
            ""
            if measured
            else " Peak memory is withheld: this file's runs counted the model's fp32 "
            "construction (all 8B rows read the same 30.96 GB); a new GPU run measures it correctly."
        ),
        "",
        "| model | seq | ckpt | cap GB | impl | steady ms (p50) | switch ms (p50) | tokens/s | peak GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("oom"):
            lines.append(
                f"| {r['model']} | {r['seq_len']} | {r['grad_checkpointing']} | {r.get('memory_cap_gb') or ''}"
                f" | {r['impl']} | out of memory | | | |"
            )
            continue
        peak = f"{r['peak_allocated_gb']:.1f}" if "memory_method" in r and "peak_allocated_gb" in r else "withheld"
        switch = r.get("switch_ms_p50")
        lines.append(
            f"| {r['model']} | {r['seq_len']} | {r['grad_checkpointing']} | {r.get('memory_cap_gb') or ''} | "
            f"{r['impl']} | {r['ms_p50']:.1f} | {'' if switch is None else f'{switch:.1f}'} | "
            f"{r['tokens_per_s']:.0f} | {peak} |"
        )
    return "\n".join(lines)


def _latest_with(bench: str):
    """(file, data, rows) of the newest results file with rows of `bench`, on any device."""
    found = None
    for f in sorted(RESULTS.glob("*.json")):
        data = json.loads(f.read_text())
        rows = [r for r in data.get("rows", []) if r.get("bench") == bench]
        if rows:
            found = (f, data, rows)
    return found


def master_section() -> str:
    found = _latest_with("master_weights")
    if found is None:
        return "_Not measured yet: run `python benchmarks/bench_master_weights.py`._"
    f, data, rows = found
    setup = data.get("master_weights_setup", {})
    lines = [
        f"`{f.relative_to(ROOT)}` ({data['device']}, torch {data['torch']}, commit {data['commit'][:10]}, "
        f"{data['date']}): one bf16 {setup.get('size')}x{setup.get('size')} weight, {setup.get('steps')} steps "
        "of one MISA period, against fp32 AdamW on the same gradients.",
        "",
        "| lr | bf16 update | moved (x fp32's) | error (of fp32's distance) | entries unchanged | "
        "floor: fp32 result rounded to bf16, error / unchanged | state B/elem |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['lr']:.0e} | {r['impl']} | {r['moved_vs_fp32']:.2f} | {r['error_vs_fp32']:.1%} | "
            f"{r['unchanged']:.1%} | {r.get('fp32_rounded_error', float('nan')):.1%} / "
            f"{r['fp32_rounded_unchanged']:.1%} | {r['state_bytes_per_element']} |"
        )
    return "\n".join(lines)


def _format_key(formats: dict) -> tuple:
    return formats.get("states", "fp32"), formats.get("masters") or "none"


def _entry_formats(entry: str) -> dict:
    """The formats of a main-job --compare entry (misa+states=8bit+masters=kahan), as MISA.formats names them."""
    switches = dict(item.partition("=")[::2] for item in entry.split("+")[1:])
    masters = switches.get("masters", "none" if switches.get("rounding") == "stochastic" else "fp32")
    return {"states": switches.get("states", "fp32"), "masters": None if masters == "none" else masters}


FORMAT_NAMES = {
    ("fp32", "fp32"): "fp32 states + fp32 master (default)",
    ("fp32", "kahan"): "fp32 states + Kahan",
    ("fp32", "none"): "fp32 states + stochastic rounding",
    ("8bit", "fp32"): "8-bit states + fp32 master",
    ("8bit", "kahan"): "8-bit states + Kahan",
    ("8bit", "none"): "8-bit states + stochastic rounding",
}


def formats_section() -> str:
    """One row per state format: bytes per active element, the 8B arena and predicted peak, the error against
    fp32 AdamW on one weight, and the main job's loss over seeds; each from the file that measured it."""
    planned = RESULTS / "plan-8b-formats" / "plan.json"
    weights = _latest_with("master_weights")
    runs = [
        f
        for f in sorted(RESULTS.glob("*/compare.json"))
        if any("states=" in r["optimizer"] or "masters=" in r["optimizer"] for r in json.loads(f.read_text())["rows"])
    ]
    if not planned.exists() or weights is None or not runs:
        return (
            "_Not measured yet: run `python benchmarks/plan_cards.py --formats`, "
            "`benchmarks/bench_master_weights.py` and the main job's `--compare` of the formats._"
        )
    pred = json.loads(planned.read_text())
    ckpt = {
        (_format_key(r["formats"]), r["release_grads"], r["seq"]): r
        for r in pred["rows"]
        if r["checkpointing"] and r["formats"]
    }
    wf, wdata, wrows = weights
    errors = {}
    for r in wrows:
        if "formats" in r and r["impl"] != "bf16_in_place":  # the in-place update is no format, a failure mode
            errors.setdefault(_format_key(r["formats"]), {})[r["lr"]] = r["error_vs_fp32"]
    run = json.loads(runs[-1].read_text())
    meta = run["meta"]
    losses = {_format_key(_entry_formats(r["optimizer"])): r for r in run["rows"]}
    tuned = [
        f
        for f in sorted(RESULTS.glob("*/finetune.json"))
        if all(r["method"].startswith("misa") for r in json.loads(f.read_text())["rows"])
        and any("states=" in r["method"] or "masters=" in r["method"] for r in json.loads(f.read_text())["rows"])
    ]
    finetuned, ft_meta = {}, None
    if tuned:
        ft = json.loads(tuned[-1].read_text())
        ft_meta = ft["meta"]
        finetuned = {_format_key(_entry_formats(r["method"])): r for r in ft["rows"]}
    lrs = sorted({lr for e in errors.values() for lr in e})[1:3]
    lora = {r["seq"]: r["peak_bytes"] / 2**30 for r in pred["rows"] if r["method"] == "lora" and r["checkpointing"]}
    gpu = _gpu_file("train_step")  # the formats' own 8B peaks, where a GPU run measured them (gpu_check.sh mem8b)
    measured = {
        (_format_key(r["formats"]), r.get("release_grads", False), r["seq_len"]): r["peak_allocated_gb"]
        for r in (gpu[1]["rows"] if gpu else [])
        if r.get("bench") == "train_step"
        and r.get("model") == "8b"
        and r.get("grad_checkpointing")
        and "formats" in r
        and not r.get("oom")
        and "peak_allocated_gb" in r
    }
    seqs = sorted(lora)
    lines = [
        f"Bytes per active element as MISA reports them (`MISA.formats`; tensors below 4096 elements keep fp32 "
        f"states). LLaMA-3-8B, δ=3%, batch 1, checkpointing: the arena and the step's peak planned on fake "
        f"tensors by the memory planner (`{planned.relative_to(ROOT)}`, `python -m misa.plan` at "
        f"{pred['meta']['commit'][:10]}; within 1% of every peak measured on a GPU, `tests/test_plan.py`); "
        "LoRA r=16 planned there: " + ", ".join(f"{lora[s]:.2f} GiB at seq {s}" for s in seqs) + ". Error: one bf16 "
        f"weight after 50 steps, distance to fp32 AdamW over the distance it moved (`{wf.relative_to(ROOT)}`, "
        f"{wdata['device']}). Loss: the main job in bf16 (`{runs[-1].parent.relative_to(ROOT)}`, "
        f"{meta['steps']} steps, {run['rows'][0]['seeds']} seeds, final validation loss mean ± std)"
        + (
            f"; fine-tuning: `{tuned[-1].parent.relative_to(ROOT)}` ({ft_meta['dtype']}, lr "
            f"{finetuned[next(iter(finetuned))]['lr']:g}, {ft_meta['steps']} steps, test loss mean ± std)"
            if tuned
            else ""
        )
        + "."
        + (
            f" Measured 8B peaks: `{gpu[0].relative_to(ROOT)}` ({gpu[1]['device']}, "
            f"commit {gpu[1]['commit'][:10]}), GiB."
            if measured
            else ""
        ),
        "",
        "| format | bytes / element | 8B arena | planned 8B peak, "
        + ", ".join(f"seq {s}" for s in seqs)
        + " (with `release_grads`) | measured 8B peak, "
        + ", ".join(f"seq {s}" for s in seqs)
        + " (with `release_grads`) | error at lr "
        + " / ".join(f"{lr:.0e}" for lr in lrs)
        + " | main job loss | fine-tuning loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, name in FORMAT_NAMES.items():
        plain = ckpt.get((key, False, seqs[0]))
        if plain is None:
            continue
        peaks = []
        for seq in seqs:
            text = f"{ckpt[(key, False, seq)]['peak_bytes'] / 2**30:.2f}"
            released = ckpt.get((key, True, seq))
            if released is not None:
                text += f" ({released['peak_bytes'] / 2**30:.2f})"
            peaks.append(text)
        seen = []
        for seq in seqs:
            plain_m, released_m = measured.get((key, False, seq)), measured.get((key, True, seq))
            text = f"{plain_m:.2f}" if plain_m is not None else "—"
            if released_m is not None:
                text += f" ({released_m:.2f})"
            seen.append(text)
        err = " / ".join(f"{errors.get(key, {}).get(lr, float('nan')):.1%}" for lr in lrs)
        loss = losses.get(key)
        loss_text = f"{loss['val_loss_mean']:.4f} ± {loss['val_loss_std']:.4f}" if loss else "—"
        ft_row = finetuned.get(key)
        ft_text = f"{ft_row['test_loss_mean']:.4f} ± {ft_row['test_loss_std']:.4f}" if ft_row else "—"
        lines.append(
            f"| {name} | {plain['formats']['bytes_per_element']:.2f} | "
            f"{plain['arena_bytes'] / 2**30:.2f} GiB | "
            f"{', '.join(peaks)} | {', '.join(seen)} | {err} | {loss_text} | {ft_text} |"
        )
    return "\n".join(lines)


def fits_section() -> str:
    """What fits on a 24 GB card, from the planner's runs of benchmarks/plan_cards.py."""
    found = sorted((RESULTS / "plan-24gib").glob("*/plan.json"))
    if not found:
        return "_Not planned yet: run `python benchmarks/plan_cards.py`._"
    plans = [json.loads(f.read_text()) for f in found]
    meta = plans[0]["meta"]
    budget = plans[0]["budget_bytes"] / 2**30
    lines = [
        f"Planned by `python -m misa.plan` (`benchmarks/plan_cards.py`, commit {meta['commit'][:10]}, "
        f"{meta['date'][:10]}; files `benchmarks/results/plan-24gib/`): bf16 weights, batch 1, the step's peak "
        f"on a Hopper-class GPU in GiB, fits in {budget:g} GiB or not (✗); for MISA the largest δ that "
        "fits (its worst active set: the lowest layer active), then its peak at δ=3%. LoRA r=16 on the seven "
        "projections; full AdamW with fp32 states (torch's default).",
        "",
    ]
    methods = [a["method"] for a in plans[0]["budget"]]
    names = {
        m: m.replace("misa+delta=0.03", "MISA").replace("+check_finite=false", "").replace("+", " ") for m in methods
    }
    lines += [
        "| model | checkpointing | seq | " + " | ".join(names[m] for m in methods) + " |",
        "|---|---|---|" + "---|" * len(methods),
    ]
    for data in plans:
        ckpt = data["rows"][0]["checkpointing"]
        answers = {a["method"]: {h["seq"]: h for h in a["at_seq"]} for a in data["budget"]}
        rows = {(r["method"], r["seq"]): r for r in data["rows"]}
        for seq in sorted({r["seq"] for r in data["rows"]}):
            cells = []
            for m in methods:
                r, a = rows[(m, seq)], answers[m][seq]
                text = f"{r['peak_bytes'] / 2**30:.2f}" + ("" if a["fits"] else " ✗")
                if m.startswith("misa"):
                    d = a.get("largest_delta")
                    text = (f"δ≤{d:.3f}" if d else "no δ") + f"; {text}"
                cells.append(text)
            lines.append(f"| {data['model']} | {'yes' if ckpt else 'no'} | {seq} | " + " | ".join(cells) + " |")
    longest = []
    for data in plans:
        ckpt = "with" if data["rows"][0]["checkpointing"] else "without"
        words = [f"{names[a['method']]} {a['longest_seq'] or 'none'}" for a in data["budget"]]
        longest.append(f"{data['model']} {ckpt} checkpointing: " + ", ".join(words))
    lines += [
        "",
        f"Longest sequence that fits in {budget:g} GiB (MISA at δ=3%, in multiples of 64): " + "; ".join(longest) + ".",
    ]
    return "\n".join(lines)


def fsdp_section() -> str:
    """How many 24 GB cards 8B needs at seq 4096: one rank's planned peak under FSDP2, per number of ranks."""
    found = sorted((RESULTS / "plan-8b-fsdp").glob("*/plan.json"))
    if not found:
        return "_Not planned yet: run `python benchmarks/plan_cards.py --fsdp`._"
    plans = [json.loads(f.read_text()) for f in found]
    budget = 24 * 2**30
    meta = plans[0]["meta"]
    methods = list(dict.fromkeys(r["method"] for r in plans[0]["rows"]))
    names = {m: m.replace("misa+delta=0.03", "MISA").replace("+", " ") for m in methods}
    peaks = {}  # (checkpointing, method) -> {ranks: peak bytes}
    for data in plans:
        for r in data["rows"]:
            peaks.setdefault((r["checkpointing"], r["method"]), {})[r["fsdp"]] = r["peak_bytes"]
    ranks = sorted({n for v in peaks.values() for n in v})
    lines = [
        f"One rank's step peak (GiB) under FSDP2 over N ranks (every block and the root `fully_shard`-ed), "
        f"LLaMA-3-8B bf16, seq 4096, batch 1 per rank, planned by `python -m misa.plan --fsdp N` "
        f"(`benchmarks/plan_cards.py --fsdp`, commit {meta['commit'][:10]}, {meta['date'][:10]}; files "
        f"`benchmarks/results/plan-8b-fsdp/`); ✗: more than 24 GiB. NCCL's own buffers are not in it.",
        "",
        "| checkpointing | method | " + " | ".join(f"N={n}" for n in ranks) + " | fewest 24 GB cards |",
        "|---|---|" + "---|" * len(ranks) + "---|",
    ]
    for ckpt in (False, True):
        for m in methods:
            row = peaks.get((ckpt, m), {})
            cells = [(f"{row[n] / 2**30:.2f}" + ("" if row[n] <= budget else " ✗")) if n in row else "" for n in ranks]
            fewest = next((n for n in ranks if n in row and row[n] <= budget), None)
            lines.append(
                f"| {'yes' if ckpt else 'no'} | {names[m]} | "
                + " | ".join(cells)
                + f" | {fewest if fewest else f'more than {ranks[-1]}'} |"
            )
    return "\n".join(lines)


def ddp_section() -> str:
    found = _latest_with("ddp_step")
    if found is None:
        return "_No DDP measurement is recorded yet: run `python benchmarks/bench_ddp_rebuild.py`._"
    f, data, rows = found
    lines = [
        f"`{f.relative_to(ROOT)}` ({data['device']}, torch {data['torch']}, commit {data['commit'][:10]}, "
        f"{data['date']}; 2 processes, {rows[0]['process_device']}):",
        "",
        "| strategy | model | steps | T | mean step ms | median step ms | rebuilds | median rebuild ms | error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mean = r.get("step_ms_mean", float("nan"))
        lines.append(
            f"| {r['impl']} | {r['model']} | {r['steps']} | {r['interval']} | {mean:.1f} "
            f"| {r['step_ms_p50']:.1f} | {r['rebuilds']} | {r['rebuild_ms_p50']:.1f} | {r['error'] or ''} |"
        )
    return "\n".join(lines)


def _commit_order(commit: str) -> int:
    """How many commits lead to `commit` in this repository (newer is larger); -1 when it is not in history
    (a commit from before a rewrite)."""
    done = subprocess.run(["git", "rev-list", "--count", commit], cwd=ROOT, capture_output=True, text=True)
    return int(done.stdout) if done.returncode == 0 and done.stdout.strip().isdigit() else -1


def _misa_step_row(r: Dict) -> bool:
    return r.get("case") == "misa_step" or r["impl"].startswith("MISA")


def _misa_step_lines(rows: List[Dict], before) -> List[str]:
    """MISA.step() against the issue's bars (an adamw_step_ call over the same tensors, torch's fused AdamW on
    the same parameters), measured in alternating rounds; older files have MISA.step alone."""
    steps = [r for r in rows if r["impl"].startswith("MISA")]
    if not steps:
        return []
    old = [r for r in before[2] if r["impl"].startswith("MISA")] if before else []
    was = (
        (
            f" At {before[1]['commit'][:7]}, before: "
            + ", ".join(f"{r['impl']} {r['us_per_call']:.0f} us" for r in old)
            + "."
        )
        if old
        else ""
    )
    head = (
        f"`MISA.step()` (default configuration, steady steps, bf16 with masters, {steps[0]['n_tensors']} trainable "
        "tensors)"
    )
    if not any("overhead_us" in r for r in steps):
        return ["", head + ": " + ", ".join(f"{r['impl']} {r['us_per_call']:.0f} us" for r in steps) + "." + was]
    lines = [
        "",
        head + ", measured in alternating rounds (median of "
        f"{steps[0].get('rounds', '?')}) beside one `adamw_step_` call over the same tensors, states and masters "
        "(a host step count) and `torch.optim.AdamW(fused=True).step()` on the same parameters (which runs its "
        "CPU kernel on them where launches are stubbed, and keeps bf16 states). The issue's bars: MISA.step at "
        "most that `adamw_step_` + 50 us, and at most torch's step." + was,
        "",
        "| backend | MISA.step (us) | adamw_step_, same tensors (us) | MISA.step - adamw_step_ (us) "
        "| adamw_step_, step and skip flag on the device (us) | torch fused AdamW, same params (us) |",
        "|---|---|---|---|---|---|",
    ]
    graphed = [r for r in steps if "overhead_us" not in r]
    for r in (r for r in steps if "overhead_us" in r):
        backend = r.get("backend", r["impl"][len("MISA.step[") : -1])
        same = {x["impl"]: x["us_per_call"] for x in rows if x.get("backend") == backend and x is not r}
        bar = same.get(f"adamw_step_[{backend}] same tensors", float("nan"))
        on_device = same.get(f"adamw_step_[{backend}] same tensors, device step")
        lines.append(
            f"| {backend} | {r['us_per_call']:.0f} | {bar:.0f} | {r['overhead_us']:.0f} "
            f"| {'' if on_device is None else f'{on_device:.0f}'} "
            f"| {same.get('torch_fused_adamw same params', float('nan')):.0f} |"
        )
    if graphed:
        lines += [
            "",
            "With `cuda_graph=True` (one replay per steady step): "
            + ", ".join(f"{r['impl']} {r['us_per_call']:.0f} us" for r in graphed)
            + ".",
        ]
    return lines


def host_section() -> str:
    """Host time per call, newest file per device (a GPU's real launches, a CPU's stubbed ones), with the
    rows of any `host-*-before-<commit>/` file for that device beside them."""
    latest, before = {}, {}
    befores = sorted(RESULTS.glob("host-*-before-*/*.json"), key=lambda f: _commit_order(f.parent.name.split("-")[-1]))
    for f in sorted(RESULTS.glob("*.json")) + befores:  # the newest "before" of a device last: it is the one shown
        data = json.loads(f.read_text())
        rows = [r for r in data.get("rows", []) if r.get("bench") == "host_time"]
        if rows:
            (before if f.parent != RESULTS else latest)[data["device"]] = (f, data, rows)
    if not latest:
        return "_Not measured yet: run `python benchmarks/bench_host.py`._"
    parts = []
    for device, (f, data, rows) in latest.items():
        stubbed = any(r["launch"] == "stubbed" for r in rows)
        note = (
            " Our rows stop before the launch (no GPU there: the extension call and the Triton launcher "
            "are no-ops); torch's rows run its CPU kernel on one-element tensors."
            if stubbed
            else ""
        )
        name = f.relative_to(ROOT) if f.is_relative_to(ROOT) else f.name
        ops = [r for r in rows if not _misa_step_row(r)]
        sizes = sorted({r["n_tensors"] for r in ops})
        parts += [
            f"`{name}` ({data['device']}, torch {data['torch']}, commit {data['commit'][:10]}, "
            f"{data['date']}): microseconds per `adamw_step_` call, bf16 parameters, fp32 states and masters, "
            f"norms asked.{note}",
            "",
            "| impl | " + " | ".join(f"{n} tensors" for n in sizes) + " |",
            "|---|" + "---|" * len(sizes),
        ]
        labelled = [(r, "") for r in ops]
        if device in before:
            commit = before[device][1]["commit"][:7]
            labelled += [(r, f" at {commit} (before)") for r in before[device][2] if r["impl"] in ("cuda", "triton")]
        for impl, label in dict.fromkeys((r["impl"], lab) for r, lab in labelled):
            cells = {r["n_tensors"]: r for r, lab in labelled if r["impl"] == impl and lab == label}
            stub = " (launch stubbed)" if next(iter(cells.values()))["launch"] == "stubbed" else ""
            parts.append(
                f"| {impl}{stub}{label} | "
                + " | ".join(f"{cells[n]['us_per_call']:.0f}" if n in cells else "" for n in sizes)
                + " |"
            )
        parts += _misa_step_lines(rows, before.get(device))
        parts.append("")
    return "\n".join(parts).rstrip()


def render(readme: Path) -> None:
    text = readme.read_text()
    sections = (
        ("compare", compare_section),
        ("equal_peak", equal_peak_section),
        ("choose", choose_section),
        ("finetune", finetune_section),
        ("kernels", kernels_section),
        ("train_step", train_step_section),
        ("master", master_section),
        ("formats", formats_section),
        ("fits", fits_section),
        ("fsdp", fsdp_section),
        ("ddp", ddp_section),
        ("host", host_section),
    )
    for name, make in sections:
        begin, end = f"<!-- results:{name}:begin -->", f"<!-- results:{name}:end -->"
        if begin not in text:
            continue
        body = make()
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
    if Path(args.readme).resolve() == (ROOT / "README.md").resolve():
        for page in sorted((ROOT / "docs").glob("*.md")):  # the pages hold the rest, from the same files
            render(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
