"""Corpora of long documents, built offline and cached as JSON lines (see docs/DATA.md).

Each corpus is a module with a `CORPUS` (a `Corpus`: name, licence, builder); `CORPORA`
maps names to them. `prepare_corpus` builds the cache folder cache_dir()/corpora/NAME
holding train.jsonl, valid.jsonl, test.jsonl (one {"name", "text"} object a line) and
meta.json; `load_corpus` reads one split back as `Document`s.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import books, code, files, metamath, pg19, proofs, pycode, tex
from .common import BUILD_VERSION, SPLITS, Corpus, CorpusUnavailable, Document, corpus_dir, write_corpus

__all__ = ["CORPORA", "Corpus", "CorpusUnavailable", "Document", "get_corpus", "load_corpus", "prepare_corpus"]

CORPORA: dict[str, Corpus] = {
    module.CORPUS.name: module.CORPUS for module in (code, pycode, proofs, metamath, books, tex, pg19, files)
}


def get_corpus(name: str) -> Corpus:
    """The registered corpus `name`; ValueError naming the known ones otherwise."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; known corpora: {', '.join(sorted(CORPORA))}")
    return CORPORA[name]


def prepare_corpus(name: str, source: str | Path | None = None, force: bool = False) -> Path:
    """Build the cache folder cache_dir()/corpora/NAME and return it.

    It holds train.jsonl, valid.jsonl and test.jsonl (one {"name": ..., "text": ...}
    object a line) and meta.json (source, licence, documents and characters per split).
    It is written to a temporary folder and renamed into place, so an interrupted build
    never leaves a half corpus. An existing cache is reused unless `force`, or unless
    `source` is given and differs from the one it was built from. `source` is a folder of
    raw files replacing the corpus's default source (required for "files").
    """
    corpus = get_corpus(name)
    argument = str(Path(source).resolve()) if source is not None else None
    target = corpus_dir(name)
    if not force and _is_current(target, argument, corpus.version):
        return target
    built = corpus.build(Path(source) if source is not None else None)
    return write_corpus(corpus, built, argument)


def load_corpus(name: str, split: str, source: str | Path | None = None) -> list[Document]:
    """The documents of one split ("train", "valid" or "test") in a deterministic order.

    Builds the cache first when the corpus needs nothing external (e.g. "code") or when
    `source` is given; otherwise a missing cache raises CorpusUnavailable saying which
    `mt data prepare` command to run.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    corpus = get_corpus(name)
    if corpus.self_contained or source is not None:
        target = prepare_corpus(name, source)
    else:
        target = corpus_dir(name)
        if not _is_current(target, None, corpus.version):
            command = f"mt data prepare {name}" + (" --source DIR" if corpus.needs_source else "")
            raise CorpusUnavailable(f"corpus {name!r} ({corpus.description}) is not prepared: run `{command}`")
    with open(target / f"{split}.jsonl", encoding="utf-8") as f:
        return [Document(**json.loads(line)) for line in f]


def _is_current(target: Path, source_argument: str | None, version: int) -> bool:
    """Whether `target` holds a complete corpus of this build version and corpus version (from
    `source_argument`, if given)."""
    try:
        meta = json.loads((target / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    if meta.get("build_version") != BUILD_VERSION or meta.get("corpus_version", 1) != version:
        return False
    return source_argument is None or meta.get("source_argument") == source_argument
