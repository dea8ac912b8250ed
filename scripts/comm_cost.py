"""Per-rank memory and bytes sent per optimizer step of data-parallel training, from the real
config shapes (composed by Hydra, model built on the meta device: nothing is allocated).

    python scripts/comm_cost.py [--experiments 12L_1mem memsize_1M] [--world 8] [--vocab 60000]

For each experiment and each way the value table's gradient can travel:
- ``dense grad``: ``model.memory.sparse_grad=false`` (the paper configs): the table's gradient is
  dense and DDP all-reduces it with every other gradient;
- ``sparse, dense branch`` / ``sparse, gather branch``: ``sparse_grad=true``; ``SparseGrads``
  averages the touched rows with one all-reduce of a (|K|, v_dim) buffer, or one all-gather
  of each rank's rows padded to the longest rank, whichever its rule picks (marked *).

Counted, in fp32 bytes: parameters, gradients (DDP's gradient buckets are the gradients:
``gradient_as_bucket_view``), Adam's two moments (LazyAdam's too, plus its scratch rows), the
value-gradient sync buffers and the sparse gradient itself. NOT counted: activations, the
allocator's fragmentation, NCCL's own buffers; measure those on a GPU (``make gpu-check``).
Touched rows: the expected number of distinct slots hit by the step's reads if every read
picked a slot uniformly at random, the most distinct rows a given number of reads can hit on
average (skewed real access touches fewer). On a GPU the sparse gradient has a fixed size,
min(reads, |K|) rows (padded with zero rows, so nothing waits for the device): the memory and
bytes use that. Bytes sent per rank by ring collectives:
all-reduce 2 (W - 1) / W x size, all-gather (W - 1) x chunk.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir

from pkm_lm import cli
from pkm_lm.config import TrainConfig, register_configs, to_train_config
from pkm_lm.distributed import SparseGrads
from pkm_lm.model import build_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FLOAT, INDEX = 4, 8  # bytes of an fp32 value, of an int64 row id
GB = 1e9


@dataclass
class Shapes:
    params: int  # all parameters
    values: int  # rows x width of the value tables
    rows: int  # |K| per table
    width: int  # v_dim
    tables: int
    touched_micro: float  # distinct rows one micro-step of one rank touches
    touched_step: float  # ... all micro-steps of one rank (the accumulated gradient)
    grad_rows: int  # rows of that gradient on a GPU: min(reads, |K|), padded with zero rows
    accum: int


def expected_distinct(reads: float, slots: int) -> float:
    return slots * -math.expm1(reads * math.log1p(-1.0 / slots))


def shapes(cfg: TrainConfig, world: int) -> Shapes:
    model = build_model(cfg.model, "meta")
    micro, accum = cfg.train.micro_steps(world)
    mem = cfg.model.memory
    tables = len(cfg.model.memory_layers)
    width = mem.v_dim or cfg.model.dim
    reads = micro * cfg.data.seq_len * mem.heads * mem.knn
    return Shapes(
        params=model.num_params(),
        values=sum(p.numel() for p in model.value_parameters()),
        rows=mem.n_slots,
        width=width,
        tables=tables,
        touched_micro=expected_distinct(reads, mem.n_slots),
        touched_step=expected_distinct(reads * accum, mem.n_slots),
        grad_rows=min(reads * accum, mem.n_slots),
        accum=accum,
    )


def rows_for(s: Shapes, world: int) -> list[tuple[str, float, float, float]]:
    """(mode, memory excluding activations, of which value-sync buffers, bytes sent) per rank."""
    dense = s.params - s.values
    ring = 2 * (world - 1) / world
    common = 3 * s.params * FLOAT  # fp32 weights + Adam's two moments (dense or lazy)
    out = []
    # Dense value gradients: one more table in DDP's buckets, all-reduced with the rest.
    out.append(("dense grad", common + s.params * FLOAT, 0.0, ring * s.params * FLOAT))
    # Sparse: the accumulated gradient (rows touched by this rank) + LazyAdam's scratch rows.
    row = s.width * FLOAT + INDEX
    sparse_grad = s.tables * s.grad_rows * row
    scratch = s.tables * 2 * s.grad_rows * s.width * FLOAT
    base = common + dense * FLOAT + sparse_grad + scratch
    dense_branch = s.tables * s.rows * s.width * FLOAT  # handed over as the gradient itself
    chunk = s.grad_rows * (s.width + 1) * FLOAT  # ids share the values' buffer
    gather_branch = s.tables * (world + 1) * chunk
    union = s.tables * min(world * s.grad_rows, s.rows) * s.width * FLOAT  # merged rows
    picks_dense = world * s.grad_rows >= SparseGrads([]).dense_fraction * s.rows
    dense_sent = ring * dense * FLOAT + s.tables * ring * s.rows * s.width * FLOAT
    gather_sent = ring * dense * FLOAT + s.tables * (world - 1) * chunk
    mark = {True: " *", False: ""}
    out.append(
        (
            "sparse, dense branch" + mark[picks_dense],
            base + dense_branch,
            dense_branch,
            dense_sent,
        )
    )
    out.append(
        (
            "sparse, gather branch" + mark[not picks_dense],
            base + gather_branch + union,
            gather_branch,
            gather_sent,
        )
    )
    return out


@cli.main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--experiments", nargs="+", default=["12L_1mem", "memsize_1M"])
    p.add_argument("--world", type=int, default=8, help="data-parallel ranks")
    p.add_argument("--vocab", type=int, default=60000, help="token embedding rows (the corpus')")
    args = p.parse_args()
    register_configs()
    print(f"{args.world} ranks, vocabulary {args.vocab:,}, fp32 master weights; GB = 1e9 bytes\n")
    print(
        "| experiment | value gradient | rows touched per rank and step (share of the table) | "
        "memory per rank w/o activations | of which value-sync buffers | sent per rank and step |"
    )
    print("|---|---|---|---|---|---|")
    with initialize_config_dir(str(CONFIGS), version_base=None):
        for name in args.experiments:
            dcfg = compose("train", [f"+experiment={name}", f"model.vocab_size={args.vocab}"])
            cfg = to_train_config(dcfg)
            s = shapes(cfg, args.world)
            touched = (
                f"{s.touched_step:,.0f} ({s.touched_step / s.rows:.0%}; one micro-step of "
                f"{s.accum}: {s.touched_micro / s.rows:.0%})"
            )
            for mode, memory, buffers, sent in rows_for(s, args.world):
                print(
                    f"| {name} | {mode} | {touched} | {memory / GB:.1f} GB | "
                    f"{buffers / GB:.2f} GB | {sent / GB:.2f} GB |"
                )
    print(
        "\n\\* the branch SparseGrads picks (dense once world x longest >= |K|). The all-gather "
        f"of every touched row would hold {args.world + 1} x the rows per rank."
    )


if __name__ == "__main__":
    main()
