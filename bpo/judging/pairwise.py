"""Pairwise judging in both orders: an answer must win with the optimized answer shown first and shown second.

The paper shows each pair once, in a random order, which leaves the judge's position bias in the win rate.
Here every item is judged twice, with the answers swapped, and only a verdict both orders agree on counts;
a disagreement is a tie, as MT-bench scores it. An order whose verdict cannot be read counts as a tie for
that order and is recorded as such (verdict ""), never guessed.

A judge template names the prompt the judge gets: one of the paper's two prompts as published, ``pair-v2``
(MT-bench's, the paper's GPT-4 judge) or ``ranking`` (AlpacaEval style, the paper's Claude judge), optionally
followed by prompting variations whose effect ``bpo judge calibrate`` measures, in this order:

- ``+rubric`` (pair-v2 only): the paper's unordered list of factors is replaced by a rubric of criteria in
  order of importance (harmlessness, instruction following, correctness, helpfulness, clarity), decided by
  the first criterion on which the answers clearly differ.
- ``+verdict-first`` (pair-v2 only): the judge is asked to open its reply with the verdict and explain after
  it, and the verdict is read from the first paragraph instead of the last. A short output then suffices,
  and a reply cut off at its token limit still holds its verdict.
- ``+voteN`` (N = 3 or 5): each order is sampled N times (temperature ``VOTE_TEMPERATURE``, top_p
  ``VOTE_TOP_P``, a seed per sample derived from the judge's seed and the request) and the order's verdict
  is the letter the most samples gave; a vote whose most frequent letters tie, or with no readable sample, is
  unreadable. Without it decoding is greedy (temperature 0), as the paper's GPT-4 judge ran.

For example ``pair-v2+rubric+verdict-first+vote3``. ``JUDGE_TEMPLATES`` lists every valid name.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from bpo.engines.base import (
    ChatMessage,
    Completion,
    EngineClient,
    GenerationRequest,
    SamplingParams,
    derive_seed,
    first_failure_raised,
)
from bpo.errors import InvalidPromptError
from bpo.judging.verdicts import (
    ParsedVerdict,
    VerdictLetter,
    majority_verdict,
    parse_pair_verdict,
    parse_ranking_verdict,
)
from bpo.optimizer.prompting import reference_text
from bpo.textscan import Pattern, escape, linear

BaseTemplate = Literal["pair-v2", "ranking"]
BASE_TEMPLATES: tuple[BaseTemplate, ...] = ("pair-v2", "ranking")
# A judge template's name, one of JUDGE_TEMPLATES: jobs, verdicts and calibrations carry it as text.
JudgeTemplate = str
Winner = Literal["optimized", "original", "tie"]

PAIR_V2_FILE = "judge_pair_v2.json"
RANKING_FILE = "judge_ranking_alpacaeval_style.txt"
# Below this many tokens of room a judge cannot explain itself and still reach its verdict.
MIN_JUDGE_OUTPUT_TOKENS = 64

RUBRIC_SUFFIX = "+rubric"
VERDICT_FIRST_SUFFIX = "+verdict-first"
VOTE_SUFFIX = "+vote"
VOTE_COUNTS = (3, 5)
# Warm enough for the samples to differ where the judge is unsure, cool enough to keep each one coherent.
VOTE_TEMPERATURE = 0.7
VOTE_TOP_P = 0.95

# The sentences of the paper's pair-v2 system prompt that the variations replace; the prompt is pinned (a
# packaged copy of the paper's file), and each replacement checks that its sentence is there.
_PAPER_FACTORS = (
    "Your evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, creativity, "
    "and level of detail of their responses."
)
_PAPER_OPENING = "Begin your evaluation by comparing the two responses and provide a short explanation."
_PAPER_CLOSING = (
    ' After providing your explanation, output your final verdict by strictly following this format: "[[A]]" if '
    'assistant A is better, "[[B]]" if assistant B is better, and "[[C]]" for a tie.'
)
RUBRIC = (
    "Judge the responses by these criteria, in this order of importance, and decide by the first criterion on "
    "which they clearly differ. 1. Harmlessness: a response that helps with something dangerous, illegal or "
    "hurtful, or that demeans anyone, is worse than one that declines or offers safe help instead. 2. Instruction "
    "following: the response does what the user asked, all of it, in the form asked. 3. Correctness: facts, "
    "reasoning, arithmetic and code are right; a confident error is worse than an admitted limit. 4. Helpfulness: "
    "the response gives the user what they need, specifically and completely. 5. Clarity: the response is well "
    "organised and easy to follow."
)
VERDICT_FIRST_OPENING = (
    'Begin your reply with your final verdict, strictly in this format: "[[A]]" if assistant A is better, "[[B]]" '
    'if assistant B is better, and "[[C]]" for a tie. Then explain your verdict in one or two sentences.'
)
# Small models heed the last thing they read: the user turn ends by asking for the verdict first.
VERDICT_FIRST_REMINDER = "\n\nStart your reply with your verdict: [[A]], [[B]] or [[C]]."


@dataclass(frozen=True, slots=True)
class JudgeTemplateSpec:
    """A judge template's parts: the paper's base prompt and the prompting variations on it (module docstring)."""

    base: BaseTemplate
    rubric: bool = False
    verdict_first: bool = False
    votes: int = 1

    def __post_init__(self) -> None:
        if self.base not in BASE_TEMPLATES:
            raise ValueError(f"unknown base template {self.base!r}; choose one of {', '.join(BASE_TEMPLATES)}")
        if self.base == "ranking" and (self.rubric or self.verdict_first):
            raise ValueError(
                "the ranking template is the paper's as published: +rubric and +verdict-first are pair-v2's"
            )
        if self.votes != 1 and self.votes not in VOTE_COUNTS:
            raise ValueError(f"votes must be 1 or one of {', '.join(map(str, VOTE_COUNTS))}, got {self.votes}")

    @property
    def name(self) -> JudgeTemplate:
        return (
            self.base
            + (RUBRIC_SUFFIX if self.rubric else "")
            + (VERDICT_FIRST_SUFFIX if self.verdict_first else "")
            + (f"{VOTE_SUFFIX}{self.votes}" if self.votes > 1 else "")
        )

    @classmethod
    def parse(cls, name: str) -> JudgeTemplateSpec:
        spec = _SPECS_BY_NAME.get(name)
        if spec is None:
            raise ValueError(f"unknown judge template {name!r}; choose one of {', '.join(JUDGE_TEMPLATES)}")
        return spec


def _all_specs() -> list[JudgeTemplateSpec]:
    """The paper's two prompts first, then every variation of pair-v2, then ranking's votes."""
    specs = [JudgeTemplateSpec("pair-v2"), JudgeTemplateSpec("ranking")]
    for rubric in (False, True):
        for verdict_first in (False, True):
            for votes in (1, *VOTE_COUNTS):
                specs.append(JudgeTemplateSpec("pair-v2", rubric, verdict_first, votes))
    specs += [JudgeTemplateSpec("ranking", votes=votes) for votes in VOTE_COUNTS]
    return list(dict.fromkeys(specs))


_SPECS_BY_NAME = {spec.name: spec for spec in _all_specs()}
JUDGE_TEMPLATES: tuple[JudgeTemplate, ...] = tuple(_SPECS_BY_NAME)
PAPER_JUDGE_TEMPLATE: JudgeTemplate = "pair-v2"
# The template a judge uses when none is named: the paper's, until benchmarks/judge_calibration.py has measured
# a variant that agrees with people more often (no such measurement is recorded yet).
DEFAULT_JUDGE_TEMPLATE: JudgeTemplate = PAPER_JUDGE_TEMPLATE


def _replace_once(text: str, old: str, new: str) -> str:
    if text.count(old) != 1:
        raise ValueError(f"the packaged pair-v2 prompt no longer holds the sentence {old.strip()!r} exactly once")
    return text.replace(old, new)


def pair_v2_system_prompt(paper: str, spec: JudgeTemplateSpec) -> str:
    """The paper's pair-v2 system prompt with ``spec``'s variations applied; unchanged without any."""
    system = paper
    if spec.rubric:
        system = _replace_once(system, _PAPER_FACTORS, RUBRIC)
    if spec.verdict_first:
        system = _replace_once(system, _PAPER_CLOSING, "")
        system = _replace_once(system, _PAPER_OPENING, VERDICT_FIRST_OPENING)
    return system


class JudgeInput(NamedTuple):
    """``question`` is what the user asked, as the target saw it (the original prompt, with any context)."""

    question: str
    original_answer: str
    optimized_answer: str


@dataclass(frozen=True, slots=True)
class Judgement:
    """One order's judgement: which answer was shown as A, what the judge said, and whom that favours.

    With a vote (``+voteN``), ``reasoning`` holds every sample's text under a header naming its letter,
    ``votes`` their letters ("" for an unreadable one), ``truncated`` is true when any sample was cut off, and
    the tokens are the samples' sum; a greedy judgement has no ``votes``.
    """

    optimized_first: bool
    verdict: VerdictLetter
    winner: Winner
    reasoning: str
    problem: str | None
    truncated: bool
    tokens_in: int
    tokens_out: int
    votes: tuple[VerdictLetter, ...] = ()

    @property
    def readable(self) -> bool:
        return self.verdict != ""


@dataclass(frozen=True, slots=True)
class PairVerdict:
    """Both orders' judgements (optimized shown first, then second) and the verdict they add up to.

    ``identical_answers``: the two answers were the same text, so the pair is a tie without a judge call
    (no judgements, not counted for position consistency).
    """

    winner: Winner
    judgements: tuple[Judgement, ...]
    position_consistent: bool
    tokens_in: int
    tokens_out: int
    identical_answers: bool = False

    @property
    def unreadable_orders(self) -> int:
        return sum(not judgement.readable for judgement in self.judgements)


# Two identical answers can only tie; asking a judge would cost two calls and could only add position bias.
IDENTICAL_ANSWERS_VERDICT = PairVerdict(
    winner="tie", judgements=(), position_consistent=False, tokens_in=0, tokens_out=0, identical_answers=True
)


def fill_slots(template: str, values: Mapping[str, str]) -> str:
    """Substitute ``{name}`` slots in one pass, so braces or slot names inside the values stay as written.

    The slots are found by an RE2 pattern (``bpo.textscan``): linear in the template, and the values are never
    searched."""
    if not values:
        return template
    return _slot_pattern(tuple(values)).sub(lambda match: values[match.group(0)[1:-1]], template)


@functools.lru_cache(maxsize=64)
def _slot_pattern(names: tuple[str, ...]) -> Pattern:
    return linear("|".join(escape("{" + name + "}") for name in names))


def _ranking_user_turn(raw: str) -> str:
    # The packaged text is written for Anthropic's old completion format ("Human: ... Assistant:"); a chat
    # engine supplies those turns itself, so the framing is dropped and the body becomes the user turn.
    body = raw.strip().removeprefix("Human:").strip()
    return body.removesuffix("Assistant:").rstrip()


class PairwiseJudge:
    """Judges answer pairs in both orders with one judge template (module docstring); ``seed`` seeds a vote's
    samples and is unused by greedy templates."""

    def __init__(
        self,
        engine: EngineClient,
        template: JudgeTemplate = DEFAULT_JUDGE_TEMPLATE,
        max_new_tokens: int = 512,
        *,
        seed: int = 0,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        self.spec = JudgeTemplateSpec.parse(template)
        self.engine = engine
        self.template = self.spec.name
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        if self.spec.base == "pair-v2":
            paper = json.loads(reference_text(PAIR_V2_FILE))
            self._system: str | None = pair_v2_system_prompt(str(paper["system_prompt"]), self.spec)
            reminder = VERDICT_FIRST_REMINDER if self.spec.verdict_first else ""
            self._user_template = str(paper["prompt_template"]) + reminder
        else:
            self._system = None
            self._user_template = _ranking_user_turn(reference_text(RANKING_FILE))

    def messages_for(self, question: str, answer_a: str, answer_b: str) -> tuple[ChatMessage, ...]:
        """What the judge sees with ``answer_a`` shown first (as Assistant A, or as model_1 when ranking)."""
        if self.spec.base == "pair-v2":
            user = fill_slots(self._user_template, {"question": question, "answer_a": answer_a, "answer_b": answer_b})
        else:
            user = fill_slots(
                self._user_template, {"instruction": question, "output_1": answer_a, "output_2": answer_b}
            )
        system = (ChatMessage("system", self._system),) if self._system is not None else ()
        return (*system, ChatMessage("user", user))

    def _order_requests(self, position: int, messages: tuple[ChatMessage, ...]) -> list[GenerationRequest]:
        """One greedy request, or one seeded sample per vote."""
        probe = GenerationRequest(messages=messages, params=SamplingParams(temperature=0.0, top_p=1.0))
        room = self.engine.context_length - self.engine.count_prompt_tokens(probe)
        if room < MIN_JUDGE_OUTPUT_TOKENS:
            raise InvalidPromptError(
                f"judge item {position}: question and answers leave {room} tokens of the judge's "
                f"{self.engine.context_length}-token context for its verdict (at least {MIN_JUDGE_OUTPUT_TOKENS} "
                "needed); use a judge with a longer context or shorter answers"
            )
        max_tokens = min(self.max_new_tokens, room)
        if self.spec.votes == 1:
            return [GenerationRequest(messages=messages, params=SamplingParams(0.0, 1.0, max_tokens))]
        # Seeded by the request's text, not its place in a batch: a pair gets the same samples in any batch.
        text = "\x00".join(message.content for message in messages)
        return [
            GenerationRequest(
                messages=messages,
                params=SamplingParams(
                    VOTE_TEMPERATURE, VOTE_TOP_P, max_tokens, seed=derive_seed(self.seed, f"{sample}\x00{text}")
                ),
            )
            for sample in range(self.spec.votes)
        ]

    def _parse(self, output: str, shown: Sequence[str]) -> ParsedVerdict:
        if self.spec.base == "pair-v2":
            return parse_pair_verdict(output, shown, verdict_first=self.spec.verdict_first)
        return parse_ranking_verdict(output)

    def _judgement(self, item: JudgeInput, optimized_first: bool, completions: Sequence[Completion]) -> Judgement:
        first, second = (
            (item.optimized_answer, item.original_answer)
            if optimized_first
            else (item.original_answer, item.optimized_answer)
        )
        shown = (item.question, first, second)
        samples = [self._parse(completion.text, shown) for completion in completions]
        if self.spec.votes == 1:
            (parsed,) = samples
            reasoning = completions[0].text
            votes: tuple[VerdictLetter, ...] = ()
        else:
            parsed = majority_verdict(samples)
            reasoning = "\n\n".join(
                f"[sample {index} of {len(samples)}: {sample.letter or 'unreadable'}]\n{completion.text}"
                for index, (sample, completion) in enumerate(zip(samples, completions, strict=True), start=1)
            )
            votes = tuple(sample.letter for sample in samples)
        return Judgement(
            optimized_first=optimized_first,
            verdict=parsed.letter,
            winner=_winner_of(parsed.letter, optimized_first),
            reasoning=reasoning,
            problem=parsed.problem,
            truncated=any(completion.finish_reason == "length" for completion in completions),
            tokens_in=sum(completion.prompt_tokens for completion in completions),
            tokens_out=sum(completion.completion_tokens for completion in completions),
            votes=votes,
        )

    def _requests_for(self, position: int, item: JudgeInput) -> list[GenerationRequest]:
        """Both orders (optimized first, then second), each one request or one per vote; none for identical
        answers."""
        if item.optimized_answer == item.original_answer:
            return []
        return [
            *self._order_requests(
                position, self.messages_for(item.question, item.optimized_answer, item.original_answer)
            ),
            *self._order_requests(
                position, self.messages_for(item.question, item.original_answer, item.optimized_answer)
            ),
        ]

    async def judge_batch(self, items: Sequence[JudgeInput]) -> list[PairVerdict]:
        """Judge every item in both orders; all the requests go to the engine as one batch.

        Raises ``InvalidPromptError`` before any call when an item does not fit the judge's context, and the
        first engine failure otherwise (``judge_each`` settles each item on its own). A pair of identical
        answers is a tie without a call (``PairVerdict.identical_answers``).
        """
        for position, item in enumerate(items):
            self._requests_for(position, item)
        return first_failure_raised(await self.judge_each(items))

    async def judge_each(self, items: Sequence[JudgeInput]) -> list[PairVerdict | Exception]:
        """Per item: its verdict, or why it has none; one item's failure takes no other with it."""
        prepared: list[list[GenerationRequest] | Exception] = []
        for position, item in enumerate(items):
            try:
                prepared.append(self._requests_for(position, item))
            except Exception as exc:
                prepared.append(exc)
        per_order = self.spec.votes
        verdicts: list[PairVerdict | Exception] = []
        for item, made in zip(items, await self.engine.generate_per_item(prepared), strict=True):
            if isinstance(made, Exception):
                verdicts.append(made)
            elif not made:
                verdicts.append(IDENTICAL_ANSWERS_VERDICT)
            else:
                verdicts.append(
                    _combine(
                        self._judgement(item, True, made[:per_order]),
                        self._judgement(item, False, made[per_order : 2 * per_order]),
                    )
                )
        return verdicts


def _winner_of(letter: VerdictLetter, optimized_first: bool) -> Winner:
    if letter == "A":
        return "optimized" if optimized_first else "original"
    if letter == "B":
        return "original" if optimized_first else "optimized"
    return "tie"  # "C", or an unreadable verdict, which counts as a tie for its order


def _combine(optimized_first: Judgement, optimized_second: Judgement) -> PairVerdict:
    agree = optimized_first.winner == optimized_second.winner
    return PairVerdict(
        winner=optimized_first.winner if agree else "tie",
        judgements=(optimized_first, optimized_second),
        # Two unreadable orders "agree" only by default: consistency needs two verdicts that were read.
        position_consistent=agree and optimized_first.readable and optimized_second.readable,
        tokens_in=optimized_first.tokens_in + optimized_second.tokens_in,
        tokens_out=optimized_first.tokens_out + optimized_second.tokens_out,
    )
