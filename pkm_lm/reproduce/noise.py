"""Seed statistics: the mean and spread of an experiment's test perplexity, and whether a gap
between two experiments is beyond the seed noise."""

from __future__ import annotations

import math
import statistics

from pkm_lm.reproduce.runs import Run

# Two means differ beyond the seed noise when the gap exceeds this many standard errors of the
# difference, sqrt(s_a^2 / n_a + s_b^2 / n_b) (about a 95% band for normal noise).
NOISE_SE = 2.0


def ppl(run: Run) -> float | None:
    """Mean test perplexity over the finished seeds."""
    return run.mean(lambda s: s.test["ppl"])


def ppl_std(run: Run) -> float | None:
    """Sample standard deviation of the test perplexity over seeds (None below two seeds)."""
    values = [s.test["ppl"] for s in run.done]
    return statistics.stdev(values) if len(values) > 1 else None


def compare(a: list[float], b: list[float]) -> tuple[float, bool | None]:
    """(relative gap of the mean of ``a`` to the mean of ``b``, whether it exceeds the seed noise).

    The noise verdict is None while either side has fewer than two seeds (no spread known)."""
    mean_a, mean_b = statistics.fmean(a), statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return mean_a / mean_b - 1, None
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return mean_a / mean_b - 1, abs(mean_a - mean_b) > NOISE_SE * se


def difference(a: Run, b: Run) -> tuple[float, bool | None]:
    """``compare`` on two experiments' test perplexities, one per finished seed."""
    return compare([s.test["ppl"] for s in a.done], [s.test["ppl"] for s in b.done])


def valid_at(run: Run, tokens: int) -> list[float]:
    """The validation perplexity of each seed that was evaluated after ``tokens`` training tokens."""
    return [c[tokens] for s in run.seeds if tokens in (c := dict(s.curve))]
