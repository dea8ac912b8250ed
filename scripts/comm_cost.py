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
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir

from pkm_lm import cli
from pkm_lm.config import TrainConfig, register_configs, to_train_config
from pkm_lm.distributed import SparseGrads
from pkm_lm.memory.layer import draw_rows
from pkm_lm.memory_parallel import check_memory_parallel
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
    layers: int = 1  # memory layers (several may read one shared table)
    tokens: int = 0  # tokens of one rank's micro-step
    reads: int = 0  # reads per token and memory layer: heads x knn


def expected_distinct(reads: float, slots: int) -> float:
    return slots * -math.expm1(reads * math.log1p(-1.0 / slots))


def shapes(cfg: TrainConfig, world: int, size: int = 1) -> Shapes:
    """``size``: ranks per memory-parallel group; a rank reads its columns for the whole
    group's tokens, so its table gradient covers the rows the group touches."""
    model = build_model(cfg.model, "meta")
    micro, accum = cfg.train.micro_steps(world)
    mem = cfg.model.memory
    width = mem.v_dim or cfg.model.dim
    layers = len(cfg.model.memory_layers)
    tokens = micro * cfg.data.seq_len
    tables = model.value_parameters()
    # Reads of one table by one rank per micro-step (a shared table is read by every layer).
    reads = tokens * mem.heads * mem.knn * layers // len(tables) * size
    return Shapes(
        params=model.num_params(),
        values=sum(p.numel() for p in tables),
        rows=mem.n_slots,
        width=width,
        tables=len(tables),
        touched_micro=expected_distinct(reads, mem.n_slots),
        touched_step=expected_distinct(reads * accum, mem.n_slots),
        grad_rows=min(reads * accum, mem.n_slots),
        accum=accum,
        layers=layers,
        tokens=tokens,
        reads=mem.heads * mem.knn,
    )


def ring(world: int) -> float:
    """Bytes a rank sends per byte all-reduced over ``world`` ranks (ring)."""
    return 2 * (world - 1) / world


