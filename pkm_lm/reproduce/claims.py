"""The headline's claims (L + 1 memory < 2L, < L; 2L < L) judged against the seed noise: on the
test split, at every validation evaluation along training, and where a claim that does not hold
is heading."""

from __future__ import annotations

import math
import statistics

from pkm_lm.experiments import headline_claims
from pkm_lm.reproduce.cells import fmt_gap, fmt_ppl, fmt_values
from pkm_lm.reproduce.noise import compare, difference, valid_at
from pkm_lm.reproduce.runs import Run


def claims_table(runs: list[Run], scale: str) -> list[str]:
    """The headline's claims, each: both means, the gap, and whether it is beyond the noise."""
    by_name = {r.name: r for r in runs if r.done}
    lines = [
        "| claim | lower | higher | gap | verdict |",
        "|---|---|---|---|---|",
    ]
    for claim, lower, higher in headline_claims(scale):
        a, b = by_name.get(lower), by_name.get(higher)
        if a is None or b is None:
            lines.append(f"| {claim}: {lower} < {higher} | - | - | - | not finished |")
            continue
        gap, beyond = difference(a, b)
        if beyond is None:
            verdict = "holds (one seed: noise unknown)" if gap < 0 else "reversed (one seed)"
        elif not beyond:
            verdict = "within the seed noise"
        else:
            verdict = "holds" if gap < 0 else "reversed"
        lines.append(
            f"| {claim}: {lower} < {higher} | {fmt_ppl(a)} | {fmt_ppl(b)} | {gap:+.1%} | {verdict} |"
        )
    return lines


def claims_along_training(runs: list[Run], scale: str) -> list[str]:
    """The claims on the validation split at every evaluation all the group's runs reached: where
    a gap opens, closes or turns, measured rather than read off the plot."""
    by_name = {r.name: r for r in runs}
    claims = [
        (c, by_name[lo], by_name[hi])
        for c, lo, hi in headline_claims(scale)
        if lo in by_name and hi in by_name
    ]
    reached = [{t for s in r.seeds for t, _ in s.curve} for r in runs]
    tokens = sorted(set.intersection(*reached)) if reached else []
    if not claims or not tokens:
        return []
    lines = [
        "| tokens | "
        + " | ".join(r.name for r in runs)
        + " | "
        + " | ".join(c for c, _, _ in claims)
        + " |",
        "|---" * (1 + len(runs) + len(claims)) + "|",
    ]
    gaps: dict[str, list[tuple[int, float]]] = {c: [] for c, _, _ in claims}
    for t in tokens:
        cells = [fmt_values(valid_at(r, t)) for r in runs]
        for claim, a, b in claims:
            gap, beyond = compare(valid_at(a, t), valid_at(b, t))
            gaps[claim].append((t, gap))
            cells.append(fmt_gap(gap, beyond))
        lines.append(f"| {t:,} | " + " | ".join(cells) + " |")
    lines += ["", *trend_notes(gaps)]
    return lines


def gap_crossing(points: list[tuple[int, float]]) -> float | None:
    """Where a straight line through (log tokens, gap) over the later half of the evaluations
    (three at least) reaches zero gap; None when the gap is not moving toward zero there."""
    later = points[len(points) // 2 :] if len(points) >= 6 else points[-3:]
    if len(later) < 3:
        return None
    x = [math.log(t) for t, _ in later]
    slope, intercept = statistics.linear_regression(x, [g for _, g in later])
    if slope == 0 or (later[-1][1] > 0) == (slope > 0):
        return None
    return math.exp(-intercept / slope)


def trend_notes(gaps: dict[str, list[tuple[int, float]]]) -> list[str]:
    """For each claim that does not hold at the last evaluation: where its gap is heading."""
    notes = []
    for claim, points in gaps.items():
        (first_t, first), (last_t, last) = points[0], points[-1]
        if last < 0:
            continue
        crossing = gap_crossing(points)
        if len(points) < 3:
            trend = "Too few evaluations to tell where it is heading."
        elif crossing is None:
            trend = (
                "It is not closing over the later evaluations: the curves give no token count "
                "at which the claim would hold."
            )
        else:
            trend = (
                f"A straight line through its later points (gap against log tokens) reaches zero "
                f"at about {crossing:,.0f} tokens: an extrapolation, not a measurement."
            )
        notes.append(
            f"- {claim}: the gap went from {first:+.1%} at {first_t:,} tokens to {last:+.1%} at "
            f"{last_t:,}. {trend}"
        )
    return notes
