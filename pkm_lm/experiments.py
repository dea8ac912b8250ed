"""The paper's experiment groups and reference numbers, in one place.

    python -m pkm_lm.experiments table1 --scale tiny     # the group's experiment names, one a line

scripts/sweep.sh trains what this lists, pkm_lm.reproduce puts the paper's numbers beside
ours from here, scripts/bench_speed.py times the Table 1 shapes named here, and the tests check
configs/experiment/ against it. An experiment NAME is the config +experiment=NAME at the paper
scale and +experiment=SCALE/NAME at the others.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass

from pkm_lm import cli
from pkm_lm.errors import ConfigError

SCALES = ("paper", "small", "tiny", "cpu", "gpu")

# Table 1: layers x memories at dim 1024 ("base") and 1600 ("wide"), memories spread evenly.
TABLE1 = (
    "12L_0mem", "12L_1mem", "12L_2mem", "12L_3mem", "16L_0mem", "16L_1mem", "16L_2mem",
    "24L_0mem", "24L_1mem", "12L_0mem_1600d", "12L_1mem_1600d", "16L_0mem_1600d",
    "16L_1mem_1600d", "24L_0mem_1600d",
)  # fmt: skip
_TABLE1_RE = re.compile(r"^(\d+)L_(\d+)mem(_1600d)?$")

# Test perplexity on CC-News, Table 1 of Lample et al. (2019): (layers, memories, dim) -> ppl.
PAPER_TABLE1 = {
    (12, 0, 1024): 17.66, (12, 1, 1024): 15.62, (12, 2, 1024): 14.79, (12, 3, 1024): 14.47,
    (16, 0, 1024): 16.65, (16, 1, 1024): 14.88, (16, 2, 1024): 14.10,
    (24, 0, 1024): 16.02, (24, 1, 1024): 14.62,
    (12, 0, 1600): 15.00, (12, 1, 1600): 13.65,
    (16, 0, 1600): 14.36, (16, 1, 1600): 13.17,
    (24, 0, 1600): 13.95,
}  # fmt: skip
# The ablation numbers the paper states in its text (section 4.5): experiment -> (ppl, usage %).
PAPER_ABLATION = {
    "memsize_16k": (22.80, None),
    "memsize_1M": (17.98, None),
    "bn_on_1M": (17.98, 80.3),
    "bn_off_1M": (19.79, 25.8),
}
# The headline finding: L layers + 1 memory vs 2L layers vs L layers. At the cpu scale L = 2
# (its own configs); at every other scale it is the paper's L = 12, three cells of Table 1.
HEADLINE_CPU = ("headline_2L", "headline_2L_1mem", "headline_4L")
HEADLINE = ("12L_0mem", "12L_1mem", "24L_0mem")
# The Table 1 cell each cpu-scale headline model stands for (its paper perplexity).
HEADLINE_COUNTERPART = dict(zip(HEADLINE_CPU, HEADLINE, strict=True))
# Beyond the paper: facts stored (pkm_lm.capacity) by L, L + 1 memory and 2L at each of these
# population sizes of synthetic people (pkm_lm/data/facts.py), L = 2.
CAPACITY_PEOPLE = {"cpu": (100, 200, 400), "gpu": (2000, 5000, 20000)}


@dataclass(frozen=True)
class Group:
    name: str
    experiments: tuple[str, ...]
    scales: tuple[str, ...]
    finding: str  # what the paper found (section 4), printed above our table


_ABLATION_SCALES = ("paper", "small", "tiny")
GROUPS = {
    g.name: g
    for g in (
        Group(
            "table1",
            TABLE1,
            ("paper", "small", "tiny", "gpu"),
            "more layers, width and memories all help; 12 layers + 1 memory beat 24 layers "
            "without memory, at about twice the inference speed; at dim 1600 a memory barely "
            "slows inference.",
        ),
        # Ablations: the 6-layer model of configs/experiment/ablation.yaml, one thing changed.
        Group(
            "memsize",
            ("memsize_16k", "memsize_65k", "memsize_262k", "memsize_1M"),
            _ABLATION_SCALES,
            "a larger memory helps (16k -> 1M: 22.80 -> 17.98) at nearly constant inference time.",
        ),
        Group(
            "bn",
            ("bn_on_16k", "bn_off_16k", "bn_on_65k", "bn_off_65k", "bn_on_1M", "bn_off_1M"),
            _ABLATION_SCALES,
            "query BN matters for large memories (1M: usage 25.8% -> 80.3%, perplexity 19.79 -> "
            "17.98) and little at 16k/65k, whose usage is already near 100%.",
        ),
        Group(
            "position",
            tuple(f"position_{i}" for i in range(1, 7)),
            _ABLATION_SCALES,
            "the middle layers (4 or 5 of 6) are best, the first is worst, the last is poor.",
        ),
        Group(
            "heads",
            (
                "heads_1x64",
                "heads_2x32",
                "heads_4x16",
                "heads_8x8",
                "heads_4x32",
                "heads_8x32",
                "heads_4x64",
            ),  # fmt: skip
            _ABLATION_SCALES,
            "equal heads x knn budgets ((1,64), (2,32), (4,16), (8,8)) perform alike; more heads "
            "or more keys help; 4 x 32 is the chosen trade-off.",
        ),
        Group(
            "keys",
            (
                "keys_product_16k",
                "keys_product_65k",
                "keys_product_262k",
                "keys_flat_16k",
                "keys_flat_65k",
                "keys_flat_262k",
            ),  # fmt: skip
            _ABLATION_SCALES,
            "product keys beat flat keys in speed, usage and perplexity; flat-key time grows "
            "with |K| while product-key time stays nearly flat (Figure 7).",
        ),
        # Beyond the paper: the causal query norms, and the Memory+ preset.
        Group(
            "querynorm",
            ("querynorm_batchnorm", "querynorm_layernorm", "querynorm_none"),
            (*_ABLATION_SCALES, "cpu"),
            "BN vs no norm only (section 4.5: at 1M slots BN raises usage 25.8% -> 80.3% and "
            "lowers perplexity 19.79 -> 17.98). In training BN normalises over the whole batch, "
            "later positions included, so it is not causal; a per-token LayerNorm (causal) is "
            "not in the paper.",
        ),
        Group(
            "plus",
            ("plus_pkm", "plus_memoryplus"),
            (*_ABLATION_SCALES, "cpu"),
            "(not in this paper) Memory Layers at Scale (Berges et al., 2024): memories in "
            "several blocks reading one shared table, with a gated output (Memory+), beat "
            "dense models with over twice the compute. Here: 12L + 1 memory (the PKM) vs "
            "Memory+ at 3 blocks, the same table, fewer parameters (1.8% at the paper's "
            "scale), equal tokens.",
        ),
        Group(
            "headline",
            HEADLINE,
            SCALES,
            "(Table 1) 12 layers + 1 memory beat 24 layers without memory (15.62 vs 16.02) "
            "and 12 layers (17.66).",
        ),
    )
}


# Groups with a driver of their own (data per population size, recall scoring) instead of
# sweep.sh's train-then-test loop; scripts/sweep.sh hands them over to it.
FACTS_GROUPS = {
    "capacity": Group(
        "capacity",
        ("capacity_2L", "capacity_2L_1mem", "capacity_4L"),
        tuple(CAPACITY_PEOPLE),
        "(not in this paper) Memory Layers at Scale (Berges et al., 2024): a memory raises "
        "factual QA by over 100% at equal compute. Here: synthetic biographies, recall of "
        "every fact and the bits it stores (python -m pkm_lm.capacity, docs/knowledge.md).",
    )
}


def experiments(group: str, scale: str) -> tuple[str, ...]:
    """The experiment names ``group`` trains at ``scale``; ConfigError names the allowed values."""
    groups = GROUPS | FACTS_GROUPS
    if group not in groups:
        raise ConfigError(f"GROUP={group} is not a group; choose one of {' '.join(groups)}")
    if scale not in SCALES:
        raise ConfigError(f"--scale={scale} is not a scale; choose one of {' '.join(SCALES)}")
    if scale not in groups[group].scales:
        runs_at = " ".join(g for g in groups if scale in groups[g].scales)
        raise ConfigError(
            f"{group} does not run at --scale {scale} (its scales: "
            f"{' '.join(groups[group].scales)}); --scale {scale} runs: {runs_at}"
        )
    if group == "headline" and scale == "cpu":
        return HEADLINE_CPU
    return groups[group].experiments


def headline_claims(scale: str) -> list[tuple[str, str, str]]:
    """The headline's claims at a scale: (claim, experiment said lower in perplexity, higher)."""
    one, one_mem, two = experiments("headline", scale)  # L, L + 1 memory, 2L
    return [
        ("L + 1 memory < 2L", one_mem, two),
        ("L + 1 memory < L", one_mem, one),
        ("2L < L (depth pays)", two, one),
    ]


