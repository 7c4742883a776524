"""What a prompt states that its rewrite must keep: formulas, negated constraints, quantitative relations and
named things.

- **Formulas**: runs of tokens around a mathematical operator (``x^2 * sin(x)``, ``3x + 5 = 20``, ``a <= b``,
  ``\\frac{1}{2}``), compared with whitespace and sentence punctuation at token edges removed (in the
  original and the rewrite alike), so a rewrite may space or mark them up differently but not change a symbol.
- **Negated constraints**: what follows a negation or exclusion ("without a car", "no dairy", "avoid jargon",
  "except Mondays", "don't mention the price"; Spanish "sin coche", "no uses azúcar"; Chinese 不要辣, 没有车;
  and the other Latin-script languages of ``bpo.optimizer.language``; "sugar-free", "non-alcoholic"). The
  rewrite must still put each of those words under a negation of its own.
- **Quantitative relations**: a sentence that puts a number in relation to something ("The ball costs $1 more
  than the sticker", "twice as old as her brother", "3 apples per child"). Its first and last words that carry
  meaning (what is compared with what) and its numbers must come back in the same order: a rewrite that swaps
  them ("the sticker costs $1 more than the ball") states another problem.
- **Named things**: identifiers (``snake_case``, ``camelCase``, ``Node.js``, ``GPT-4``, ``C++``, paths, URLs,
  e-mail addresses) and function applications (``f(2)``, ``sin(x)``), kept byte for byte; capitalised names
  ("New York City", "Paris" in mid-sentence) and the lower-case technical names of
  ``bpo/resources/lexicons/technical_names.txt`` ("kubernetes"), kept in any case.

Each reader walks the text once with ``str`` methods (its first ``MAX_READ_CHARS`` characters), and each check
looks up at most ``MAX_CHECKED`` facts, each with one substring search or set lookup: linear in the texts'
length.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources
from itertools import islice

from bpo.optimizer.spans import MARKER_RE

# A prompt with more facts than this is a document, not an instruction: its first MAX_CHECKED of each kind are
# checked (each is one scan of the rewrite, so the bound keeps a check linear).
MAX_CHECKED = 64

# Text past this many characters is not read for facts. No optimizer's context holds an instruction this long
# (the optimizer refuses one that does not fit before any rewrite is checked), and a rewrite this long is an
# answer; the bound keeps a check's cost bounded whatever it is given.
MAX_READ_CHARS = 200_000

_EDGE_PUNCTUATION = ".,;:!?\"'“”‘’«»「」『』`$*_~"
_CLAUSE_END = tuple(",.;:!?，。；：！？")
_SENTENCE_END = tuple(".!?:;。！？")
_BULLETS = frozenset({"-", "*", "•"})
_CLOSING_MARKS = "\"'”’)»」』"


@dataclass(frozen=True, slots=True)
class _Token:
    raw: str
    core: str  # raw without surrounding punctuation
    sentence_start: bool
    clause_end: bool  # the token ends a clause (punctuation after it, or the end of its line)


@lru_cache(maxsize=8)
def _tokens(text: str) -> tuple[_Token, ...]:
    """Whitespace-separated tokens of the first ``MAX_READ_CHARS`` characters, line by line; markers are not
    the user's words. Cached: one check reads the same original and rewrite several times."""
    tokens: list[_Token] = []
    core_edges = _EDGE_PUNCTUATION + "()[]{}<>"
    for line in MARKER_RE.sub(" ", text[:MAX_READ_CHARS]).splitlines():
        raws = line.split()
        last = len(raws) - 1
        previous = ""
        for position, raw in enumerate(raws):
            sentence_start = not position or previous.endswith(_SENTENCE_END) or previous in _BULLETS
            clause_end = position == last or raw.rstrip(_CLOSING_MARKS).endswith(_CLAUSE_END)
            tokens.append(_Token(raw, raw.strip(core_edges), sentence_start, clause_end))
            previous = raw
    return tuple(tokens)


