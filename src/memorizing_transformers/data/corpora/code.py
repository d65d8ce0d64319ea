"""The `code` corpus (GitHub analogue): the Python standard library of the running interpreter.

One document per top-level package (a directory whose name is a Python identifier), its
.py files concatenated in directory-traversal order: a directory's own files by name, then
its subdirectories by name, each file preceded by a line `# file: RELATIVE/PATH.py`. The
top-level single-file modules are grouped by the first letter of their name, leading
underscores ignored (`_pydecimal.py` joins `pickle.py` in "modules/p"). Test suites
(directories named test, tests or idle_test), site-packages and non-.py files are left out.
Needs nothing external.
"""

from __future__ import annotations

import os
import platform
import sysconfig
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from .common import Built, Corpus, CorpusUnavailable, Document, concatenate, read_text, split_documents

EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__"})
HEADER = "# file: {}"


def build(source: Path | None) -> Built:
    root = source if source is not None else Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise CorpusUnavailable(f"corpus 'code': source folder {root} does not exist")
    if source is not None:
        description = str(root.resolve())
    else:
        description = f"Python {platform.python_version()} standard library ({root})"
    return Built(source=description, splits=split_documents(documents(root)))


def documents(root: Path) -> list[Document]:
    """The packages of `root` by name, then the module groups by letter."""
    packages = [
        Document(entry.name, concatenate(package_files(root, entry), HEADER))
        for entry in sorted(root.iterdir())
        if entry.is_dir() and entry.name.isidentifier() and entry.name not in EXCLUDED_DIRS
    ]
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(root.glob("*.py")):
        if path.is_file():
            groups[path.name.lstrip("_")[:1].lower() or "_"].append(path)
    modules = [
        Document(f"modules/{letter}", concatenate(((p.name, read_text(p)) for p in groups[letter]), HEADER))
        for letter in sorted(groups)
    ]
    return packages + modules


def package_files(root: Path, package: Path) -> Iterator[tuple[str, str]]:
    """(path relative to `root`, text) of every .py file of `package`, in directory-traversal order."""
    for directory, subdirs, files in os.walk(package):
        subdirs[:] = sorted(d for d in subdirs if d not in EXCLUDED_DIRS)
        for name in sorted(files):
            if name.endswith(".py"):
                path = Path(directory, name)
                yield path.relative_to(root).as_posix(), read_text(path)


CORPUS = Corpus(
    name="code",
    description="Python standard library: one document per top-level package, "
    "single-file modules grouped by first letter",
    licence="PSF-2.0 (Python Software Foundation License)",
    build=build,
    self_contained=True,
)
