"""The docs match the repository: the README's memory-layer example runs as written, and every
relative link in README.md and docs/ points at a file (and heading) that exists."""

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
