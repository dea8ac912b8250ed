"""The reproduction grid: sweep.sh's commands, the experiment configs and make_table.py's output."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from pkm_lm.config import register_configs, to_train_config
from pkm_lm.data.manifest import write_manifest
from pkm_lm.data.shards import ShardWriter

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "scripts" / "sweep.sh"
FIXTURES = ROOT / "tests" / "fixtures" / "sweep"
sys.path.insert(0, str(ROOT / "scripts"))
import make_table  # noqa: E402  (a script, importable once scripts/ is on the path)

SCALES = ("paper", "small", "tiny")  # every group but headline, which runs at the cpu scale only
TABLE1 = [
    "12L_0mem", "12L_1mem", "12L_2mem", "12L_3mem", "16L_0mem", "16L_1mem", "16L_2mem",
    "24L_0mem", "24L_1mem", "12L_0mem_1600d", "12L_1mem_1600d", "16L_0mem_1600d",
    "16L_1mem_1600d", "24L_0mem_1600d",
]  # fmt: skip
ABLATIONS = ("memsize", "bn", "position", "heads", "keys")
GROUP_SCALES = [(g, s) for g in ("table1", *ABLATIONS) for s in SCALES] + [("headline", "cpu")]
# |K| and width of each scale relative to the paper (configs/scale/*.yaml say the same in words).
SLOT_DIVISOR = {"paper": 1, "small": 4, "tiny": 16}
DIMS = {"paper": (1024, 1600), "small": (256, 400), "tiny": (64, 100)}


def group_experiments(group: str) -> list[str]:
    """What a group must sweep: Table 1's cells, or every configs/experiment/<group>_*.yaml."""
    if group == "table1":
        return TABLE1
    folder = ROOT / "configs" / "experiment" / ("cpu" if group == "headline" else "")
    return sorted(p.stem for p in folder.glob(f"{group}_*.yaml"))


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


@pytest.mark.parametrize(("group", "scale"), GROUP_SCALES)
def test_dry_run_lists_every_experiment(group, scale):
    cmds = dry_run(group, scale, "--gpus", "2", "--", "train.seed=3")
    prefix = "" if scale == "paper" else f"{scale}/"
    trains = [c for c in cmds if "pkm_lm.train" in c]
    evals = [c for c in cmds if "pkm_lm.evaluate" in c]
    names = group_experiments(group)
    assert len(names) >= 3
    assert sorted(train_overrides(c) for c in trains) == sorted(
        [f"+experiment={prefix}{n}", f"run_dir=R/{n}", "data.dir=D", "train.seed=3"] for n in names
    )
    assert all(c[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                         "--nproc_per_node", "2"] for c in trains)  # fmt: skip
    assert sorted(c[-2:] for c in evals) == sorted([f"run_dir=R/{n}", "split=test"] for n in names)
    assert cmds[-1] == [sys.executable, "scripts/make_table.py", group, "--scale", scale,
                        "--runs", "R", "--out", "O"]  # fmt: skip
    make_table.build_parser().parse_args(cmds[-1][2:])  # exits (fails the test) if it rejects them


def test_single_process_command_and_bad_arguments():
    cmds = dry_run("memsize", "tiny")
    assert cmds[0][:3] == [sys.executable, "-m", "pkm_lm.train"]
    for args, message in (
        (["nope"], "GROUP=nope is not a group"),
        (["bn", "--scale", "huge"], "--scale=huge is not a scale"),
        (["bn", "--scale", "cpu"], "runs at --scale cpu only"),
        (["headline", "--scale", "tiny"], "runs at --scale cpu only"),
        (["bn", "--gpus", "0"], "--gpus=0 must be a positive integer"),
        (["bn", "--frobnicate"], "unknown argument --frobnicate"),
    ):
        result = sweep(*args, "--dry-run", check=False)
        assert result.returncode == 2 and message in result.stderr


def test_missing_dataset_is_a_clear_error(tmp_path):
    result = sweep("keys", "--scale", "small", "--data", str(tmp_path / "none"), check=False)
    assert result.returncode == 1
    assert f"no dataset at {tmp_path / 'none'}" in result.stderr
    assert "python -m pkm_lm.preprocess" in result.stderr


@pytest.fixture(scope="module")
def composed():
    """scale -> group -> experiment -> validated TrainConfig, from sweep.sh's own commands."""
    register_configs()
    out = {}
    with initialize_config_dir(str(ROOT / "configs"), version_base=None):
        for group, scale in GROUP_SCALES:
            runs = {}
            for cmd in dry_run(group, scale):
                if "pkm_lm.train" in cmd:
                    overrides = train_overrides(cmd)
                    name = overrides[0].rsplit("/", 1)[-1].removeprefix("+experiment=")
                    runs[name] = to_train_config(compose("train", overrides))
            out.setdefault(scale, {})[group] = runs
    return out


def run_tokens(cfg) -> int:
    return cfg.train.batch_size * cfg.data.seq_len * cfg.train.max_steps


