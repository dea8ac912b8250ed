"""Fact recall and sparse memory finetuning on a tiny model that facts_run a tiny population."""

import json
import math

import pytest
import torch
from tiny_trainer import build_trainer

from pkm_lm import recall, slots
from pkm_lm.checkpoint import latest_checkpoint, load_checkpoint, read_run_config
from pkm_lm.config import ModelConfig
from pkm_lm.data import Vocabulary, corpus
from pkm_lm.data.facts import ATTRIBUTES, FactsConfig
from pkm_lm.data.pipeline import BPEConfig, PreprocessConfig, preprocess
from pkm_lm.errors import ConfigError, NotFoundError
from pkm_lm.finetune import FINETUNE_JSON, FinetuneConfig, check_settings, run_finetune
from pkm_lm.memory import LazyAdam
from pkm_lm.metrics import read_metrics
from pkm_lm.model import build_model

TRAIN = ["train.max_steps=10", "train.batch_size=8", "train.log_interval=5"]
TRAIN += ["train.eval_interval=10", "train.checkpoint_interval=10"]


@pytest.fixture(scope="module")
def facts_run(tmp_path_factory):
    """(population a's data, population b's data with a's vocabulary, a short run on a's)."""
    root = tmp_path_factory.mktemp("facts")
    data = {}
    for population in ("a", "b"):
        cfg = FactsConfig(people=4, population=population, templates=2, repetitions=10)
        corpus.build_facts(cfg, root / f"raw_{population}")
        pre = PreprocessConfig(
            raw_dir=str(root / f"raw_{population}"),
            out_dir=str(root / f"bin_{population}"),
            workers=1,
            bpe=BPEConfig(n_codes=300),
            vocab_from=str(data["a"]) if population == "b" else None,
        )
        preprocess(pre)
        data[population] = root / f"bin_{population}"
    run_dir = root / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only add overhead
    try:
        build_trainer(data["a"], "cpu", run_dir, *TRAIN).fit()
    finally:
        torch.set_num_threads(threads)
    return data["a"], data["b"], run_dir


def test_population_b_has_the_pretrained_vocabulary(facts_run, tmp_path):
    data_a, data_b, _ = facts_run
    a, b = (json.loads((d / "dataset.json").read_text()) for d in (data_a, data_b))
    assert a["vocab_size"] == b["vocab_size"]
    assert (data_a / "codes").read_bytes() == (data_b / "codes").read_bytes()
    assert all(s["unk"] == 0 for m in (a, b) for s in m["splits"].values())  # a's words only
    bad = PreprocessConfig(raw_dir=str(data_b.parent / "raw_b"), out_dir=str(tmp_path / "x"))
    bad.vocab_from = str(tmp_path / "missing")
    with pytest.raises(NotFoundError, match="vocab_from=.* is not a complete preprocessed"):
        preprocess(bad)


def memorise(model, items, steps: int = 80) -> None:
    """Train ``model`` on the recall sequences themselves until it completes every one."""
    seqs = [prompt + value for _, prompt, value in items]
    width = max(map(len, seqs))
    batch = torch.tensor([s + [2] * (width - len(s)) for s in seqs])  # <pad>
    targets = batch[:, 1:].clone()
    for row, (_, prompt, _) in enumerate(items):  # only the values are learnt
        targets[row, : len(prompt) - 1] = -100
    targets[batch[:, 1:] == 2] = -100
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_recall_of_a_memorised_population(facts_run):
    data_a, _, run_dir = facts_run
    index = recall.read_facts(recall.facts_path(data_a))
    vocab = Vocabulary.load(data_a)
    items = recall.encode_facts(index, vocab, "train")
    assert len(items) == 4 * 6
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(n_layers=1, dim=32, n_heads=2, vocab_size=len(vocab), max_seq_len=32)
    )
    assert sum(recall.recalled(model, items, 5)) < len(items) / 4  # before: mostly wrong
    memorise(model, items)
    result = recall.run_recall(model, vocab, index, "train", 5, "fp32")
    assert result["accuracy_overall"] == 1.0
    assert result["bits"] == pytest.approx(result["bits_max"])
    assert result["bits_max"] == pytest.approx(4 * sum(a.entropy_bits for a in ATTRIBUTES))
    assert result["bits_per_param"]["all"] == pytest.approx(result["bits"] / model.num_params())


