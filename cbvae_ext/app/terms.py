"""Ask in words with NeuroQuery's vocabulary: typed text to NeuroQuery's normalised terms.

The text goes through NeuroQuery's own tokenising pipeline (``neuroquery.tokenization``, the one its
``TextVectorizer`` uses): words are lower-cased, NLTK's English stop words dropped, the longest phrase of
the 7,547-term vocabulary taken at each position ("theory of mind" -> ``theory mind``, "reward
anticipation"), and NeuroQuery's synonym and plural map applied ("nociception" -> ``nociceptive``,
"reaction times" -> ``reaction time``). What the vocabulary lacks is reported, with stop words, never
guessed. Only the first ``MAX_WORDS`` words are read.

The files are NeuroQuery's (``../shared/data/neuroquery``, BSD-3; NiMARE's ``fetch_neuroquery`` downloads
the vocabulary): ``data-neuroquery_version-1_vocab-neuroquery7547_vocabulary.txt`` and, when present beside
it, the released model's synonym map ``neuroquery_model_vocabulary.csv_voc_mapping_identity.json``.
"""

from __future__ import annotations

import json
import threading
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cbvae_ext.app.words import MAX_WORDS

__all__ = ["SYNONYMS_FILE", "VOCABULARY_FILE", "QueryTokeniser", "Term", "Tokens"]

#: NeuroQuery's vocabulary (one term a line; NiMARE's ``fetch_neuroquery`` layout).
VOCABULARY_FILE = "data-neuroquery_version-1_vocab-neuroquery7547_vocabulary.txt"
#: The released NeuroQuery model's synonym / plural map (``{"reaction times": "reaction time"}``).
SYNONYMS_FILE = "neuroquery_model_vocabulary.csv_voc_mapping_identity.json"
_SHOWN_CHARS = 40


@dataclass(frozen=True)
class Term:
    """A recognised term.

    Attributes:
        term: NeuroQuery's normalised term (stop words dropped, synonyms resolved): ``theory mind``.
        said: the words as typed: ``Theory of Mind``.
        synonym: the synonym map changed the words (``nociception`` -> ``nociceptive``).
    """

    term: str
    said: str
    synonym: bool = False

    def __str__(self) -> str:
        return f"{self.said} → {self.term}" if self.synonym else self.said


@dataclass
class Tokens:
    """What a text was read as.

    Attributes:
        terms: recognised terms, in the order typed.
        ignored: ``(word, reason)`` for each word that did not count, in the order typed.
        truncated: words beyond ``MAX_WORDS`` that were not read.
    """

    terms: list[Term] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)
    truncated: int = 0


def _shown(word: str) -> str:
    return word if len(word) <= _SHOWN_CHARS else word[:_SHOWN_CHARS] + "…"


class QueryTokeniser:
    """NeuroQuery's tokenising pipeline over a vocabulary and a synonym map.

    Args:
        vocabulary: NeuroQuery's terms (words and phrases, as in its vocabulary file).
        synonyms: ``{term: canonical term}`` (both in the vocabulary's own spelling).
        max_words: words read from a text; the rest is reported as truncated.
    """

    def __init__(
        self, vocabulary: Sequence[str], synonyms: Mapping[str, str] | None = None, max_words: int = MAX_WORDS
    ) -> None:
        import regex
        from neuroquery import tokenization

        mapping = {
            tokenization.string_to_tuple(k): tokenization.string_to_tuple(v) for k, v in (synonyms or {}).items()
        }
        # "[]": a word outside the vocabulary comes back bracketed, in place, so it can be reported
        self._pipeline = tokenization.tokenizing_pipeline_from_vocabulary(
            list(vocabulary), out_of_voc="[]", voc_mapping=mapping
        )
        self._words = regex.compile(tokenization.WORD_PATTERN)  # the pipeline's own word pattern
        self._stop = frozenset(w.lower() for w in tokenization.nltk_stop_words())  # and its stop words
        # the pipeline keeps the last text's positions on itself; the page's sessions share one tokeniser
        self._lock = threading.Lock()
        self.max_words = max_words
        self.n_terms = len(self._pipeline.get_vocabulary())

    @classmethod
    def from_directory(cls, directory: str | Path) -> QueryTokeniser:
        """The tokeniser of a NeuroQuery folder (the synonym map is used when the folder has it).

        Raises:
            OSError: the folder lacks the vocabulary file, or a file is unreadable.
            ValueError: the synonym map is not a JSON object of strings.
        """
        directory = Path(directory)
        vocabulary = [t.strip() for t in (directory / VOCABULARY_FILE).read_text(encoding="utf-8").splitlines()]
        synonyms: dict[str, str] = {}
        if (directory / SYNONYMS_FILE).is_file():
            synonyms = json.loads((directory / SYNONYMS_FILE).read_text(encoding="utf-8"))
            if not isinstance(synonyms, dict) or not all(isinstance(v, str) for v in synonyms.values()):
                raise ValueError(f"{directory / SYNONYMS_FILE} is not a JSON object of terms")
        return cls([t for t in vocabulary if t], synonyms)

    def __call__(self, text: str) -> Tokens:
        """The terms of ``text`` and the words ignored (see the module docstring)."""
        text = unicodedata.normalize("NFKC", str(text or ""))
        words = list(self._words.finditer(text))
        out = Tokens(truncated=max(len(words) - self.max_words, 0))
        if out.truncated:
            text = text[: words[self.max_words - 1].end()]
            words = words[: self.max_words]
        found: list[tuple[int, Term | tuple[str, str]]] = []  # by position: a term, or (word, why ignored)
        inside: list[tuple[int, int]] = []  # spans of recognised terms: their stop words ("of") are part of them
        with self._lock:
            phrases = self._pipeline(text, keep_pos=True)
            positions = self._pipeline.positions.reshape(-1, 2).tolist()
        for phrase, (start, end) in zip(phrases, positions, strict=True):
            start, end = int(start), int(end)
            if phrase.startswith("[") and phrase.endswith("]"):
                found.append((start, (_shown(text[start:end]), "not in NeuroQuery's vocabulary")))
            else:
                said = text[start:end]
                plain = " ".join(w for w in self._words.findall(said.lower()) if w not in self._stop)
                found.append((start, Term(phrase, " ".join(said.split()), plain != phrase)))
                inside.append((start, end))
        for w in words:
            if w.group().lower() in self._stop and not any(a <= w.start() < b for a, b in inside):
                found.append((w.start(), (_shown(w.group()), "stop word")))
        for _, item in sorted(found, key=lambda f: f[0]):
            if isinstance(item, Term):
                out.terms.append(item)
            else:
                out.ignored.append(item)
        return out
