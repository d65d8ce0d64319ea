"""A synthetic long-document recall task: names bound to values, asked again later.

A document is a stream of two-token pairs `name value`. The first time a name
appears its value is drawn at random (a *binding*: unpredictable, not in the
loss); every later pair with the same name repeats that value (a *question*:
the value token is the answer and the only token in `loss_mask`). Every pair
after the first few is a question, so answers are dense.

Answering is an induction step: the query (the name token, whose next-token
prediction is the answer) must find an earlier position of the same name and
copy the token that followed it. With a memory layer, the key written at a
value token's position must encode the preceding name, which a lower layer can
supply with a previous-token head.

The distance of a question is measured from the value token of the name's most
recent earlier occurrence (the *source*) to the answer token. For each pair the
generator draws a wanted distance log-uniformly from `[min_distance,
max_distance]` tokens and, with probability `question_rate`, asks about the
name whose last occurrence lies closest to it (within a factor of 2); otherwise
it binds a new name. Once every name is bound, it always asks. One document so
mixes answers inside the segment, inside the Transformer-XL window and far
beyond it (reachable only through the memory). A curriculum raises
`max_distance` as training goes. The number of names bounds the reach: a name
asked often cannot also be asked far from its last occurrence, so with 32 names
a 512-token document has distances up to about 256 tokens; more names reach
further but make the task slower to learn.

Token ids: names are `0 .. num_names - 1`, values `num_names .. num_names +
num_values - 1`, and one filler id after them, used for a pair only when no
name is left to bind and no earlier name lies at an allowed distance (rare for
sensible parameters; fillers are never in the loss).
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Sequence

import torch

from .streaming import TokenizedDocument

LAG_TOLERANCE = math.log(2.0)
"""A question is asked about a name whose lag is within this log ratio of the wanted lag;
when none is, a new name is bound instead (while names are left)."""

DISTANCE_CATEGORIES = ("segment", "xl", "memory")
"""Where an answer's source lies for a model reading `segment_length`-token segments:
in the query's own segment, in its Transformer-XL cache, or only in the kNN memory."""


@dataclass(frozen=True)
class RecallTask:
    """Parameters of the name/value recall task (distances in tokens)."""

    num_names: int = 32
    num_values: int = 16
    document_length: int = 512
    min_distance: int = 2
    max_distance: int = 512
    question_rate: float = 0.8

    def __post_init__(self) -> None:
        if self.num_names < 1 or self.num_values < 2:
            raise ValueError(f"need at least 1 name and 2 values, got {self.num_names} and {self.num_values}")
        if self.document_length < 4 or self.document_length % 2:
            raise ValueError(f"document_length must be an even number >= 4, got {self.document_length}")
        if not 2 <= self.min_distance <= self.max_distance:
            raise ValueError(f"need 2 <= min_distance <= max_distance, got {self.min_distance}, {self.max_distance}")
        if not 0.0 <= self.question_rate <= 1.0:
            raise ValueError(f"question_rate must be in [0, 1], got {self.question_rate}")

    @property
    def vocab_size(self) -> int:
        """Names, values and the filler id."""
        return self.num_names + self.num_values + 1

    @property
    def filler_id(self) -> int:
        return self.num_names + self.num_values

    @property
    def chance_accuracy(self) -> float:
        """Accuracy of guessing a value uniformly at random."""
        return 1.0 / self.num_values

    def generate(self, seed: int) -> "RecallDocument":
        """One document, a pure function of the task parameters and `seed`."""
        rng = random.Random(seed)
        names = rng.sample(range(self.num_names), self.num_names)  # binding order of this document's names
        n_pairs = self.document_length // 2
        min_lag, max_lag = math.ceil(self.min_distance / 2), self.max_distance // 2  # in pairs
        ids = [0] * self.document_length
        answers: list[int] = []
        sources: list[int] = []
        value_of: dict[int, int] = {}
        last_slot: dict[int, int] = {}  # name -> pair slot of its most recent occurrence
        for slot in range(n_pairs):
            wanted = math.exp(rng.uniform(math.log(min_lag), math.log(max_lag)))
            mismatch = {  # how far (log ratio) each askable name's lag is from the wanted lag
                name: abs(math.log((slot - last) / wanted))
                for name, last in last_slot.items()
                if min_lag <= slot - last <= max_lag
            }
            best = min(mismatch, key=lambda n: (mismatch[n], n), default=None)
            names_left = len(value_of) < len(names)
            close = best is not None and mismatch[best] <= LAG_TOLERANCE and rng.random() < self.question_rate
            if best is not None and (close or not names_left):
                name = best
                answers.append(2 * slot + 1)
                sources.append(2 * last_slot[name] + 1)
            elif names_left:
                name = names[len(value_of)]
                value_of[name] = self.num_names + rng.randrange(self.num_values)
            else:
                ids[2 * slot] = ids[2 * slot + 1] = self.filler_id
                continue
            ids[2 * slot], ids[2 * slot + 1] = name, value_of[name]
            last_slot[name] = slot
        loss_mask = torch.zeros(self.document_length, dtype=torch.bool)
        loss_mask[answers] = True
        return RecallDocument(
            document=TokenizedDocument(f"recall-{seed}", torch.tensor(ids, dtype=torch.long), loss_mask),
            answer_positions=torch.tensor(answers, dtype=torch.long),
            source_positions=torch.tensor(sources, dtype=torch.long),
        )

    def generate_many(self, seeds: Sequence[int]) -> list["RecallDocument"]:
        return [self.generate(seed) for seed in seeds]