# -- formulas ----------------------------------------------------------------------------------------------

_OPERATOR_CHARS = frozenset("+-*/=^<>")
# Punctuation a formula's tokens are read without: "x + 1." ends a sentence, `x+1` is marked up as code.
_FORMULA_TOKEN_EDGES = ".,;:!?\"'“”‘’«»`$"


@cache
def _math_symbols() -> frozenset[str]:
    """``^`` and the Basic Multilingual Plane's math symbols (Sm: + < = > | ~ ± × ÷ ∫ ∑ √ ≤ ≠ ...) and other
    numbers (No: superscripts and fractions, x² ½)."""
    return frozenset(
        char for char in map(chr, range(0x10000)) if char == "^" or unicodedata.category(char) in ("Sm", "No")
    )


@cache
def _formula_marks() -> frozenset[str]:
    """Every character that can make a token a formula: a token without one is none, whatever else it holds."""
    return _math_symbols() | _OPERATOR_CHARS | {"\\"}


def _is_math_symbol(char: str) -> bool:
    return char in _math_symbols()


def _bears_operator(token: str) -> bool:
    """The token holds a mathematical operator, not punctuation that looks like one."""
    if _formula_marks().isdisjoint(token):
        return False
    if "\\" in token and any(char.isalpha() for char in token.split("\\", 1)[1][:1]):
        return True  # a LaTeX command
    inner = token.strip("*")  # **bold** is markup
    for index, char in enumerate(inner):
        if _is_math_symbol(char) or (char == "*" and 0 < index < len(inner) - 1):
            return True
        if char in "-/" and 0 < index < len(inner) - 1:
            left, right = inner[index - 1], inner[index + 1]
            if left.isdigit() or right.isdigit() or left == ")" or right == "(":
                return True
            single_left = left.isalpha() and (index < 2 or not inner[index - 2].isalpha())
            single_right = right.isalpha() and (index + 2 >= len(inner) or not inner[index + 2].isalpha())
            if single_left and single_right:
                return True  # x/y, a-b
    return False


def _is_operand(token: str) -> bool:
    """A number, a single letter, a short term with a digit (3x, 2y), or a call such as sin(x) or f(x)."""
    if not token:
        return False
    if token.replace(".", "").replace(",", "").isdigit():
        return True
    if len(token) == 1 and token.isalpha():
        return True
    if len(token) <= 3 and token.isalnum() and any(char.isdigit() for char in token):
        return True
    opening = token.find("(")
    return opening > 0 and token.endswith(")") and token[:opening].isalpha() and len(token) <= 16


def _unbracketed(token: str) -> str:
    """The token without the brackets that open or close a group around it: "(a", "b)", "(x)"."""
    opening, closing = token.count("("), token.count(")")
    if opening > closing:
        return token.lstrip("(")
    if closing > opening:
        return token.rstrip(")")
    return token[1:-1] if token[:1] == "(" and token[-1:] == ")" else token


def formulas(text: str) -> list[str]:
    """Each formula of the text, whitespace removed, in order of appearance, each once."""
    if _formula_marks().isdisjoint(text):
        return []
    found: dict[str, None] = {}
    run: list[str] = []
    has_operator = False

    def close() -> None:
        nonlocal has_operator
        while run and run[-1] in _OPERATOR_CHARS:
            run.pop()
        if has_operator and run and (len(run) > 1 or len(run[0]) > 1):
            found.setdefault("".join(run))
        run.clear()
        has_operator = False

    for token in _tokens(text):
        core = token.raw.strip(_FORMULA_TOKEN_EDGES)
        standalone_operator = bool(core) and all(char in _OPERATOR_CHARS for char in core)
        bears_operator = bool(core) and not standalone_operator and _bears_operator(core)
        operand = _is_operand(_unbracketed(core))
        if bears_operator and run and not has_operator and not _is_math_symbol(core[0]) and core[0] not in "*/-":
            close()  # "a 3-day trip": a word before a formula is not its operand unless an operator joins them
        if (standalone_operator and run) or bears_operator or (operand and has_operator):
            run.append(core)
            has_operator = has_operator or standalone_operator or bears_operator
        elif operand:
            close()
            run.append(core)
        else:
            close()
        if token.clause_end and token.raw[-1:] in ",;:!?。，":
            close()
    close()
    return list(found)


