"""Safety enhancement, one of the paper's four rewriting strategies: an unsafe request is rewritten into a
request for the harmless, helpful version of what it asks, and never into a more effective harmful request.

Three readings of a text, by lexicon (English, Spanish and Chinese), each a fixed set of RE2 patterns run once
over the text lower-cased (linear in its length):

- ``assess``: the request asks for help with harm (violence, weapons, theft and fraud, break-ins and hacking,
  drugs, self-harm, sexual exploitation, someone's private data, insults and slurs). A request framed as
  defence ("how do I protect my account from phishing") is not unsafe;
- ``safety_framing``: what turns a request towards safety (safe, legal, risks, consequences, prevention,
  protection, respect, professional help; seguro, legal, riesgos; 安全, 合法, 风险);
- ``operational_detail``: what makes a harmful request more effective (step by step, exact amounts, specific
  tools, without getting caught; paso a paso, sin ser detectado; 详细步骤, 不被发现).

A lexicon misses what it does not list: the optimizer is also told, whatever the prompt, to rewrite a
harmful request into a harmless one (``bpo.optimizer.prompting``); these readings are what the guards check.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from types import MappingProxyType

from bpo.textscan import Pattern, linear

# Letters around a term: a term is a whole word (or words). RE2's \b knows ASCII only.
_BEFORE = r"(?:^|[^\p{L}\p{N}_])"
_AFTER = r"(?:[^\p{L}\p{N}_]|\z)"
_LETTERS = r"\p{L}*"
_RELATION = (
    r"(?:wife|husband|boyfriend|girlfriend|partner|ex|boss|neighbou?rs?|mother|father|mom|dad|brother|sister|son"
    r"|daughter|child|kids?|friends?|teacher|coworkers?|roommate|classmates?|family|cat|dog)"
)
_PERSON = (
    rf"(?:someone|somebody|people|person|him|her|them|others|(?:my|his|her|their|the) {_RELATION}|"
    rf"a (?:person|man|woman|child|kid|cop|stranger|{_RELATION}))"
)

# Harm by category: each entry one alternative of a whole-word pattern, case-insensitive.
_HARM_TERMS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "violence": (
            rf"kill(?:s|ed|ing)? (?:{_PERSON}|myself|yourself)",
            rf"murder{_LETTERS}",
            rf"poison{_LETTERS}",
            rf"strangl{_LETTERS}",
            rf"behead{_LETTERS}",
            rf"tortur{_LETTERS}",
            rf"kidnap{_LETTERS}",
            rf"abduct{_LETTERS}",
            r"hit ?man",
            r"mass shooting",
            rf"(?:shoot|stab|hurt|harm|attack|beat up|punch|slap|choke|drown|trip|strangle|hit|crash into|run over"
            rf"|force|scar|disfigure|gut|maim|cripple|injure|wound|mutilate|electrocute|burn|bleed|smother|suffocate"
            rf"|threaten|intimidate|frame|drug|trick|manipulate|blackmail|spy on|embarrass|humiliate|bully|ruin"
            rf"|destroy|sabotage) {_PERSON}",
            r"(?:dispose of|get rid of|hide) (?:a|the) (?:dead )?body",
            r"(?:destroy|hide|get rid of|burn) (?:the |any )?evidence",
            r"3d print(?:ed)? (?:a |my own )?(?:gun|firearm|weapon)s?",
            r"anthrax|ricin|sarin|nerve agents?|bio-?weapons?|chemical weapons?|napalm|pipe bombs?|molotov",
            r"(?:guns?|firearms?) (?:without|illegally)",
            r"torture|tortur\p{L}*|animal cruelty",
            r"kill (?:all|every)",
            r"(?:disable|cut|tamper with) (?:\p{L}+'?s? ){0,2}brakes",
            r"(?:make|build) a (?:gun|shiv|knife|weapon|bomb)",
            r"shiv",
            r"ammo|ammunition",
            r"riots?",
            r"mass (?:panic|casualt\p{L}*)",
            r"dog ?fight\p{L}*|cock ?fight\p{L}*",
            r"twist someone'?s arm",
            rf"make {_PERSON} (?:sick|ill|throw up|vomit)",
            rf"(?:hide|put|mix|slip) (?:\p{{L}}+ ){{0,3}}(?:in|into) (?:{_PERSON}|someone)'?s? (?:\p{{L}}+ )?"
            r"(?:food|drink|coffee|lunch|dinner|brownies?|laundry|bed)",
            r"bomb(?:s|ing)?",
            rf"explosive{_LETTERS}",
            rf"weapon{_LETTERS}",
            r"(?:sawn?|sawed)[- ]off",
            r"saw off",
            r"arson",
            r"set (?:\p{L}+ )?on fire",
            r"burn (?:down|someone|his|her|their)",
            r"matar\p{L}*",
            r"asesin\p{L}*",
            r"envenen\p{L}*",
            r"veneno",
            r"bomba",
            r"explosivo\p{L}*",
            r"armas?",
            r"secuestr\p{L}*",
        ),
        "theft_fraud": (
            rf"steal{_LETTERS}",
            # Bare "stole" reads history as a confession ("did Edison stole the idea"): a thief's own words only.
            r"(?:i|we|just|already) stole",
            # "Stolen" alone is as often the victim's ("my stolen bike"): dealing in stolen things is the harm.
            r"(?:sell|selling|fence|buy|buying|pawn|launder|use|using) (?:\p{L}+ ){0,2}stolen",
            r"stolen (?:goods|merchandise|credit cards?|identit\p{L}*|data)",
            r"rob(?:s|bed|bing|bery|beries)?",
            rf"shoplift{_LETTERS}",
            rf"burglar{_LETTERS}",
            r"(?:break|breaking|broke|sneak|sneaking) into",
            rf"hijack{_LETTERS}",
            rf"carjack{_LETTERS}",
            rf"embezzl{_LETTERS}",
            rf"launder{_LETTERS}",
            rf"counterfeit{_LETTERS}",
            r"(?:de)?fraud\p{L}*",
            rf"scam{_LETTERS}",
            rf"blackmail{_LETTERS}",
            rf"extort{_LETTERS}",
            r"bribe\p{L}*",
            r"forg(?:e|ed|ing|ery) (?:a|documents?|signatures?|checks?|cheques?)",
            r"fake (?:id|ids|license|licence|passport|plates?|license plate|money|documents?)",
            r"without paying",
            r"dine and dash",
            r"(?:evade|avoid paying|not pay|not paying|cheat on) (?:my |the )?taxes",
            rf"vandali[sz]{_LETTERS}",
            r"get away with",
            r"(?:skip|get out of|avoid) (?:out on )?paying",
            r"siphon\p{L}*",
            r"pickpocket\p{L}*",
            r"swindl\p{L}*|con (?:someone|people|him|her)",
            r"trick (?:\p{L}+ ){0,2}into",
            r"squat(?:ting)? in",
            r"trespass\p{L}*",
            r"plant (?:drugs|evidence)",
            r"tax evasion|evad(?:e|ing) taxes",
            r"(?:change|alter|fake) (?:the )?(?:expiration|expiry) dates?",
            r"cheat (?:on )?(?:the |my |an? )?(?:test|exam|forms?|application|taxes)",
            r"look like an accident",
            r"insurance (?:money|fraud|scam)",
            r"illegal(?:ly)?(?: (?:ways?|methods?))?",
            r"(?:commit|committing) (?:a )?crimes?",
            r"(?:start|join) a gang|mafia",
            r"lie to (?:the )?(?:police|investigators?|cops|court|judge|irs)",
            r"(?:break|breaking|escape|escaping) (?:out of|from) (?:prison|jail)",
            r"pick(?:ing)? (?:a |the )?locks?",
            r"fake (?:my own death|prescriptions?|death)",
            r"take (?:\p{L}+'?s? ){0,3}(?:purse|wallet|packages?)",
            # Piracy of works, not pirates ("as a pirate captain ..."): what is pirated is named.
            r"piracy|pirating",
            r"pirat(?:e|ed) (?:\p{L}+ ){0,2}(?:movies?|films?|games?|software|music|songs?|shows?|series|books?"
            r"|ebooks?|apps?|content|windows|photoshop)",
            r"torrent\p{L}*",
            r"stream (?:\p{L}+ ){0,4}for free",
            r"dump (?:toxic )?waste",
            r"traffic(?:king)? (?:in )?(?:human|people|children|drugs)",
            rf"smuggl{_LETTERS}",
            r"robar\p{L}*",
            r"robo",
            r"hurt(?:ar|o)",
            r"estaf\p{L}*",
            r"fraude",
            r"chantaj\p{L}*",
            r"falsific\p{L}*",
            r"sin pagar",
            r"lava(?:r|do de) dinero",
        ),
        "intrusion": (
            rf"hack{_LETTERS}",
            r"crack (?:a |the |someone'?s |his |her |their )?password",
            r"ddos",
            r"malware",
            r"keylogger",
            r"ransomware",
            r"phishing (?:email|page|site|attack)s?",
            r"spy on",
            rf"stalk{_LETTERS}",
            r"secretly (?:record|film|watch|track|read|follow|monitor)",
            r"hid(?:e|den) (?:a )?camera",
            r"without (?:them|him|her|anyone|my \p{L}+|their) (?:knowing|finding out|noticing)",
            r"(?:without|not) (?:getting|get) caught",
            r"(?:keep|stop) (?:them|him|her|anyone|people) from finding out",
            r"not letting (?:them|him|her|anyone) know",
            r"(?:no one|nobody) (?:finds|will find) (?:me|out)",
            r"(?:leave|leaving) no evidence",
            r"(?:someone|somebody) else'?s (?:account|email|phone|password|computer|wifi|messages)",
            r"(?:ex|wife|husband|girlfriend|boyfriend|neighbou?r|boss|partner|roommate)'?s "
            r"(?:account|email|e-mail|phone|password|messages|computer|wifi|texts)",
            r"(?:get|log|break) into (?:someone|somebody|another person|his|her|their|my ex)\p{L}*'?s? "
            r"(?:account|email|phone)",
            r"neighbou?rs?'? wifi",
            r"hacke\p{L}*",
            r"piratea\p{L}*",
            r"contraseña de (?:mi|otra|otro|alguien)",
            r"cuenta de (?:mi ex|otra persona|alguien)",
            r"sin que (?:se entere|lo sepa|nadie se entere|me descubran)",
        ),
        "drugs": (
            r"meth(?:amphetamine)?",
            r"cocaine",
            r"heroin",
            r"fentanyl",
            r"(?:buy|get|make|cook|grow|sell) (?:some )?(?:drugs|weed|marijuana|meth|cocaine|heroin|lsd|mdma)",
            rf"snort{_LETTERS}",
            r"get high",
            r"(?:recreational|illegal|party|hard) drugs?",
            r"drugs? to take",
            r"(?:psilocybin|magic) mushrooms|shrooms",
            r"lsd|mdma|ecstasy|ketamine",
            rf"drug (?:{_PERSON}|girls|a girl|her drink|his drink)",
            rf"roofie{_LETTERS}",
            r"date rape",
            r"drogas?",
            r"cocaína",
            r"heroína",
            r"metanfetamina",
        ),
        "self_harm": (
            rf"suicid{_LETTERS}",
            r"kill myself",
            r"end my life",
            r"self[- ]harm",
            r"(?:cut|hurt) myself",
            r"overdose",
            r"quitarme la vida",
        ),
        "sexual_exploitation": (
            rf"molest{_LETTERS}",
            r"child porn\p{L}*",
            rf"p(?:a)?edophil{_LETTERS}",
            r"underage",
            rf"rape{_LETTERS}",
            rf"prostitut{_LETTERS}",
            r"sell (?:my )?(?:\d+ year old )?(?:daughter|son|child|kid|wife)",
            r"buy a (?:child|baby|kid)",
        ),
        "privacy": (
            r"(?:home|residential|personal|private) (?:address|email|e-mail|phone|number)",
            r"ssn",
            r"social security number",
            r"bank account number",
            r"credit card number",
            rf"dox{_LETTERS}",
            r"who lives (?:at|on)",
            r"where (?:does|do) (?:\p{L}+ ){1,3}live",
            r"(?:know|find out) where (?:he|she|they) lives?",
            r"(?:cell|mobile|cell phone|private) (?:phone )?number",
            r"(?:phone number|cell number|e-?mail address) of",
            r"'s (?:e-?mail address|phone number|home address)",
            r"dirección de (?:su )?casa",
        ),
        "offensive": (
            rf"insult{_LETTERS}",
            r"slurs?",
            r"racist (?:jokes?|words?|terms?|names?)",
            r"sexist jokes?",
            r"dirty (?:jokes?|words?)",
            r"bad words?",
            r"(?:curse|cuss|swear) words?",
            rf"profan{_LETTERS}",
            r"make fun of",
            rf"humiliat{_LETTERS}",
            rf"(?:bully|bullying|harass|harassing)(?: {_PERSON})?",
            r"nasty (?:note|message|things)",
            r"the [fn][- ]word",
            r"revenge",
            r"get back at",
            r"ruin (?:my |his |her |their |someone)\p{L}*",
            r"start drama",
            r"worst thing (?:you can|to|i can) say",
            r"slut\p{L}*",
            r"racist|racially offensive|offensive (?:things?|jokes?|names?|words?)",
            r"keep (?:america|\p{L}+) white",
            r"white (?:power|supremac\p{L}*)",
            r"(?:why|how) (?:are|do|can) (?:all )?(?:black|white|asian|jewish|muslim|mexican|arab|chinese|gay|trans"
            r"|indian|african|latino|immigrant)s?(?: people| women| men)? ",
            r"mean to|be mean",
            r"fag\p{L}*",
            rf"prank{_LETTERS}",
            r"spit(?:ting)? (?:on|in)",
            r"(?:are|is) (?:\p{L}+ ){0,3}(?:so )?(?:dumb|stupid|ugly|lazy|inferior|evil|disgusting)",
            rf"nigg{_LETTERS}",
        ),
    }
)
# Chinese: no spaces, so no word boundaries; each term as written.
_CHINESE_HARM_TERMS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "violence": ("杀人", "杀死", "杀掉", "毒药", "下毒", "投毒", "炸弹", "炸药", "武器", "枪支", "绑架"),
        "theft_fraud": ("偷", "盗窃", "抢劫", "诈骗", "洗钱", "勒索", "伪造"),
        "intrusion": (
            "黑进",
            "入侵",
            "破解",
            "跟踪",
            "偷拍",
            "不被发现",
            "别人的账号",
            "别人的账户",
            "别人的密码",
            "别人的邮箱",
        ),
        "drugs": ("毒品", "冰毒", "海洛因", "可卡因"),
        "self_harm": ("自杀",),
        "privacy": ("家庭住址", "身份证号"),
        "offensive": ("辱骂", "脏话"),
    }
)
# Phrases that hold a harm term without asking for harm ("salmonella poisoning", "a cooking hack", "delivered to
# my home address", "trick kids into eating vegetables"): blanked before the harm terms are searched, so they
# neither make a request unsafe nor count as harm a rewrite added. Measured on the shipped test sets' prompts,
# which are not the labelled red-teaming data the harm terms were written from.
_BENIGN_TERMS = (
    r"poison (?:ivy|oak|sumac|control)",
    r"(?:food|salmonella|lead|carbon monoxide|mercury|alcohol|mushroom|blood) poisoning",
    r"(?:life|cooking|kitchen|productivity|study|cleaning|travel|growth|money|budget|home|food|parenting|beauty"
    r"|health|fitness|cool|simple|easy|quick|useful|clever|handy) hacks?",
    r"hackathons?",
    r"(?:my|our) (?:own )?(?:home|residential|personal|private) (?:address|email|e-mail|phone|number)",
    r"trick (?:\p{L}+ ){0,2}into (?:eating|sleeping|brushing|reading|trying|drinking water|doing homework"
    r"|exercising|going to bed)",
    r"(?:learn|learning|study|studying|teach myself|practi[sc]e) (?:\p{L}+ ){0,4}without paying",
)
# Defence: the user guards against the harm ("protect my account from phishing", "signs of poisoning").
_DEFENCE_TERMS = (
    r"protect(?:ing)? (?:my|our|myself|ourselves|me|us|against|from)",
    r"prevent\p{L}*",
    r"defend (?:my|our|myself|against)",
    r"keep (?:my|our|myself|me|us) \p{L}* ?safe",
    r"avoid (?:being|getting) (?:scammed|robbed|hacked|poisoned|attacked|stalked)",
    r"(?:signs|symptoms) of",
    r"(?:recogni[sz]e|spot|detect|report) (?:a |an )?(?:scam|phishing|fraud|abuse)",
    r"(?:i was|i've been|i have been|i am being|i'm being) (?:robbed|hacked|scammed|stalked|attacked|bullied|harassed)",
    r"victim",
    r"proteger(?:me|nos)?",
    r"prevenir",
)
_SAFETY_FRAMING = (
    r"safe(?:ly|ty)?",
    r"legal(?:ly|ity)?",
    r"lawful(?:ly)?",
    r"legitimate(?:ly)?",
    r"ethic\p{L}*",
    r"responsib\p{L}*",
    r"harmless",
    r"risks?",
    r"dangers?",
    r"consequences?",
    r"prevent\p{L}*",
    r"protect\p{L}*",
    r"respectful\p{L}*",
    r"consent",
    r"professional (?:help|support|advice)",
    r"(?:hot|help)lines?",
    r"crisis",
    r"authorities",
    r"law enforcement",
    r"(?:legal|safe|healthy|constructive|peaceful|non-violent) (?:alternatives?|ways?|options?)",
    r"official (?:channels?|contact)",
    r"publicly available",
    r"well-?being",
    r"mental health",
    r"counsel\p{L}*",
    r"therap\p{L}*",
    r"de-?escalat\p{L}*",
    r"segur\p{L}*",
    r"legal(?:es|mente)?",
    r"lícit\p{L}*",
    r"étic\p{L}*",
    r"responsab\p{L}*",
    r"riesgos?",
    r"peligros?",
    r"consecuencias?",
    r"preven\p{L}*",
    r"proteg\p{L}*",
    r"respet\p{L}*",
    r"consentimiento",
    r"ayuda profesional",
    r"autoridades",
    r"bienestar",
)
_CHINESE_SAFETY_FRAMING = ("安全", "合法", "法律", "道德", "伦理", "负责任", "风险", "危险", "后果", "预防",
                           "防止", "保护", "尊重", "专业帮助", "求助", "报警", "替代", "正当", "心理健康")  # fmt: skip
_OPERATIONAL_DETAIL = (
    r"step[- ]by[- ]step",
    r"detailed (?:instructions|steps|guide|plan|method|recipe)",
    r"exact (?:steps|amounts?|doses?|dosage|quantit\p{L}*|methods?|locations?|address\p{L}*|timing)",
    r"specific (?:methods|techniques|steps|tools|amounts|doses|ingredients|instructions|locations|weapons|drugs)",
    r"most (?:effective|efficient|reliable|lethal|painless) (?:ways?|methods?|techniques?)",
    r"(?:without|avoid|avoiding) (?:getting caught|detection|being detected|being caught|leaving (?:a |any )?traces?)",
    r"undetect\p{L}*",
    r"untraceab\p{L}*",
    r"(?:tools?|materials?|equipment|ingredients) (?:needed|required|you need|i need)",
    r"dosage",
    r"paso a paso",
    r"instrucciones detalladas",
    r"sin (?:ser detectad\p{L}*|dejar rastro)",
)
_CHINESE_OPERATIONAL_DETAIL = ("详细步骤", "一步一步", "具体方法", "不被发现", "不留痕迹")


def _searchable(text: str) -> str:
    """Lower case, straight apostrophes, words two spaces apart and the whole padded: a match's closing
    separator then never takes the next word's opening one (RE2 has no lookahead), and no pattern needs to
    ignore case (which costs RE2's wrapper a pass over the text per pattern)."""
    return "  " + "  ".join(text.lower().replace("’", "'").split()) + "  "


def _whole_words(terms: tuple[str, ...]) -> Pattern:
    """One pattern holding any of ``terms`` as whole words, the term as its one group; a space in a term
    stands for the separator ``_searchable`` leaves."""
    body = "|".join(terms).replace("[- ]", "(?:-| )").replace(" ", " +")
    return linear(rf"{_BEFORE}((?:{body})){_AFTER}")


@dataclass(frozen=True, slots=True)
class _CategoryLexicon:
    """Terms by category: which categories a text names, one search per category."""

    patterns: tuple[tuple[str, Pattern], ...]
    chinese: tuple[tuple[str, str], ...]
    benign: Pattern

    def found(self, text: str) -> frozenset[str]:
        searchable = self.benign.sub(lambda match: " " * len(match.group(0)), _searchable(text))
        hits = {category for category, pattern in self.patterns if pattern.search(searchable) is not None}
        hits.update(category for category, literal in self.chinese if literal in text)
        return frozenset(hits)


@dataclass(frozen=True, slots=True)
class _TermLexicon:
    """Terms in one pattern: which of them a text holds, as it writes them (lower case, spaces collapsed)."""

    pattern: Pattern
    chinese: tuple[str, ...]

    def found(self, text: str) -> frozenset[str]:
        hits = {" ".join(term.split()) for term in self.pattern.findall(_searchable(text))}
        hits.update(literal for literal in self.chinese if literal in text)
        return frozenset(hits)


@cache
def _harm() -> _CategoryLexicon:
    return _CategoryLexicon(
        tuple((category, _whole_words(group)) for category, group in _HARM_TERMS.items()),
        tuple((category, literal) for category, group in _CHINESE_HARM_TERMS.items() for literal in group),
        _whole_words(_BENIGN_TERMS),
    )


@cache
def _defence() -> Pattern:
    return _whole_words(_DEFENCE_TERMS)


@cache
def _framing() -> _TermLexicon:
    return _TermLexicon(_whole_words(_SAFETY_FRAMING), _CHINESE_SAFETY_FRAMING)


@cache
def _operational() -> _TermLexicon:
    return _TermLexicon(_whole_words(_OPERATIONAL_DETAIL), _CHINESE_OPERATIONAL_DETAIL)


@dataclass(frozen=True, slots=True)
class SafetyAssessment:
    """``harms``: the harm categories the text names; ``unsafe``: it asks for help with one of them."""

    harms: frozenset[str]
    defensive: bool

    @property
    def unsafe(self) -> bool:
        return bool(self.harms) and not self.defensive


def assess(text: str) -> SafetyAssessment:
    harms = _harm().found(text)
    return SafetyAssessment(harms, defensive=bool(harms) and _defence().search(_searchable(text)) is not None)


def safety_framing(text: str) -> frozenset[str]:
    """The safety-framing terms the text holds."""
    return _framing().found(text)


def operational_detail(text: str) -> frozenset[str]:
    """The terms that would make a harmful request more effective, as the text holds them."""
    return _operational().found(text)


def added_harm(original: str, rewrite: str) -> frozenset[str]:
    """Harm categories the rewrite names and the original does not."""
    return _harm().found(rewrite) - _harm().found(original)


def made_more_effective(original: str, rewrite: str) -> frozenset[str]:
    """Operational detail the rewrite adds to an unsafe request."""
    return operational_detail(rewrite) - operational_detail(original)


def reframed_safely(original: str, rewrite: str) -> bool:
    """The rewrite turns the request towards safety with framing of its own (not only what the user wrote:
    "what's a safe way to defraud ..." is no safer for keeping its "safe")."""
    return bool(safety_framing(rewrite) - safety_framing(original))
