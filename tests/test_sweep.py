"""The reproduction grid: sweep.sh's commands, the experiment configs and the tables
(pkm_lm.reproduce) written from them."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from pkm_lm import experiments as registry
from pkm_lm.config import register_configs, to_train_config
from pkm_lm.data.manifest import write_manifest
from pkm_lm.data.shards import ShardWriter
from pkm_lm.errors import ConfigError
from pkm_lm.reproduce import claims, dataset, noise, table
from pkm_lm.reproduce import runs as run_dirs
from pkm_lm.reproduce.cells import fmt_ppl
from pkm_lm.reproduce.compose import compose_experiments
from pkm_lm.reproduce.params import param_counts, param_table
from pkm_lm.reproduce.report import make_report
from pkm_lm.reproduce.runs import collect, has_test_eval
from pkm_lm.reproduce.tables import table1_grid

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "scripts" / "sweep.sh"
FIXTURES = ROOT / "tests" / "fixtures" / "sweep"

GROUP_SCALES = [(g, s) for g, group in registry.GROUPS.items() for s in group.scales]
SCALES = sorted({s for _, s in GROUP_SCALES})
# |K| and width of each scale relative to the paper (configs/scale/*.yaml say the same in words).
SLOT_DIVISOR = {"paper": 1, "small": 4, "tiny": 16, "gpu": 16}
DIMS = {"paper": (1024, 1600), "small": (256, 400), "tiny": (64, 100), "gpu": (256, 400)}


def test_registry_matches_the_configs():
    """Every experiment the registry lists has a config at each of its scales, and every
    ablation config of configs/experiment/ belongs to a group (none is left out of a sweep)."""
    for group, scale in GROUP_SCALES:
        for name in registry.experiments(group, scale):
            path = ROOT / "configs" / "experiment" / f"{registry.config_name(name, scale)}.yaml"
            assert path.is_file(), path
    listed = {n for g in registry.GROUPS.values() for n in g.experiments}
    for path in (ROOT / "configs" / "experiment").glob("*_*.yaml"):
        prefix = path.stem.split("_")[0]
        if prefix in registry.GROUPS or registry.table1_shape(path.stem):
            assert path.stem in listed, path
    assert registry.experiments("headline", "cpu") == registry.HEADLINE_CPU
    assert registry.paper_reference("headline_2L_1mem") == (15.62, None)
    assert registry.paper_reference("bn_off_1M") == (19.79, 25.8)
    assert registry.table1_shape("16L_1mem_1600d") == (16, 1, True)


def sweep(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(SWEEP), *args], cwd=ROOT, env=env, capture_output=True, text=True, check=check
    )


def dry_run(group: str, scale: str, *extra: str) -> list[list[str]]:
    out = sweep(
        group, "--scale", scale, "--dry-run", "--data", "D", "--runs", "R", "--out", "O", *extra
    )
    return [shlex.split(line) for line in out.stdout.splitlines() if not line.startswith("==")]


def train_overrides(cmd: list[str]) -> list[str]:
    return cmd[cmd.index("pkm_lm.train") + 1 :]


@functools.cache
def grid_commands(group: str, scale: str) -> list[list[str]]:
    """A group's commands on 2 GPUs with an extra override, printed once for the tests below
    (every dry run starts bash and Python)."""
    return dry_run(group, scale, "--gpus", "2", "--", "train.seed=3")


@pytest.mark.parametrize(("group", "scale"), GROUP_SCALES)
def test_dry_run_lists_every_experiment(group, scale):
    cmds = grid_commands(group, scale)
    prefix = "" if scale == "paper" else f"{scale}/"
    trains = [c for c in cmds if "pkm_lm.train" in c]
    evals = [c for c in cmds if "pkm_lm.evaluate" in c]
    names = registry.experiments(group, scale)
    assert len(names) >= 2  # a group compares experiments
    assert sorted(train_overrides(c) for c in trains) == sorted(
        [f"+experiment={prefix}{n}", f"run_dir=R/{n}", "data.dir=D", "train.seed=3"] for n in names
    )
    assert all(c[:6] == [sys.executable, "-m", "pkm_lm.torchrun", "--standalone",
                         "--nproc_per_node", "2"] for c in trains)  # fmt: skip
    assert sorted(c[-2:] for c in evals) == sorted([f"run_dir=R/{n}", "split=test"] for n in names)
    assert cmds[-1] == [sys.executable, "-m", "pkm_lm.reproduce.table", group, "--scale", scale,
                        "--runs", "R", "--out", "O"]  # fmt: skip
    table.build_parser().parse_args(cmds[-1][3:])  # exits (fails the test) if it rejects them


def test_single_process_command_and_bad_arguments():
    cmds = dry_run("memsize", "tiny")
    assert cmds[0][:3] == [sys.executable, "-m", "pkm_lm.train"]
    for args, message in (
        (["nope"], "GROUP=nope is not a group; choose one of table1 memsize"),
        (["bn", "--scale", "huge"], "--scale=huge is not a scale; choose one of paper"),
        (["bn", "--scale", "cpu"], "bn does not run at --scale cpu (its scales: paper small tiny)"),
        (["memsize", "--scale", "gpu"], "--scale gpu runs: table1 headline"),
        (["bn", "--gpus", "0"], "--gpus=0 must be a positive integer"),
        (["bn", "--seeds", "x"], "--seeds=x must be a positive integer"),
        (["bn", "--parallel", "0"], "--parallel=0 must be a positive integer"),
        (["bn", "--parallel", "2", "--gpus", "2"], "--parallel 2 needs --gpus 1"),
        (["bn", "--frobnicate"], "unknown argument --frobnicate"),
    ):
        result = sweep(*args, "--dry-run", check=False)
        assert result.returncode == 2 and message in result.stderr


def test_seeds_train_every_experiment_seed_by_seed():
    """--seeds 2: seed-major order (an interrupted sweep leaves whole seeds), one folder each."""
    cmds = dry_run("headline", "cpu", "--seeds", "2", "--parallel", "2")
    trains = [train_overrides(c) for c in cmds if "pkm_lm.train" in c]
    assert trains == [
        [f"+experiment=cpu/{n}", f"train.seed={s}", f"run_dir=R/{n}/seed{s}", "data.dir=D"]
        for s in range(2)
        for n in registry.HEADLINE_CPU
    ]
    evals = [c[-2] for c in cmds if "pkm_lm.evaluate" in c]
    assert evals == [f"run_dir=R/{n}/seed{s}" for s in range(2) for n in registry.HEADLINE_CPU]


def test_missing_dataset_is_a_clear_error(tmp_path):
    result = sweep("keys", "--scale", "small", "--data", str(tmp_path / "none"), check=False)
    assert result.returncode == 1
    assert f"no dataset at {tmp_path / 'none'}" in result.stderr
    assert "python -m pkm_lm.preprocess" in result.stderr


def test_default_dataset_is_the_one_the_configs_read():
    """Without --data a scale trains on its configs' data.dir, and prepares that directory."""
    out = sweep("headline", "--scale", "gpu", "--dry-run", "--runs", "R", "--out", "O").stdout
    cmds = [shlex.split(line) for line in out.splitlines() if not line.startswith("==")]
    trains = [c for c in cmds if "pkm_lm.train" in c]
    assert len(trains) == 3 and all("data.dir=data/bin/offline" in c for c in trains)
    if not (ROOT / "data" / "bin" / "offline" / "dataset.json").exists():  # else nothing to make
        preprocess = next(c for c in cmds if "pkm_lm.preprocess" in c)
        assert preprocess[-2:] == ["raw_dir=data/raw/offline", "out_dir=data/bin/offline"]