def missing_formulas(original: str, rewrite: str) -> list[str]:
    """The original's formulas that the rewrite does not hold symbol for symbol (whitespace aside)."""
    wanted = formulas(original)[:MAX_CHECKED]
    if not wanted:
        return []
    reading = _formula_reading(rewrite)
    return [formula for formula in wanted if formula not in reading]


def _formula_reading(text: str) -> str:
    """The text as ``formulas`` reads it: its tokens without their edge punctuation, joined without spaces.

    A formula is built from those token cores, so it is compared with the rewrite read the same way: a formula
    whose inner tokens carry such punctuation (a Markdown table's ``| --: |``) is then found in its own text,
    which comparing with the raw text (punctuation kept) would not find."""
    return "".join(token.raw.strip(_FORMULA_TOKEN_EDGES) for token in _tokens(text))


# -- negated constraints -----------------------------------------------------------------------------------

# Single words that negate or exclude what follows them, per language (lower case; apostrophes straight).
_NEGATION_CUES = frozenset(
    """no not without avoid avoiding avoids except excluding exclude excludes never don't dont doesn't didn't
    won't can't cannot shouldn't mustn't isn't aren't wasn't neither nor none nothing nobody
    sin nunca jamás ni nada ningún ninguna ninguno excepto salvo evita evitar evitando evite tampoco
    ne pas sans jamais sauf éviter évitez aucun aucune
    nicht kein keine keinen keinem ohne nie niemals außer vermeide vermeiden
    não sem exceto
    non senza mai tranne""".split()
)
# Two-word cues: "other than", "instead of", "rather than", "en lugar de", "en vez de".
_NEGATION_PAIRS = frozenset({("other", "than"), ("instead", "of"), ("rather", "than"), ("lugar", "de"), ("vez", "de")})
# A cue followed by one of these is an idiom, not a constraint ("not only", "no matter", "no doubt").
_NOT_A_CONSTRAINT = frozenset(
    {("not", "only"), ("no", "matter"), ("no", "doubt"), ("no", "longer"), ("never", "mind"), ("nothing", "else")}
)
# Verbs a constraint is stated with, which a rewrite may phrase differently ("don't use dairy" -> "no dairy").
_LIGHT_VERBS = frozenset(
    """use using used include including included mention mentioning add adding want need make give write say
    put be have go get do contain containing containing require requiring involve involving go exceed
    uses usar usa usen incluyas incluya incluir incluyan menciones mencione mencionar añadas añada añadir
    pongas ponga poner quiero quieres debe debes hables hable hablar utilices utilice utilizar tenga tener
    haya sea es esté necesito necesita
    utilise utilisez utiliser mets mettez inclus incluez verwende verwenden benutze benutzen use usar utilize
    usare usa includere""".split()
)
# Words a constraint's object is not: articles, pronouns and the like (in every supported language).
_FILLER = frozenset(
    """a an the any some my your his her its our their this that these those of to for in on at with and or
    it them me him us any more than such kind sort type types
    el la los las un una unos unas de del al mi tu su sus lo le les se mis tus y o en con para por que ningún
    le la les un une des du de au aux et ou mon ma mes ton ta tes son sa ses
    der die das ein eine einen dem den des und oder zu mit
    o os as um uma do da dos das e ou
    il lo gli le un una di del della e o""".split()
)
_CONSTRAINT_WINDOW = 4  # tokens after a cue that may hold what it negates
_CONSTRAINT_OBJECTS = 2  # content words taken from that window
_NEGATED_SCOPE = 6  # tokens after a cue in the rewrite that count as negated

