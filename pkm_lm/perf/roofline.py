"""The memory layer's roofline floor: bytes moved and FLOPs of each phase, from the real shapes.

A phase can go no faster than its bytes over the device's bandwidth or its FLOPs over its
FLOP/s, whichever is larger; the floor of a forward or a training step is the sum over its
phases. Counted, per phase (the names match the profiler regions of ``pkm_lm.perf.profile``):

- query: read x and the query weights, write the queries (and the norm's read + write);
- select: read the queries and sub-keys, write and re-read both halves' (H, N, n_keys)
  scores for their top-k, the candidate merge, the softmax weights;
- value_read: the indices and weights, every read row of the table (H x knn rows per token:
  most of the bytes), the output;
- backward: each phase again, with the value read's second gather (the weight gradients
  need each read row), one sort of the reads, and a dense |K| x v gradient written once;
- clip: one read of every gradient for the norm (the scale by a scalar folds into the
  optimizer, as fused Adam's ``grad_scale`` does);
- optimizer: dense Adam reads parameter, gradient and both moments and writes three of them;
  a separate gather copy of the table (e.g. bf16 of fp32 master weights) is rewritten too.

Small tensors that stay in cache (the output gradient read once per row, the sub-keys) are
counted once. Indices are int64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .devices import Peaks

BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2}
INDEX = 8  # int64 indices


@dataclass(frozen=True)
class LayerShapes:
    """One memory layer's step: ``tokens`` inputs of size ``dim``, |K| = n_keys^2 slots."""

    dim: int = 512
    tokens: int = 8192
    heads: int = 4
    knn: int = 32
    k_dim: int = 512
    n_keys: int = 512
    v_dim: int | None = None  # None: dim
    table: str = "fp32"  # the value table (master weights)
    gather: str | None = None  # the copy the forward reads, None: the table itself
    activations: str = "fp32"  # x, the output and their gradients (bf16/fp16 under autocast)
    matmul: str = "fp32"  # the query and score matmuls: fp32 (TF32 off), tf32, bf16, fp16
    query_norm: bool = True

    @property
    def values(self) -> int:
        return self.v_dim or self.dim

    @property
    def slots(self) -> int:
        return self.n_keys**2

    @property
    def reads(self) -> int:
        return self.tokens * self.heads * self.knn

    @property
    def candidates(self) -> int:
        """Candidate pairs per head and token that can reach the top-k (as candidate_pairs)."""
        return sum(self.knn // (a + 1) for a in range(self.knn))


@dataclass
class Phase:
    name: str
    bytes: float
    matmul_flops: float = 0.0  # at the shapes' matmul precision
    vector_flops: float = 0.0  # elementwise/reductions on fp32 cores

    def seconds(self, peaks: Peaks, matmul: str) -> float:
        compute = self.matmul_flops / peaks.flops(matmul) + self.vector_flops / peaks.fp32
        return max(self.bytes / peaks.bandwidth, compute)

    def bound(self, peaks: Peaks, matmul: str) -> str:
        compute = self.matmul_flops / peaks.flops(matmul) + self.vector_flops / peaks.fp32
        return "memory" if self.bytes / peaks.bandwidth >= compute else "compute"

    @property
    def flops(self) -> float:
        return self.matmul_flops + self.vector_flops


def forward_phases(s: LayerShapes) -> list[Phase]:
    f32, act = 4, BYTES[s.activations]
    q = s.tokens * s.heads * s.k_dim  # query elements
    scores = 2 * s.heads * s.tokens * s.n_keys  # both halves' sub-key scores
    half_top = 2 * s.heads * s.tokens * s.knn
    top = s.heads * s.tokens * s.knn
    query = Phase(
        "query",
        s.tokens * s.dim * act
        + s.dim * s.heads * s.k_dim * f32
        + q * f32 * (3 if s.query_norm else 1),
        matmul_flops=2 * s.tokens * s.dim * s.heads * s.k_dim,
    )
    select = Phase(
        "select",
        q * f32
        + s.heads * s.n_keys * s.k_dim * f32
        + 2 * scores * f32  # written, then read by top-k
        + 2 * half_top * (f32 + INDEX)  # the halves' top-k, written and read by the merge
        + s.heads * s.tokens * s.candidates * f32
        + top * (f32 + INDEX + f32),  # merged scores and indices, softmax weights
        matmul_flops=2 * s.heads * s.tokens * s.n_keys * s.k_dim,
        vector_flops=s.heads * s.tokens * s.candidates,
    )
    value_read = Phase(
        "value_read",
        top * (INDEX + f32)
        + s.reads * s.values * BYTES[s.gather or s.table]
        + s.tokens * s.values * act,
        vector_flops=2 * s.reads * s.values,
    )
    return [query, select, value_read]


def backward_phases(s: LayerShapes) -> list[Phase]:
    f32, act = 4, BYTES[s.activations]
    q = s.tokens * s.heads * s.k_dim
    value_read = Phase(
        "value_read backward",
        2 * s.reads * 2 * INDEX  # one sort of (slot, position): read and write both
        + s.tokens * s.values * act  # the output gradient, cache-resident after its first read
        + s.reads * s.values * BYTES[s.gather or s.table]  # rows again, for the weight grads
        + s.slots * s.values * f32  # the dense table gradient, written once
        + s.reads * (INDEX + 2 * f32),  # indices, weights, weight gradients
        vector_flops=4 * s.reads * s.values,
    )
    half_top = 2 * s.heads * s.tokens * s.knn
    select = Phase(
        "select backward",
        s.heads * s.tokens * s.knn * 2 * f32  # softmax backward
        + half_top * (f32 + INDEX)  # the halves' score gradients and indices
        + 2 * q * f32  # queries read, their gradient written
        + 2 * s.heads * s.n_keys * s.k_dim * f32,  # sub-keys read, their gradient written
        vector_flops=4 * half_top * s.k_dim // 2,
    )
    query = Phase(
        "query backward",
        q * f32 * (4 if s.query_norm else 1)
        + 2 * s.tokens * s.dim * act  # x read, its gradient written
        + 2 * s.dim * s.heads * s.k_dim * f32,
        matmul_flops=4 * s.tokens * s.dim * s.heads * s.k_dim,
    )
    return [query, select, value_read]


def parameters(s: LayerShapes) -> int:
    """Trainable elements: value table, sub-keys, query weights (+ norm and bias)."""
    return s.slots * s.values + s.heads * s.n_keys * s.k_dim + (s.dim + 3) * s.heads * s.k_dim


def update_phases(s: LayerShapes) -> list[Phase]:
    f32 = 4
    n = parameters(s)
    refresh = s.slots * s.values * BYTES[s.gather] if s.gather and s.gather != s.table else 0
    return [
        Phase("clip", n * f32, vector_flops=2 * n),
        Phase("optimizer", 7 * n * f32 + refresh, vector_flops=12 * n),
    ]


@dataclass
class Roofline:
    shapes: LayerShapes
    peaks: Peaks
    forward: list[Phase] = field(default_factory=list)
    training: list[Phase] = field(default_factory=list)

    def seconds(self, phases: list[Phase]) -> float:
        return sum(p.seconds(self.peaks, self.shapes.matmul) for p in phases)


def roofline(shapes: LayerShapes, peaks: Peaks) -> Roofline:
    fwd = forward_phases(shapes)
    return Roofline(shapes, peaks, fwd, fwd + backward_phases(shapes) + update_phases(shapes))


def table(r: Roofline, measured: dict[str, float] | None = None) -> str:
    """Markdown: each phase's GB, GFLOP, floor and bound; ``measured`` (seconds by phase name,
    or by "forward" / "training step") adds the measured time and its ratio to the floor."""
    measured = measured or {}
    pk, mm = r.peaks, r.shapes.matmul
    lines = [
        "| phase | GB moved | GFLOP | floor ms | bound | measured ms | measured / floor |",
        "|---|---|---|---|---|---|---|",
    ]

    def row(name: str, phases: list[Phase], bold: bool = False) -> None:
        nbytes = sum(p.bytes for p in phases)
        flops = sum(p.flops for p in phases)
        floor = r.seconds(phases)
        bound = {p.bound(pk, mm) for p in phases}
        t = measured.get(name)
        cells = [f"{t * 1e3:.3f}", f"{t / floor:.2f}x"] if t else ["-", "-"]
        label = f"**{name}**" if bold else name
        lines.append(
            f"| {label} | {nbytes / 1e9:.3f} | {flops / 1e9:.2f} | {floor * 1e3:.3f} | "
            f"{'/'.join(sorted(bound))} | {' | '.join(cells)} |"
        )

    for p in r.forward:
        row(p.name, [p])
    row("forward", r.forward, bold=True)
    for p in r.training[len(r.forward) :]:
        row(p.name, [p])
    row("training step", r.training, bold=True)
    return "\n".join(lines)


def describe(r: Roofline) -> str:
    s, pk = r.shapes, r.peaks
    return (
        f"dim {s.dim}, {s.tokens:,} tokens, {s.heads} heads x knn {s.knn}, k_dim {s.k_dim}, "
        f"|K| = {s.n_keys}^2 = {s.slots:,}, v_dim {s.values}; table {s.table}, gather "
        f"{s.gather or s.table}, activations {s.activations}, matmuls {s.matmul}; "
        f"peaks ({pk.source}) of {pk.name}: {pk.bandwidth / 1e9:,.0f} GB/s, "
        f"{pk.flops(s.matmul) / 1e12:,.1f} TFLOP/s ({s.matmul}), {pk.fp32 / 1e12:,.1f} fp32"
    )