@pytest.fixture(scope="module")
def composed():
    """scale -> group -> experiment -> validated TrainConfig, from sweep.sh's own commands (those
    of test_dry_run_lists_every_experiment: its extra override is the seed)."""
    register_configs()
    out = {}
    with initialize_config_dir(str(ROOT / "configs"), version_base=None):
        for group, scale in GROUP_SCALES:
            runs = {}
            for cmd in grid_commands(group, scale):
                if "pkm_lm.train" in cmd:
                    overrides = train_overrides(cmd)
                    name = overrides[0].rsplit("/", 1)[-1].removeprefix("+experiment=")
                    runs[name] = to_train_config(compose("train", overrides))
            out.setdefault(scale, {})[group] = runs
    return out


def run_tokens(cfg) -> int:
    return cfg.train.batch_size * cfg.data.seq_len * cfg.train.max_steps


@pytest.mark.parametrize("scale", SCALES)
def test_every_command_composes_with_the_same_budget_per_group(composed, scale):
    for runs in composed[scale].values():
        assert {run_tokens(c) for c in runs.values()} == {run_tokens(runs[next(iter(runs))])}
        for name, cfg in runs.items():
            assert cfg.optim.value_lr == pytest.approx(4 * cfg.optim.lr), name
            if scale in DIMS:
                assert cfg.model.dim == DIMS[scale][1 if name.endswith("_1600d") else 0], name


