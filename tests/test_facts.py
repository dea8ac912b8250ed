"""The synthetic facts corpus: determinism, the held-out phrasing, the second population."""

import json
import math
import re

import pytest

from pkm_lm.data import corpus, facts
from pkm_lm.data.facts import ATTRIBUTES, FactsConfig


def files(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_corpus_is_deterministic(tmp_path):
    cfg = FactsConfig(people=30, repetitions=3, seed=4)
    corpus.build_facts(cfg, tmp_path / "a")
    corpus.build_facts(cfg, tmp_path / "b")
    assert files(tmp_path / "a") == files(tmp_path / "b")
    corpus.build_facts(FactsConfig(people=30, repetitions=3, seed=5), tmp_path / "c")
    assert files(tmp_path / "c")["train.txt"] != files(tmp_path / "a")["train.txt"]


def test_layout_and_every_fact_stated(tmp_path):
    cfg = FactsConfig(people=10, templates=2, repetitions=4)
    index = corpus.build_facts(cfg, tmp_path)
    assert set(index) == {"train", "valid", "test"}
    people = json.loads((tmp_path / corpus.FACTS_JSON).read_text())["people"]
    train = (tmp_path / "train.txt").read_text().splitlines()
    assert len(train) == 10 * 4 and len(people) == 10
    for person in people:
        lines = [
            line for line in train if line.startswith(person["name"]) or person["name"] in line
        ]
        assert len(lines) == 4
        for a in ATTRIBUTES:  # each biography states each fact once, in a training phrasing
            stated = [t.format(name=person["name"], value=person[a.name]) for t in a.templates[-2:]]
            assert all(sum(line.count(s) for s in stated) == 1 for line in lines)
    held = (tmp_path / "valid.txt").read_text() + (tmp_path / "test.txt").read_text()
    assert len(held.splitlines()) == 10  # every person once, in the held-out phrasing


def test_heldout_phrasing_is_not_in_training_text(tmp_path):
    corpus.build_facts(FactsConfig(people=40, repetitions=5), tmp_path)
    train = (tmp_path / "train.txt").read_text()
    train_words = set(re.findall(r"\w+|'s", train))
    for a in ATTRIBUTES:
        middle = a.heldout.split("{name}")[1].split("{value}")[0]  # "'s birthplace is "
        assert middle.strip() and middle not in train
        assert set(re.findall(r"\w+|'s", middle)) <= train_words  # known words, new phrasing


def test_entropy_and_employer_city():
    bits = {a.name: a.entropy_bits for a in ATTRIBUTES}
    assert bits["birth_date"] == pytest.approx(math.log2(28 * 12 * 100))
    assert bits["employer_city"] == 0.0  # a function of the employer
    pools = facts.pools()
    city_of = {
        e: pools.cities[c] for e, c in zip(pools.employers, pools.employer_city, strict=True)
    }
    for person in facts.people(FactsConfig(people=50), pools):
        assert city_of[person["employer"]] == person["employer_city"]


def test_population_b_is_disjoint_with_the_same_words():
    pools = facts.pools()
    a = facts.people(FactsConfig(people=60), pools)
    b = facts.people(FactsConfig(people=60, population="b"), pools)
    assert len({p["name"] for p in b}) == 60
    assert not {p["name"] for p in a} & {p["name"] for p in b}
    words_a = {w for p in a for v in p.values() for w in v.split()}
    assert {w for p in b for v in p.values() for w in v.split()} <= words_a
    for key in ("birth_city", "university", "field", "birth_date"):  # values re-dealt
        assert sorted(p[key] for p in a) == sorted(p[key] for p in b)
    assert [p[k] for p in b for k in p] != [p[k] for p in a for k in p]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--people", "1"], "--people=1 is invalid: must be an integer in [2, 160000]"),
        (["--population", "c"], "--population=c is invalid: must be one of a, b"),
        (["--templates", "5"], "--templates=5 is invalid: must be an integer in [2, 4]"),
        (["--templates", "1"], "--templates=1 is invalid: must be an integer in [2, 4]"),
        (["--repetitions", "0"], "--repetitions=0 is invalid: must be an integer >= 1"),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        corpus.main(["facts", "--out", str(tmp_path / "x"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()  # validated before any work
