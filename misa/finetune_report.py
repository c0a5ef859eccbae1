"""The fine-tuning comparison's results, from its rows: each method's summary over seeds, the table, the
verdict of every MISA row against every other method held against the seed spread, and the advice on
when to choose what. Everything here is computed from the numbers a run wrote (misa.finetune writes
them, benchmarks/render_readme.py renders committed ones into the README), never typed."""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

EQUAL = "@lora-memory"  # the suffix of the rows sized to LoRA's accounted memory (--equal-memory)


def method_name(entry: str) -> str:
    return entry.split("+")[0].split("-")[0].split("@")[0]


def summarize(entry, rates, grid, chosen, finals, overrides) -> Dict:
    tests = torch.tensor([r["test_loss"] for r in finals], dtype=torch.float64)
    olds = torch.tensor([r["old_loss"] for r in finals], dtype=torch.float64)
    memory = max((r["memory"] for r in finals), key=lambda m: m["total_bytes"])
    return {"method": entry, "overrides": overrides, "grid": {f"{r['lr']:g}": r["val_loss"] for r in grid},
            "lr": chosen, "lr_at_grid_edge": len(rates) > 1 and chosen in (min(rates), max(rates)),
            "seeds": len(finals), "test_loss_mean": float(tests.mean()),
            "test_loss_std": float(tests.std()) if len(finals) > 1 else 0.0,
            "test_loss_min": float(tests.min()), "test_loss_max": float(tests.max()),
            "test_sem_mean": float(sum(r["test_sem"] for r in finals) / len(finals)),
            "old_loss_mean": float(olds.mean()), "memory": memory,
            "runs": [{k: v for k, v in r.items() if k != "history"} for r in finals],
            "val_curves": [r["history"] for r in finals]}


def paired_se(a_rows, b_rows) -> float:
    """Evaluation noise of the difference of two methods' mean test losses (same windows for both)."""
    a = torch.tensor([r["test_batch_losses"] for r in a_rows], dtype=torch.float64).mean(0)
    b = torch.tensor([r["test_batch_losses"] for r in b_rows], dtype=torch.float64).mean(0)
    diff = a - b
    return float(diff.std() / diff.numel() ** 0.5) if diff.numel() > 1 else float("nan")


def table(rows: List[Dict], base_losses: Dict) -> str:
    gpu = any("gpu_peak_bytes" in r["memory"] for r in rows)
    lines = ["| method | lr (grid: val loss) | seeds | test loss, mean ± std | old-domain loss (base "
             f"{base_losses['old']:.4f}) | trainable params | adapters + grads + states + masters (MiB) | total MiB |"
             + (" measured GPU peak MiB |" if gpu else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if gpu else "")]
    for r in sorted(rows, key=lambda r: r["test_loss_mean"]):
        m = r["memory"]
        grid = ", ".join(f"{k}: {v:.3f}" for k, v in r["grid"].items())
        edge = " (edge)" if r["lr_at_grid_edge"] else ""
        mib = " + ".join(f"{m[k] / 2**20:.2f}" for k in ("adapter_bytes", "grad_bytes", "state_bytes", "master_bytes"))
        lines.append(f"| {r['method']} | {r['lr']:g}{edge} ({grid}) | {r['seeds']} | {r['test_loss_mean']:.4f} ± "
                     f"{r['test_loss_std']:.4f} | {r['old_loss_mean']:.4f} | {m['trainable_params']:,} | {mib} | "
                     f"{m['total_bytes'] / 2**20:.2f} |"
                     + (f" {m.get('gpu_peak_bytes', float('nan')) / 2**20:.0f} |" if gpu else ""))
    return "\n".join(lines)


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
            memory = a["memory"]["total_bytes"] / max(b["memory"]["total_bytes"], 1)
            out.append(f"{mine}'s mean test loss is {abs(diff):.4f} {'lower' if diff > 0 else 'higher'} than "
                       f"{other}'s, {'larger than' if abs(diff) > spread else 'within'} the spread over seeds "
                       f"(largest std {spread:.4f}; evaluation noise of the difference {noise:.4f}), at "
                       f"{memory:.2f}x its accounted memory.")
    return " ".join(out)


