"""What every corpus builder shares: the document type, the split rule, raw-file helpers
(Debian packages, text files, the `datasets` text loader) and the atomic cache writer."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...atomic import atomic_dir
from ..tokenizer import cache_dir

SPLITS = ("train", "valid", "test")
TEST_FRACTION = 0.05
VALID_FRACTION = 0.05
# Bumped whenever a builder changes what it writes, so older caches are rebuilt.
BUILD_VERSION = 1
SPLIT_RULE = (
    "by document: u = first 8 bytes of SHA-256(document name) / 2**64; test if u < 0.05, "
    "valid if u < 0.10, train otherwise; with 3 or more documents, while a split is empty "
    "the lowest-u document of the largest split (train on ties) moves into it, filling test, then valid, then train"
)


@dataclass(frozen=True)
class Document:
    """One long document: `name` is a stable id within its corpus (e.g. "email" or "Coq/Arith")."""

    name: str
    text: str


class CorpusUnavailable(RuntimeError):
    """A corpus cannot be built or loaded here; the message says what to run or what is missing."""


@dataclass(frozen=True)
class Built:
    """A built corpus before it is written: documents per split, where they came from, how they were split."""

    source: str
    splits: Mapping[str, Iterable[Document]]
    split_rule: str = SPLIT_RULE


@dataclass(frozen=True)
class Corpus:
    """How one corpus is made.

    `build(folder)` reads raw files from `folder` (None: the corpus's default source) and
    returns its documents per split. `self_contained` corpora need nothing external and
    are built on first use; the others are built by `mt data prepare NAME`, with
    `--source DIR` where `needs_source` (there is no default source).
    """

    name: str
    description: str
    licence: str
    build: Callable[[Path | None], Built]
    self_contained: bool = False
    needs_source: bool = False
    version: int = 1  # bumped when this corpus's builder changes what it writes (its cache is then rebuilt)


def split_key(name: str) -> float:
    """The document's position in [0, 1) for the split rule: the same on every machine."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2**64


def split_documents(documents: Iterable[Document]) -> dict[str, list[Document]]:
    """Assign whole documents to train/valid/test by a hash of their names (see SPLIT_RULE).

    Within each split the documents keep the order they came in. Empty documents
    (whitespace only) are dropped; duplicate names are an error.
    """
    documents = list(non_empty(documents))
    names = [d.name for d in documents]
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate document names: {duplicates[:10]}")
    assigned: dict[str, str] = {}
    for name in names:
        u = split_key(name)
        assigned[name] = "test" if u < TEST_FRACTION else "valid" if u < TEST_FRACTION + VALID_FRACTION else "train"
    if len(names) >= 3:
        for empty in ("test", "valid", "train"):
            members = {split: sorted((n for n in names if assigned[n] == split), key=split_key) for split in SPLITS}
            if not members[empty]:
                largest = max(("train", "valid", "test"), key=lambda split: len(members[split]))
                assigned[members[largest][0]] = empty
    return {split: [d for d in documents if assigned[d.name] == split] for split in SPLITS}


def non_empty(documents: Iterable[Document]) -> Iterator[Document]:
    """The documents that are not empty or whitespace only."""
    return (d for d in documents if d.text.strip())


def read_text(path: Path) -> str:
    """A source file as text: UTF-8, undecodable bytes replaced."""
    return path.read_bytes().decode("utf-8", errors="replace")


def concatenate(files: Iterable[tuple[str, str]], header: str) -> str:
    """Join (relative path, text) pairs into one document, each file preceded by a header line.

    `header` is a format string for that line, e.g. "# file: {}". Whitespace-only files are skipped.
    """
    parts = []
    for path, text in files:
        if text.strip():
            parts.append(header.format(path) + "\n" + text + ("" if text.endswith("\n") else "\n"))
    return "\n".join(parts)


def stream_dataset(path: str, **kwargs: Any) -> Any:
    """`datasets.load_dataset(path, ...)` streamed (no Arrow copy), its cache under cache_dir()."""
    import datasets

    return datasets.load_dataset(path, streaming=True, cache_dir=str(cache_dir() / "hf-datasets"), **kwargs)


def text_files(paths: list[Path]) -> Iterator[tuple[Path, str]]:
    """Each file's whole text, read through the `datasets` text loader (one example per file)."""
    if not paths:
        return
    rows = stream_dataset(
        "text", data_files=[str(p) for p in paths], sample_by="document", encoding_errors="replace", split="train"
    )
    yield from zip(paths, (row["text"] for row in rows), strict=True)


def debian_package(package: str, corpus: str) -> Path:
    """The files of Debian package `package`, unpacked (never installed) under cache_dir()/debian/PACKAGE.

    Fetched once with `apt-get download` and unpacked with `dpkg-deb -x`. Raises
    CorpusUnavailable, saying what to run instead, when either tool is missing or fails.
    """
    target = cache_dir() / "debian" / package
    marker = target / ".package.json"
    if marker.is_file():
        return target
    by_hand = (
        f"On a Debian or Ubuntu machine, `apt-get download {package}` and `dpkg-deb -x {package}_*.deb DIR` "
        f"unpack it anywhere; then run `mt data prepare {corpus} --source DIR`."
    )
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise CorpusUnavailable(
            f"corpus {corpus!r} is built from the Debian package {package}, but {' and '.join(missing)} "
            f"cannot be found on this machine. {by_hand}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{package}.", dir=target.parent))
    try:
        try:
            run_tool(["apt-get", "download", package], cwd=work)
        except subprocess.CalledProcessError as error:
            hint = (
                "The package lists may be missing: run `apt-get update` (as root) and try again. "
                if "Unable to locate package" in (error.stderr or "")
                else ""
            )
            raise CorpusUnavailable(
                f"corpus {corpus!r}: `apt-get download {package}` failed: {(error.stderr or '').strip()[-500:]}\n"
                f"{hint}{by_hand}"
            ) from error
        deb = next(work.glob("*.deb"))
        tree = work / "tree"
        run_tool(["dpkg-deb", "-x", str(deb), str(tree)])
        version = run_tool(["dpkg-deb", "-f", str(deb), "Version"]).strip()
        (tree / ".package.json").write_text(json.dumps({"package": package, "version": version, "deb": deb.name}))
        try:
            os.rename(tree, target)
        except OSError:
            if not marker.is_file():  # not merely beaten to it by another process
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def run_tool(command: list[str], cwd: Path | None = None) -> str:
    """Run an external program; its stdout, or CalledProcessError carrying its stderr."""
    return subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True).stdout


