"""Is a trained model's gain from the future? Its per-token losses on a test document against the
same document with every token from `--cut` on replaced at random: a causal model's losses before
the cut are identical, whatever its memory holds.

    python experiments/causality_check.py runs/grids/layer1-pycode-2048/L-mem8k-xl-gate0-s0/checkpoints/step-0000976 \\
        --corpus pycode --out experiments/results/causality-layer1-gate0.json

The test suite checks causality on tiny models (tests/test_model.py); this checks the weights a
result came from, at their own size, on real text. Writes JSON with the command that made it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from memorizing_transformers import MemorizingTransformer
from memorizing_transformers.atomic import write_atomically
from memorizing_transformers.data.pipeline import load_tokenized
from memorizing_transformers.data.streaming import TokenizedDocument
from memorizing_transformers.evaluation.perplexity import evaluate


def check(model: MemorizingTransformer, ids: torch.Tensor, cut: int, seed: int = 0) -> dict:
    """Losses of `ids` against `ids` with every token from `cut` on drawn at random."""
    changed = ids.clone()
    generator = torch.Generator().manual_seed(seed)
    changed[cut:] = torch.randint(0, model.config.vocab_size, (ids.numel() - cut,), generator=generator)
    losses = [
        evaluate(model, [TokenizedDocument(name, tokens)], token_losses=True).token_losses[0]
        for name, tokens in (("original", ids), ("changed", changed))
    ]  # (tokens,) each; NaN where no prediction is made (the first token)
    before = [loss[1:cut] for loss in losses]
    return {
        "tokens": ids.numel(),
        "cut": cut,
        "max_difference_before_cut": (before[0] - before[1]).abs().max().item(),
        "identical_before_cut": torch.equal(before[0], before[1]),
        "differ_after_cut": not torch.equal(losses[0][cut:], losses[1][cut:]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a model folder (save_pretrained, or a trainer checkpoint's step-N folder)")
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--document", type=int, default=0, help="which test document")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--cut", type=int, default=2500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not 1 < args.cut < args.tokens:
        sys.exit(f"--cut must lie between 1 and --tokens ({args.tokens}), got {args.cut}")
    model = MemorizingTransformer.from_pretrained(args.checkpoint).eval()
    document = load_tokenized(args.corpus, "test", model.tokenizer)[args.document]
    if document.ids.numel() < args.tokens:
        sys.exit(f"test document {document.name} has {document.ids.numel()} tokens, fewer than --tokens")
    result = {
        "command": "python experiments/causality_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "checkpoint": args.checkpoint,
        "memory_gates": model.memory_gates(),
        "document": document.name,
        **check(model, document.ids[: args.tokens], args.cut),
    }
    write_atomically(Path(args.out), lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