def test_recall_command_logs_records(facts_run):
    _, _, run_dir = facts_run
    held = recall.recall_run(run_dir, "heldout")
    params = held["params"]
    assert params["values"] == 32**2 * 64 and params["all"] > params["non_embedding"]
    assert held["step"] == 10 and set(held["accuracy"]) == {a.name for a in ATTRIBUTES}
    logged = [r for r in read_metrics(run_dir) if r["kind"] == "facts"]
    assert logged[-1] == held
    assert recall.recall_run(run_dir, "heldout", again=False) == held  # not redone
    assert [r for r in read_metrics(run_dir) if r["kind"] == "facts"] == logged


def test_bits_estimator():
    index = {
        "people": [{}] * 10,
        "attributes": {
            "x": {"entropy_bits": 3.0, "chance_accuracy": 0.2},
            "y": {"entropy_bits": 0.0, "chance_accuracy": 0.5},
        },
    }
    items = [("x", [], [])] * 10 + [("y", [], [])] * 10
    correct = [True] * 6 + [False] * 4 + [True] * 10
    model = build_model(ModelConfig(n_layers=1, dim=8, n_heads=2, vocab_size=5, max_seq_len=4))
    out = recall.knowledge(index, items, correct, model)
    assert out["accuracy"] == {"x": 0.6, "y": 1.0} and out["accuracy_overall"] == 0.8
    assert out["bits"] == pytest.approx(10 * 3.0 * (0.6 - 0.2) / 0.8)  # y carries no bits
    assert out["bits_per_param"]["values"] is None  # no memory


def test_one_forward_equals_greedy_decoding():
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layers=2, dim=16, n_heads=2, vocab_size=7, max_seq_len=16))
    model.eval()
    gen = torch.Generator().manual_seed(1)
    items = []
    for _ in range(40):
        prompt = torch.randint(
            0, 7, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen
        )
        context = prompt.unsqueeze(0)
        greedy = []
        for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
            greedy.append(int(model(context)[0, -1].argmax()))
            context = torch.cat([context, torch.tensor([[greedy[-1]]])], dim=1)
        if torch.rand(1, generator=gen) < 0.5:  # half of the values are what greedy decodes
            greedy[-1] = (greedy[-1] + 1) % 7
        items.append(("x", prompt.tolist(), greedy))
    got = recall.recalled(model, items, batch_size=7)
    expected = []
    for _, prompt, value in items:
        context, ok = torch.tensor([prompt]), True
        for token in value:
            ok = ok and int(model(context)[0, -1].argmax()) == token
            context = torch.cat([context, torch.tensor([[token]])], dim=1)
        expected.append(ok)
    assert got == expected and 0 < sum(got) < len(got)


def test_tfidf_ranking():
    counts = torch.tensor([5.0, 5.0, 0.0, 2.0, 2.0], dtype=torch.float64)
    batches_with = torch.tensor([4.0, 0.0, 0.0, 1.0, 4.0], dtype=torch.float64)
    scores = slots.tfidf(counts, batches_with, 4)
    idf = [math.log(5 / (1 + b)) + 1 for b in batches_with.tolist()]
    expected = [c / 14 * i for c, i in zip(counts.tolist(), idf, strict=True)]
    assert scores.tolist() == pytest.approx(expected)
    assert slots.top_slots(scores, 2).tolist() == [0, 1]  # 1: as often, rarer in the background
    assert slots.top_slots(scores, 3).tolist() == [0, 1, 3]  # 3 beats 4: 4 is in every batch
    assert slots.top_slots(torch.zeros(4), 2).tolist() == [0, 1]  # ties: lower index


