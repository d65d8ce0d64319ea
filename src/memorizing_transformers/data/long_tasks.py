"""Long-context tasks, generated offline and deterministically from a seed: a fact hidden at a
chosen depth of a long prompt of filler, asked at its end.

- passkey: the landmark-attention format, a five-digit key in grass / sky / sun filler;
- multikey: several key-value needles ("one of the special magic numbers for <word> is:
  <seven digits>"), one of them asked, in the manner of RULER's niah_multikey;
- vt (variable tracking, in the manner of RULER's vt): a chain of assignments spread through
  the filler (VAR A = 12345, VAR B = VAR A, ...), the answer every variable that ends up
  holding the value, in the order of the chain.

A prompt is sized in tokens of the tokenizer that will read it; its answer follows it, with a
leading space, so that it can be scored token by token.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
TASKS = ("passkey", "multikey", "vt")


@dataclass(frozen=True)
class LongTask:
    """One prompt and the answer that should follow it."""

    task: str
    length: int  # the prompt's length in tokens, as asked (the actual one is within a filler sentence of it)
    depth: float  # where the asked needle sits, 0 (the start) to 1 (just before the question)
    prompt: str
    answer: str


def make_task(task: str, tokenizer, length: int, depth: float, seed: int) -> LongTask:
    """The sample of `task` for (`length`, `depth`, `seed`): the same arguments always give the same text."""
    if task not in TASKS:
        raise ValueError(f"unknown long-context task {task!r}: choose one of {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be between 0 and 1, got {depth}")
    rng = random.Random(f"{task}:{length}:{depth}:{seed}")
    return {"passkey": _passkey, "multikey": _multikey, "vt": _variable_tracking}[task](tokenizer, length, depth, rng)


def _passkey(tokenizer, length: int, depth: float, rng: random.Random) -> LongTask:
    key = str(rng.randint(10000, 99999))
    intro = (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there. "
    )
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    prompt = _fill(tokenizer, length, intro, [(depth, needle)], "What is the pass key? The pass key is")
    return LongTask("passkey", length, depth, prompt, key)


def _multikey(tokenizer, length: int, depth: float, rng: random.Random, needles: int = 4) -> LongTask:
    words = _distinct(rng, needles, lambda: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(7)))
    values = [str(rng.randint(1_000_000, 9_999_999)) for _ in words]
    intro = (
        "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
        "I will quiz you about the numbers afterwards. "
    )
    # The asked needle (the first) at `depth`, the others at random depths.
    placed = [(depth, f"One of the special magic numbers for {words[0]} is: {values[0]}. ")] + [
        (rng.random(), f"One of the special magic numbers for {w} is: {v}. ") for w, v in zip(words[1:], values[1:])
    ]
    question = f"What is the special magic number for {words[0]} mentioned in the provided text? The number is"
    return LongTask("multikey", length, depth, _fill(tokenizer, length, intro, placed, question), values[0])


def _variable_tracking(tokenizer, length: int, depth: float, rng: random.Random, hops: int = 4) -> LongTask:
    names = _distinct(rng, hops + 1, lambda: "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)))
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}. "] + [f"VAR {b} = VAR {a}. " for a, b in zip(names, names[1:])]
    # The first assignment at `depth`, the rest spread evenly between it and the question.
    placed = [(depth + (1 - depth) * i / len(chain), line) for i, line in enumerate(chain)]
    intro = "Memorize and track the chain of variable assignments hidden in the following text. "
    question = f"Question: which variables are assigned the value {value} in the text above? Answer: they are"
    return LongTask("vt", length, depth, _fill(tokenizer, length, intro, placed, question), " ".join(names))


def _distinct(rng: random.Random, count: int, draw) -> list[str]:
    found: list[str] = []
    while len(found) < count:
        if (word := draw()) not in found:
            found.append(word)
    return found


def _fill(tokenizer, length: int, intro: str, placed: list[tuple[float, str]], question: str) -> str:
    """intro + filler + question, about `length` tokens long, with each (depth, text) of `placed`
    between filler sentences at that share of the filler (stable order for equal depths)."""
    fixed = len(tokenizer(intro + "".join(text for _, text in placed) + question)["input_ids"])
    per_sentence = len(tokenizer(FILLER * 16)["input_ids"]) / 16
    sentences = max(1, round((length - fixed) / per_sentence))
    pieces = [FILLER] * sentences
    # Inserted last position first, so that each insertion leaves the earlier positions where they were.
    for position, _, text in sorted(((round(d * sentences), i, t) for i, (d, t) in enumerate(placed)), reverse=True):
        pieces.insert(position, text)
    return intro + "".join(pieces) + question
