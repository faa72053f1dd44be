"""The rule layer of the injection detector: phrasings that are an attack wherever they appear.

Each rule has a name and a weight (how sure a match alone makes us). The rules are deliberately
narrow: "ignore whitespace in git diff" or "forget the milk" match nothing; "ignore all previous
instructions" does. What they miss (paraphrases, other languages, role-play set-ups) is the learned
classifier's job; their matches are also its features.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PRIOR = (
    r"(?:all\s+|any\s+|the\s+|your\s+|my\s+|of\s+)*"
    r"(?:previous|prior|preceding|above|earlier|former|original|initial|old|system|developer|safety)"
)
_ORDERS = (
    r"(?:instructions?|prompts?|rules|directives?|guidelines|guidance|commands?|orders|context|constraints"
    r"|restrictions|policies|programming|messages?|text)"
)


@dataclass(frozen=True)
class Rule:
    name: str
    weight: float
    pattern: re.Pattern[str]


def _rule(name: str, weight: float, pattern: str) -> Rule:
    return Rule(name, weight, re.compile(pattern, re.IGNORECASE | re.DOTALL))


RULES: tuple[Rule, ...] = (
    _rule(
        "override",
        0.9,
        r"\b(?:ignore|disregard|forget|overlook|skip|bypass|override|drop|abandon|discard)\s+(?:about\s+)?"
        rf"{_PRIOR}\s+{_ORDERS}\b",
    ),
    _rule(
        "override",
        0.8,
        r"\b(?:ignore|disregard|forget)\s+(?:everything|all(?:\s+of\s+that)?|what)\s+"
        r"(?:you\s+(?:were|have been)\s+told"
        r"|(?:that\s+)?(?:was\s+)?(?:said|written)\s+(?:above|before)|above|before)\b",
    ),
    _rule("override", 0.6, rf"\b(?:do\s+not|don't|never)\s+(?:follow|obey|listen\s+to)\s+{_PRIOR}\s+{_ORDERS}\b"),
    _rule(
        "override",
        0.7,
        r"\b(?:ignore|disregard|forget)\s+(?:(?:all|any|the|these|those|your|my)\s+)?"
        r"(?:(?:instructions?|prompts?|rules|guidelines)\b|(?:the\s+)?user'?s?\s+(?:question|request|task|message)s?\b)"
        r"(?!\s+(?:on|in|for|of|from)\s+(?:the\s+)?(?:box|manual|label|package|page|form|slide))",
    ),
    _rule("override", 0.6, r"\b(?:ignore|disregard)\s+the\s+rest\s+of\s+(?:this|the)\s+(?:data|text|document|input)\b"),
    _rule(
        "task_switch",
        0.5,
        r"\b(?:the\s+)?(?:real|actual|true|new)\s+task\s+is\b|\bstop\s*[.!]\s*(?:the|now|instead|just)\b"
        r"|\binstead\s*,?\s+(?:just\s+)?(?:say|print|write|respond|reply|output)\s+(?:only\s+)?[\"'“]",
    ),
    _rule(
        "new_instructions",
        0.6,
        r"(?:^|\n|\.\s)\s*(?:new|updated|real|actual|true)\s+(?:instructions?|task|directive|system\s+prompt)\s*:",
    ),
    _rule(
        "role_markers",
        0.7,
        r"<\|?(?:im_start|system|start_header_id)\|?>|\[/?INST\]|<</?SYS>>|^\s*#{2,}\s*(?:system|instruction)s?\b",
    ),
    _rule(
        "prompt_leak",
        0.8,
        r"\b(?:reveal|print|show|repeat|output|display|tell\s+me|give\s+me|spell\s+out|leak|dump)\s+(?:me\s+)?(?:\w+\s+){0,3}?(?:your|the)\s+(?:\w+\s+)?(?:system\s+prompt|initial\s+(?:instructions|prompt)|hidden\s+(?:instructions|prompt)|original\s+(?:instructions|prompt)|pre-?prompt|instructions\s+(?:you\s+were\s+given|above))\b",
    ),
    _rule(
        "prompt_leak",
        0.6,
        r"\b(?:display|output|show|print|reveal|dump|list)\s+(?:\w+\s+){0,3}?(?:initial|starting|initiali[sz]ation|hidden"
        r"|original|internal|secret|confidential|system)\s+(?:prompt|instructions|string|configuration|rules)\b",
    ),
    _rule("prompt_leak", 0.6, r"\b(?:the|my|your)\s+system\s+prompt\s+(?:is|was|reads)\s*[:'\"]"),
    _rule(
        "prompt_leak",
        0.6,
        r"\bwhat\s+(?:were|are)\s+your\s+(?:initial|original|first|system|hidden)\s+(?:instructions|prompts?)\b",
    ),
    _rule(
        "persona_unbound",
        0.9,
        r"\b(?:DAN|STAN|DUDE|AIM|developer\s+mode|jailbreak(?:ed)?\s+mode|god\s+mode|unfiltered\s+mode)\b.{0,200}\b(?:enabled|mode|anything|no\s+(?:restrictions|rules|limits|filters))\b",
    ),
    _rule("persona_unbound", 0.85, r"\bdo\s+anything\s+now\b"),
    _rule(
        "no_limits",
        0.7,
        r"\b(?:without|free\s+(?:of|from)|no(?:t\s+bound\s+by)?|ignor(?:e|ing)|beyond)\s+(?:any\s+)?(?:ethical|moral|content|safety|openai'?s?|usual)?\s*(?:restrictions|filters|limitations|guidelines|censorship|policies|rules)\b.{0,120}\b(?:you|answer|respond|reply)\b",
    ),
    _rule(
        "no_limits",
        0.6,
        r"\b(?:you\s+(?:are|will\s+be|have\s+been)\s+(?:now\s+)?(?:freed|liberated|unrestricted|uncensored|unfiltered|released))\b",
    ),
    _rule(
        "hidden_order",
        0.7,
        r"\b(?:(?:AI|assistant|model|chatbot|LLM|language\s+model)s?\s*(?:reading|processing|summari[sz]ing)\s+this|if\s+you\s+are\s+an?\s+(?:AI|assistant|language\s+model|LLM))\b",
    ),
    _rule(
        "hidden_order",
        0.6,
        r"\b(?:important|attention|note)\s*(?:to|for)?\s*(?:the\s+)?(?:AI|assistant|model|LLM)\s*[:!]",
    ),
    _rule(
        "exfiltrate",
        0.7,
        r"!\[[^\]]*\]\(https?://[^)]*(?:\{|%7B|\?[^)]*=)[^)]*\)|\b(?:send|post|forward|email|upload)\s+(?:all\s+)?(?:the\s+)?(?:user'?s?\s+)?(?:conversation|chat\s+history|password|credentials|api\s+keys?|personal\s+data)\s+to\b",
    ),
    _rule(
        "pretend_unsafe",
        0.5,
        r"\b(?:pretend|imagine|act\s+as\s+if|roleplay|role-play)\b.{0,80}\b(?:no\s+(?:rules|restrictions|filter|guidelines)|evil|unethical|without\s+(?:ethics|morals|limits))\b",
    ),
)


@dataclass(frozen=True)
class Hit:
    rule: str
    weight: float
    view: int  # which view of the text matched (0: the text itself, then what it decoded to)


def match(views: list[str]) -> list[Hit]:
    """Every rule that matches one of ``views`` (the strongest match per rule name)."""
    best: dict[str, Hit] = {}
    for i, text in enumerate(views):
        for rule in RULES:
            if rule.pattern.search(text) and (rule.name not in best or best[rule.name].weight < rule.weight):
                best[rule.name] = Hit(rule.name, rule.weight, i)
    return sorted(best.values(), key=lambda h: -h.weight)


def rule_score(hits: list[Hit]) -> float:
    """How sure the rules alone are: 1 − Π(1 − weight) over the matching rules."""
    miss = 1.0
    for hit in hits:
        miss *= 1.0 - hit.weight
    return 1.0 - miss


RULE_NAMES = tuple(dict.fromkeys(r.name for r in RULES))