# Chinese: cues, longest first where one contains another; compounds that only look negated.
_CHINESE_CUES = ("不包括", "不需要", "不要", "不用", "不能", "不得", "不可", "不许", "不准", "不含", "没有",
                 "除了", "避免", "禁止", "别", "没", "无", "勿", "非", "不", "除")  # fmt: skip
_CHINESE_NOT_CUES = ("不同", "不过", "不断", "不错", "不仅", "不管", "不少", "不久", "不如", "不但", "不然",
                     "不论", "无论", "非常", "别人", "别的", "无数", "无限", "除此", "没关系", "不一定")  # fmt: skip
# Characters that sit between a Chinese cue and what it negates, or end what it negates.
_CHINESE_SKIPPED = frozenset("要用能得会需想使含包括在")
_CHINESE_CUE_STARTS = frozenset(cue[0] for cue in _CHINESE_CUES)
_CHINESE_STOPS = frozenset("的了地得，。、；：！？ ,.;:!?")
_CHINESE_OBJECT_CHARS = 2
_CHINESE_SCOPE_CHARS = 8


@dataclass(frozen=True, slots=True)
class Constraint:
    """A negation cue and the words it negates (lower case, as written)."""

    cue: str
    objects: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.cue} {' '.join(self.objects)}"


def _normalized(word: str) -> str:
    return word.lower().replace("’", "'")


def _stem(word: str) -> str:
    """Lower case without a plural or possessive ending: "cars", "car's" and "car" compare equal."""
    word = _normalized(word)
    if word.endswith("'s"):
        word = word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        word = word[:-1]
    return word


def _is_han(char: str) -> bool:
    return "\u4e00" <= char <= "\u9fff" or "\u3400" <= char <= "\u4dbf"


def _affix_constraint(word: str) -> str | None:
    """What "sugar-free", "alcohol-free" or "non-alcoholic" exclude."""
    lowered = _normalized(word)
    if lowered.endswith("-free") and len(lowered) > 5:
        return lowered[: -len("-free")]
    if lowered.startswith("non-") and len(lowered) > 4:
        return lowered[len("non-") :]
    return None


def _latin_constraints(tokens: tuple[_Token, ...]) -> Iterator[Constraint]:
    words = [_normalized(token.core) for token in tokens]
    for index, word in enumerate(words):
        affix = _affix_constraint(word)
        if affix is not None:
            yield Constraint(word, (_stem(affix),))
            continue
        pair = (words[index - 1], word) if index else ("", word)
        if word not in _NEGATION_CUES and pair not in _NEGATION_PAIRS:
            continue
        if tokens[index].clause_end:
            continue
        following = words[index + 1] if index + 1 < len(words) else ""
        if (word, following) in _NOT_A_CONSTRAINT or (word, following) in _NEGATION_PAIRS:
            continue
        objects: list[str] = []
        for offset in range(index + 1, min(index + 1 + _CONSTRAINT_WINDOW, len(tokens))):
            candidate = words[offset]
            if candidate in _NEGATION_CUES:
                break  # the next constraint begins
            is_word = bool(candidate) and any(char.isalpha() for char in candidate) and not _is_han(candidate[0])
            if is_word and candidate not in _FILLER and candidate not in _LIGHT_VERBS:
                objects.append(_stem(candidate))
                if len(objects) == _CONSTRAINT_OBJECTS:
                    break
            if tokens[offset].clause_end:
                break
        if objects:
            yield Constraint(word, tuple(objects))


def _chinese_cue_at(text: str, index: int) -> str | None:
    if text[index] not in _CHINESE_CUE_STARTS:
        return None
    if not any(text.startswith(compound, index) for compound in _CHINESE_NOT_CUES):
        for cue in _CHINESE_CUES:
            if text.startswith(cue, index):
                return cue
    return None


