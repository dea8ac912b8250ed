"""A goal met only when the figure beats it by more than the run-to-run spread measured.

A ratio of 0.76x against a target of 0.75x, from steps that vary by 5%, is not a met target:
the next run may well give 0.73x. ``Target.met`` asks for the figure minus (or plus) its spread
to clear the target; every benchmark and the GPU check use this one rule.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass


@dataclass
class Target:
    name: str
    value: float
    target: float
    higher_is_better: bool
    spread: float  # relative run-to-run spread of ``value``, (max - min) / median

    @property
    def met(self) -> bool:
        margin = abs(self.value) * self.spread
        if self.higher_is_better:
            return self.value - margin > self.target
        return self.value + margin < self.target

    def line(self) -> str:
        sign = ">=" if self.higher_is_better else "<="
        verdict = "met" if self.met else "not met"
        return (
            f"{self.name}: {self.value:.2f}x (spread {self.spread:.0%}), "
            f"target {sign} {self.target:g}x: {verdict}"
        )

    def as_dict(self) -> dict:
        return {**asdict(self), "met": self.met}


def ratio_spread(*spreads: float) -> float:
    """Spread of a ratio (or product) of medians: the relative spreads add (first order)."""
    return sum(spreads)


def spread(samples: list[float]) -> float:
    """(max - min) / median of repeated timings."""
    return (max(samples) - min(samples)) / statistics.median(samples)


def faster_than(name: str, ours: list[float], reference: list[float]) -> Target:
    """``ours`` (seconds per round) against ``reference``: the ratio of their medians must
    stay below 1 by more than the two timings' spreads together."""
    ratio = statistics.median(ours) / statistics.median(reference)
    return Target(name, ratio, 1.0, False, ratio_spread(spread(ours), spread(reference)))
