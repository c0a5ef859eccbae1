"""The fine-tuning comparison's results, from its rows: each method's summary over seeds, the table, the
verdict of every MISA row against every other method held against the seed spread, and the advice on
when to choose what. Everything here is computed from the numbers a run wrote (misa.finetune writes
them, benchmarks/render_readme.py renders committed ones into the README), never typed."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from .method import EQUAL, method_name

# A row "fits" LoRA's memory up to this ratio: the sizing aims at LoRA's peak exactly, and a run's worst step may
# differ from its sizing's by a few bytes of bookkeeping; 0.4% over (a sizing that missed) does not fit.
FITS = 1.001


def summarize(entry, rates, grid, chosen, finals, overrides) -> Dict:
    tests = torch.tensor([r["test_loss"] for r in finals], dtype=torch.float64)
    olds = torch.tensor([r["old_loss"] for r in finals], dtype=torch.float64)
    memory = dict(max((r["memory"] for r in finals), key=lambda m: m["total_bytes"]))
    if all(r["memory"].get("step_peak_bytes") for r in finals):  # the worst step of every seed's run
        worst = max((r["memory"] for r in finals), key=lambda m: m["step_peak_bytes"])
        memory.update(step_peak_bytes=worst["step_peak_bytes"], step_peak_parts=worst["step_peak_parts"])
    times = [r["step_ms"] for r in finals if r.get("step_ms")]
    step_ms = float(torch.tensor(times, dtype=torch.float64).median()) if times else None
    return {
        "method": entry,
        "overrides": overrides,
        "grid": {f"{r['lr']:g}": r["val_loss"] for r in grid},
        "lr": chosen,
        "lr_at_grid_edge": len(rates) > 1 and chosen in (min(rates), max(rates)),
        "seeds": len(finals),
        "test_loss_mean": float(tests.mean()),
        "test_loss_std": float(tests.std()) if len(finals) > 1 else 0.0,
        "test_loss_min": float(tests.min()),
        "test_loss_max": float(tests.max()),
        "test_sem_mean": float(sum(r["test_sem"] for r in finals) / len(finals)),
        "old_loss_mean": float(olds.mean()),
        "memory": memory,
        "step_ms": step_ms,
        "tokens_per_s": finals[0]["tokens_per_s"] * finals[0]["step_ms"] / step_ms if step_ms else None,
        "runs": [{k: v for k, v in r.items() if k != "history"} for r in finals],
        "val_curves": [r["history"] for r in finals],
    }


def paired_se(a_rows, b_rows) -> float:
    """Evaluation noise of the difference of two methods' mean test losses (same windows for both)."""
    a = torch.tensor([r["test_batch_losses"] for r in a_rows], dtype=torch.float64).mean(0)
    b = torch.tensor([r["test_batch_losses"] for r in b_rows], dtype=torch.float64).mean(0)
    diff = a - b
    return float(diff.std() / diff.numel() ** 0.5) if diff.numel() > 1 else float("nan")


def _peak(r: Dict) -> Optional[int]:
    return r["memory"].get("step_peak_bytes")


def _x_lora(r: Dict, lora: Optional[Dict]) -> str:
    if lora is None or not _peak(r) or not _peak(lora):
        return ""
    return f" ({_peak(r) / _peak(lora):.2f}x)"


def table(rows: List[Dict], base_losses: Dict) -> str:
    """One row per method: quality, forgetting, the step's measured peak (x LoRA's), time per step, and the
    accounted ledger beside them. Rows of runs older than the meter show only the ledger."""
    by = {r["method"]: r for r in rows}
    lora = by.get("lora")
    measured = any(_peak(r) for r in rows)
    head = (
        "| method | lr (grid: val loss) | seeds | test loss, mean ± std | old-domain loss (base "
        f"{base_losses['old']:.4f}) | trainable params |"
    )
    if measured:
        head += " step peak MiB (x LoRA) | ms / step | tokens/s |"
    head += " accounted: adapters + grads + states + masters (MiB) | accounted MiB |"
    lines = [head, "|" + "---|" * head.count(" |")]
    for r in sorted(rows, key=lambda r: r["test_loss_mean"]):
        m = r["memory"]
        grid = ", ".join(f"{k}: {v:.3f}" for k, v in r["grid"].items())
        edge = " (edge)" if r["lr_at_grid_edge"] else ""
        mib = " + ".join(f"{m[k] / 2**20:.2f}" for k in ("adapter_bytes", "grad_bytes", "state_bytes", "master_bytes"))
        line = (
            f"| {r['method']} | {r['lr']:g}{edge} ({grid}) | {r['seeds']} | {r['test_loss_mean']:.4f} ± "
            f"{r['test_loss_std']:.4f} | {r['old_loss_mean']:.4f} | {m['trainable_params']:,} |"
        )
        if measured:
            peak = f"{_peak(r) / 2**20:.2f}{_x_lora(r, lora)}" if _peak(r) else ""
            ms = f"{r['step_ms']:.0f}" if r.get("step_ms") else ""
            tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else ""
            line += f" {peak} | {ms} | {tps} |"
        lines.append(line + f" {mib} | {m['total_bytes'] / 2**20:.2f} |")
    return "\n".join(lines)