def _has_chinese_cue(text: str) -> bool:
    return any(start in text for start in _CHINESE_CUE_STARTS)


def _chinese_constraints(text: str) -> Iterator[Constraint]:
    if not _has_chinese_cue(text):
        return
    index = 0
    while index < len(text):
        cue = _chinese_cue_at(text, index)
        if cue is None:
            index += 1
            continue
        cursor = index + len(cue)
        while cursor < len(text) and text[cursor] in _CHINESE_SKIPPED:
            cursor += 1
        end = cursor
        while end < len(text) and end - cursor < _CHINESE_OBJECT_CHARS and _is_han(text[end]):
            if text[end] in _CHINESE_STOPS:
                break
            end += 1
        if end > cursor:
            yield Constraint(cue, (text[cursor:end],))
        index = max(index + len(cue), end)


def negated_constraints(text: str) -> list[Constraint]:
    """The text's negated constraints, in order of appearance, each once (the first ``MAX_CHECKED`` of each
    script)."""
    found = dict.fromkeys(islice(_latin_constraints(_tokens(text)), MAX_CHECKED))
    found.update(dict.fromkeys(islice(_chinese_constraints(MARKER_RE.sub(" ", text[:MAX_READ_CHARS])), MAX_CHECKED)))
    return list(found)


def _negated_words(text: str) -> set[str]:
    """The stems the text puts under a negation: a cue's next ``_NEGATED_SCOPE`` tokens within its clause,
    words made negative by an affix, and (Chinese) the one- and two-character strings within
    ``_CHINESE_SCOPE_CHARS`` characters after a cue. Each of a word's negations reads the same scope, so a
    scope is read once however many cues open it."""
    negated: set[str] = set()
    tokens = _tokens(text)
    words = [_normalized(token.core) for token in tokens]
    read_up_to = 0  # tokens before this one are already in ``negated`` if a scope covered them
    for index, word in enumerate(words):
        affix = _affix_constraint(word)
        if affix is not None:
            negated.add(_stem(affix))
        pair = (words[index - 1], word) if index else ("", word)
        if word not in _NEGATION_CUES and pair not in _NEGATION_PAIRS:
            continue
        for offset in range(max(index + 1, read_up_to), min(index + 1 + _NEGATED_SCOPE, len(tokens))):
            negated.add(_stem(words[offset]))
            read_up_to = offset + 1
            if tokens[offset].clause_end:
                break
    plain = MARKER_RE.sub(" ", text[:MAX_READ_CHARS])
    if not _has_chinese_cue(plain):
        return negated
    read_up_to = 0
    for index in range(len(plain)):
        if _chinese_cue_at(plain, index) is None:
            continue
        scope_start = max(index + 1, read_up_to)
        scope = plain[scope_start - 1 : index + 1 + _CHINESE_SCOPE_CHARS]
        negated.update(scope[start : start + width] for width in (1, 2) for start in range(len(scope) - width + 1))
        read_up_to = index + 1 + _CHINESE_SCOPE_CHARS
    return negated


def dropped_constraints(original: str, rewrite: str) -> list[Constraint]:
    """The original's negated constraints of which the rewrite no longer negates every word."""
    wanted = negated_constraints(original)[:MAX_CHECKED]
    if not wanted:
        return []
    negated = _negated_words(rewrite)
    return [constraint for constraint in wanted if not all(word in negated for word in constraint.objects)]


# -- quantitative relations --------------------------------------------------------------------------------

# Words that relate a quantity to something else; a sentence holding one and a number states a relation.
_RELATION_CUES = frozenset(
    """more less fewer than times twice thrice half double triple per each every older younger faster slower
    longer shorter larger smaller bigger heavier lighter cheaper higher lower taller earlier later ahead behind
    percent""".split()
)


def _is_number(core: str) -> bool:
    return bool(core) and core[0].isdigit()


