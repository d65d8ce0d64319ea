"""From a corpus name to token-id documents: tokenizer per corpus, tokenization cache."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from tokenizers import decoders
from transformers import PreTrainedTokenizerBase

from ..atomic import write_atomically
from .corpora import Document, get_corpus, load_corpus
from .streaming import TokenizedDocument
from .tokenizer import cache_dir, train_bpe

SPLITS = ("train", "valid", "test")
TOKENIZED_VERSION = 2  # 2: num_bytes counts the bytes of the scored tokens only
TOKENIZE_GROUP = 32  # documents tokenized at once


def corpus_key(corpus: str) -> str:
    """The corpus's name in the caches made from it; from version 2 on, with its version, so a
    rebuilt corpus gets a tokenizer and token ids of its own."""
    version = get_corpus(corpus).version
    return f"{corpus}-c{version}" if version > 1 else corpus


def corpus_tokenizer_dir(corpus: str, vocab_size: int) -> Path:
    return cache_dir() / "tokenizers" / f"{corpus_key(corpus)}-bpe{vocab_size}"


def corpus_tokenizer(corpus: str, vocab_size: int) -> Path:
    """The folder of a byte-level BPE trained on the corpus's train split (trained once, then cached)."""
    directory = corpus_tokenizer_dir(corpus, vocab_size)
    if not (directory / "tokenizer_config.json").is_file():
        train_bpe((d.text for d in load_corpus(corpus, "train")), vocab_size, directory)
    return directory


def tokenize_documents(documents: list[Document], tokenizer: PreTrainedTokenizerBase) -> list[TokenizedDocument]:
    """Token ids of each document, and the UTF-8 bytes of the text its scored tokens (all but
    the first, which nothing predicts) spell: the denominator of bits per byte. Documents go
    through the tokenizer in groups, so a large corpus never holds all its ids as lists."""
    tokenized = []
    for first in range(0, len(documents), TOKENIZE_GROUP):
        group = documents[first : first + TOKENIZE_GROUP]
        for d, ids in zip(group, tokenizer([d.text for d in group], add_special_tokens=False)["input_ids"]):
            num_bytes = len(d.text.encode("utf-8")) - _first_token_bytes(tokenizer, d.text, ids)
            tokenized.append(TokenizedDocument(d.name, torch.tensor(ids, dtype=torch.long), num_bytes=num_bytes))
    return tokenized


def _first_token_bytes(tokenizer: PreTrainedTokenizerBase, text: str, ids: list[int]) -> int:
    """Bytes of text the first token spells. A byte-level BPE token's string has one character
    per byte (a token may end inside a character); other tokenizers are read by offsets."""
    if not ids:
        return len(text.encode("utf-8"))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and isinstance(backend.decoder, decoders.ByteLevel):
        return len(tokenizer.convert_ids_to_tokens(ids[0]))
    offsets = tokenizer(text[:1000], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return len(text[: offsets[0][1]].encode("utf-8"))


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of a fast tokenizer's full definition (vocabulary, merges, normalisation)."""
    return hashlib.sha1(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()[:12]


def load_tokenized(corpus: str, split: str, tokenizer: PreTrainedTokenizerBase) -> list[TokenizedDocument]:
    """A corpus split as token ids; cached on disk per (corpus and its version, split, tokenizer)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    folder = f"{corpus_key(corpus)}-{tokenizer_fingerprint(tokenizer)}-v{TOKENIZED_VERSION}"
    path = cache_dir() / "tokenized" / folder / f"{split}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        return [
            TokenizedDocument(name, ids, num_bytes=int(n))
            for name, ids, n in zip(saved["names"], saved["ids"], saved["bytes"])
        ]
    documents = tokenize_documents(load_corpus(corpus, split), tokenizer)
    payload = {
        "names": [d.name for d in documents],
        "ids": [d.ids for d in documents],
        "bytes": [d.num_bytes for d in documents],
    }
    write_atomically(path, lambda tmp: torch.save(payload, tmp))
    return documents