@dataclass
class RecallDocument:
    """A generated document and, per answer, where it is and where its binding was last seen.

    answer_positions[i]: index in `document.ids` of the i-th answer (a value token in
    `loss_mask`). source_positions[i]: index of the value token of the same name's most
    recent earlier occurrence, which holds the same value.
    """

    document: TokenizedDocument
    answer_positions: torch.Tensor  # (answers,) long
    source_positions: torch.Tensor  # (answers,) long

    @property
    def distances(self) -> torch.Tensor:
        """Tokens from each answer's source to the answer: (answers,) long."""
        return self.answer_positions - self.source_positions

    def categories(self, segment_length: int, xl_length: int) -> torch.Tensor:
        """Index into DISTANCE_CATEGORIES of each answer, for a model streaming this document
        from its first token in segments of `segment_length` with an XL cache of `xl_length`."""
        return distance_categories(self.answer_positions, self.source_positions, segment_length, xl_length)


def distance_categories(
    answer_positions: torch.Tensor, source_positions: torch.Tensor, segment_length: int, xl_length: int
) -> torch.Tensor:
    """0 ("segment"), 1 ("xl") or 2 ("memory") per answer.

    The answer is predicted at the query position `answer - 1` (the name token). Its
    source is local if it lies in the query's segment, in the XL window if it lies in
    the `xl_length` tokens before that segment, and in the memory otherwise.
    """
    segment_start = (answer_positions - 1) // segment_length * segment_length
    category = torch.full_like(answer_positions, 2)
    category[source_positions >= segment_start - xl_length] = 1
    category[source_positions >= segment_start] = 0
    return category


def accuracy_by_category(correct: torch.Tensor, categories: torch.Tensor) -> dict[str, dict[str, float]]:
    """Accuracy and count per distance category: {"segment": {"accuracy", "count"}, ...}.

    correct: (answers,) bool, categories: (answers,) from `distance_categories`. A category
    without answers has accuracy NaN.
    """
    result = {}
    for index, name in enumerate(DISTANCE_CATEGORIES):
        chosen = correct[categories == index]
        accuracy = chosen.float().mean().item() if chosen.numel() else float("nan")
        result[name] = {"accuracy": accuracy, "count": int(chosen.numel())}
    return result


def curriculum_documents(
    task: RecallTask,
    steps: int,
    batch_size: int,
    segment_length: int,
    start: int = 32,
    doubling_steps: int = 500,
    seed: int = 0,
) -> list[TokenizedDocument]:
    """Training documents of `task` in the order the rows of a `StreamingBatcher` (shuffle
    off) read them, the distance limit `start` doubling every `doubling_steps` steps up to
    the task's own (`doubling_steps` 0: no curriculum, the whole task from the first step).
    Document i is generated from seed `seed * 10_000_000 + i`."""
    segments_per_document = -(-(task.document_length - 1) // segment_length)
    documents = []
    for index in range(batch_size * (steps // segments_per_document + 1)):
        step = index // batch_size * segments_per_document
        limit = (
            task.max_distance if not doubling_steps else min(task.max_distance, start * 2 ** (step // doubling_steps))
        )
        limit = max(task.min_distance, limit)
        documents.append(
            dataclasses.replace(task, max_distance=limit).generate(seed=seed * 10_000_000 + index).document
        )
    return documents