def raw_folder(source: str | Path | None, corpus: str, package: str, inner: str) -> tuple[Path, str]:
    """The folder a corpus reads its raw files from, and a description of it for meta.json.

    With `source`, that folder, or its subfolder `inner` when `source` is an unpacked
    package. Without, `inner` inside the Debian package `package` (fetched on first use).
    """
    if source is not None:
        folder = Path(source)
        if not folder.is_dir():
            raise CorpusUnavailable(f"corpus {corpus!r}: source folder {folder} does not exist")
        return (folder / inner if (folder / inner).is_dir() else folder), str(folder.resolve())
    root = debian_package(package, corpus)
    folder = root / inner
    if not folder.is_dir():
        raise CorpusUnavailable(f"corpus {corpus!r}: the Debian package {package} unpacked in {root} has no {inner}/")
    info = json.loads((root / ".package.json").read_text())
    return folder, f"Debian package {package} {info['version']} ({folder})"


def corpus_dir(name: str) -> Path:
    """Where corpus `name` is cached."""
    return cache_dir() / "corpora" / name


def write_corpus(corpus: Corpus, built: Built, source_argument: str | None) -> Path:
    """Write train/valid/test.jsonl and meta.json into a temporary folder, then rename it into place.

    An interrupted build leaves any previous corpus untouched and no half corpus behind.
    """
    target = corpus_dir(corpus.name)
    with atomic_dir(target) as work:
        counts = {}
        for split in SPLITS:
            documents = characters = 0
            with open(work / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for document in built.splits.get(split, ()):
                    f.write(json.dumps({"name": document.name, "text": document.text}, ensure_ascii=False) + "\n")
                    documents += 1
                    characters += len(document.text)
            counts[split] = {"documents": documents, "characters": characters}
        meta = {
            "corpus": corpus.name,
            "description": corpus.description,
            "source": built.source,
            "source_argument": source_argument,
            "licence": corpus.licence,
            "split_rule": built.split_rule,
            "build_version": BUILD_VERSION,
            "corpus_version": corpus.version,
            "splits": counts,
        }
        (work / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return target
