"""Pairwise judging in both orders: an answer must win with the optimized answer shown first and shown second.

The paper shows each pair once, in a random order, which leaves the judge's position bias in the win rate.
Here every item is judged twice, with the answers swapped, and only a verdict both orders agree on counts;
a disagreement is a tie, as MT-bench scores it. An order whose verdict cannot be read counts as a tie for
that order and is recorded as such (verdict ""), never guessed.

Decoding is greedy (temperature 0), as the paper's GPT-4 judge ran.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from bpo.engines.base import ChatMessage, Completion, EngineClient, GenerationRequest, SamplingParams
from bpo.errors import InvalidPromptError
from bpo.judging.verdicts import ParsedVerdict, VerdictLetter, parse_pair_verdict, parse_ranking_verdict
from bpo.optimizer.prompting import reference_text

JudgeTemplate = Literal["pair-v2", "ranking"]
JUDGE_TEMPLATES: tuple[JudgeTemplate, ...] = ("pair-v2", "ranking")
Winner = Literal["optimized", "original", "tie"]

PAIR_V2_FILE = "judge_pair_v2.json"
RANKING_FILE = "judge_ranking_alpacaeval_style.txt"
# Below this many tokens of room a judge cannot explain itself and still reach its verdict.
MIN_JUDGE_OUTPUT_TOKENS = 64


class JudgeInput(NamedTuple):
    """``question`` is what the user asked, as the target saw it (the original prompt, with any context)."""

    question: str
    original_answer: str
    optimized_answer: str


@dataclass(frozen=True, slots=True)
class Judgement:
    """One judge call: which answer was shown as A, what the judge said, and whom that favours."""

    optimized_first: bool
    verdict: VerdictLetter
    winner: Winner
    reasoning: str
    problem: str | None
    truncated: bool
    tokens_in: int
    tokens_out: int

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
    """Substitute ``{name}`` slots in one pass, so braces or slot names inside the values stay as written."""
    if not values:
        return template
    pattern = re.compile("|".join(re.escape("{" + name + "}") for name in values))
    return pattern.sub(lambda match: values[match.group(0)[1:-1]], template)


def _ranking_user_turn(raw: str) -> str:
    # The packaged text is written for Anthropic's old completion format ("Human: ... Assistant:"); a chat
    # engine supplies those turns itself, so the framing is dropped and the body becomes the user turn.
    body = raw.strip().removeprefix("Human:").strip()
    return body.removesuffix("Assistant:").rstrip()


class PairwiseJudge:
    def __init__(self, engine: EngineClient, template: JudgeTemplate = "pair-v2", max_new_tokens: int = 512) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        self.engine = engine
        self.template = template
        self.max_new_tokens = max_new_tokens
        if template == "pair-v2":
            spec = json.loads(reference_text(PAIR_V2_FILE))
            self._system: str | None = str(spec["system_prompt"])
            self._user_template = str(spec["prompt_template"])
        elif template == "ranking":
            self._system = None
            self._user_template = _ranking_user_turn(reference_text(RANKING_FILE))
        else:
            raise ValueError(f"unknown judge template {template!r}; choose 'pair-v2' or 'ranking'")

    def messages_for(self, question: str, answer_a: str, answer_b: str) -> tuple[ChatMessage, ...]:
        """What the judge sees with ``answer_a`` shown first (as Assistant A, or as model_1 when ranking)."""
        if self.template == "pair-v2":
            user = fill_slots(self._user_template, {"question": question, "answer_a": answer_a, "answer_b": answer_b})
        else:
            user = fill_slots(
                self._user_template, {"instruction": question, "output_1": answer_a, "output_2": answer_b}
            )
        system = (ChatMessage("system", self._system),) if self._system is not None else ()
        return (*system, ChatMessage("user", user))

    def _request(self, position: int, messages: tuple[ChatMessage, ...]) -> GenerationRequest:
        probe = GenerationRequest(messages=messages, params=SamplingParams(temperature=0.0, top_p=1.0))
        room = self.engine.context_length - self.engine.count_prompt_tokens(probe)
        if room < MIN_JUDGE_OUTPUT_TOKENS:
            raise InvalidPromptError(
                f"judge item {position}: question and answers leave {room} tokens of the judge's "
                f"{self.engine.context_length}-token context for its verdict (at least {MIN_JUDGE_OUTPUT_TOKENS} "
                "needed); use a judge with a longer context or shorter answers"
            )
        params = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=min(self.max_new_tokens, room))
        return GenerationRequest(messages=messages, params=params)

    def _parse(self, output: str, shown: Sequence[str]) -> ParsedVerdict:
        if self.template == "pair-v2":
            return parse_pair_verdict(output, shown)
        return parse_ranking_verdict(output)

    def _judgement(self, item: JudgeInput, optimized_first: bool, completion: Completion) -> Judgement:
        first, second = (
            (item.optimized_answer, item.original_answer)
            if optimized_first
            else (item.original_answer, item.optimized_answer)
        )
        parsed = self._parse(completion.text, (item.question, first, second))
        return Judgement(
            optimized_first=optimized_first,
            verdict=parsed.letter,
            winner=_winner_of(parsed.letter, optimized_first),
            reasoning=completion.text,
            problem=parsed.problem,
            truncated=completion.finish_reason == "length",
            tokens_in=completion.prompt_tokens,
            tokens_out=completion.completion_tokens,
        )

    async def judge_batch(self, items: Sequence[JudgeInput]) -> list[PairVerdict]:
        """Judge every item in both orders; all 2N requests go to the engine as one batch.

        Raises ``InvalidPromptError`` before any call when an item does not fit the judge's context. A pair
        of identical answers is a tie without a call (``PairVerdict.identical_answers``).
        """
        if not items:
            return []
        requests: list[GenerationRequest] = []
        judged = [item for item in items if item.optimized_answer != item.original_answer]
        for position, item in enumerate(judged):
            requests.append(
                self._request(position, self.messages_for(item.question, item.optimized_answer, item.original_answer))
            )
            requests.append(
                self._request(position, self.messages_for(item.question, item.original_answer, item.optimized_answer))
            )
        completions = await self.engine.generate(requests) if requests else []
        verdicts = []
        index = 0
        for item in items:
            if item.optimized_answer == item.original_answer:
                verdicts.append(IDENTICAL_ANSWERS_VERDICT)
                continue
            optimized_first = self._judgement(item, True, completions[2 * index])
            optimized_second = self._judgement(item, False, completions[2 * index + 1])
            verdicts.append(_combine(optimized_first, optimized_second))
            index += 1
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
