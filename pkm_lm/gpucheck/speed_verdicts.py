"""Verdicts of the speed stages (profile, roofline, bench-train, bench-memory, repro), read
from the JSON-lines records the benchmarks wrote into the report.

A speed goal is PASS only when every target of the stage is met beyond the measured spread
(the ``met`` the benchmark recorded with ``pkm_lm.perf.targets``); otherwise WARN, quoting each
figure. A benchmark that fails to run is FAIL.
"""

from __future__ import annotations

import json
from pathlib import Path

from pkm_lm.perf.targets import Target

from .commands import COMPILE
from .stage import Context, Result
from .verdicts import all_ok, failed

MAX_NOTES = 12  # lines of figures per stage in the summary; the rest are in the records


def records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def targets_in(figures) -> list[Target]:
    """Every recorded target anywhere in a record's figures, in order."""
    found = []
    if isinstance(figures, dict):
        for key, value in figures.items():
            if key == "targets":
                fields = ("name", "value", "target", "higher_is_better", "spread")
                found += [Target(**{f: t[f] for f in fields}) for t in value]
            else:
                found += targets_in(value)
    return found


def judged(
    ctx: Context, codes: list[int], stem: str, extra=lambda recs: [], only=lambda rec: True
) -> Result:
    """PASS when the stage's records (those ``only`` keeps) hold targets and all are met; WARN
    with the figures."""
    if not all_ok(codes):
        return failed(codes, f"{stem} ({len(codes)} runs)")
    recs = [r for r in records(ctx.out / f"{stem}.jsonl") if only(r)]
    if not recs:
        return Result("FAIL", [f"no record in {stem}.jsonl"])
    targets = [t for r in recs for t in targets_in(r["figures"])]
    notes = list(extra(recs))
    missed = [t for t in targets if not t.met]
    shown = missed if len(targets) > MAX_NOTES else targets
    notes += [t.line() for t in shown[:MAX_NOTES]]
    if missed or len(shown) > MAX_NOTES:
        notes.append(f"{len(targets) - len(missed)} of {len(targets)} targets met "
                     f"(all in {stem}.md)")  # fmt: skip
    if not targets:
        return Result("WARN", [*notes, "no target was recorded"])
    return Result("WARN" if missed else "PASS", notes)


def _profile_lines(recs: list[dict]) -> list[str]:
    lines = []
    for r in recs:
        f = r["figures"]
        shapes = f["shapes"]
        models = sorted(k for k in f if k.endswith(" training step"))  # --experiment's
        for name in ["training step", "forward", *models]:
            regions = f[name]["regions"]
            steps = f[name]["steps"]
            timed = "device_us" if any(s["kernels"] for s in regions.values()) else "cpu_us"
            total = sum(s[timed] for s in regions.values()) / steps
            top = sorted(regions.items(), key=lambda kv: -kv[1][timed])[:3]
            share = ", ".join(f"{k} {v[timed] / steps / total:.0%}" for k, v in top if total)
            kernels = sum(s["kernels"] for s in regions.values()) / steps
            ops = sum(s["ops"] for s in regions.values()) / steps
            lines.append(
                f"dim {shapes['dim']} {f['precision']} {name}: "
                f"{total / 1e3:.2f} ms {'device' if timed == 'device_us' else 'CPU'}, "
                f"{kernels:.0f} kernels, {ops:.0f} ops; {share}"
            )
    return lines


def profile_verdict(ctx: Context, codes: list[int]) -> Result:
    if not all_ok(codes):
        return failed(codes, "profile_memory.py")
    recs = records(ctx.out / "profile.jsonl")
    if len(recs) != len(codes):
        return Result("FAIL", [f"{len(recs)} records in profile.jsonl for {len(codes)} runs"])
    return Result("PASS", [*_profile_lines(recs), "tables: profile.md"])


def roofline_verdict(ctx: Context, codes: list[int]) -> Result:
    def floors(recs):
        for r in recs:
            f, p = r["figures"], r["figures"]["peaks"]
            yield (f"dim {f['shapes']['dim']} {f['precision']}: floor forward "
                   f"{f['floor_s']['forward'] * 1e3:.2f} ms, training step "
                   f"{f['floor_s']['training step'] * 1e3:.2f} ms ({p['name']}, {p['source']} "
                   f"{p['bandwidth'] / 1e9:,.0f} GB/s)")  # fmt: skip

    return judged(ctx, codes, "roofline", floors)


def bench_train_verdict(ctx: Context, codes: list[int]) -> Result:
    return judged(ctx, codes, "bench_train", only=lambda r: COMPILE not in r["command"])


def compile_verdict(ctx: Context, codes: list[int]) -> Result:
    return judged(ctx, codes, "bench_train", only=lambda r: COMPILE in r["command"])


def bench_memory_verdict(ctx: Context, codes: list[int]) -> Result:
    return judged(ctx, codes, "bench_memory")


def repro_verdict(ctx: Context, codes: list[int]) -> Result:
    if not all_ok(codes):
        return failed(codes, "sweep.sh headline")
    tables = sorted((ctx.work / "sweep_out").rglob("headline*.md"))
    if not tables:
        return Result("FAIL", ["sweep.sh wrote no headline table"])
    names = ", ".join(t.name for t in tables)
    notes = [f"3 trainings + evaluations, one seed: wall time {ctx.group_seconds:.0f} s "
             f"(measured); {names}: below"]  # fmt: skip
    return Result("PASS", notes, details="\n\n".join(t.read_text() for t in tables))
