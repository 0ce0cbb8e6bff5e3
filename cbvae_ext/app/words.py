"""Ask in words: typed terms to a mixture of Neurosynth's 50 LDA topics, through the topics' key words.

The rule (documented in ``bundle/docs/app.md``), deterministic and offline:

1. The text is normalised (Unicode NFKC, case-folded) and split into words at every character that is
   not a letter or a digit (``n-back`` -> ``n``, ``back``). Only the first ``MAX_WORDS`` words are read.
2. Words shorter than two characters and NiMARE's Neurosynth stop list (``brain``, ``activation``, ...)
   are ignored. A word no topic lists is retried without a plural ``s``/``es``; failing that it is
   reported as not in the topics' vocabulary.
3. Each topic lists its top words in rank order (the LDA50 keys file). A word at rank ``r`` (0 = top)
   of a topic weighs ``1 / (r + 1)`` there, a Zipf-like stand-in for the word's probability in the topic.
4. Two adjacent words that share a topic form a phrase (``working memory``): the phrase counts twice
   (once per word) and goes only to the topics that list both words, in proportion to the product of
   their weights. A single word counts once and is shared among the topics that list it in proportion
   to its weight there, so a word every topic lists (``cortex``) moves no topic much.
5. The topic scores are divided by their sum: the result is a mixture of topic weights summing to 1, the
   scale of a study's LDA topic weights in Neurosynth.

Limits: only words among the topics' top 100 key words count; no synonyms, no spelling correction, no
negation ("not pain" is "pain"), and no other language than the English of the abstracts.

With NeuroQuery's vocabulary (``terms.QueryTokeniser``, the page's default when its files are found),
``match_terms`` replaces steps 1, 2 and 4: the terms are NeuroQuery's (phrases of any length, synonyms
resolved), and a term of several words goes to the topics that list all of them (a product of their
weights, counted once per word); failing that, each of its words counts on its own. A recognised term that
no topic lists is reported: it cannot change the map of a run conditioned on topics. Words NeuroQuery does
not know are still looked up among the topics' key words (``wm``, ``fc``).
"""

from __future__ import annotations

import importlib.util
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # terms.py imports this module's MAX_WORDS
    from cbvae_ext.app.terms import Tokens

__all__ = ["MAX_WORDS", "TopicMatch", "TopicVocabulary", "stop_words"]

#: Words read from a query; the rest of a long text is ignored (and reported).
MAX_WORDS = 64

_SPLIT = re.compile(r"[^\w]|_", flags=re.UNICODE)


@lru_cache(maxsize=1)
def stop_words() -> frozenset[str]:
    """NiMARE's Neurosynth stop list (bundled with nimare), plus a few English function words."""
    spec = importlib.util.find_spec("nimare")  # locate without importing nimare (seconds of imports)
    path = Path(spec.origin).parent / "resources" / "neurosynth_stoplist.txt" if spec and spec.origin else None
    words = {w.strip().lower() for w in path.read_text().split()} if path and path.is_file() else set()
    return frozenset(words | {"and", "or", "the", "of", "in", "on", "for", "with", "to", "a", "an", "vs", "versus"})


@dataclass
class TopicMatch:
    """What a query matched.

    Attributes:
        weights: ``[T]`` topic mixture (sums to 1), or all zeros when nothing matched.
        matched: ``(term, [topic indices])`` per word or phrase that counted.
        ignored: words that did not count, with the reason (``"stop word"``, ``"not in the topics"``, ...).
        truncated: number of words beyond ``MAX_WORDS`` that were not read.
        no_topic: recognised terms (NeuroQuery's) that no topic lists.
    """

    weights: np.ndarray
    matched: list[tuple[str, list[int]]] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)
    truncated: int = 0
    no_topic: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.matched

    def top(self, n: int = 5) -> list[tuple[int, float]]:
        """The ``n`` heaviest topics as ``(index, weight)``, heaviest first (only positive weights)."""
        order = np.argsort(-self.weights, kind="stable")[:n]
        return [(int(t), float(self.weights[t])) for t in order if self.weights[t] > 0]


