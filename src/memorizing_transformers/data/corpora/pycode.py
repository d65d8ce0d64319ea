"""The `pycode` corpus (a larger GitHub analogue): Python source of the standard library and of
every package installed beside this one (torch, transformers, numpy, ... : the project's
dependencies at their installed versions).

One document per directory: its own .py files concatenated by name, each preceded by a line
`# file: RELATIVE/PATH.py` (subdirectories are documents of their own). Documents shorter
than MIN_CHARACTERS are left out, and so are test suites (directories named test, tests or
idle_test), __pycache__ and this project's own package. Names are `stdlib/PATH` and
`site/PATH`. The corpus depends on the installed versions, which meta.json records.
Needs nothing external.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from .common import Built, Corpus, CorpusUnavailable, Document, concatenate, read_text, split_documents

EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages", "memorizing_transformers"})
MIN_CHARACTERS = 8_000
HEADER = "# file: {}"


def build(source: Path | None) -> Built:
    if source is not None:  # one folder of Python source instead of the interpreter's
        if not source.is_dir():
            raise CorpusUnavailable(f"corpus 'pycode': source folder {source} does not exist")
        return Built(source=str(source.resolve()), splits=split_documents(documents(source, "src")))
    stdlib, site = Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])
    versions = sorted(f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions())
    description = (
        f"Python {platform.python_version()} standard library ({stdlib}) and site-packages ({site}): "
        + ", ".join(versions)
    )
    return Built(source=description, splits=split_documents([*documents(stdlib, "stdlib"), *documents(site, "site")]))


def documents(root: Path, prefix: str) -> list[Document]:
    """One document per directory under `root` (its own .py files), in directory-traversal order."""
    found = []
    for directory, text in directory_texts(root):
        if len(text) >= MIN_CHARACTERS:
            found.append(Document(f"{prefix}/{directory or '.'}", text))
    return found


def directory_texts(root: Path) -> Iterator[tuple[str, str]]:
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(
            d for d in subdirs if d not in EXCLUDED_DIRS and not d.endswith((".dist-info", ".egg-info"))
        )
        files = [Path(directory, name) for name in sorted(names) if name.endswith(".py")]
        if files:
            relative = Path(directory).relative_to(root).as_posix()
            yield (
                ("" if relative == "." else relative),
                concatenate(((p.relative_to(root).as_posix(), read_text(p)) for p in files), HEADER),
            )


CORPUS = Corpus(
    name="pycode",
    description="Python source of the standard library and the installed packages: one document per directory",
    licence="the licences of the packages (PSF-2.0, BSD, Apache-2.0, MIT, ...), recorded per package in site-packages",
    build=build,
    self_contained=True,
)
