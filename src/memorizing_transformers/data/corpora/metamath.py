"""The `metamath` corpus (formal proofs): set.mm, from Debian `metamath-databases`.

set.mm is a single database of 41 million characters. A single document could only go
into one split, so it is cut, without dropping or reordering anything, into contiguous
parts at its top-level section headers (a `$(` line followed by a title framed by lines of
`#`): "set.mm/00 front matter" is everything before the first header, then
"set.mm/NN TITLE" for each part. The parts are split like any other documents.

`--source` is a folder holding set.mm (or an unpacked package).
"""

from __future__ import annotations

import re
from pathlib import Path

from .common import Built, Corpus, CorpusUnavailable, Document, raw_folder, read_text, split_documents

PACKAGE = "metamath-databases"
INNER = "usr/share/metamath/databases"
DATABASE = "set.mm"

_PART_HEADER = re.compile(r"^\$\(\n#{40,}\n(.*?)\n#{40,}\n", re.M | re.S)


def build(source: Path | None) -> Built:
    folder, description = raw_folder(source, "metamath", PACKAGE, INNER)
    path = folder / DATABASE
    if not path.is_file():
        raise CorpusUnavailable(f"corpus 'metamath': no {DATABASE} in {folder}")
    return Built(source=description, splits=split_documents(parts(read_text(path))))


def parts(text: str) -> list[Document]:
    """`text` cut at its part headers into documents whose concatenation is `text`."""
    headers = list(_PART_HEADER.finditer(text))
    starts = [0] + [h.start() for h in headers] + [len(text)]
    titles = ["front matter"] + [" ".join(h.group(1).split()) for h in headers]
    return [
        Document(f"{DATABASE}/{i:02d} {title}", text[begin:end])
        for i, (title, begin, end) in enumerate(zip(titles, starts, starts[1:]))
    ]


CORPUS = Corpus(
    name="metamath",
    description="Metamath set.mm (Debian metamath-databases), cut into contiguous parts at its part headers",
    licence="CC0-1.0 (set.mm is public domain; Debian metamath-databases)",
    build=build,
)