def _mem(r: Dict) -> Tuple[float, str]:
    """(bytes, what they are): the measured step peak where the run has one, else the accounted ledger."""
    return (float(_peak(r)), "step peak") if _peak(r) else (float(r["memory"]["total_bytes"]), "accounted memory")


def verdict(rows: List[Dict]) -> str:
    """MISA's rows against the others, each gap held against the seed spread (computed, never typed)."""
    by = {r["method"]: r for r in rows}
    out = []
    for mine in [m for m in by if method_name(m) == "misa"]:
        a = by[mine]
        for other in [m for m in by if method_name(m) != "misa"]:
            b = by[other]
            diff = b["test_loss_mean"] - a["test_loss_mean"]
            spread = max(a["test_loss_std"], b["test_loss_std"])
            noise = b.get("paired_se", {}).get(mine, float("nan"))
            (mem_a, what), (mem_b, _) = _mem(a), _mem(b)
            out.append(
                f"{mine}'s mean test loss is {abs(diff):.4f} {'lower' if diff > 0 else 'higher'} than "
                f"{other}'s, {'larger than' if abs(diff) > spread else 'within'} the spread over seeds "
                f"(largest std {spread:.4f}; evaluation noise of the difference {noise:.4f}), at "
                f"{mem_a / max(mem_b, 1):.2f}x its {what}."
            )
    return " ".join(out)


def _gap(a: Dict, b: Dict) -> Tuple[float, float]:
    """(b's mean test loss minus a's, the larger of their seed spreads)."""
    return b["test_loss_mean"] - a["test_loss_mean"], max(a["test_loss_std"], b["test_loss_std"])


def regime(meta: Dict) -> str:
    return "with activation checkpointing" if meta.get("checkpointing") else "without activation checkpointing"


def _speed(a: Dict, b: Dict) -> str:
    if not (a.get("step_ms") and b.get("step_ms")):
        return ""
    return f", at {a['step_ms']:.0f} ms per step against {b['step_ms']:.0f}"


def advice(rows: List[Dict], base_old: float, meta: Optional[Dict] = None) -> str:
    """When to choose MISA, LoRA or LISA, read off these rows (computed, never typed). With measured peaks
    the memory compared is the step's peak, in the run's regime (checkpointing or not)."""
    meta = meta or {}
    by = {r["method"]: r for r in rows}
    lora = by.get("lora")
    out = []
    measured = lora is not None and bool(_peak(lora))

    def mib(r):
        return _mem(r)[0] / 2**20

    unit = "MiB step peak" if measured else "MiB accounted"
    prefix = f"{regime(meta).capitalize()}, at" if measured else "At"
    if lora is not None:
        within = [r for r in rows if method_name(r["method"]) == "misa" and mib(r) <= mib(lora) * FITS]
        if within:
            best = min(within, key=lambda r: r["test_loss_mean"])
            d, spread = _gap(best, lora)
            if abs(d) <= spread:
                said = (
                    f"MISA and LoRA train alike (test losses {abs(d):.4f} apart, within the seed spread "
                    f"{spread:.4f}): choose on speed and forgetting"
                )
            else:
                better = "MISA" if d > 0 else "LoRA"
                said = (
                    f"{better} trains better (test loss {abs(d):.4f} lower, more than the seed spread "
                    f"{spread:.4f}): choose {better} when memory is what limits you"
                )
            out.append(
                f"{prefix} LoRA's memory ({mib(lora):.2f} {unit}), the best MISA row is {best['method']} "
                f"({best['test_loss_mean']:.4f} against LoRA's {lora['test_loss_mean']:.4f}, "
                f"{mib(best):.2f} {unit}{_speed(best, lora)}): {said}."
            )
        else:
            out.append(f"{prefix} LoRA's memory ({mib(lora):.2f} {unit}) no MISA row fits.")
        mine = sorted((r for r in rows if method_name(r["method"]) == "misa"), key=mib)
        beating = [r for r in mine if _gap(r, lora)[0] > _gap(r, lora)[1]]
        if beating:
            out.append(
                f"The least memory at which a MISA row beats LoRA beyond the seed spread: "
                f"{beating[0]['method']} at {mib(beating[0]) / mib(lora):.2f}x LoRA's {_mem(lora)[1]}."
            )
        else:
            out.append("No MISA row here beats LoRA beyond the seed spread.")
    sampled = [r for r in rows if method_name(r["method"]) in ("misa", "lisa", "badam", "lora", "dora")]
    if sampled:
        best = min(sampled, key=lambda r: r["test_loss_mean"])
        line = (
            f"Of the memory-saving methods, {best['method']} reaches the lowest test loss "
            f"({best['test_loss_mean']:.4f}, {mib(best):.2f} {unit}"
        )
        if "adamw" in by:
            line += f"; full fine-tuning {by['adamw']['test_loss_mean']:.4f} at {mib(by['adamw']):.2f}"
        out.append(line + ").")
        timed = [r for r in sampled if r.get("step_ms")]
        if timed:
            fast = min(timed, key=lambda r: r["step_ms"])
            out.append(
                f"The fastest is {fast['method']} ({fast['step_ms']:.0f} ms per step"
                + (f"; LoRA {lora['step_ms']:.0f}" if lora is not None and lora.get("step_ms") else "")
                + ")."
            )
    least = min(rows, key=lambda r: r["old_loss_mean"])
    out.append(
        f"{least['method']} forgets least: its loss on the old domain rises from {base_old:.4f} to "
        f"{least['old_loss_mean']:.4f}; "
        + ", ".join(
            f"{r['method']} {r['old_loss_mean']:.4f}" for r in sorted(rows, key=lambda r: r["old_loss_mean"])[1:]
        )
        + "."
    )
    return " ".join(out)


