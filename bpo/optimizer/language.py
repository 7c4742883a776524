"""Which language a prompt is written in, told well enough to notice a rewrite that changed it.

Two levels. The writing system comes from the Unicode names of the letters (Han, kana, Hangul, Cyrillic,
Arabic, ...), weighted by how many letters a word takes in it, so that a Chinese prompt naming one English
product stays Chinese. Within the Latin script, English, Spanish, French, German, Portuguese and Italian are
told apart by their commonest function words and letters; a text too short to tell is left undecided, and an
undecided language never counts as a change.

Every function here reads the text (its first ``MAX_READ_CHARS`` characters) once with ``str`` methods
(``translate``, ``split``, ``count``): linear in its length whatever it holds.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from dataclasses import dataclass
from functools import cache, lru_cache
from types import MappingProxyType

from bpo.optimizer.spans import MARKER_RE

# Letters per word-like unit in each writing system: a Han character is about a word, a Latin word about five
# letters. Systems not named here count as "other:<first word of their letters' Unicode names>".
_LETTERS_PER_UNIT = MappingProxyType(
    {"han": 1.5, "kana": 2.0, "hangul": 3.0, "thai": 4.0, "lao": 4.0, "khmer": 4.0, "myanmar": 4.0}
)
_DEFAULT_LETTERS_PER_UNIT = 5.0
# The first word of a letter's Unicode name, for the systems whose name differs from that word.
_SYSTEM_OF_NAME_WORD = MappingProxyType(
    {
        "CJK": "han",
        "HIRAGANA": "kana",
        "KATAKANA": "kana",
        "FULLWIDTH": "latin",
        "HALFWIDTH": "kana",
        "KATAKANA-HIRAGANA": "kana",
    }
)
# Kana among a Han text's letters, from which it reads as Japanese rather than Chinese.
_JAPANESE_KANA_SHARE = 0.1
# Private-use code points stand for the writing systems inside a translated text (see ``_system_table``).
_TAG_BASE = 0xE000
_PRIVATE_USE = range(0xE000, 0xF900)

# The commonest function words (and, for the first four, a few imperatives prompts start with) per language.
_FUNCTION_WORDS: MappingProxyType[str, frozenset[str]] = MappingProxyType(
    {
        "en": frozenset(
            """the and of to is are in for with what how why that this it be you your my me can do does an on
            about which who should would please write give tell explain from by or not have has was were will
            i we they there when where some any""".split()
        ),
        "es": frozenset(
            """el la los las de del y que en un una es por para con cómo como qué cuál cuáles mi tu su sus me se lo
            al más pero sin sobre este esta estos son hay muy también puedes dame escribe explica dime necesito
            quiero cuando donde dónde porque ni nunca recomiéndame recomienda escríbeme explícame hazme dos tres
            cuatro cinco seis siete ocho nueve diez""".split()
        ),
        "fr": frozenset(
            """le la les des du de et est un une que qui pour dans avec sur pas ne je tu vous nous il elle ce cette
            comment pourquoi quel quelle au aux mon ma mes votre écris explique donne peux sans""".split()
        ),
        "de": frozenset(
            """der die das und ist ein eine einen zu mit für von auf nicht ich du sie wie was warum den dem des im
            sind bitte schreibe erkläre gib mir mein kannst auch oder ohne""".split()
        ),
        "pt": frozenset(
            """o os as um uma de do da dos das e que em no na para com por como não é são você meu minha seu sua
            mais isso este esta escreva explique sem""".split()
        ),
        "it": frozenset(
            """il lo gli le un una di del della che e è per con non come perché mi ti si sono questo questa scrivi
            spiega dammi senza""".split()
        ),
    }
)
# Letters that occur in one of those languages' spelling and in none of English's.
_DISTINCTIVE_LETTERS = MappingProxyType({"es": "ñ¿¡", "fr": "çèêùœ", "de": "ßäöü", "pt": "ãõ", "it": "ìò"})
# A Latin-script language is decided when it scores at least this many points and this many times its runner-up.
_MIN_LANGUAGE_SCORE = 2
_MIN_LANGUAGE_LEAD = 1.5
_TOKEN_EDGES = ".,;:!?¡¿\"'“”‘’«»()[]{}<>*_`~-–—/\\|"

# What a writing system is called when the optimizer is told to keep it; a Latin-script language by its code.
LANGUAGE_NAMES = MappingProxyType(
    {
        "en": "English",
        "es": "Spanish",
        "fr": "French",
        "de": "German",
        "pt": "Portuguese",
        "it": "Italian",
        "han": "Chinese",
        "japanese": "Japanese",
        "hangul": "Korean",
        "cyrillic": "Russian",
        "ukrainian": "Ukrainian",
        "greek": "Greek",
        "arabic": "Arabic",
        "hebrew": "Hebrew",
        "devanagari": "Hindi",
        "thai": "Thai",
    }
)
_UKRAINIAN_LETTERS = "іїєґІЇЄҐ"

# The share of its own writing system a rewrite may lose before it counts as written in another: a Chinese
# prompt's rewrite may name more English terms, not turn into English around one Chinese word.
MAX_SHARE_LOSS = 0.5
# Enough text to tell any language; a text longer than this is told by its beginning.
MAX_READ_CHARS = 200_000
MIN_UNITS_TO_JUDGE = 2.0


@dataclass(frozen=True, slots=True)
class LanguageProfile:
    """``system``: the dominant writing system ("latin", "han", "japanese", "hangul", "cyrillic", ...; "" for a
    text without letters); ``shares``: each system's share of the text's units; ``language``: the Latin-script
    language ("en", "es", ...) when the text tells it, else None."""

    system: str
    shares: MappingProxyType[str, float]
    units: float
    language: str | None

    def share_of(self, system: str) -> float:
        return self.shares.get(system, 0.0)

    @property
    def name(self) -> str | None:
        """The language's name in English, when it is known well enough to tell a model to write in it."""
        if self.system == "latin":
            return LANGUAGE_NAMES.get(self.language or "")
        return LANGUAGE_NAMES.get(self.system)


