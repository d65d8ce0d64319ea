"""The `books` corpus (PG-19 analogue): Jane Austen's six novels and the 66 books of the King James Bible.

The novels come from Debian `r-cran-janeaustenr`: they sit in the R lazy-load database
data/Rdata.rdb, one character vector (a line of text per element) each. The file is a
sequence of blocks, each a 4-byte big-endian length followed by a zlib stream holding an R
serialisation in XDR format; it is read here in plain Python, without R. One document per
novel, its lines joined with newlines, named by its title (the first non-empty line, e.g.
"Pride and Prejudice").

The Bible comes from Debian `bible-kjv-text` (bible.data, in the compressed format of its
own reader) and is read out by that reader, the `bible` program of Debian `bible-kjv`
(`bible -f -p DIR gen1:1-rev22:21`: one verse a line, "Ge1:1 In the beginning ..."); no
other program reads the format, and writing a decoder for it would copy that one. One
document per book, named "KJV: Genesis" and so on: its name, then a line
"CHAPTER:VERSE text" per verse, a blank line between chapters.

`--source` is a folder holding Rdata.rdb (or an unpacked janeaustenr package) and, anywhere
under it, bible.data and the `bible` program (the two Bible packages unpacked there).
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import zlib
from pathlib import Path

from .common import Built, Corpus, CorpusUnavailable, Document, debian_package, raw_folder, run_tool, split_documents

PACKAGE = "r-cran-janeaustenr"
INNER = "usr/lib/R/site-library/janeaustenr/data"
DATABASE = "Rdata.rdb"
BIBLE_TEXT, BIBLE_READER = "bible-kjv-text", "bible-kjv"
BIBLE_DATA, BIBLE_PROGRAM = "bible.data", "bible"
BIBLE_RANGE = "gen1:1-rev22:21"
BIBLE_BOOKS = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth", "1 Samuel", "2 Samuel",
    "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra", "Nehemiah", "Esther", "Job", "Psalms", "Proverbs",
    "Ecclesiastes", "Song of Solomon", "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel",
    "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah", "Malachi",
    "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians", "2 Corinthians", "Galatians", "Ephesians",
    "Philippians", "Colossians", "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon",
    "Hebrews", "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude", "Revelation",
)  # fmt: skip
_VERSE = re.compile(r"(\d?[A-Za-z]+)(\d+):(\d+) (.*)")

# R's SEXP types and CHARSXP encoding flags (R Internals, "Serialization Formats").
STRSXP, CHARSXP = 16, 9
LATIN1_MASK = 1 << 2
SMALL_WORDS = frozenset({"a", "an", "and", "in", "of", "on", "the", "to"})


def build(source: Path | None) -> Built:
    folder, description = raw_folder(source, "books", PACKAGE, INNER)
    path = folder / DATABASE
    if not path.is_file():
        raise CorpusUnavailable(f"corpus 'books': no {DATABASE} in {folder}")
    data, program, bible = bible_files(source)
    documents = novels(read_rdb(path.read_bytes())) + bible_books(read_bible(data, program))
    return Built(source=f"{description}; {bible}", splits=split_documents(documents))


def bible_files(source: Path | None) -> tuple[Path, Path, str]:
    """bible.data, the `bible` program that reads it, and a description of where they came from."""
    if source is None:
        packages = {package: debian_package(package, "books") for package in (BIBLE_TEXT, BIBLE_READER)}
        roots = list(packages.values())
        described = [f"Debian package {package} {json_version(root)}" for package, root in packages.items()]
    else:
        roots, described = [source], [str(source.resolve())]
    data = next((p for root in roots for p in sorted(root.rglob(BIBLE_DATA))), None)
    program = next((p for root in roots for p in sorted(root.rglob(BIBLE_PROGRAM)) if p.is_file()), None)
    if data is None or program is None:
        missing = " and ".join(name for name, found in ((BIBLE_DATA, data), (BIBLE_PROGRAM, program)) if found is None)
        raise CorpusUnavailable(
            f"corpus 'books': no {missing} under {', '.join(map(str, roots))} (unpack the Debian packages "
            f"{BIBLE_TEXT} and {BIBLE_READER} there: `apt-get download {BIBLE_TEXT} {BIBLE_READER}`, then "
            "`dpkg-deb -x FILE DIR` for each)"
        )
    return data, program, "King James Bible: " + ", ".join(described)


def json_version(root: Path) -> str:
    return json.loads((root / ".package.json").read_text())["version"]


def read_bible(data: Path, program: Path) -> str:
    """Every verse, one a line ("Ge1:1 In the beginning ..."), as the Bible's own reader prints them."""
    try:
        os.chmod(program, os.stat(program).st_mode | 0o111)
        return run_tool([str(program), "-f", "-p", str(data.parent), BIBLE_RANGE])
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", None) or error
        raise CorpusUnavailable(f"corpus 'books': the Bible's reader {program} could not run here: {detail}") from error


def bible_books(verses: str) -> list[Document]:
    """One document per book of the reader's output, in order, named by BIBLE_BOOKS."""
    books: list[tuple[str, list[tuple[int, int, str]]]] = []
    for line in verses.splitlines():
        if not line.strip():
            continue
        match = _VERSE.fullmatch(line.strip())
        if match is None:
            raise ValueError(f"the Bible's reader printed a line that is not a verse: {line[:80]!r}")
        book, chapter, verse, text = match.groups()
        if not books or books[-1][0] != book:
            books.append((book, []))
        books[-1][1].append((int(chapter), int(verse), text))
    if len(books) != len(BIBLE_BOOKS):
        raise ValueError(f"the Bible's reader printed {len(books)} books, expected {len(BIBLE_BOOKS)}")
    documents = []
    for name, (_, verses_of_book) in zip(BIBLE_BOOKS, books):
        lines, chapter = [name], None
        for number, verse, text in verses_of_book:
            if number != chapter:
                lines.append("")
                chapter = number
            lines.append(f"{number}:{verse} {text}")
        documents.append(Document(f"KJV: {name}", "\n".join(lines)))
    return documents


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
    description="Jane Austen's six novels (Debian r-cran-janeaustenr) and the 66 books of the King James Bible "
    "(Debian bible-kjv-text), one document per novel or book",
    licence="public-domain texts; janeaustenr package MIT (Debian r-cran-janeaustenr); bible-kjv-text public domain",
    build=build,
    version=2,  # 2: the King James Bible added
)