def test_headline_is_l_plus_memory_vs_2l_vs_l(composed):
    runs = composed["cpu"]["headline"]
    shapes = {n: (c.model.n_layers, c.model.memory_layers) for n, c in runs.items()}
    assert shapes == {"headline_2L": (2, []), "headline_2L_1mem": (2, [2]), "headline_4L": (4, [])}
    assert run_tokens(runs["headline_2L"]) == 500 * 32 * 128
    for scale in ("tiny", "gpu"):  # elsewhere the headline is three Table 1 cells
        runs = composed[scale]["headline"]
        shapes = {n: (c.model.n_layers, len(c.model.memory_layers)) for n, c in runs.items()}
        assert shapes == {"12L_0mem": (12, 0), "12L_1mem": (12, 1), "24L_0mem": (24, 0)}


@pytest.mark.parametrize("scale", ("small", "tiny", "gpu"))
def test_shrunk_scales_keep_the_paper_structure(composed, scale):
    for group, runs in composed[scale].items():
        for name, cfg in runs.items():
            paper = composed["paper"][group][name].model
            model = cfg.model
            assert model.n_layers == paper.n_layers, name
            assert model.memory_layers == paper.memory_layers, name
            for field in ("heads", "knn", "keys", "query_norm"):
                assert getattr(model.memory, field) == getattr(paper.memory, field), (name, field)
            assert model.memory.n_slots * SLOT_DIVISOR[scale] == paper.memory.n_slots, name


def test_paper_settings(composed):
    """Table 1 cells at the paper's settings (the paper's section 4.3): only depth, width, count vary."""
    for name, cfg in composed["paper"]["table1"].items():
        layers, mems = int(name.split("L_")[0]), int(name.split("_")[1][0])
        assert (cfg.model.n_layers, len(cfg.model.memory_layers)) == (layers, mems), name
        mem = cfg.model.memory
        assert (mem.n_slots, mem.heads, mem.knn, mem.k_dim) == (512**2, 4, 32, 512), name
        assert mem.query_norm == "batchnorm" and mem.keys == "product", name
        assert (cfg.model.n_heads, cfg.train.precision) == (16, "fp16"), name
        assert (cfg.optim.lr, cfg.optim.value_lr, list(cfg.optim.betas)) == (
            2.5e-4,
            1e-3,
            [0.9, 0.98],
        )
    placement = {n: c.model.memory_layers for n, c in composed["paper"]["table1"].items()}
    assert placement["16L_2mem"] == [6, 12]  # the paper's example of spreading evenly
    ablation = composed["paper"]["position"]
    assert [ablation[f"position_{i}"].model.memory_layers for i in range(1, 7)] == [
        [i] for i in range(1, 7)
    ]


def test_param_table_is_current():
    """results/params.md, the sizes the README quotes, equals the models the configs build."""
    expected = param_table(param_counts(ROOT / "configs"))
    assert (ROOT / "results" / "params.md").read_text() == expected


@pytest.mark.parametrize("group", ("table1", "keys", "bn"))
def test_report_on_fixtures(tmp_path, group):
    runs = collect(group, FIXTURES / "runs", "tiny")
    md = make_report(group, runs, tmp_path, "tiny")
    assert md.read_text() == (FIXTURES / "expected" / f"{group}.md").read_text()
    for image in tmp_path.glob("*.png"):
        assert image.read_bytes()[:4] == b"\x89PNG"
    pngs = {p.name for p in tmp_path.glob("*.png")}
    assert pngs == {"table1": {"table1_speed_ppl.png", "table1_usage.png", "table1_curves.png"},
                    "keys": {"keys_size.png", "keys_usage.png"}, "bn": {"bn_usage.png"}}[group]  # fmt: skip


