"""The `proofs` corpus (Isabelle analogue): the Coq standard library, from Debian `libcoq-stdlib`.

One document per directory of .v files, named by its logical path ("Coq/Arith",
"Coq/Numbers/Natural/Abstract"). Within a directory the files are concatenated in
dependency order: a file comes after the files of the same directory it loads with
`Require` (also `Require Import`/`Require Export` and `From ... Require ...`); ties are
broken by file name, and a dependency cycle by taking the first remaining file by name.
Each file is preceded by a line `(* file: DIR/NAME.v *)`.

`--source` is the `theories` folder of a Coq installation (or an unpacked package).
"""

from __future__ import annotations

import heapq
import re
from collections import defaultdict
from pathlib import Path

from .common import Built, Corpus, Document, concatenate, raw_folder, read_text, split_documents

PACKAGE = "libcoq-stdlib"
INNER = "usr/lib/ocaml/coq/theories"
LOGICAL_ROOT = "Coq"

_REQUIRE = re.compile(r"(?<![\w.])Require\s+(?:(?:Import|Export)\s+)?(.*?)\.(?=\s|$)", re.S)
_COMMENT_DELIMITER = re.compile(r"\(\*|\*\)")
_MODULE = re.compile(r"[A-Za-z_][\w']*(?:\.[A-Za-z_][\w']*)*")


def build(source: Path | None) -> Built:
    folder, description = raw_folder(source, "proofs", PACKAGE, INNER)
    return Built(source=description, splits=split_documents(documents(folder)))


def documents(root: Path) -> list[Document]:
    """One document per directory under `root` holding .v files, directories by path."""
    by_directory: dict[Path, dict[str, str]] = defaultdict(dict)
    for path in sorted(root.rglob("*.v")):
        by_directory[path.parent.relative_to(root)][path.stem] = read_text(path)
    result = []
    for directory in sorted(by_directory):
        files = by_directory[directory]
        prefix = "" if directory == Path(".") else f"{directory.as_posix()}/"
        ordered = ((f"{prefix}{stem}.v", files[stem]) for stem in dependency_order(files))
        name = LOGICAL_ROOT if not prefix else f"{LOGICAL_ROOT}/{directory.as_posix()}"
        result.append(Document(name, concatenate(ordered, "(* file: {} *)")))
    return result


def strip_comments(text: str) -> str:
    """Coq source without its (possibly nested) `(* ... *)` comments."""
    kept, depth, start = [], 0, 0
    for delimiter in _COMMENT_DELIMITER.finditer(text):
        if delimiter.group() == "(*":
            if not depth:
                kept.append(text[start : delimiter.start()])
            depth += 1
        elif depth:
            depth -= 1
            if not depth:
                start = delimiter.end()
    if not depth:
        kept.append(text[start:])
    return "".join(kept)


def required_modules(text: str) -> set[str]:
    """The short names (last path component) of the modules a Coq file `Require`s."""
    return {
        module.rsplit(".", 1)[-1]
        for statement in _REQUIRE.findall(strip_comments(text))
        for module in _MODULE.findall(statement)
    }


def dependency_order(files: dict[str, str]) -> list[str]:
    """File stems in an order where each comes after the stems it requires (see module docstring)."""
    needs = {stem: required_modules(text) & files.keys() - {stem} for stem, text in files.items()}
    placed: list[str] = []
    remaining = set(files)
    ready = [stem for stem in files if not needs[stem]]
    heapq.heapify(ready)
    while remaining:
        stem = heapq.heappop(ready) if ready else min(remaining)  # a cycle: break it at the first name
        placed.append(stem)
        remaining.discard(stem)
        for other in remaining:
            if stem in needs[other]:
                needs[other].discard(stem)
                if not needs[other]:
                    heapq.heappush(ready, other)
    return placed


CORPUS = Corpus(
    name="proofs",
    description="Coq standard library (Debian libcoq-stdlib): one document per directory, files in Require order",
    licence="LGPL-2.1 (Coq; Debian libcoq-stdlib)",
    build=build,
)
