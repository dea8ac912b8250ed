"""Each stage's verdict, from its commands' return codes and the files they wrote.

PASS means what the stage checks holds; a speed goal passes only when its figure beats the
target by more than the spread measured in the same run (``pkm_lm.perf.targets``), and is WARN
with the figure otherwise. The project's modules are imported inside the functions: the check
starts before the wheelhouse has installed their dependencies.
"""

from __future__ import annotations

import json
import math
import re

from .stage import TIMEOUT, Context, Result


def all_ok(codes: list[int]) -> bool:
    return all(c == 0 for c in codes)


def failed(codes: list[int], what: str) -> Result:
    bad = [c for c in codes if c != 0]
    reason = "timed out" if any(c == TIMEOUT for c in bad) else f"exit status {bad}"
    return Result("FAIL", [f"{what}: {reason} (see the log)"])


def env_verdict(ctx: Context, codes: list[int]) -> Result:
    if not all_ok(codes):
        return failed(codes, "installing from the wheelhouse")
    info = ctx.info
    where = "CPU (dry run, no GPU)"
    if info["gpu"]:
        where = (f"{info['gpu']}, {info['memory_gib']:.1f} GiB, capability {info['capability']}, "
                 f"NCCL {info['nccl']}")  # fmt: skip
    notes = [f"{where}, torch {info['torch']}, CUDA {info['cuda']}, "
             f"triton {info.get('triton')}, bf16 {'yes' if info['bf16'] else 'no'}"]  # fmt: skip
    if info.get("installed"):
        notes.append(f"installed from the wheelhouse: {', '.join(info['installed'])}")
    missing = [m for m, v in info["imports"].items() if v is None]
    if missing:
        return Result("FAIL", [*notes, f"not importable: {', '.join(missing)}"])
    return Result("PASS" if info["bf16"] else "WARN", notes)


def data_verdict(ctx: Context, codes: list[int]) -> Result:
    if not all_ok(codes):
        return failed(codes, "making the datasets")
    from pkm_lm.data.manifest import load_manifest

    notes = []
    for path in dict.fromkeys([ctx.text_data, ctx.ids_data]):
        m = load_manifest(path)
        tokens = {s: m["splits"][s]["tokens"] for s in m["splits"]}
        notes.append(f"{path.name}: vocabulary {m['vocab_size']:,}, tokens {tokens}")
    return Result("PASS", notes)


def pytest_verdict(ctx: Context, codes: list[int]) -> Result:
    """FAIL unless pytest passed and ran tests; WARN for skipped tests and for the warnings the
    GPU tests emit when they fall back (e.g. gloo instead of NCCL). The dry run only collects
    them: SKIP with the count."""
    log = (ctx.out / "pytest.log").read_text(errors="replace")
    if ctx.args.dry_run:
        collected = re.search(r"^(\d+)(?:/\d+)? tests? collected", log, re.M)
        if codes[0] != 0 or not collected:
            return failed(codes, "collecting the GPU tests")
        return Result("SKIP", [f"{collected.group(1)} GPU tests collected; they need a GPU"])
    tail = re.findall(r"^=*\s*(\d+ \w+.* in [\d.]+s.*?)\s*=*$", log, re.M)
    summary = tail[-1] if tail else "no pytest summary line"
    if codes[0] != 0:
        broken = re.findall(r"^(?:FAILED|ERROR) (\S+)", log, re.M)
        return Result("FAIL", failed(codes, summary).notes + [f"failed: {t}" for t in broken])
    if not re.search(r"\b[1-9]\d* passed", summary):
        return Result("FAIL", [f"{summary}: no GPU test ran"])
    warned = re.findall(r"test_\w+\.py:\d+: \w*Warning: (.*)$", log, re.M)
    skipped = re.findall(r"^SKIPPED (.*)$", log, re.M)
    notes = [summary, *(f"warning: {w}" for w in dict.fromkeys(warned))]
    notes += [f"skipped: {s}" for s in skipped]
    return Result("WARN" if warned or skipped else "PASS", notes)


