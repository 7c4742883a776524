"""Diversity of the instructions kept: a self-BLEU filter and distinct-n.

**Which BLEU.** A candidate instruction is scored by its highest sentence BLEU (sacrebleu: 13a tokens,
lowercased, exp smoothing, effective order) against any *single* instruction kept so far, and dropped when that
exceeds the threshold: "is it a near-duplicate of something we kept". BLEU against the whole kept set as one
multi-reference was measured and rejected: its clipped n-gram counts come from the union of every kept
instruction, so the score of the same instruction rises as the set grows (median 13.7 for the first hundred
HH-RLHF single-turn prompts, 27.8 for the fourth hundred) and short prompts that merely share common phrases
("what is a dirty joke", 53.7) score like real duplicates.

**Why it is fast.** Comparing with every kept instruction is quadratic (14K instructions: 10^8 BLEU calls). An
inverted index from 2-, 3- and 4-grams to the kept instructions containing them finds the ``max_candidates``
sharing the most n-grams, and only those are scored, exactly, from cached n-gram counts through sacrebleu's own
``BLEU.compute_bleu``. A near-duplicate shares most of its n-grams, so it is among them. Two bounded losses,
both far below any useful threshold: n-grams found in more than ``max_posting`` kept instructions are too common
to rank by and are not looked up; and an instruction sharing no 2-gram with the candidate is not compared at all
(for a candidate of four or more tokens its BLEU is then at most 22.6; shorter candidates are also looked up by
their words, because smoothing lets a 2- or 3-token sentence score up to 70.7 with no 2-gram in common).
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Iterable

from sacrebleu.metrics.bleu import BLEU
from sacrebleu.metrics.helpers import extract_all_word_ngrams

MAX_ORDER = 4
Ngram = tuple[str, ...]

_BLEU = BLEU(lowercase=True, effective_order=True)


def bleu_tokens(text: str) -> str:
    """The text as sacrebleu's sentence BLEU above sees it: lowercased, 13a-tokenized, space-joined."""
    return str(_BLEU.tokenizer(text.lower().rstrip()))


def sentence_bleu(hypothesis: str, reference: str) -> float:
    """Reference implementation of the score the filter computes (sacrebleu, one reference)."""
    return float(_BLEU.sentence_score(hypothesis, [reference]).score)


class SelfBleuFilter:
    """Admits an instruction unless it is too similar to one admitted before (see the module docstring)."""

    def __init__(self, threshold: float, *, max_candidates: int = 64, max_posting: int = 2000) -> None:
        if not 0 <= threshold <= 100:
            raise ValueError(f"a BLEU threshold lies in [0, 100], got {threshold}")
        if max_candidates < 1 or max_posting < 1:
            raise ValueError("max_candidates and max_posting must be at least 1")
        self.threshold = threshold
        self.max_candidates = max_candidates
        self.max_posting = max_posting
        self._refs: list[tuple[Counter[Ngram], int]] = []
        self._postings: dict[Ngram, list[int]] = {}
        self._word_postings: dict[Ngram, list[int]] = {}

    def __len__(self) -> int:
        return len(self._refs)

    def score(self, text: str, *, stop_above: float | None = None) -> float:
        """The highest BLEU of ``text`` against one admitted instruction (0 when none is comparable).

        With ``stop_above`` it only answers whether the score exceeds that: it returns as soon as one instruction
        scores above it, and returns a score at most ``stop_above`` (not necessarily the highest) otherwise."""
        ngrams, length = extract_all_word_ngrams(bleu_tokens(text), 1, MAX_ORDER)
        if length == 0:
            return 0.0
        hits: Counter[int] = Counter()
        self._count_hits(hits, self._postings, ((g, c) for g, c in ngrams.items() if len(g) > 1))
        if length < 4:
            self._count_hits(hits, self._word_postings, ((g, c) for g, c in ngrams.items() if len(g) == 1))
        total = [0] * MAX_ORDER
        for gram, count in ngrams.items():
            total[len(gram) - 1] += count
        # Ties go to the earlier instruction, so the result does not depend on dict order.
        ranked = heapq.nlargest(self.max_candidates, hits.items(), key=lambda item: (item[1], -item[0]))
        best = 0.0
        # Below ``floor`` a score changes nothing: under the best so far, or (filtering) under the threshold.
        floor = 0.0 if stop_above is None else stop_above
        for index, shared in ranked:
            # Sorted by shared n-grams, and BLEU can be no higher than with every shared n-gram matching once
            # per order and a perfect brevity penalty: once that cannot beat the floor, no later candidate can.
            bound = _upper_bound(shared, total)
            if bound <= max(best, floor):
                break
            if bound * _brevity_penalty(length, self._refs[index][1]) <= max(best, floor):
                continue
            best = max(best, self._bleu_against(ngrams, total, length, index))
            if stop_above is not None and best > stop_above:
                break
        return best

    def admit(self, text: str) -> bool:
        """Whether ``text`` is kept (its score is at most the threshold); a kept text is indexed."""
        if self.score(text, stop_above=self.threshold) > self.threshold:
            return False
        self.add(text)
        return True

    def add(self, text: str) -> None:
        ngrams, length = extract_all_word_ngrams(bleu_tokens(text), 1, MAX_ORDER)
        index = len(self._refs)
        self._refs.append((ngrams, length))
        for gram in ngrams:
            (self._postings if len(gram) > 1 else self._word_postings).setdefault(gram, []).append(index)

    def _count_hits(
        self, hits: Counter[int], postings: dict[Ngram, list[int]], grams: Iterable[tuple[Ngram, int]]
    ) -> None:
        # Weighted by the candidate's own count of the n-gram: then no order can match more n-grams than the
        # hits, which is what makes ``_upper_bound`` a bound.
        for gram, count in grams:
            posting = postings.get(gram)
            if posting is None or len(posting) > self.max_posting:
                continue
            if count == 1:
                hits.update(posting)  # the common case, counted in C
            else:
                for index in posting:
                    hits[index] += count

    def _bleu_against(self, ngrams: Counter[Ngram], total: list[int], length: int, index: int) -> float:
        ref_ngrams, ref_length = self._refs[index]
        correct = [0] * MAX_ORDER
        # The shared keys only, intersected in C: texts share a few n-grams out of hundreds.
        for gram in ngrams.keys() & ref_ngrams.keys():
            correct[len(gram) - 1] += min(ngrams[gram], ref_ngrams[gram])
        score = BLEU.compute_bleu(
            correct, list(total), length, ref_length, smooth_method="exp", effective_order=True,
            max_ngram_order=MAX_ORDER,
        )  # fmt: skip
        return float(score.score)


def _brevity_penalty(length: int, ref_length: int) -> float:
    return 1.0 if length >= ref_length else math.exp(1 - ref_length / length)


def _upper_bound(shared: int, total: list[int]) -> float:
    """BLEU with a perfect brevity penalty, every word matched and ``shared`` matches in each higher order.

    ``shared`` counts the candidate's n-grams found in the reference (with the candidate's multiplicity), so no
    order has more matches; smoothing gives an order without matches at most 100 / total, no more either."""
    logs = [math.log(100.0)]
    for order_total in total[1:]:
        if order_total == 0:
            break
        logs.append(math.log(100.0 * min(shared, order_total) / order_total))
    return math.exp(sum(logs) / len(logs))


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Distinct n-grams over all n-grams of ``texts`` (n-grams never span two texts), on BLEU's tokens."""
    if n < 1:
        raise ValueError("n must be at least 1")
    seen: set[Ngram] = set()
    total = 0
    for text in texts:
        tokens = bleu_tokens(text).split()
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0