def test_report_with_seeds():
    """Seeds folders become one row: mean +- std over the finished seeds, the claims judged
    against the noise (2 standard errors of the difference), an unfinished seed counted."""
    runs = collect("headline", FIXTURES / "runs_seeds", "tiny")
    by_name = {r.name: r for r in runs}
    one, mem, two = (by_name[n] for n in registry.HEADLINE)
    assert [len(r.seeds) for r in (one, mem, two)] == [3, 3, 3]
    assert [len(r.done) for r in (one, mem, two)] == [3, 3, 2]
    assert noise.ppl(two) == pytest.approx(522.5)
    assert noise.ppl_std(two) == pytest.approx(np.std([515.0, 530.0], ddof=1))
    # 2L vs L: 522.5 - 520 = 2.5 < 2 * sqrt(112.5 / 2 + 16 / 3) = 15.6: noise
    assert noise.difference(two, one) == (pytest.approx(2.5 / 520), False)
    # L + memory vs 2L: 42.5 > 2 * sqrt(100 / 3 + 112.5 / 2) = 18.9: beyond the noise
    assert noise.difference(mem, two) == (pytest.approx(480 / 522.5 - 1), True)
    assert fmt_ppl(one) == "520.00 +- 4.00 (n=3)"
    assert mem.mem_mean("usage") == pytest.approx(61.0)  # seeds at 60, 61, 62 %
    assert mem.curve == [(32000, 580.0), (64000, 490.0)]


def test_claims_along_training_judge_each_evaluation_against_the_seed_noise():
    runs = collect("headline", FIXTURES / "runs_seeds", "tiny")
    two = {r.name: r for r in runs}[registry.HEADLINE[2]]
    assert noise.valid_at(two, 32000) == [615.0, 630.0, 640.0]  # the unfinished seed counts
    rows = claims.claims_along_training(runs, "tiny")
    assert rows[2].startswith("| 32,000 | 620.0 +- 4.0 | 580.0 +- 10.0 | 628.3 +- 12.6 | -7.7% |")
    assert rows[3].endswith("| +1.6% (noise) |")


def test_gap_crossing_extrapolates_a_closing_gap_in_log_tokens():
    # gap = 0.1 - 0.02 * log2(t / 1000): zero at 1000 * 2**5 tokens
    closing = [(1000 * 2**k, 0.1 - 0.02 * k) for k in range(4)]
    assert claims.gap_crossing(closing) == pytest.approx(32000)
    assert claims.gap_crossing([(t, -g) for t, g in closing]) == pytest.approx(32000)
    opening = [(t, 0.2 - g) for t, g in closing]
    assert claims.gap_crossing(opening) is None
    assert claims.gap_crossing(closing[:2]) is None  # two points: no trend
    notes = claims.trend_notes({"2L < L": closing, "holds": [(1000, 0.1), (2000, -0.1)]})
    assert len(notes) == 1 and "about 32,000 tokens: an extrapolation" in notes[0]
    assert "not closing" in claims.trend_notes({"2L < L": opening})[0]


def test_report_on_seed_fixtures(tmp_path):
    runs = collect("headline", FIXTURES / "runs_seeds", "tiny")
    md = make_report("headline", runs, tmp_path, "tiny")
    assert md.read_text() == (FIXTURES / "expected" / "headline.md").read_text()
    assert {p.name for p in tmp_path.glob("*.png")} == {"headline_curves.png", "headline_usage.png"}


def test_report_warns_when_runs_differ_in_tokens(tmp_path):
    runs = collect("headline", FIXTURES / "runs_seeds", "tiny")
    runs[0].seeds[0].test = {**runs[0].seeds[0].test, "tokens": 32000}
    text = make_report("headline", runs, tmp_path, "tiny").read_text()
    assert "Training tokens per run: 32,000, 64,000." in text
    assert "evaluated after different numbers of training tokens" in text


def test_report_cells():
    """The cells that matter, independently of the golden files above."""
    runs = {r.name: r for r in collect("table1", FIXTURES / "runs", "tiny")}
    grid = "\n".join(table1_grid(list(runs.values())))
    assert "| 12 | 520.50 (17.66) | 480.25 (15.62) | 470.00 (14.79) | not run (14.47) |" in grid
    assert "| 16 | not finished (16.65) |" in grid
    assert runs["12L_2mem"].memory_layers == [4, 8]
    assert runs["12L_2mem"].mem_mean("usage") == pytest.approx(55.0)
    assert runs["12L_0mem"].mem_mean("usage") is None
    with pytest.raises(FileNotFoundError, match="no run of group 'heads'"):
        collect("heads", FIXTURES / "runs", "tiny")


def test_a_run_is_tested_only_at_its_last_step(tmp_path):
    """sweep.sh evaluates a run again when it trained further after its test evaluation."""
    record = {"kind": "train", "step": 2}
    test = {"kind": "eval", "split": "test", "step": 2}
    assert not has_test_eval(tmp_path)  # no metrics.jsonl
    for records, expected in (([record], False), ([record, test], True),
                              ([record, test, {**record, "step": 4}], False)):  # fmt: skip
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        assert has_test_eval(tmp_path) is expected
        with pytest.raises(SystemExit) as exit_info:  # the command line sweep.sh asks
            run_dirs.main(["tested", str(tmp_path)])
        assert exit_info.value.code == (0 if expected else 1)


