"""The `tex` corpus (arXiv analogue): the LaTeX/TeX sources of the PARI/GP manuals, from Debian `pari-doc`.

One document per .tex file, named by its file name. The manuals are not assembled through
their `\\input` chains: the master files of the package input only some chapters (the
library manual's master, libpari.tex, is not shipped), so per-file documents keep every
chapter exactly once.

`--source` is a folder of .tex files, searched recursively (or an unpacked package).
"""

from __future__ import annotations

from pathlib import Path

from .common import Built, Corpus, CorpusUnavailable, Document, raw_folder, read_text, split_documents

PACKAGE = "pari-doc"
INNER = "usr/share/pari/doc"


def build(source: Path | None) -> Built:
    folder, description = raw_folder(source, "tex", PACKAGE, INNER)
    paths = sorted(folder.rglob("*.tex"))
    if not paths:
        raise CorpusUnavailable(f"corpus 'tex': no .tex files in {folder}")
    documents = [Document(path.relative_to(folder).as_posix(), read_text(path)) for path in paths]
    return Built(source=description, splits=split_documents(documents))


CORPUS = Corpus(
    name="tex",
    description="TeX sources of the PARI/GP manuals (Debian pari-doc), one document per .tex file",
    licence="GPL-2.0-or-later (PARI/GP; Debian pari-doc)",
    build=build,
)
