"""The docs match the repository: the README's memory-layer example runs as written, and every
relative link in README.md and docs/ points at a file (and heading) that exists."""

import json
import re
from fnmatch import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_memory_layer_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "from pkm_lm.memory import" in b)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["y"].shape == (4, 64, 256)
    assert namespace["mem"].stats.counts.sum().item() == 4 * 64 * 4 * 32


def _anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    headings = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def _relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def test_readme_links_every_docs_page():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in _relative_links(README)}
    assert set(PAGES[1:]) <= linked and len(PAGES) >= 6


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for target in _relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


RESULTS_PATH = re.compile(r"results/[\w./+-]*")


def test_results_paths_named_exist():
    """A figure's source is a committed file under results/: every results/ path the README and
    docs/ name, in a link, in code or in prose, exists (a pattern such as results/<scale>/ is
    checked up to its first placeholder)."""
    named = {
        (page.relative_to(ROOT).as_posix(), path.rstrip(".,"))
        for page in PAGES
        for path in RESULTS_PATH.findall(page.read_text())
    }
    missing = sorted(f"{page}: {path}" for page, path in named if not (ROOT / path).exists())
    assert not missing, f"no such results path: {missing}"
    assert len({path for _, path in named}) > 10  # the pattern finds what the pages cite


def _count(n: int) -> str:
    """1,799,059 -> 1.80M; 86,795 -> 86.8k; 130,767 -> 131k (as the corpus table writes them)."""
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.3g}k"


@pytest.mark.parametrize("corpus", ["books", "sotu", "offline"])
def test_corpus_table_equals_its_committed_source(corpus):
    """docs/data.md's corpus table quotes results/data/<corpus>/: bytes, words and documents of
    each split from documents.json, tokens and the vocabulary from dataset.json."""
    source = ROOT / "results" / "data" / corpus
    documents = json.loads((source / "documents.json").read_text())
    dataset = json.loads((source / "dataset.json").read_text())
    text = (ROOT / "docs" / "data.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith(f"| {corpus} "))
    cells = [c.strip() for c in row.strip("|").split("|")][2:]
    for split, cell in zip(("train", "valid", "test"), cells, strict=True):
        info, tokens = documents[split], dataset["splits"][split]["tokens"]
        expected = [
            f"{info['bytes'] / 1e6:.2f} MB, {_count(info['words'])} words, ",
            f" {len(info['documents'])} ",
            f", {_count(tokens)} tokens",
        ]
        assert all(e in cell for e in expected), (corpus, split, cell, expected)
    assert f"{dataset['vocab_size']:,} for {corpus}" in text  # "vocabulary 7,960 for books, ..."


def test_gpu_estimates_equal_their_committed_source():
    """docs/reproduction.md's wall-time estimates are the cost model's output in
    results/gpu/estimate/estimate.log (one JSON line per command)."""
    log = (ROOT / "results" / "gpu" / "estimate" / "estimate.log").read_text()
    walls = {}
    for line in log.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            key = (rec["group"], rec["parallel"], rec["assumed"]["tflops"])
            walls[key] = f"{rec['estimated_wall_s']:.0f} s"
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in (ROOT / "docs" / "reproduction.md").read_text().splitlines()
        if re.match(r"\| (headline|table1) \| \d+ \|", line)
    ]
    quoted = {(r[0], int(r[3]), tflops): r[i] for r in rows for i, tflops in ((4, 100), (5, 50))}
    assert len(quoted) == 8 and quoted == walls


def test_readme_tour_names_every_module_and_script():
    """A newcomer finds any piece of the system from the README's tour (globs like bench_*.py
    count for what they match)."""
    tour = README.read_text().split("## Where things are", 1)[1].split("\n## ", 1)[0]
    patterns = set(re.findall(r"[\w*]+\.(?:py|sh)", tour))
    files = [*ROOT.glob("pkm_lm/**/*.py"), *ROOT.glob("scripts/*")]
    missing = [
        f.relative_to(ROOT).as_posix()
        for f in files
        if f.name != "__init__.py" and not any(fnmatch(f.name, p) for p in patterns)
    ]
    assert not missing, f"not in the README's tour: {missing}"


def test_anchor_rule():
    """The slug rule on a heading with code and punctuation, as GitHub renders it."""
    assert "the-memory-layer-pkm_lmmemory" in _anchors(README)
