"""MISA's variants as data: each is a named preset of a few switches, and `MISA.step()` reads the
switches, never the name. Any switch can be overridden on the constructor for ablations.

    paper     Algorithm 1 as printed (arXiv 2511.00056)
    official  the authors' code (github.com/pkumelon/MISA), which produced the paper's tables
    default   what trained best in our own measurements (benchmarks/results/ablation-*)
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional


@dataclass(frozen=True)
class Variant:
    name: str
    # End-of-period momentum flush: theta -= lr * beta1/(1-beta1) * m_hat / (sqrt(v_hat) + eps).
    flush: bool
    # A module sampled again for the next period keeps its Adam state and step count.
    keep_states: bool
    # 2: the importance accumulates squared gradient norms; 1: norms. Logits use the energy either way
    # (eta * G for squared norms, eta * G^2 for norms, as the authors' code does).
    norm_power: int
    # Logits are min(logit_cap, ...) (the authors' code: 5); None: no cap.
    logit_cap: Optional[float]
    # True: the bias correction G /= 1 - beta^k is written back into G, so it compounds (authors'
    # code); False: it is applied when reading G (Algorithm 1).
    compounding_correction: bool
    # True: a period's accumulated statistic is always divided by the interval T, also for the one-step
    # warm-up periods (authors' code); False: by the period's actual length.
    divide_by_interval: bool
    # "global_step": resample after every step while any module was never sampled, then whenever
    # global_step % T == 0 (authors' code). "periods": warm-up periods of `warmup_interval` steps while
    # never-sampled modules are forced in, then periods of T steps counted from the last switch.
    schedule: str
    warmup_interval: Optional[int]  # None: T
    sample_last: int  # the oldest-sampled modules forced into every sample (anti-starvation)
    # A 1-D parameter (bias) travels with its matrix (ours); False: biases are never trained, as in the
    # authors' code, whose modules are the >=2-D weights only.
    module_biases: bool
    # Non-finite gradients: False skips the step uncounted; True counts it (the statistic adds 1.0 for
    # the non-finite tensor) and skips only the update, as the authors' code does.
    count_nonfinite_steps: bool
    # A module whose accumulated statistic is exactly 0 keeps its G (authors' code).
    skip_zero_statistic: bool
    # include_embedding / include_lm_head make them modules (False) or train them every step (True).
    embedding_and_head_every_step: bool

    def with_overrides(self, **overrides) -> "Variant":
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown variant switch(es): {', '.join(sorted(unknown))}")
        changed = {k: v for k, v in overrides.items() if v is not None and getattr(self, k) != v}
        if not changed:
            return self
        return replace(self, name=f"{self.name}+" + ",".join(f"{k}={v}" for k, v in sorted(changed.items())), **changed)

    def check(self) -> "Variant":
        if self.norm_power not in (1, 2):
            raise ValueError(f"norm_power: expected 1 (norms) or 2 (squared norms), got {self.norm_power!r}")
        if self.logit_cap is not None and not self.logit_cap > 0:
            raise ValueError(f"logit_cap: expected a positive number or None, got {self.logit_cap!r}")
        if self.schedule not in ("periods", "global_step"):
            raise ValueError(f"schedule: expected 'periods' or 'global_step', got {self.schedule!r}")
        return self


PAPER = Variant(
    name="paper",
    flush=True,
    keep_states=False,
    norm_power=2,
    logit_cap=None,
    compounding_correction=False,
    divide_by_interval=False,
    schedule="periods",
    warmup_interval=None,
    sample_last=0,
    module_biases=True,
    count_nonfinite_steps=False,
    skip_zero_statistic=False,
    embedding_and_head_every_step=False,
)

OFFICIAL = Variant(
    name="official",
    flush=False,
    keep_states=True,
    norm_power=1,
    logit_cap=5.0,
    compounding_correction=True,
    divide_by_interval=True,
    schedule="global_step",
    warmup_interval=1,
    sample_last=2,
    module_biases=False,
    count_nonfinite_steps=True,
    skip_zero_statistic=True,
    embedding_and_head_every_step=True,
)

# Chosen by the ablation in benchmarks/results/ablation-cpu-small (main job, small model, 500 steps, 3
# seeds): the authors' configuration had the lowest mean final validation loss (2.459 +- 0.012, against
# 2.463 +- 0.030 for Algorithm 1 without its flush and 2.657 with it); its logit cap and its keeping
# of re-selected states changed nothing measurable there, the flush cost 0.16-0.19.
DEFAULT = replace(OFFICIAL, name="default")

PRESETS = {v.name: v for v in (DEFAULT, PAPER, OFFICIAL)}


def resolve(variant, **overrides) -> Variant:
    if isinstance(variant, Variant):
        base = variant
    elif variant in PRESETS:
        base = PRESETS[variant]
    else:
        raise ValueError(f"variant: expected one of {', '.join(map(repr, PRESETS))} or a misa.Variant, got {variant!r}")
    return base.with_overrides(**overrides).check()