def at_lora_peak(rows: List[Dict]) -> Optional[Dict]:
    """LoRA, the best MISA row whose measured step peak fits in LoRA's (its equal-peak rows, or any other
    that fits), and LISA's equal-peak row: the answer to "MISA or LoRA at the same memory", with the gap
    held against the seed spread. None without a LoRA row with a measured peak."""
    by = {r["method"]: r for r in rows}
    lora = by.get("lora")
    if lora is None or not _peak(lora):
        return None
    fits = [r for r in rows if method_name(r["method"]) == "misa" and _peak(r) and _peak(r) <= _peak(lora) * FITS]
    best = min(fits, key=lambda r: r["test_loss_mean"]) if fits else None
    sized = [r for r in rows if method_name(r["method"]) == "misa" and EQUAL["peak"] in r["method"]]
    over = min(sized, key=lambda r: r["test_loss_mean"]) if sized and best is None else None
    out = {"lora": lora, "misa": best, "over": over, "lisa": by.get("lisa" + EQUAL["peak"]), "adamw": by.get("adamw")}
    if over is not None:
        d, spread = _gap(over, lora)
        out["over_winner"] = "tie" if abs(d) <= spread else ("misa" if d > 0 else "lora")
    if best is not None:
        d, spread = _gap(best, lora)
        out["gap"], out["spread"] = d, spread
        out["winner"] = "tie" if abs(d) <= spread else ("misa" if d > 0 else "lora")
    return out


def sized(r: Dict) -> str:
    """A row's entry with the delta it was sized to, if any. At delta 1 every module trains at every step, so the
    row is AdamW, in the row's state format, on all of MISA's modules: no sample at all, which the reader is told
    rather than left to infer."""
    delta = r.get("overrides", {}).get("delta")
    if delta is None:
        return r["method"]
    if delta >= 1.0:
        return f"{r['method']} (δ=1: every module at every step, no sampling)"
    return f"{r['method']} (δ={delta:.3f})"


def equal_peak_line(meta: Dict, found: Dict) -> str:
    """One sentence per comparison: who trains better at LoRA's peak, in which regime, at what speed."""
    lora, best = found["lora"], found["misa"]
    where = f"{meta['new_domain']}, {regime(meta)}"
    if best is None:
        line = f"{where}: no MISA row fits in LoRA's step peak ({_peak(lora) / 2**20:.1f} MiB)"
        over = found.get("over")
        if over is None:
            return line + "."
        said = {
            "tie": "trains like LoRA (within the seed spread)",
            "misa": "trains better than LoRA (beyond the seed spread)",
            "lora": "trains worse than LoRA (beyond the seed spread)",
        }[found["over_winner"]]
        return (
            f"{line}: the rows sized to it ran at {_peak(over) / _peak(lora):.2f}x and above, and the best, "
            f"{sized(over)}, {said}: {over['test_loss_mean']:.4f} ± {over['test_loss_std']:.4f} against "
            f"{lora['test_loss_mean']:.4f} ± {lora['test_loss_std']:.4f}{_speed(over, lora)} ms."
        )
    said = {
        "tie": "MISA and LoRA train alike (within the seed spread)",
        "misa": "MISA trains better than LoRA (beyond the seed spread)",
        "lora": "LoRA trains better than MISA (beyond the seed spread)",
    }[found["winner"]]
    return (
        f"{where}: at LoRA's step peak ({_peak(lora) / 2**20:.1f} MiB) {said}: {sized(best)} "
        f"{best['test_loss_mean']:.4f} ± {best['test_loss_std']:.4f} against {lora['test_loss_mean']:.4f} ± "
        f"{lora['test_loss_std']:.4f}{_speed(best, lora)} ms."
    )