class TopicVocabulary:
    """The key words of each topic with their ranks, and the query rule above.

    Args:
        topic_keys: per topic, its key words in rank order (a list of words or one space-separated string).
        topic_names: per topic, a short label (default ``topic_<i>``).
    """

    def __init__(self, topic_keys: Sequence[Sequence[str] | str], topic_names: Sequence[str] | None = None) -> None:
        self.keys = [k.split() if isinstance(k, str) else [str(w) for w in k] for k in topic_keys]
        self.n_topics = len(self.keys)
        self.names = list(topic_names) if topic_names is not None else [f"topic_{i}" for i in range(self.n_topics)]
        if len(self.names) != self.n_topics:
            raise ValueError(f"{len(self.names)} topic names for {self.n_topics} topics")
        # word -> dense [T] weight row (0 where a topic does not list the word)
        self._weights: dict[str, np.ndarray] = {}
        for t, words in enumerate(self.keys):
            for rank, word in enumerate(words):
                row = self._weights.setdefault(word.casefold(), np.zeros(self.n_topics))
                row[t] = max(row[t], 1.0 / (rank + 1))

    def label(self, topic: int, n_words: int = 4) -> str:
        """A readable label: the topic's first key words (``memory · working · wm · load``)."""
        return " · ".join(self.keys[topic][:n_words]) or self.names[topic]

    def _lookup(self, word: str) -> tuple[str, np.ndarray] | None:
        for form in (word, word[:-1] if word.endswith("s") else "", word[:-2] if word.endswith("es") else ""):
            if form and form in self._weights:
                return form, self._weights[form]
        return None

    def match(self, text: str) -> TopicMatch:
        """Topic mixture of a free-text query (the rule in the module docstring)."""
        text = unicodedata.normalize("NFKC", text or "").casefold()
        words = [w for w in _SPLIT.split(text) if w]
        truncated = max(len(words) - MAX_WORDS, 0)
        words = words[:MAX_WORDS]
        stop = stop_words()
        ignored: list[tuple[str, str]] = []
        hits: list[tuple[str, np.ndarray] | None] = []
        for word in words:
            if len(word) < 2:
                ignored.append((word, "too short"))
                hits.append(None)
            elif word in stop:
                ignored.append((word, "stop word"))
                hits.append(None)
            else:
                hit = self._lookup(word)
                if hit is None:
                    ignored.append((word if len(word) <= 40 else word[:40] + "…", "not in the topics"))
                hits.append(hit)
        scores = np.zeros(self.n_topics)
        matched: list[tuple[str, list[int]]] = []
        i = 0
        while i < len(hits):
            hit, nxt = hits[i], hits[i + 1] if i + 1 < len(hits) else None
            if hit is not None and nxt is not None and (hit[1] * nxt[1]).any():
                matched.append((f"{hit[0]} {nxt[0]}", _add(scores, hit[1] * nxt[1], 2)))
                i += 2
                continue
            if hit is not None:
                matched.append((hit[0], _add(scores, hit[1], 1)))
            i += 1
        return _result(scores, matched, ignored, truncated)

    def match_terms(self, tokens: Tokens) -> TopicMatch:
        """Topic mixture of NeuroQuery's terms of a query (``terms.QueryTokeniser``; the rule above)."""
        scores = np.zeros(self.n_topics)
        matched: list[tuple[str, list[int]]] = []
        no_topic: list[str] = []
        stop = stop_words()
        for term in tokens.terms:
            said = str(term)
            words = [w for w in term.term.split() if w not in stop] or term.term.split()
            hits = [self._lookup(w) for w in words]
            found = [h for h in hits if h is not None]
            joint = np.prod([h[1] for h in found], axis=0) if len(found) == len(words) else np.zeros(self.n_topics)
            if joint.any():
                matched.append((said, _add(scores, joint, len(words))))
            elif found:  # no topic lists the whole phrase: its words count on their own
                topics = sorted({t for h in found for t in _add(scores, h[1], 1)})
                matched.append((f"{said} (by its words {', '.join(h[0] for h in found)})", topics))
            else:
                no_topic.append(said)
        ignored: list[tuple[str, str]] = []
        for word, why in tokens.ignored:
            hit = self._lookup(word.casefold()) if why != "stop word" and word.casefold() not in stop else None
            if hit is None:
                ignored.append((word, why))
            else:  # NeuroQuery lacks it but a topic lists it (an abbreviation such as "fcmri")
                matched.append((f"{word} (topic key word)", _add(scores, hit[1], 1)))
        return _result(scores, matched, ignored, tokens.truncated, no_topic)


def _add(scores: np.ndarray, row: np.ndarray, count: float) -> list[int]:
    """Add ``count`` to ``scores``, spread over ``row``'s topics in proportion; returns those topics."""
    scores += count * row / row.sum()
    return np.flatnonzero(row).tolist()


def _result(
    scores: np.ndarray, matched: list, ignored: list, truncated: int, no_topic: list[str] | None = None
) -> TopicMatch:
    total = scores.sum()
    weights = scores / total if total > 0 else scores
    return TopicMatch(weights.astype(np.float32), matched, ignored, truncated, no_topic or [])
