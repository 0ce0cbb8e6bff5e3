"""The contract of one evaluation section: what it reads (``EvalData``) and what it returns (``Section``).

Each section of the evaluation (baselines, models, conditional maps, the text baselines and protocols,
the generative measurements, ...) is a function ``section(data: EvalData) -> Section``. It reads only the
loaded data and its own options, never another section's side effects; what it needs from another
section it recomputes or takes from ``data.cache`` (shared, read-only-after-write fits such as the PCA of
the training maps, keyed by a name the writer documents). The workflow runs the sections, merges each
``Section.results`` under ``results[section.name]`` (or at the top level where ``top_level`` is set),
and joins every ``Section.columns`` into the per-map test table.

Cache keys the workflow itself writes (``workflow.Evaluation.run``):

* ``"columns"``: the per-map test table so far (column name -> ``[N_test]``), every earlier section's
  columns joined; the sections that summarise or pair other sections' columns read it.
* ``"predictions"``: per predictor (``columns.PROTOCOL_PREDICTORS``) its ``[N_test, V]`` test maps, NaN rows
  where it predicts nothing (filled by the sections that make the predictions).

Random draws never flow between sections: each section (and each network within one) takes its own
stream, ``EvalData.generator(name)`` / ``EvalData.rng(name)``, seeded from ``seed`` and the name, so a
section's numbers do not depend on which sections ran before it or in what order.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cbvae_ext.evaluation.stats import bootstrap_summary, paired_bootstrap

__all__ = ["EvalData", "Section", "SectionFn", "prefixed"]


@dataclass
class EvalData:
    """Everything a section may read: options, the dataset, the loaded runs and the two splits.

    Attributes:
        opts: checked evaluation options (``n_bootstrap``, ``seed``, ...).
        info: the dataset (``cbvae_ext.data.DatasetInfo``).
        schema: the dataset's ``MetadataSchema``.
        mask: ``[D, H, W]`` bool brain mask.
        runs: loaded runs by role (``"cbvae"``, ``"uncond"``, ``"nolambda"``, ``"baseline"``).
        train: the training split (``SplitData``; maps ``[N, V]`` inside the mask).
        test: the test split.
        peaks: ``[N_test, V]`` bool peak-voxel indicator of the test maps (None without coordinates).
        latent_size: the runs' latent size.
        device: where networks run.
        cache: fits shared between sections (written once, then read-only).
    """

    opts: dict[str, Any]
    info: Any
    schema: Any
    mask: np.ndarray
    runs: dict[str, Any]
    train: Any
    test: Any
    peaks: np.ndarray | None
    latent_size: int
    device: torch.device | str = "cpu"
    cache: dict[str, Any] = field(default_factory=dict)

    def summary(self, values: np.ndarray) -> dict[str, Any]:
        """Bootstrap mean and 95% CI of per-map values (``n_bootstrap`` resamples, seeded)."""
        return bootstrap_summary(values, self.opts["n_bootstrap"], self.opts["seed"])

    def paired(self, a: np.ndarray, b: np.ndarray, direction: str = "greater", margin: float = 0.0) -> dict[str, Any]:
        """Paired bootstrap of ``a - b`` over the same maps."""
        return paired_bootstrap(a, b, direction, self.opts["n_bootstrap"], self.opts["seed"], margin)

    def at_least(self, a: np.ndarray, b: np.ndarray, rule: str, a_col: str, b_col: str) -> dict[str, Any]:
        """Criterion "a at least b": passed when the paired mean difference ``a - b`` is >= 0 (its CI beside it;
        ``superior``: the CI lies above 0)."""
        res = self.paired(a, b)
        passed = None if res["mean_diff"] is None else bool(res["mean_diff"] >= 0)
        superior = res.pop("passed")
        return {"rule": rule, "a": a_col, "b": b_col, **res, "superior": superior, "passed": passed, "reason": None}

    def summaries(self, columns: dict[str, np.ndarray], prefix: str) -> dict[str, Any]:
        """``summary`` of every column under ``prefix/``, keyed by the rest of the name."""
        n = len(prefix) + 1
        return {k[n:]: self.summary(v) for k, v in columns.items() if k.startswith(prefix + "/")}

    def generator(self, stream: int | str = 0) -> torch.Generator:
        """A fresh torch generator seeded from ``seed`` and ``stream`` (a number, or a name such as
        ``"reconstruction/model"``), so a section's draws do not depend on section order."""
        return torch.Generator().manual_seed(int(self.opts["seed"]) + _stream_offset(stream))

    def rng(self, stream: int | str = 0) -> np.random.Generator:
        """A fresh numpy generator seeded from ``seed`` and ``stream`` (see ``generator``)."""
        return np.random.default_rng(int(self.opts["seed"]) + _stream_offset(stream))


def _stream_offset(stream: int | str) -> int:
    """``stream`` itself, or a stable 31-bit number for a name (CRC-32: the same on every run and platform)."""
    return int(stream) if isinstance(stream, int) else zlib.crc32(stream.encode()) & 0x7FFFFFFF


@dataclass
class Section:
    """What one section returns.

    Attributes:
        name: the section's key in ``test_results.json``.
        results: its JSON part (numbers, lists, dicts; NaN becomes null when written).
        columns: per-map test columns ``{column name: [N_test] values}``; names come from
            ``cbvae_ext.evaluation.columns`` where ``criteria.py`` reads them.
        figure_data: arrays the figures need (not written to JSON).
        tables: per-map tables besides the test one, by file name (``per_map_ood.parquet``: column -> values).
        top_level: merge ``results`` into the top level of the results instead of under ``name``.
    """

    name: str
    results: dict[str, Any] = field(default_factory=dict)
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    figure_data: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    top_level: bool = False


SectionFn = Callable[[EvalData], Section]


def prefixed(prefix: str, values: dict[str, Any]) -> dict[str, np.ndarray]:
    """``values`` as per-map columns ``<prefix>/<key>`` in float64."""
    return {f"{prefix}/{k}": np.asarray(v, dtype=np.float64) for k, v in values.items()}