def _meaning_words(tokens: tuple[_Token, ...]) -> list[str]:
    """The numbers and the words outside the function words, stemmed, in order; a number written with its
    unit ("1$", "$1", "5kg") reads as the number."""
    found = []
    for token in tokens:
        core = token.core.strip("$€£¥%")
        if _is_number(core):
            found.append(core.rstrip("abcdefghijklmnopqrstuvwxyz"))
        elif core.isalpha() and len(core) >= 3 and _normalized(core) not in _NOT_NAME_WORDS:
            found.append(_stem(core))
    return found


def relations(text: str) -> list[tuple[str, ...]]:
    """The sentences of the text that relate a number to something, each as its meaning words in order (the
    first ``MAX_CHECKED``)."""
    found: list[tuple[str, ...]] = []
    sentence: list[_Token] = []
    for token in (*_tokens(text), None):
        if token is not None and not (token.sentence_start and sentence):
            sentence.append(token)
            continue
        cued = any(_normalized(part.core) in _RELATION_CUES for part in sentence)
        meaning = _meaning_words(tuple(sentence)) if cued else []
        if any(_is_number(word) for word in meaning):
            # What the relation's order rests on: its first and last meaning words (what is compared with
            # what) and its numbers between them; the other words may be paraphrased or moved.
            kept = [meaning[0], *(word for word in meaning[1:-1] if _is_number(word)), meaning[-1]]
            found.append(tuple(word for index, word in enumerate(kept) if not index or word != kept[index - 1]))
            if len(found) >= MAX_CHECKED:
                break
        sentence = [token] if token is not None else []
    return found


def reordered_relations(original: str, rewrite: str) -> list[tuple[str, ...]]:
    """The original's quantitative relations whose meaning words the rewrite does not hold in the same order."""
    wanted = relations(original)
    if not wanted:
        return []
    said = _meaning_words(_tokens(rewrite))
    broken = []
    for relation in wanted:
        position = 0
        for word in relation:
            try:
                position = said.index(word, position) + 1
            except ValueError:
                broken.append(relation)
                break
    return broken


# -- named things ------------------------------------------------------------------------------------------

# Words that start a capitalised run without being part of the name ("Tell", "Is", "The").
_NOT_NAME_WORDS = frozenset(
    """a an the and or but if of to in on at by for with from into about as is are was were be been it its this
    that these those there here what which who whom whose when where why how i me my we our you your he she they
    them his her their do does did can could should would will shall may might must not no please some any all
    more most very just so than too also only give tell write make explain describe list provide create
    generate compose draft summarize summarise translate compare find show help let rewrite suggest plan name
    define analyze analyse calculate solve imagine pretend act hi hello hey dear thanks thank yes ok okay""".split()
)
# Words that may join the parts of a name ("Bank of America", "Universidad de Madrid").
_NAME_JOINERS = frozenset({"of", "de", "del", "la", "von", "van", "der", "da", "di", "du", "&", "and", "the"})


@dataclass(frozen=True, slots=True)
class Entity:
    """A named thing; ``exact``: kept byte for byte (identifiers), else in any case (names)."""

    text: str
    exact: bool


