"""Share a view: the app's state to and from the URL query string (``st.query_params``).

Parameters (all optional; anything else is ignored with a message):

``run``      name of the run folder the link was made on (the app never opens a run named by a URL: a
             run folder is code, see ``bundle/docs/app.md``; a different name only gives a warning)
``study``    a study id of the run's ``latents.parquet`` — or ``seed`` (prior draw) — or ``z`` (comma list)
``task``     a task category or ``unknown``
``year``, ``sample_size``, ``field_strength``, ``fwhm``   a number, or ``unknown``
``q``        the "ask in words" text
``qa``, ``qb`` the two queries of the contrast view (A minus B)
``topics``   topic weights, ``index:weight`` pairs (``9:0.6,33:0.4``), or ``unknown``
``strength`` the condition strength
``sweep``    the continuous condition swept

An invalid value yields a one-line message naming the parameter and the valid values, and its default; an
unknown parameter yields a message naming the parameters the page reads (Streamlit's own ``embed`` and
``embed_options`` are left to Streamlit). The messages are plain text: the page escapes them
(``markup.md_escape``), since they quote the link.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["MAX_QUERY_CHARS", "STREAMLIT_PARAMS", "STRENGTH_RANGE", "UrlState", "parse_state", "state_params"]

#: Longest "ask in words" text kept from a URL or the text box.
MAX_QUERY_CHARS = 2000
#: Range of the condition-strength control.
STRENGTH_RANGE: tuple[float, float] = (0.0, 3.0)
#: Query parameters Streamlit itself reads (``?embed=true``): not the page's, never reported.
STREAMLIT_PARAMS = frozenset({"embed", "embed_options"})
_TEXTS = {"q": "the words", "qa": "query A", "qb": "query B"}
_PARAMS = ("run", "study", "seed", "z", "task", *_TEXTS, "topics", "strength", "sweep")


@dataclass
class UrlState:
    """What a URL asks for; ``None`` = not given (the app's default applies)."""

    run: str | None = None
    study: str | None = None
    seed: int | None = None
    z: np.ndarray | None = None
    task: str | None = None  # a category or "unknown"
    values: dict[str, float | None] = field(default_factory=dict)  # None = explicitly unknown
    query: str | None = None
    contrast: tuple[str, str] | None = None  # the contrast view's queries A and B ("" = not given)
    topics: dict[int, float] | None = None  # {} = explicitly unknown
    strength: float | None = None
    sweep: str | None = None


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _shorten(text: str, n: int = 40) -> str:
    text = str(text)
    return text if len(text) <= n else text[:n] + "…"


def parse_state(
    params: Mapping[str, str],
    *,
    study_ids: Sequence[str] | set[str],
    categories: Sequence[str],
    fields: Mapping[str, tuple[float, float]],
    latent_size: int,
    n_topics: int,
) -> tuple[UrlState, list[str]]:
    """Read a query string. Returns the state and one message per parameter that was ignored.

    Args:
        params: the query parameters (one string each).
        study_ids: valid study ids.
        categories: valid task categories.
        fields: ``{name: (low, high)}`` of each continuous condition's slider.
        latent_size: length of ``z``.
        n_topics: number of topics (0: the run has no topic conditioning).
    """
    state, notes = UrlState(), []

    def bad(name: str, why: str) -> None:
        notes.append(f"ignored {name}={_shorten(params[name])} in the link: {why}")

    known = (*_PARAMS, *fields)
    for name in params:
        if name not in known and name not in STREAMLIT_PARAMS:
            notes.append(
                f"ignored {_shorten(name)}={_shorten(params[name])} in the link: not a parameter of this page "
                f"(it reads {', '.join(known)})"
            )

    state.run = params.get("run")
    if "study" in params:
        if params["study"] in study_ids:
            state.study = params["study"]
        else:
            bad("study", "no study with this id in the run")
    if "seed" in params:
        seed = params["seed"]
        if seed.isascii() and seed.isdigit() and int(seed) < 2**31:
            state.seed = int(seed)
        else:
            bad("seed", "must be a whole number from 0 to 2147483647")
    if "z" in params:
        parts = [_number(v) for v in params["z"].split(",")]
        if len(parts) == latent_size and all(p is not None for p in parts):
            state.z = np.asarray(parts, dtype=np.float32)
        else:
            bad("z", f"must be {latent_size} finite numbers separated by commas")
    if "task" in params:
        if params["task"] in categories or params["task"] == "unknown":
            state.task = params["task"]
        else:
            bad("task", f"must be one of {', '.join(categories)} or unknown")
    for name, (low, high) in fields.items():
        if name not in params:
            continue
        if params[name] == "unknown":
            state.values[name] = None
            continue
        value = _number(params[name])
        if value is None or not low <= value <= high:
            bad(name, f"must be a number from {low:g} to {high:g}, or unknown")
        else:
            state.values[name] = value
    for name, what in _TEXTS.items():
        if len(params.get(name, "")) > MAX_QUERY_CHARS:
            notes.append(f"{what} in the link: cut to the first {MAX_QUERY_CHARS} characters")
    if "q" in params:
        state.query = params["q"][:MAX_QUERY_CHARS]
    if "qa" in params or "qb" in params:
        state.contrast = (params.get("qa", "")[:MAX_QUERY_CHARS], params.get("qb", "")[:MAX_QUERY_CHARS])
    if params.get("topics") == "unknown":
        state.topics = {}
    elif "topics" in params:
        topics: dict[int, float] = {}
        ok = n_topics > 0
        for pair in params["topics"].split(",") if ok else []:
            index, _, weight = pair.partition(":")
            w = _number(weight)
            if not (index.isascii() and index.isdigit() and int(index) < n_topics and w is not None and 0 <= w <= 1):
                ok = False
                break
            topics[int(index)] = w
        if ok and topics:
            state.topics = topics
        else:
            bad("topics", f"must be index:weight pairs with index 0-{max(n_topics - 1, 0)} and weight 0-1")
    if "strength" in params:
        value = _number(params["strength"])
        if value is None or not STRENGTH_RANGE[0] <= value <= STRENGTH_RANGE[1]:
            bad("strength", f"must be a number from {STRENGTH_RANGE[0]:g} to {STRENGTH_RANGE[1]:g}")
        else:
            state.strength = value
    if "sweep" in params:
        if params["sweep"] in fields:
            state.sweep = params["sweep"]
        else:
            bad("sweep", f"must be one of {', '.join(fields)}")
    return state, notes


def state_params(
    *,
    run: str,
    study: str | None,
    seed: int | None,
    z: np.ndarray | None,
    conditions: Mapping[str, Any],
    query: str,
    contrast: tuple[str, str] = ("", ""),
    topics: Mapping[int, float] | None,
    strength: float,
    sweep: str,
) -> dict[str, str]:
    """The query string of a view (the inverse of ``parse_state``); ``z`` only when moved from the start."""
    params: dict[str, str] = {"run": run}
    if study is not None:
        params["study"] = study
    elif seed is not None:
        params["seed"] = str(seed)
    if z is not None:
        params["z"] = ",".join(f"{float(v):.4g}" for v in z)
    params["task"] = conditions.get("task") or "unknown"
    for name, value in conditions.items():
        if name in ("task", "topics", "terms"):  # terms: from the words or the starting study, not the link
            continue
        params[name] = "unknown" if value is None else f"{float(value):g}"
    for name, text in zip(_TEXTS, (query, *contrast), strict=True):
        if text:
            params[name] = text[:MAX_QUERY_CHARS]
    if topics is None:
        params["topics"] = "unknown"
    elif any(w > 0 for w in topics.values()):
        params["topics"] = ",".join(f"{i}:{w:.4g}" for i, w in sorted(topics.items()) if w > 0)
    params["strength"] = f"{strength:g}"
    params["sweep"] = sweep
    return params