def test_slot_counts_match_memory_stats(facts_run):
    data_a, _, run_dir = facts_run
    from pkm_lm.checkpoint import load_run
    from pkm_lm.data import open_split

    model, cfg, _ = load_run(run_dir)
    tokens = open_split(data_a, "valid")
    counts, batches_with, n = slots.slot_counts(model, tokens, 32, 4, 10**9)
    mem = model.memories[2]
    n_targets = len(tokens) - 1
    assert counts[0].sum() == n_targets * mem.config.heads * mem.config.knn
    assert n == math.ceil(n_targets // 32 / 4) + (n_targets % 32 > 0)
    assert bool((batches_with[0] <= n).all()) and bool(
        ((counts[0] > 0) == (batches_with[0] > 0)).all()
    )


def frozen_state(model, keep: dict):
    """Every parameter and buffer (the query BatchNorm's statistics too) but the trained rows
    of each table, cloned."""
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        rows = keep.get(id(t))
        out[name] = (t.detach()[~rows] if rows is not None else t.detach()).clone()
    return out


@pytest.mark.parametrize("sparse", [False, True])
def test_frozen_rows_stay_bit_identical(sparse):
    """Momentum from earlier steps and weight decay move a zero-gradient row; the freezer's
    frozen parameters and rows must not move at all."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=2, dim=16, n_heads=2, vocab_size=11, max_seq_len=8)
    cfg.memory.layers = [2]
    cfg.memory.n_keys, cfg.memory.k_dim, cfg.memory.knn, cfg.memory.heads = 8, 8, 4, 2
    cfg.memory.sparse_grad = sparse
    model = build_model(cfg)
    values = model.value_parameters()
    rest = [p for p in model.parameters() if all(p is not v for v in values)]
    value_opt = LazyAdam(values, lr=1e-2) if sparse else torch.optim.AdamW(values, lr=1e-2)
    opts = [torch.optim.AdamW(rest, lr=1e-2, weight_decay=0.1), value_opt]
    x = torch.randint(0, 11, (4, 8))

    def step():
        for opt in opts:
            opt.zero_grad()
        model(x).square().mean().backward()
        for opt in opts:
            opt.step()

    for _ in range(3):  # every parameter gets momentum
        step()
    trained = torch.tensor([1, 5, 9, 60])
    freezer = slots.Freezer(model, "top_slots", [trained])
    freezer.attach(opts)
    keep = torch.zeros(64, dtype=torch.bool)
    keep[trained] = True
    before = frozen_state(model, {id(values[0]): keep})
    rows_before = values[0].detach()[trained].clone()
    for _ in range(5):
        step()
    after = frozen_state(model, {id(values[0]): keep})
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(rows_before, values[0].detach()[trained])  # the trained rows learn
    assert freezer.trained_params(model) == 4 * 16


def test_finetune_top_slots(facts_run, tmp_path):
    """Finetuning trains only the chosen value rows: every other number of the checkpoint is
    bit-identical to the pretrained one; resuming keeps the same slots."""
    _, data_b, run_dir = facts_run
    cfg = FinetuneConfig(run_dir=str(run_dir), out_dir=str(tmp_path / "ft"))
    cfg.data.dir = str(data_b)
    cfg.finetune.trainable, cfg.finetune.top_slots = "top_slots", 20
    cfg.train.max_steps = cfg.train.checkpoint_interval = cfg.train.eval_interval = 6
    run_finetune(cfg)
    saved = json.loads((tmp_path / "ft" / FINETUNE_JSON).read_text())
    assert len(saved["slots"][0]) == 20 and saved["trained_params"] == 20 * 64
    before = load_checkpoint(latest_checkpoint(run_dir))["model"]
    after = load_checkpoint(latest_checkpoint(tmp_path / "ft"))["model"]
    rows = torch.tensor(saved["slots"][0])
    name = "blocks.1.ffn.fn.values.weight"
    keep = torch.zeros(after[name].shape[0], dtype=torch.bool)
    keep[rows] = True
    for key, tensor in before.items():
        if key == name:
            assert torch.equal(tensor[~keep], after[key][~keep])
            assert not torch.equal(tensor[keep], after[key][keep])
        else:
            assert torch.equal(tensor, after[key]), key
    cfg.train.max_steps = 8  # resumed: the recorded slots, not a new ranking
    run_finetune(cfg)
    assert json.loads((tmp_path / "ft" / FINETUNE_JSON).read_text()) == saved


def test_finetune_settings_are_checked_before_any_work(facts_run, tmp_path):
    _, data_b, run_dir = facts_run
    cfg = FinetuneConfig(run_dir=str(run_dir), out_dir=str(tmp_path / "ft"))
    with pytest.raises(ConfigError, match="^data.dir is missing"):
        run_finetune(cfg)
    cfg.data.dir = str(data_b)
    run_cfg = read_run_config(run_dir)
    cfg.finetune.top_slots = 5000
    with pytest.raises(ConfigError, match="must be <= the 1024 slots of a table"):
        check_settings(cfg, run_cfg)
    cfg.finetune.top_slots = 10
    run_cfg.distributed.memory_parallel = 2
    with pytest.raises(ConfigError, match="cannot train rows of a table split over ranks"):
        check_settings(cfg, run_cfg)
    assert not (tmp_path / "ft").exists()
