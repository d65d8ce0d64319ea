"""The `files` corpus: a folder of your own long documents, given with `--source DIR`.

Every .txt file under DIR (searched recursively) is one document, named by its path
relative to DIR; every line of a .jsonl file is one document, its text in the "text"
field and its name in the optional "name" field (default: "RELATIVE/PATH.jsonl#ROW").
Files are read through the Hugging Face `datasets` text and json loaders; undecodable
bytes in .txt files are replaced.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from .common import Built, Corpus, CorpusUnavailable, Document, split_documents, stream_dataset, text_files

USAGE = (
    "run `mt data prepare files --source DIR`, DIR holding .txt files (one document each) "
    'and/or .jsonl files (one document a line: {"text": ..., "name": ...})'
)


def build(source: Path | None) -> Built:
    if source is None:
        raise CorpusUnavailable(f"corpus 'files' has no default source: {USAGE}")
    if not source.is_dir():
        raise CorpusUnavailable(f"corpus 'files': source folder {source} does not exist")
    texts = sorted(source.rglob("*.txt"))
    jsonl = sorted(source.rglob("*.jsonl"))
    if not texts and not jsonl:
        raise CorpusUnavailable(f"corpus 'files': no .txt or .jsonl files in {source}; {USAGE}")
    documents = [Document(path.relative_to(source).as_posix(), text) for path, text in text_files(texts)]
    for path in jsonl:
        documents.extend(json_lines(path, path.relative_to(source).as_posix()))
    return Built(source=str(source.resolve()), splits=split_documents(documents))


def json_lines(path: Path, relative: str) -> Iterator[Document]:
    """The documents of one .jsonl file, in file order."""
    for row_index, row in enumerate(stream_dataset("json", data_files=str(path), split="train")):
        if not isinstance(row.get("text"), str):
            raise ValueError(f'{path}: row {row_index} has no string "text" field')
        yield Document(str(row.get("name") or f"{relative}#{row_index}"), row["text"])


CORPUS = Corpus(
    name="files",
    description="a folder of .txt / .jsonl long documents given with --source",
    licence="that of the documents given",
    build=build,
    needs_source=True,
)