@pytest.mark.parametrize("scale", (*SCALES, "cpu"))
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
    assert 6_000_000 <= run_tokens(runs["headline_2L"]) <= 7_000_000


@pytest.mark.parametrize("scale", ("small", "tiny"))
def test_shrunk_scales_keep_the_paper_structure(composed, scale):
    for group, runs in composed[scale].items():
        for name, cfg in runs.items():
            paper = composed["paper"][group][name].model
            model = cfg.model
            assert model.n_layers == paper.n_layers, name
            assert model.memory_layers == paper.memory_layers, name
            for field in ("heads", "knn", "keys", "query_batchnorm"):
                assert getattr(model.memory, field) == getattr(paper.memory, field), (name, field)
            assert model.memory.n_slots * SLOT_DIVISOR[scale] == paper.memory.n_slots, name


def test_paper_settings(composed):
    """Table 1 cells at the paper's settings (SPEC section 3): only depth, width, count vary."""
    for name, cfg in composed["paper"]["table1"].items():
        layers, mems = int(name.split("L_")[0]), int(name.split("_")[1][0])
        assert (cfg.model.n_layers, len(cfg.model.memory_layers)) == (layers, mems), name
        mem = cfg.model.memory
        assert (mem.n_slots, mem.heads, mem.knn, mem.k_dim) == (512**2, 4, 32, 512), name
        assert mem.query_batchnorm and mem.keys == "product", name
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
    expected = make_table.param_table(make_table.param_counts(ROOT / "configs"))
    assert (ROOT / "results" / "params.md").read_text() == expected


@pytest.mark.parametrize("group", ("table1", "keys", "bn"))
def test_make_table_on_fixtures(tmp_path, group):
    runs = make_table.collect(group, FIXTURES / "runs")
    md = make_table.make_report(group, runs, tmp_path, "tiny")
    assert md.read_text() == (FIXTURES / "expected" / f"{group}.md").read_text()
    for image in tmp_path.glob("*.png"):
        assert image.read_bytes()[:4] == b"\x89PNG"
    pngs = {p.name for p in tmp_path.glob("*.png")}
    assert pngs == {"table1": {"table1_speed_ppl.png", "table1_usage.png", "table1_curves.png"},
                    "keys": {"keys_size.png", "keys_usage.png"}, "bn": {"bn_usage.png"}}[group]  # fmt: skip


def test_make_table_cells():
    """The cells that matter, independently of the golden files above."""
    runs = {r.name: r for r in make_table.collect("table1", FIXTURES / "runs")}
    grid = "\n".join(make_table.table1_grid(list(runs.values())))
    assert "| 12 | 520.50 (17.66) | 480.25 (15.62) | 470.00 (14.79) | not run (14.47) |" in grid
    assert "| 16 | not finished (16.65) |" in grid
    assert runs["12L_2mem"].memory_layers == [4, 8]
    assert runs["12L_2mem"].mem_mean("usage") == pytest.approx(55.0)
    assert runs["12L_0mem"].mem_mean("usage") is None
    with pytest.raises(FileNotFoundError, match="no run of group 'heads'"):
        make_table.collect("heads", FIXTURES / "runs")


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
def test_tiny_group_end_to_end(tmp_path):
    """memsize at the tiny scale through sweep.sh: train, evaluate, table; a rerun redoes nothing."""
    torch.set_num_threads(1)
    data = make_random_dataset(tmp_path / "data")
    args = ("memsize", "--scale", "tiny", "--data", str(data), "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path / "out"), "--", "train.max_steps=2", "train.eval_interval=2",
            "train.checkpoint_interval=2", "train.log_interval=1")  # fmt: skip
    first = sweep(*args)
    assert first.stdout.count("pkm_lm.evaluate") == 4
    table = (tmp_path / "out" / "memsize.md").read_text()
    assert "Runs: 4 evaluated on the test split." in table
    assert (tmp_path / "out" / "memsize_size.png").exists()
    again = sweep(*args)
    assert "pkm_lm.evaluate" not in again.stdout


def test_bench_speed_variants_and_one_measurement():
    """The speed study times the shapes it claims (Table 1 placement, memory sizes) and runs."""
    import bench_speed

    table1 = {v.name: v for v in bench_speed.table1_variants()}
    assert sorted(table1) == sorted(TABLE1)
    assert table1["16L_2mem"].config().memory_layers == [6, 12]
    assert table1["12L_1mem_1600d"].dim == bench_speed.WIDE_DIM
    sizes = {(v.keys, v.n_keys**2) for v in bench_speed.memsize_variants()}
    assert ("product", 2**20) in sizes and ("flat", 2**16) in sizes
    assert all(v.config().memory_layers == [5] for v in bench_speed.memsize_variants())
    torch.set_num_threads(1)
    small = bench_speed.Variant("probe", n_layers=1, dim=16, memory_layers=(1,), n_keys=32)
    rates = bench_speed.measure_once(small, min_seconds=0.0)
    assert rates["infer"] > 0 and rates["train"] > 0