def _training_notes(ctx: Context, precision: str) -> tuple[list[str], bool]:
    from pkm_lm.metrics import read_metrics

    recs = read_metrics(ctx.run_dir(precision))
    train = [r for r in recs if r["kind"] == "train"]
    evals = [r for r in recs if r["kind"] == "eval" and r["split"] == "valid"]
    if not train or len(evals) < 2:
        return [f"{precision}: {len(train)} train and {len(evals)} eval records"], False
    last = train[-1]
    usage = min(last["memory_usage"].values())
    eval_usage = min(m["usage"] for m in evals[-1]["memory"].values())
    ppl = [round(r["ppl"], 1) for r in evals]
    problems = []
    if not all(math.isfinite(r["loss"]) for r in train):
        problems.append("non-finite loss")
    if last["skipped_steps"] > (0.1 if precision == "fp16" else 0) * last["step"]:
        problems.append(f"{last['skipped_steps']} skipped steps")
    if not ppl[-1] < 0.9 * ppl[0]:
        problems.append("validation perplexity not falling")
    if min(usage, eval_usage) <= 50:
        problems.append("memory usage <= 50%")
    note = (
        f"{precision}: loss {last['loss']:.3f}, valid ppl {' -> '.join(map(str, ppl))}, "
        f"skipped {last['skipped_steps']}/{last['step']}, memory usage {usage:.1f}% (train) "
        f"{eval_usage:.1f}% (valid), {last['tokens_per_s']:,.0f} tok/s (both runs at once)"
    )
    return [note + (f": {', '.join(problems)}" if problems else "")], not problems


def train_verdict(ctx: Context, codes: list[int]) -> Result:
    from pkm_lm.metrics import read_metrics

    if codes[:2] != [0, 0]:
        return failed(codes[:2], "training")
    notes, good = [], True
    for precision in ("fp16", "bf16"):
        more, ok = _training_notes(ctx, precision)
        notes, good = notes + more, good and ok
    if codes[2] != 0:
        return Result("FAIL", notes + failed(codes[2:3], "evaluate").notes)
    test = [r for r in read_metrics(ctx.run_dir("bf16")) if r.get("split") == "test"]
    if not test or not math.isfinite(test[-1]["loss"]):
        return Result("FAIL", [*notes, "evaluate wrote no finite test record"])
    notes.append(f"evaluate (bf16 run, test): ppl {test[-1]['ppl']:.1f}")
    if codes[3] != 0:
        return Result("FAIL", notes + failed(codes[3:4], "generate").notes)
    if "--- sample 2 ---" not in (ctx.out / "train.log").read_text(errors="replace"):
        return Result("FAIL", [*notes, "generate printed no second sample"])
    return Result("PASS" if good else "FAIL", [*notes, "generate: 2 samples"])


def paper_verdict(ctx: Context, codes: list[int]) -> Result:
    if codes[:1] != [0]:
        return failed(codes[:1], "12L_1mem step")
    r = json.loads((ctx.work / "paper.json").read_text())
    memory = "no GPU memory on a CPU"
    if r["peak_gib"] is not None:
        memory = (f"peak GPU memory {r['peak_gib']:.2f} GiB ({r['peak_gib'] * 2**30 / 1e9:.1f} "
                  f"GB) allocated of {r['total_gib']:.1f} GiB")  # fmt: skip
    notes = [
        f"{r['experiment']}, {r['micro_batch']} x {r['seq_len']} tokens, vocabulary "
        f"{r['vocab']:,}, {r['precision']}: {r['ms_per_step']:.1f} ms/step (median of "
        f"{r['steps']}, {r['ms_min']:.1f}-{r['ms_max']:.1f}), {memory}"
    ]
    log = (ctx.out / "paper.log").read_text(errors="replace")
    estimate = re.search(r"^\| 12L_1mem \| dense grad \|[^|]*\| ([\d.]+) GB \|", log, re.M)
    if codes[1:] != [0] or estimate is None:
        return Result("WARN", [*notes, "scripts/comm_cost.py gave no estimate (see paper.log)"])
    notes.append(
        f"estimate (scripts/comm_cost.py, 1 rank, dense value gradient as the paper config): "
        f"{estimate.group(1)} GB without activations"
    )
    return Result("PASS", notes)