def _gap(a: Dict, b: Dict) -> Tuple[float, float]:
    """(b's mean test loss minus a's, the larger of their seed spreads)."""
    return b["test_loss_mean"] - a["test_loss_mean"], max(a["test_loss_std"], b["test_loss_std"])


def advice(rows: List[Dict], base_old: float) -> str:
    """When to choose MISA, LoRA or LISA, read off these rows (computed, never typed)."""
    by = {r["method"]: r for r in rows}
    out = []

    def mib(r):
        return r["memory"]["total_bytes"] / 2**20

    equal = by.get("misa" + EQUAL)
    if equal is not None and "lora" in by:
        d, spread = _gap(equal, by["lora"])
        if abs(d) <= spread:
            out.append(f"At LoRA's memory ({mib(by['lora']):.2f} MiB accounted) MISA and LoRA train alike here (test "
                       f"losses {abs(d):.4f} apart, within the seed spread {spread:.4f}): choose on other grounds.")
        else:
            better, worse = ("MISA", "LoRA") if d > 0 else ("LoRA", "MISA")
            out.append(f"At LoRA's memory ({mib(by['lora']):.2f} MiB accounted) {better} trains better than {worse} "
                       f"(test loss {abs(d):.4f} lower, more than the seed spread {spread:.4f}): choose {better} "
                       "when memory is what limits you.")
    mine = sorted((r for r in rows if method_name(r["method"]) == "misa"), key=mib)
    if "lora" in by and mine:
        lora = by["lora"]
        within = [r for r in mine if mib(r) <= mib(lora) * 1.001]
        if within:
            best = min(within, key=lambda r: r["test_loss_mean"])
            d, spread = _gap(best, lora)
            out.append(f"Within LoRA's memory the best MISA row is {best['method']} ({best['test_loss_mean']:.4f}, "
                       f"{abs(d):.4f} {'below' if d > 0 else 'above'} LoRA's {lora['test_loss_mean']:.4f}; seed "
                       f"spread {spread:.4f}).")
        beating = [r for r in mine if _gap(r, lora)[0] > _gap(r, lora)[1]]
        if beating:
            first = beating[0]
            out.append(f"The least memory at which a MISA row beats LoRA beyond the seed spread: {first['method']} "
                       f"at {mib(first) / mib(lora):.2f}x LoRA's accounted memory.")
        else:
            out.append("No MISA row here beats LoRA beyond the seed spread.")
    sampled = [r for r in rows if method_name(r["method"]) in ("misa", "lisa", "badam", "lora", "dora")]
    if sampled:
        best = min(sampled, key=lambda r: r["test_loss_mean"])
        line = (f"Of the memory-saving methods, {best['method']} reaches the lowest test loss "
                f"({best['test_loss_mean']:.4f}, {mib(best):.2f} MiB accounted")
        if "adamw" in by:
            line += (f"; full fine-tuning {by['adamw']['test_loss_mean']:.4f} at {mib(by['adamw']):.2f} MiB")
        out.append(line + ").")
    if "misa" in by and "lisa" in by:
        d, spread = _gap(by["misa"], by["lisa"])
        word = "lower" if d > 0 else "higher"
        out.append(f"MISA ({by['misa']['memory']['trainable_params']:,} parameters trained at a time) ends "
                   f"{abs(d):.4f} {word} than LISA ({'beyond' if abs(d) > spread else 'within'} the seed spread), "
                   f"at {mib(by['misa']) / max(mib(by['lisa']), 1e-9):.2f}x its memory.")
    least = min(rows, key=lambda r: r["old_loss_mean"])
    out.append(f"{least['method']} forgets least: its loss on the old domain rises from {base_old:.4f} to "
               f"{least['old_loss_mean']:.4f}; " + ", ".join(f"{r['method']} {r['old_loss_mean']:.4f}" for r in
                                                             sorted(rows, key=lambda r: r["old_loss_mean"])[1:]) + ".")
    return " ".join(out)