def config_name(name: str, scale: str) -> str:
    """The +experiment= value of an experiment at a scale."""
    return name if scale == "paper" else f"{scale}/{name}"


def table1_shape(name: str) -> tuple[int, int, bool] | None:
    """(layers, memories, wide) of a Table 1 cell name such as 16L_1mem_1600d; None otherwise."""
    m = _TABLE1_RE.match(name)
    return (int(m.group(1)), int(m.group(2)), bool(m.group(3))) if m else None


def paper_reference(name: str) -> tuple[float | None, float | None]:
    """(test perplexity, memory usage %) the paper reports for an experiment, None if it does not."""
    shape = table1_shape(HEADLINE_COUNTERPART.get(name, name))
    if shape:
        layers, mems, wide = shape
        return PAPER_TABLE1.get((layers, mems, 1600 if wide else 1024)), None
    return PAPER_ABLATION.get(name, (None, None))


@cli.main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pkm_lm.experiments", description=__doc__.split("\n")[0]
    )
    parser.add_argument("group", help=f"one of {' '.join(GROUPS)}")
    parser.add_argument("--scale", default="paper", help=f"one of {' '.join(SCALES)}")
    args = parser.parse_args(argv)
    print("\n".join(experiments(args.group, args.scale)))


if __name__ == "__main__":
    main(sys.argv[1:])
