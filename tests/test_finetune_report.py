"""The fine-tuning comparison's verdict at LoRA's peak, on rows made by hand: which row counts as fitting, who
wins against the seed spread, and what the sentence says. The README's "MISA or LoRA?" is rendered from these
functions, so a wrong verdict here is a wrong claim there."""

from misa.jobs import finetune_report as fr

MIB = 2**20


def row(method, loss, std, peak_mib, ms=100.0, **overrides):
    return {
        "method": method,
        "overrides": overrides,
        "test_loss_mean": loss,
        "test_loss_std": std,
        "old_loss_mean": 5.0,
        "memory": {"step_peak_bytes": int(peak_mib * MIB), "total_bytes": MIB},
        "step_ms": ms,
    }


META = {"new_domain": "names", "checkpointing": True}


def test_a_row_fits_up_to_the_tolerance_and_not_beyond():
    lora = row("lora", 1.45, 0.01, 100.0)
    inside = row("misa@lora-peak", 1.40, 0.01, 100.0 * fr.FITS, delta=0.3)
    over = row("misa@lora-peak+states=8bit", 1.10, 0.01, 100.4, delta=0.6)  # 0.4% over: a sizing that missed
    found = fr.at_lora_peak([lora, inside, over])
    assert found["misa"] is inside  # the better row is over LoRA's peak, so it is not the answer
    assert found["winner"] == "misa" and round(found["gap"], 6) == 0.05


def test_the_winner_is_held_against_the_seed_spread():
    lora = row("lora", 1.45, 0.03, 100.0)
    close = row("misa@lora-peak", 1.43, 0.01, 99.0, delta=0.2)
    assert fr.at_lora_peak([lora, close])["winner"] == "tie"
    worse = row("misa@lora-peak", 1.60, 0.01, 99.0, delta=0.2)
    found = fr.at_lora_peak([lora, worse])
    assert found["winner"] == "lora"
    line = fr.equal_peak_line(META, found)
    assert "LoRA trains better than MISA" in line and "with activation checkpointing" in line and "(δ=0.200)" in line


def test_no_row_within_the_peak_names_the_best_one_above_it():
    lora = row("lora", 1.45, 0.01, 100.0)
    above = row("misa@lora-peak", 1.30, 0.01, 101.0, delta=0.4)
    found = fr.at_lora_peak([lora, above])
    assert found["misa"] is None and found["over"] is above and found["over_winner"] == "misa"
    assert "no MISA row fits" in fr.equal_peak_line(META, found) and "1.01x" in fr.equal_peak_line(META, found)


def test_a_row_at_delta_one_says_it_samples_nothing():
    assert fr.sized(row("misa@lora-peak", 1.2, 0.0, 10.0, delta=1.0)).endswith(
        "every module at every step, no sampling)"
    )
    assert fr.sized(row("misa@lora-peak", 1.2, 0.0, 10.0, delta=0.39412)) == "misa@lora-peak (δ=0.394)"
    assert fr.sized(row("lora", 1.2, 0.0, 10.0)) == "lora"


def test_the_advice_counts_only_rows_within_loras_peak():
    lora = row("lora", 1.45, 0.01, 100.0)
    over = row("misa@lora-peak", 1.10, 0.01, 100.4, delta=0.6)
    fits = row("misa@lora-peak+states=8bit", 1.60, 0.01, 99.0, delta=0.3)
    said = fr.advice([lora, over, fits], 2.3, META)
    assert "the best MISA row is misa@lora-peak+states=8bit" in said and "LoRA trains better" in said