def test_sweep_dataset_is_the_scale_data_dir(capsys):
    """sweep.sh prepares the data.dir the trainer composes, and a group trains on one."""
    dataset.main(["headline", "--scale", "gpu"])
    assert capsys.readouterr().out == "data/bin/offline\n"
    cfgs = compose_experiments([("headline_2L", "cpu"), ("bn_on_16k", "tiny")])
    assert dataset.data_dir(cfgs[:1]) == "data/bin/books"
    with pytest.raises(ConfigError, match="different data.dir: data/bin/books data/bin/tiny"):
        dataset.data_dir(cfgs)


def make_random_dataset(path: Path, vocab: int = 64) -> Path:
    path.mkdir()
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 4000), ("valid", 300), ("test", 300)):
        writer = ShardWriter(path / f"{split}.00000.bin", "uint16")
        writer.write(rng.integers(4, vocab, size=n).astype(np.int64))
        splits[split] = {"shards": [writer.close()], "tokens": n}
    write_manifest(path, {"complete": True, "vocab_size": vocab, "splits": splits})
    return path


@pytest.mark.slow
def test_tiny_group_end_to_end_with_seeds_in_parallel(tmp_path):
    """headline at the tiny scale, 2 seeds, 2 runs at a time: train, evaluate, table with
    mean +- std; a rerun redoes nothing; a failing job is named with its log."""
    data = make_random_dataset(tmp_path / "data")
    runs = tmp_path / "runs"
    args = ("headline", "--scale", "tiny", "--seeds", "2", "--parallel", "2", "--data", str(data),
            "--runs", str(runs), "--out", str(tmp_path / "out"), "--", "train.max_steps=2",
            "train.eval_interval=2", "train.checkpoint_interval=2", "train.log_interval=1")  # fmt: skip
    sweep(*args)
    logs = sorted(p.relative_to(runs / "logs").as_posix() for p in (runs / "logs").rglob("*.log"))
    assert logs == sorted(f"{n}/seed{s}.log" for n in registry.HEADLINE for s in range(2))
    assert all("pkm_lm.evaluate" in (runs / "logs" / log).read_text() for log in logs)
    table = (tmp_path / "out" / "headline.md").read_text()
    assert "Seeds: 6 of the 6 seed runs found are evaluated" in table and table.count("(n=2)") >= 3
    assert "| L + 1 memory < 2L |" in table
    again = sweep(*args)
    assert "pkm_lm.evaluate" not in "".join((runs / "logs" / log).read_text() for log in logs)
    assert again.returncode == 0
    # A group of two experiments, one seed: both jobs fail at once (dim 7 % 4 heads).
    broken = sweep("plus", "--scale", "tiny", "--parallel", "2", "--data", str(data), "--runs",
                   str(runs), "--out", str(tmp_path / "out"), "--", "model.dim=7", check=False)  # fmt: skip
    assert broken.returncode == 1 and "a job failed, see its log" in broken.stderr
    assert f"{runs / 'logs' / registry.experiments('plus', 'tiny')[0]}.log" in broken.stderr


def load_script(name: str):
    """A standalone script of scripts/ as a module, from its path (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def test_bench_speed_variants_and_one_measurement():
    """The speed study times the shapes it claims (Table 1 placement, memory sizes) and runs."""
    bench_speed = load_script("bench_speed")

    table1 = {v.name: v for v in bench_speed.table1_variants()}
    assert sorted(table1) == sorted(registry.TABLE1)
    assert table1["16L_2mem"].config().memory_layers == [6, 12]
    assert table1["12L_1mem_1600d"].dim == bench_speed.WIDE_DIM
    sizes = {(v.keys, v.n_keys**2) for v in bench_speed.memsize_variants()}
    assert ("product", 2**20) in sizes and ("flat", 2**16) in sizes
    assert all(v.config().memory_layers == [5] for v in bench_speed.memsize_variants())
    torch.set_num_threads(1)
    small = bench_speed.Variant("probe", n_layers=1, dim=16, memory_layers=(1,), n_keys=32)
    rates = bench_speed.measure_once(small, min_seconds=0.0)
    assert rates["infer"] > 0 and rates["train"] > 0