def split_read(s: Shapes, size: int) -> tuple[float, float]:
    """(bytes held from forward to backward, bytes sent per step) of the memory-parallel reads
    of one rank: the group's indices and weights all-gathered, this rank's columns of the
    group's tokens, the columns' all-to-all there and back, the weight gradients'
    reduce-scatter; every memory layer, every micro-step."""
    if size == 1:
        return 0.0, 0.0
    gathered = size * s.tokens * s.reads * (INDEX + FLOAT)
    held = s.layers * (gathered + s.tokens * s.width * FLOAT)
    per_read = (
        (size - 1)
        * s.tokens
        * (s.reads * (INDEX + FLOAT) + 2 * s.width // size * FLOAT + s.reads * FLOAT)
    )
    return held, s.accum * s.layers * per_read


def rows_for(s: Shapes, world: int, size: int = 1) -> list[tuple[str, float, float, float]]:
    """(mode, memory excluding activations, of which value-sync buffers, bytes sent) per rank;
    ``size``: ranks per memory-parallel group (each holds width / size columns of each table,
    averaged over the world / size ranks that hold the same columns)."""
    replicas, part = world // size, s.width // size
    split = s.tables * s.rows * part  # this rank's values
    dense = s.params - s.values
    common = 3 * (dense + split) * FLOAT  # fp32 weights + Adam's two moments (dense or lazy)
    read_held, read_sent = split_read(s, size)
    out = []
    # Dense value gradients: one more table in DDP's buckets, all-reduced with the rest.
    out.append(
        (
            "dense grad",
            common + (dense + split) * FLOAT + read_held,
            0.0,
            ring(world) * dense * FLOAT + ring(replicas) * split * FLOAT + read_sent,
        )
    )
    # Sparse: the accumulated gradient (rows touched by this rank) + LazyAdam's scratch rows.
    row = part * FLOAT + INDEX
    sparse_grad = s.tables * s.grad_rows * row
    scratch = s.tables * 2 * s.grad_rows * part * FLOAT
    base = common + dense * FLOAT + sparse_grad + scratch + read_held
    averaged = replicas > 1  # with one group, nothing is averaged and no buffer is held
    dense_branch = averaged * s.tables * s.rows * part * FLOAT  # handed over as the gradient
    chunk = s.grad_rows * (part + 1) * FLOAT  # ids share the values' buffer
    gather_branch = averaged * s.tables * (replicas + 1) * chunk
    union = averaged * s.tables * min(replicas * s.grad_rows, s.rows) * part * FLOAT  # merged
    picks_dense = replicas * s.grad_rows >= SparseGrads([]).dense_fraction * s.rows
    sent = ring(world) * dense * FLOAT + read_sent
    dense_sent = sent + s.tables * ring(replicas) * s.rows * part * FLOAT
    gather_sent = sent + s.tables * (replicas - 1) * chunk
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


def building_peak(s: Shapes, size: int = 1) -> float:
    """Bytes on a rank's device while the model is initialised: the model with this rank's
    columns of each table, and one block of rows of a whole table (``draw_values_``)."""
    block = min(draw_rows(s.width), s.rows) * s.width
    return (s.params - s.values + s.values // size + block) * FLOAT


@cli.main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--experiments", nargs="+", default=["12L_1mem", "memsize_1M"])
    p.add_argument("--world", type=int, nargs="+", default=[8], help="ranks (one table each)")
    p.add_argument("--vocab", type=int, default=60000, help="token embedding rows (the corpus')")
    p.add_argument(
        "--memory-parallel",
        type=int,
        nargs="+",
        metavar="N",
        help="distributed.memory_parallel values: one table of every N and ranks instead",
    )
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="overrides of every experiment, e.g. model.dim=1600 model.memory.n_keys=4096",
    )
    args = p.parse_args()
    register_configs()
    with initialize_config_dir(str(CONFIGS), version_base=None):
        configs = {}
        for name in args.experiments:
            overrides = [f"+experiment={name}", f"model.vocab_size={args.vocab}", *args.set]
            configs[" ".join([name, *args.set])] = to_train_config(compose("train", overrides))
    if args.memory_parallel:
        for cfg, world, size in itertools.product(
            configs.values(), args.world, args.memory_parallel
        ):
            cfg.distributed.memory_parallel = size
            check_memory_parallel(cfg, world)  # the trainer's rule, before any output
        print_split_table(configs, args.world, args.memory_parallel, args.vocab)
        return
    for world in args.world:
        print_table(configs, world, args.vocab)


def print_table(configs: dict[str, TrainConfig], world: int, vocab: int) -> None:
    print(f"{world} ranks, vocabulary {vocab:,}, fp32 master weights; GB = 1e9 bytes\n")
    print(
        "| experiment | value gradient | rows touched per rank and step (share of the table) | "
        "memory per rank w/o activations | of which value-sync buffers | sent per rank and step |"
    )
    print("|---|---|---|---|---|---|")
    for name, cfg in configs.items():
        s = shapes(cfg, world)
        touched = (
            f"{s.touched_step:,.0f} ({s.touched_step / s.rows:.0%}; one micro-step of "
            f"{s.accum}: {s.touched_micro / s.rows:.0%})"
        )
        for mode, memory, buffers, sent in rows_for(s, world):
            print(
                f"| {name} | {mode} | {touched} | {memory / GB:.1f} GB | "
                f"{buffers / GB:.2f} GB | {sent / GB:.2f} GB |"
            )
    print(
        "\n\\* the branch SparseGrads picks (dense once world x longest >= |K|). The all-gather "
        f"of every touched row would hold {world + 1} x the rows per rank."
    )


def print_split_table(configs: dict[str, TrainConfig], worlds, sizes, vocab: int) -> None:
    """Each experiment, world and N: the dense value gradient and the sparse one (the branch
    SparseGrads picks), per rank."""
    print(f"vocabulary {vocab:,}, fp32 master weights; GB = 1e9 bytes\n")
    print(
        "| experiment | ranks | N | value gradient | memory per rank w/o activations | "
        "of which value tables, gradients, optimizer state | of which read buffers | "
        "peak while building | sent per rank and step |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, cfg in configs.items():
        for world in worlds:
            for size in sizes:
                s = shapes(cfg, world, size)
                read, _ = split_read(s, size)
                rest = 4 * (s.params - s.values) * FLOAT  # weights, gradients, Adam moments
                for mode, memory, _, sent in rows_for(s, world, size):
                    if mode.startswith("sparse") and not mode.endswith("*"):
                        continue  # the branch SparseGrads does not pick
                    tables = memory - read - rest
                    print(
                        f"| {name} | {world} | {size} | {mode.rstrip(' *')} | "
                        f"{memory / GB:.1f} GB | {tables / GB:.1f} GB | {read / GB:.2f} GB | "
                        f"{building_peak(s, size) / GB:.1f} GB | {sent / GB:.2f} GB |"
                    )


if __name__ == "__main__":
    main()
