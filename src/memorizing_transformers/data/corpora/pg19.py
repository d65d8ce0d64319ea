"""The `pg19` corpus: PG-19 (Rae et al., 2020), 28,752 Project Gutenberg books, through Hugging Face `datasets`.

Without `--source` the books are streamed from the Hub dataset `emozilla/pg19`, a Parquet
copy of `deepmind/pg19` with the same fields (short_book_title, publication_date, url,
text) and splits; `deepmind/pg19` itself is a loading script, which `datasets` 4 and later
no longer run. This needs network access to the Hub and about 11 GB of disk.

`--source DIR` reads a local copy in the layout of the DeepMind release instead:
DIR/train/, DIR/validation/ and DIR/test/, each holding one BOOK_ID.txt file per book.

The dataset's own splits are kept (validation becomes "valid"). Books are named by their
Project Gutenberg id (the file name, or the last part of the url).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .common import Built, Corpus, CorpusUnavailable, Document, non_empty, stream_dataset, text_files

HUB_ID = "emozilla/pg19"
SPLIT_NAMES = {"train": "train", "valid": "validation", "test": "test"}
OWN_SPLITS = "the dataset's own splits (train, validation -> valid, test)"


def build(source: Path | None) -> Built:
    if source is not None:
        missing = [name for name in SPLIT_NAMES.values() if not (source / name).is_dir()]
        if missing:
            raise CorpusUnavailable(
                f"corpus 'pg19': {source} has no {', '.join(name + '/' for name in missing)} folder "
                "(expected train/, validation/ and test/ folders of BOOK_ID.txt files, as in the DeepMind release)"
            )
        splits = {split: local_books(source / name) for split, name in SPLIT_NAMES.items()}
        return Built(source=str(source.resolve()), splits=splits, split_rule=OWN_SPLITS)
    try:
        dataset = stream_dataset(HUB_ID)
    except Exception as error:  # datasets reports an unreachable Hub with several exception types
        raise CorpusUnavailable(
            f"corpus 'pg19': the Hugging Face dataset {HUB_ID} cannot be loaded here ({error}). "
            "Run `mt data prepare pg19` where the Hub can be reached, or download PG-19 "
            "(train/, validation/, test/ folders of BOOK_ID.txt files) and run `mt data prepare pg19 --source DIR`."
        ) from error
    splits = {split: hub_books(dataset[name]) for split, name in SPLIT_NAMES.items()}
    return Built(source=f"Hugging Face dataset {HUB_ID}", splits=splits, split_rule=OWN_SPLITS)


def local_books(folder: Path) -> Iterator[Document]:
    """The books of one split folder, by file name."""
    books = (Document(path.stem, text) for path, text in text_files(sorted(folder.glob("*.txt"))))
    return non_empty(books)


def hub_books(rows: Iterable[dict[str, Any]]) -> Iterator[Document]:
    """The books of one split of the Hub dataset, in its order."""
    return non_empty(Document(row["url"].rstrip("/").rsplit("/", 1)[-1], row["text"]) for row in rows)


CORPUS = Corpus(
    name="pg19",
    description="PG-19 books (Hugging Face datasets, or a local copy given with --source), one document per book",
    licence="Apache-2.0 (PG-19 release); the books are public domain in the USA",
    build=build,
)