@cache
def _system_table() -> tuple[dict[int, int], tuple[str, ...]]:
    """A ``str.translate`` table that turns each letter of the Basic Multilingual Plane into the private-use
    character standing for its writing system (private-use characters themselves are deleted), and the
    systems in tag order."""
    systems: list[str] = []
    tag_of: dict[str, int] = {}
    table: dict[int, int] = {}
    for code in range(0x10000):
        char = chr(code)
        if not char.isalpha():
            continue
        try:
            first_word = unicodedata.name(char).split(" ", 1)[0]
        except ValueError:
            continue
        system = _SYSTEM_OF_NAME_WORD.get(first_word, first_word.lower())
        if first_word == "HALFWIDTH" and "HANGUL" in unicodedata.name(char):
            system = "hangul"
        if system not in tag_of:
            tag_of[system] = _TAG_BASE + len(systems)
            systems.append(system)
        table[code] = tag_of[system]
    for code in _PRIVATE_USE:
        table[code] = 0  # NUL: never a tag
    return table, tuple(systems)


def _system_letters(text: str) -> Counter[str]:
    table, systems = _system_table()
    counts = Counter(text.translate(table))
    letters: Counter[str] = Counter()
    for index, system in enumerate(systems):
        found = counts.get(chr(_TAG_BASE + index), 0)
        if found:
            letters[system] = found
    return letters


@cache
def _languages_of_word() -> dict[str, tuple[str, ...]]:
    languages: dict[str, list[str]] = {}
    for code, function_words in _FUNCTION_WORDS.items():
        for word in function_words:
            languages.setdefault(word, []).append(code)
    return {word: tuple(codes) for word, codes in languages.items()}


def cjk_letters(text: str) -> int:
    """How many Chinese, Japanese and Korean letters the text holds (``str.translate`` and a count: no loop
    in Python over its characters)."""
    letters = _system_letters(text)
    return letters["han"] + letters["kana"] + letters["hangul"]


def _latin_language(text: str) -> str | None:
    scores: Counter[str] = Counter()
    languages_of = _languages_of_word()
    for word, count in Counter(token.strip(_TOKEN_EDGES) for token in text.lower().split()).items():
        for code in languages_of.get(word, ()):
            scores[code] += count
    lowered = text.lower()
    for code, letters in _DISTINCTIVE_LETTERS.items():
        scores[code] += sum(lowered.count(letter) for letter in letters)
    ranked = scores.most_common(2)
    if not ranked or ranked[0][1] < _MIN_LANGUAGE_SCORE:
        return None
    runner_up = ranked[1][1] if len(ranked) > 1 else 0
    return ranked[0][0] if ranked[0][1] >= _MIN_LANGUAGE_LEAD * runner_up else None


@lru_cache(maxsize=16)
def profile(text: str) -> LanguageProfile:
    """The writing systems and language of the text's first ``MAX_READ_CHARS`` characters; ``[PASSAGE n]``
    markers are not the user's words. Cached: a check and a request read the same texts more than once."""
    text = MARKER_RE.sub(" ", text[:MAX_READ_CHARS])
    letters = _system_letters(text)
    han, kana = letters.pop("han", 0), letters.pop("kana", 0)
    if kana and kana >= _JAPANESE_KANA_SHARE * (han + kana):
        letters["japanese"] = han + kana
    elif han or kana:
        letters["han"] = han + kana
    if letters.get("cyrillic") and any(letter in text for letter in _UKRAINIAN_LETTERS):
        letters["ukrainian"] = letters.pop("cyrillic")
    units = {
        system: count / _LETTERS_PER_UNIT.get("han" if system == "japanese" else system, _DEFAULT_LETTERS_PER_UNIT)
        for system, count in letters.items()
    }
    total = sum(units.values())
    if not total:
        return LanguageProfile("", MappingProxyType({}), 0.0, None)
    dominant = max(units, key=lambda system: units[system])
    shares = MappingProxyType({system: value / total for system, value in units.items()})
    language = _latin_language(text) if dominant == "latin" else None
    return LanguageProfile(dominant, shares, total, language)


def language_changed(original: str, rewrite: str) -> bool:
    """The rewrite is written in another language or script than the original.

    Another dominant writing system, a large loss of the original's (a Chinese prompt come back as English
    around one Chinese word), or another Latin-script language where both texts tell theirs. A text with
    fewer than ``MIN_UNITS_TO_JUDGE`` word-like units (a number, a name) tells nothing.
    """
    before = profile(original)
    if before.units < MIN_UNITS_TO_JUDGE:
        return False
    after = profile(rewrite)
    if not after.units:
        return False
    if after.system != before.system or after.share_of(before.system) < MAX_SHARE_LOSS * before.share_of(before.system):
        return True
    return before.language is not None and after.language is not None and before.language != after.language
