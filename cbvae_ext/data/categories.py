"""Task categories: Neurosynth LDA50 topics and NeuroStore task names to one shared list of names.

Neurosynth rule: sum each study's LDA50 topic weights over the topics mapped to a category
(``TOPIC_CATEGORIES``); the category with the largest sum wins, ``other`` when that sum is below
``TOPIC_THRESHOLD``. Topics about anatomy, methods, development or clinical groups map to nothing.

NeuroStore rule: the rules of ``TASK_KEYWORDS`` are tried in table order against all of an analysis'
task names; the first rule that matches any name wins (so a named n-back or flanker task outranks a
secondary task), ``other`` when no rule matches, missing when the analysis has no task names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

__all__ = [
    "CATEGORIES",
    "TASK_KEYWORDS",
    "TOPIC_CATEGORIES",
    "TOPIC_THRESHOLD",
    "category_table",
    "task_category",
    "topic_categories",
]

#: Category names in the order of the one-hot block of the metadata vector.
CATEGORIES: list[str] = [
    "working memory",
    "cognitive control",
    "attention",
    "episodic memory",
    "language",
    "emotion",
    "faces",
    "reward",
    "decision making",
    "social cognition",
    "pain",
    "motor",
    "auditory",
    "visual perception",
    "other",
]

#: LDA50 topic index -> category, chosen from the top words in
#: ``data-neurosynth_version-7_vocab-LDA50_keys.tsv`` (shown after each entry).
TOPIC_CATEGORIES: dict[int, str] = {
    9: "working memory",  # memory working wm load task verbal maintenance
    20: "cognitive control",  # control conflict task error interference stroop switching
    16: "cognitive control",  # response inhibition control inhibitory stop nogo
    48: "cognitive control",  # prefrontal pfc dlpfc executive rule
    47: "attention",  # attention attentional target visual spatial cues orienting
    44: "attention",  # eye gaze saccade fixation pursuit oculomotor
    33: "episodic memory",  # memory retrieval encoding hippocampus recognition episodic
    41: "episodic memory",  # imagery scenes navigation past autobiographical
    37: "language",  # language reading word semantic sentences phonological
    26: "emotion",  # emotional amygdala negative emotion valence regulation
    40: "faces",  # face faces facial expressions fusiform
    7: "reward",  # reward feedback striatum anticipation monetary
    10: "reward",  # food taste eating hunger pleasantness
    30: "decision making",  # decision making risk choice uncertainty discounting
    8: "social cognition",  # mpfc social mental mind tom mentalizing
    28: "social cognition",  # social empathy moral game interaction
    32: "pain",  # pain somatosensory painful noxious touch
    17: "motor",  # motor hand movement premotor finger tapping
    19: "motor",  # action observation mirror imitation grasping
    6: "auditory",  # auditory speech sounds music pitch voice
    42: "visual perception",  # visual cortex sensory object occipital multisensory
    45: "visual perception",  # motion perception visual mt moving illusion
}

#: A study whose best category gathers less than this topic weight (weights sum to 1) is ``other``.
TOPIC_THRESHOLD: float = 0.05

#: Ordered (category, regex) rules for NeuroStore task names (lower-cased); the first rule that matches wins.
TASK_KEYWORDS: list[tuple[str, str]] = [
    # named paradigms first: they identify the task better than generic words in other task names
    ("working memory", r"\bn\s*-?\s*back\b|\bnback\b|\b\d+\s*-?\s*back\b|\b(zero|one|two|three|four)\s*-?\s*back\b"),
    ("cognitive control", r"flanker|eriksen|stroop|go\s*/?\s*no\s*-?\s*go|stop\s*-?\s*signal|simon task"),
    ("working memory", r"working memory|sternberg|delayed match"),
    ("cognitive control", r"task switch|conflict|inhibition"),
    ("attention", r"attention|oddball|visual search|posner|cueing"),
    ("episodic memory", r"episodic|recognition memory|encoding|retrieval|autobiographical|recall"),
    ("language", r"language|reading|verb generation|semantic|sentence|word"),
    ("faces", r"\bfaces?\b|facial"),
    ("emotion", r"emotion|fear|affective|\biaps\b"),
    ("reward", r"reward|monetary incentive|\bmid\b"),
    ("decision making", r"decision|gambl|choice|risk"),
    ("social cognition", r"theory of mind|mentaliz|social|empathy"),
    ("pain", r"pain|noxious|thermal stim"),
    ("motor", r"finger tapping|motor|movement|grasp"),
    ("auditory", r"auditory|music|\btones?\b|listening"),
    ("visual perception", r"visual|checkerboard|motion perception"),
]

_COMPILED = [(cat, re.compile(rx)) for cat, rx in TASK_KEYWORDS]


def topic_categories(weights: np.ndarray) -> list[str | None]:
    """Category per study from its LDA50 topic weights ``[N, 50]``; None where a row is all zero or missing (NaN)."""
    weights = np.asarray(weights, dtype=np.float64)
    has_topics = np.isfinite(weights).all(axis=1) & (np.nan_to_num(weights).sum(axis=1) > 0)
    weights = np.where(has_topics[:, None], weights, 0.0)
    names = [c for c in CATEGORIES if c != "other"]
    sums = np.zeros((weights.shape[0], len(names)))
    for topic, cat in TOPIC_CATEGORIES.items():
        sums[:, names.index(cat)] += weights[:, topic]
    best = sums.argmax(axis=1)
    out: list[str | None] = []
    for i in range(weights.shape[0]):
        if not has_topics[i]:
            out.append(None)
        else:
            out.append(names[best[i]] if sums[i, best[i]] >= TOPIC_THRESHOLD else "other")
    return out


def task_category(task_names: Sequence[str]) -> str | None:
    """Category of a NeuroStore analysis from its ordered task names; None when there are none."""
    names = [str(n).strip().lower() for n in task_names if isinstance(n, str) and n.strip()]
    if not names:
        return None
    for cat, rx in _COMPILED:
        if any(rx.search(name) for name in names):
            return cat
    return "other"


def category_table() -> dict:
    """JSON-able description of both rules, stored in the dataset manifest."""
    return {
        "categories": list(CATEGORIES),
        "neurosynth_topic_categories": {str(k): v for k, v in sorted(TOPIC_CATEGORIES.items())},
        "neurosynth_topic_threshold": TOPIC_THRESHOLD,
        "neurostore_task_keywords": [list(r) for r in TASK_KEYWORDS],
    }
