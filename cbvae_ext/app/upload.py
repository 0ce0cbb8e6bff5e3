"""The "Your study" starting point: an uploaded file read and analysed by ``cbvae_ext.study``, turned into what
the page shows (a starting point at the study's posterior, its typicality sentence, its nearest studies).

Reading, MA rendering, encoding and scoring are the study package's (``StudyContext``, ``analyse_file``); this
module only adapts its results to the page and its errors to one line. Plain Python, testable without Streamlit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from cbvae_ext.errors import CbvaeError
from cbvae_ext.schema import CONTINUOUS_FIELDS

from .session import LATENT_RANGE, RunInfo, StartPoint, one_line, slider_value

__all__ = [
    "UPLOAD_TYPES",
    "analyse_upload",
    "nearest_table",
    "typicality_sentence",
    "upload_metadata",
    "upload_start",
]

#: File name endings the uploader accepts (the study package's formats; ``.gz`` for ``.nii.gz``).
UPLOAD_TYPES: tuple[str, ...] = ("txt", "csv", "tsv", "json", "nii", "gz")


def upload_metadata(
    text: str = "", year: float | None = None, sample_size: float | None = None, task: str | None = None
) -> dict[str, Any]:
    """The optional metadata typed beside an upload, as ``analyse_file(metadata=...)`` takes it (blanks left out)."""
    out: dict[str, Any] = {}
    if text and text.strip():
        out["text"] = text.strip()
    if year is not None:
        out["year"] = float(year)
    if sample_size is not None:
        out["sample_size"] = float(sample_size)
    if task:
        out["task"] = task
    return out


def analyse_upload(context: Any, data: bytes, filename: str, metadata: Mapping[str, Any] | None = None) -> Any:
    """``analyse_file`` on an upload's bytes with an open ``StudyContext``; a ``str`` (one line) for bad input.

    Returns:
        the ``StudyAnalysis``, or the study package's one-line error message (unreadable, empty, unknown space,
        mixed spaces, a condition out of range, ...).
    """
    from cbvae_ext.study import analyse_file

    try:
        return analyse_file(data, filename=filename, context=context, metadata=dict(metadata or {}))
    except CbvaeError as err:
        return one_line(err, 300)


def upload_start(info: RunInfo, result: Any, key: str, source: str) -> StartPoint:
    """Starting point of an analysed study: its posterior mean as the latent code and its conditions.

    Args:
        info: the run.
        result: a ``StudyResult`` of ``analyse_upload``.
        key: identifies the upload (its digest and the study's index in the file).
        source: the uploaded file's name (shown in the label).
    """
    post = result.posterior
    z = np.zeros(info.latent_size, np.float32) if post is None else np.asarray(post["mu"], np.float32)
    cond = result.conditions
    task = cond.get("task")
    conditions: dict[str, Any] = {"task": task if task in info.schema.categories else None}
    for name in CONTINUOUS_FIELDS:
        value = cond.get(name)
        conditions[name] = None if value is None else slider_value(info.schema, name, float(value))
    topics = cond.get("topics")
    conditions["topics"] = None if topics is None else np.round(np.asarray(topics, np.float64), 2).astype(np.float32)
    label = f"your study {result.study.name} ({source})"
    return StartPoint(key, np.clip(z, *LATENT_RANGE).astype(np.float32), conditions, label, upload=True)


def typicality_sentence(result: Any) -> str:
    """One plain sentence: the study's typicality percentile among the dataset's test studies, or why none."""
    from cbvae_ext.study import ATYPICAL_PERCENTILE

    typ = result.typicality
    if typ is None:
        why = next((n for n in result.notes if n.startswith("typicality:")), None)
        if result.posterior is None:
            why = "this run exports no encoder"
        return f"Typicality: not computed ({why.removeprefix('typicality: ') if why else 'no reference'})."
    pct = float(typ["percentile"])
    return (
        f"Typicality: the model finds this map more likely than {pct:.0f}% of the dataset's {typ['n_reference']} "
        f"test studies (percentile {pct:.1f}; below {ATYPICAL_PERCENTILE:g} it is called atypical)."
    )


def nearest_table(result: Any) -> pd.DataFrame:
    """The most correlated dataset studies (``id``, ``title``, ``year``, ``category``, ``split``, ``r``)."""
    columns = ["id", "title", "year", "category", "split", "r"]
    return pd.DataFrame(result.nearest, columns=columns)
