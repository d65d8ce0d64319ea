"""The `books` corpus (PG-19 analogue): Jane Austen's six novels, from Debian `r-cran-janeaustenr`.

The novels sit in the R lazy-load database data/Rdata.rdb, one character vector (a line
of text per element) each. The file is a sequence of blocks, each a 4-byte big-endian
length followed by a zlib stream holding an R serialisation in XDR format; it is read here
in plain Python, without R. One document per novel, its lines joined with newlines,
named by its title (the first non-empty line, e.g. "Pride and Prejudice").

`--source` is a folder holding Rdata.rdb (or an unpacked package).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from .common import Built, Corpus, CorpusUnavailable, Document, raw_folder, split_documents

PACKAGE = "r-cran-janeaustenr"
INNER = "usr/lib/R/site-library/janeaustenr/data"
DATABASE = "Rdata.rdb"

# R's SEXP types and CHARSXP encoding flags (R Internals, "Serialization Formats").
STRSXP, CHARSXP = 16, 9
LATIN1_MASK = 1 << 2
SMALL_WORDS = frozenset({"a", "an", "and", "in", "of", "on", "the", "to"})


def build(source: Path | None) -> Built:
    folder, description = raw_folder(source, "books", PACKAGE, INNER)
    path = folder / DATABASE
    if not path.is_file():
        raise CorpusUnavailable(f"corpus 'books': no {DATABASE} in {folder}")
    return Built(source=description, splits=split_documents(novels(read_rdb(path.read_bytes()))))


def novels(vectors: list[list[str | None]]) -> list[Document]:
    """One document per non-blank character vector: its lines (NA as empty) joined, named by its title."""
    result = []
    for vector in vectors:
        lines = [line or "" for line in vector]
        first = next((line for line in lines if line.strip()), None)
        if first is not None:
            result.append(Document(title(first), "\n".join(lines)))
    return result


def title(line: str) -> str:
    """A title line in title case: "PRIDE AND PREJUDICE" -> "Pride and Prejudice"."""
    words = line.lower().split()
    return " ".join(w if i and w in SMALL_WORDS else w.capitalize() for i, w in enumerate(words))


def read_rdb(data: bytes) -> list[list[str | None]]:
    """The character vectors in an R lazy-load database (.rdb), in file order; NA is None.

    Objects of other types are skipped.
    """
    vectors = []
    position = 0
    while position < len(data):
        (length,) = struct.unpack_from(">I", data, position)
        stream = zlib.decompressobj()
        try:
            payload = stream.decompress(data[position + 4 :])
        except zlib.error as error:
            raise ValueError(
                f"block at byte {position} is not a zlib stream (only zlib-compressed .rdb files are read)"
            ) from error
        if not stream.eof or len(payload) != length:
            raise ValueError(f"block at byte {position} is truncated: expected {length} bytes, got {len(payload)}")
        position = len(data) - len(stream.unused_data)
        vector = unserialize_character_vector(payload)
        if vector is not None:
            vectors.append(vector)
    return vectors


def unserialize_character_vector(payload: bytes) -> list[str | None] | None:
    """An XDR R serialisation (versions 2 and 3) of a character vector; None for any other object."""
    if payload[:2] != b"X\n":
        raise ValueError("not an R serialisation in XDR format (expected it to start with 'X\\n')")
    reader = _XDRReader(payload, 2)
    version = reader.int()
    reader.take(8)  # the versions of R that wrote it and that can read it
    if version == 3:
        reader.take(reader.int())  # name of the native encoding
    elif version != 2:
        raise ValueError(f"unsupported R serialisation version {version}")
    if reader.int() & 0xFF != STRSXP:
        return None
    length = reader.int()
    if length < 0:
        raise ValueError("long R vectors (2**31 elements or more) are not supported")
    return [reader.string() for _ in range(length)]


class _XDRReader:
    """Big-endian integers and strings from a buffer, left to right."""

    def __init__(self, data: bytes, position: int) -> None:
        self.data, self.position = data, position

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.position)
        self.position += 4
        return value

    def take(self, n: int) -> bytes:
        if self.position + n > len(self.data):
            raise ValueError("R serialisation ends in the middle of an object")
        chunk = self.data[self.position : self.position + n]
        self.position += n
        return chunk

    def string(self) -> str | None:
        """One element of a character vector (a CHARSXP); NA is None."""
        flags = self.int()
        if flags & 0xFF != CHARSXP:
            raise ValueError(f"expected a string (CHARSXP) in a character vector, found SEXP type {flags & 0xFF}")
        n = self.int()
        if n == -1:
            return None
        return self.take(n).decode("latin-1" if (flags >> 12) & LATIN1_MASK else "utf-8", errors="replace")


CORPUS = Corpus(
    name="books",
    description="Jane Austen's six novels (Debian r-cran-janeaustenr), one document per novel",
    licence="public-domain texts; janeaustenr package MIT (Debian r-cran-janeaustenr)",
    build=build,
)