@cache
def technical_names() -> frozenset[str]:
    text = resources.files("bpo.resources").joinpath("lexicons", "technical_names.txt").read_text(encoding="utf-8")
    return frozenset(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def _is_identifier(core: str) -> bool:
    """camelCase, iPhone, GPT-4, COVID-19, snake_case, Node.js, C++, C#, .NET, URLs, paths and e-mail addresses."""
    if len(core) < 2 or (core.isalpha() and (core.islower() or core.isupper() or core.istitle())):
        return False  # a plain word: the common case, decided without reading it character by character
    if not any(char.isalpha() for char in core):
        return False
    if "://" in core or ("@" in core.strip("@") and "." in core):
        return True
    if "_" in core.strip("_") or core.endswith(("++", "#")) or (core.startswith(".") and core[1:].isalpha()):
        return True
    letters_and_digits = any(char.isdigit() for char in core) and core[0].isalpha()
    if letters_and_digits and all(char.isalnum() or char in "-._" for char in core):
        return True
    for index in range(1, len(core)):
        if core[index].isupper() and core[index - 1].islower():
            return True  # camelCase, iPhone, PostgreSQL, macOS
        if core[index] == "." and index + 1 < len(core) and core[index - 1].isalpha() and core[index + 1].isalpha():
            parts = core.split(".")
            if max(len(part) for part in parts) > 1:
                return True  # Node.js, os.path, example.com; not e.g.
    return False


def _call(raw: str) -> str | None:
    """A function applied to its arguments, written as one token ("f(2)", "sin(x)", "print()"), without the
    sentence punctuation after it: the value asked for, which a rewrite must not turn into another."""
    text = raw.rstrip(".,;:!?\"'”’")
    opening = text.find("(")
    name = text[:opening]
    if opening < 1 or not text.endswith(")") or not name[0].isalpha() or len(name) > 32:
        return None
    return text if all(char.isalnum() or char in "_." for char in name) else None


def _is_capitalised(core: str) -> bool:
    return len(core) >= 2 and core[0].isupper() and any(char.islower() for char in core[1:])


def entities(text: str) -> list[Entity]:
    """The text's named things, in order of appearance, each once (the first ``MAX_CHECKED``)."""
    found: dict[Entity, None] = {}
    tokens = _tokens(text)
    index = 0
    while index < len(tokens) and len(found) < MAX_CHECKED:
        token = tokens[index]
        core = token.core
        call = _call(token.raw)
        if call is not None:
            found.setdefault(Entity(call, exact=True))
            index += 1
            continue
        if _is_identifier(core):
            found.setdefault(Entity(core, exact=True))
            index += 1
            continue
        if core.lower() in technical_names():
            found.setdefault(Entity(core.lower(), exact=False))
        if not (_is_capitalised(core) or (core.isupper() and len(core) >= 2 and core.isalpha())):
            index += 1
            continue
        # A capitalised run: consecutive capitalised words, joiners between them, ending at a clause's end.
        run = [token]
        end = index + 1
        while end < len(tokens) and not run[-1].clause_end:
            if tokens[end].raw[:1] in "([{":
                break  # "Marg (Allahabad)": a bracket opens an aside, which names something of its own
            candidate = tokens[end].core
            if (
                _is_capitalised(candidate)
                or (candidate.isupper() and candidate.isalpha() and len(candidate) >= 2)
                or (
                    candidate.lower() in _NAME_JOINERS
                    and end + 1 < len(tokens)
                    and _is_capitalised(tokens[end + 1].core)
                )
            ):
                run.append(tokens[end])
            else:
                break
            end += 1
        while run and (run[0].core.lower() in _NOT_NAME_WORDS or run[0].core.lower() in _NAME_JOINERS):
            run.pop(0)
        while run and run[-1].core.lower() in _NAME_JOINERS:
            run.pop()
        if len(run) >= 2 or (len(run) == 1 and not run[0].sentence_start and run[0].core != "I"):
            found.setdefault(Entity(" ".join(part.core for part in run), exact=False))
        index = end
    return list(found)


def missing_entities(original: str, rewrite: str) -> list[Entity]:
    """The original's named things the rewrite lost (identifiers byte for byte, names in any case)."""
    wanted = entities(original)[:MAX_CHECKED]
    if not wanted:
        return []
    # Names are built from token cores (edge punctuation and brackets stripped: "Marg (Allahabad)" is read as
    # "Marg Allahabad"), so the rewrite is read the same way; identifiers are looked up in its raw text.
    folded = " ".join(token.core for token in _tokens(rewrite)).casefold()
    return [
        entity
        for entity in wanted
        if not (entity.text in rewrite if entity.exact else " ".join(entity.text.split()).casefold() in folded)
    ]
