"""The metadata vector: one declaration shared by data, training, export, inference and the app.

Layout of the conditioning vector ``meta`` (length ``schema.meta_dim``)::

    [ year_z, sample_size_z, field_strength_z, fwhm_z,  one-hot(category) (K entries) ]

Layout of ``meta_mask`` (length ``schema.mask_dim``)::

    [ year_observed, sample_size_observed, field_strength_observed, fwhm_observed, category_observed ]

Continuous fields are normalised as ``z = (t(x) - center) / scale`` where ``t`` is the identity or
``log1p`` (sample size). A missing value is stored as ``z = 0`` with its mask entry ``0``: the model
imputes it, nothing is invented. A missing category is an all-zero one-hot with mask ``0``.

Normalisation constants come from the training split when the field is observed there; a field that
no source observes (field strength and FWHM for Neurosynth) uses the documented ``PRIORS`` below,
which are scales for the network, never values written into the metadata table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "CONTINUOUS_FIELDS",
    "PRIORS",
    "FieldSpec",
    "MetadataSchema",
    "SchemaError",
]

#: Continuous, possibly-missing conditioning fields, in vector order.
CONTINUOUS_FIELDS: tuple[str, ...] = ("year", "sample_size", "field_strength", "fwhm")

#: Per-field transform, fallback normalisation and plausible range (used only when a field is
#: never observed in the training split). Ranges bound the app's sliders and input validation.
PRIORS: dict[str, dict[str, Any]] = {
    "year": {"transform": "identity", "center": 2010.0, "scale": 5.0, "range": (1990.0, 2026.0)},
    # participants per study: log1p(20) ~ 3.04, typical fMRI samples 8-200
    "sample_size": {"transform": "log1p", "center": 3.04, "scale": 0.7, "range": (1.0, 2000.0)},
    # Tesla: 1.5 T, 3 T and 7 T scanners dominate the literature
    "field_strength": {"transform": "identity", "center": 3.0, "scale": 1.5, "range": (0.5, 9.4)},
    # smoothing kernel in mm
    "fwhm": {"transform": "identity", "center": 8.0, "scale": 3.0, "range": (0.0, 20.0)},
}


class SchemaError(ValueError):
    """Invalid conditions or a schema that does not match its consumer."""


@dataclass
class FieldSpec:
    """Normalisation and range of one continuous field.

    Args:
        name: field name, one of ``CONTINUOUS_FIELDS``.
        transform: ``"identity"`` or ``"log1p"``.
        center: mean of the transformed value.
        scale: standard deviation of the transformed value (> 0).
        low: smallest value accepted without ``allow_extrapolation``.
        high: largest value accepted without ``allow_extrapolation``.
        observed: whether any training row observed this field (else center/scale/range are priors).
    """

    name: str
    transform: str
    center: float
    scale: float
    low: float
    high: float
    observed: bool

    def forward(self, x: np.ndarray | float) -> np.ndarray:
        """Raw value(s) to normalised z."""
        x = np.asarray(x, dtype=np.float64)
        t = np.log1p(x) if self.transform == "log1p" else x
        return (t - self.center) / self.scale

    def inverse(self, z: np.ndarray | float) -> np.ndarray:
        """Normalised z to raw value(s)."""
        t = np.asarray(z, dtype=np.float64) * self.scale + self.center
        return np.expm1(t) if self.transform == "log1p" else t


@dataclass
class MetadataSchema:
    """Declares the conditioning vector and converts between named values and tensors.

    Args:
        categories: task category names; ``"other"`` must be one of them.
        fields: one ``FieldSpec`` per entry of ``CONTINUOUS_FIELDS``, in that order.
        year_bin_edges: 11 increasing edges of the 10 equal-frequency year bins (training split).
    """

    categories: list[str]
    fields: list[FieldSpec]
    year_bin_edges: list[float] = field(default_factory=list)

    # ----- layout -------------------------------------------------------------------------
    @property
    def n_continuous(self) -> int:
        return len(self.fields)

    @property
    def n_categories(self) -> int:
        return len(self.categories)

    @property
    def meta_dim(self) -> int:
        return self.n_continuous + self.n_categories

    @property
    def mask_dim(self) -> int:
        return self.n_continuous + 1

    @property
    def n_year_bins(self) -> int:
        return max(len(self.year_bin_edges) - 1, 0)

    def field(self, name: str) -> FieldSpec:
        for spec in self.fields:
            if spec.name == name:
                return spec
        raise SchemaError(f"unknown metadata field {name!r}; valid fields: {', '.join(CONTINUOUS_FIELDS)}")

    # ----- construction -------------------------------------------------------------------
    @classmethod
    def fit(
        cls, categories: Sequence[str], train_values: Mapping[str, np.ndarray], n_year_bins: int = 10
    ) -> MetadataSchema:
        """Build the schema from the training split's raw values (NaN = missing).

        Args:
            categories: category names.
            train_values: raw arrays per continuous field for the training rows.
            n_year_bins: number of equal-frequency year bins.
        """
        specs = []
        for name in CONTINUOUS_FIELDS:
            prior = PRIORS[name]
            values = np.asarray(train_values.get(name, np.array([])), dtype=np.float64)
            values = values[np.isfinite(values)]
            spec = FieldSpec(name, prior["transform"], prior["center"], prior["scale"], *prior["range"], False)
            if values.size >= 2:
                t = np.log1p(values) if spec.transform == "log1p" else values
                spec.center = float(t.mean())
                spec.scale = float(t.std()) or prior["scale"]
                spec.low, spec.high = float(values.min()), float(values.max())
                spec.observed = True
            specs.append(spec)
        years = np.asarray(train_values.get("year", np.array([])), dtype=np.float64)
        years = years[np.isfinite(years)]
        edges: list[float] = []
        if years.size:
            edges = [float(e) for e in np.quantile(years, np.linspace(0.0, 1.0, n_year_bins + 1))]
        return cls(list(categories), specs, edges)

    def to_dict(self) -> dict[str, Any]:
        return {
            "categories": list(self.categories),
            "continuous_fields": [asdict(s) for s in self.fields],
            "year_bin_edges": list(self.year_bin_edges),
            "meta_layout": [f"{s.name}_z" for s in self.fields] + [f"category={c}" for c in self.categories],
            "mask_layout": [f"{s.name}_observed" for s in self.fields] + ["category_observed"],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MetadataSchema:
        try:
            specs = [FieldSpec(**s) for s in d["continuous_fields"]]
            schema = cls(list(d["categories"]), specs, [float(e) for e in d.get("year_bin_edges", [])])
        except (KeyError, TypeError) as err:
            raise SchemaError(
                f"metadata schema is malformed ({err}); rebuild the dataset or re-export the run"
            ) from err
        if tuple(s.name for s in specs) != CONTINUOUS_FIELDS:
            raise SchemaError(
                f"metadata schema fields {[s.name for s in specs]} differ from {list(CONTINUOUS_FIELDS)}; "
                "rebuild the dataset with this version of cbvae_ext"
            )
        return schema

    # ----- encoding -----------------------------------------------------------------------
    def year_bin(self, years: np.ndarray | float) -> np.ndarray:
        """Year bin index 0..n-1 per year (clipped at the ends), -1 where the year is missing."""
        years = np.atleast_1d(np.asarray(years, dtype=np.float64))
        out = np.full(years.shape, -1, dtype=np.int64)
        ok = np.isfinite(years)
        if self.n_year_bins and ok.any():
            inner = np.asarray(self.year_bin_edges[1:-1])
            out[ok] = np.searchsorted(inner, years[ok], side="right")
        return out

    def category_index(self, name: str | None) -> int:
        """Index of a category name; -1 for missing (None/NaN/empty)."""
        if name is None or (isinstance(name, float) and math.isnan(name)) or name == "":
            return -1
        try:
            return self.categories.index(str(name))
        except ValueError:
            raise SchemaError(
                f"unknown task category {name!r}; valid categories: {', '.join(self.categories)}"
            ) from None

    def encode(
        self, values: Mapping[str, Sequence[float] | np.ndarray], categories: Sequence[str | None]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encode raw per-row values into ``(meta [N, meta_dim], meta_mask [N, mask_dim])`` float32.

        Args:
            values: raw arrays per continuous field (NaN or absent = missing).
            categories: category name per row (None/NaN = missing).
        """
        n = len(categories)
        meta = np.zeros((n, self.meta_dim), dtype=np.float32)
        mask = np.zeros((n, self.mask_dim), dtype=np.float32)
        for j, spec in enumerate(self.fields):
            raw = np.asarray(values.get(spec.name, np.full(n, np.nan)), dtype=np.float64)
            ok = np.isfinite(raw)
            meta[ok, j] = spec.forward(raw[ok])
            mask[ok, j] = 1.0
        for i, cat in enumerate(categories):
            k = self.category_index(cat)
            if k >= 0:
                meta[i, self.n_continuous + k] = 1.0
                mask[i, self.n_continuous] = 1.0
        return meta, mask

    def validate_conditions(self, conditions: Mapping[str, Any], allow_extrapolation: bool = False) -> None:
        """Raise ``SchemaError`` naming the bad condition and the valid values."""
        known = {"task", *CONTINUOUS_FIELDS}
        for key in conditions:
            if key not in known:
                raise SchemaError(f"unknown condition {key!r}; valid conditions: {', '.join(sorted(known))}")
        task = conditions.get("task")
        if task is not None:
            self.category_index(task)
        for spec in self.fields:
            value = conditions.get(spec.name)
            if value is None:
                continue
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise SchemaError(f"condition {spec.name!r} must be a number, got {value!r}") from None
            if not math.isfinite(value):
                raise SchemaError(f"condition {spec.name!r} must be finite, got {value!r}")
            if spec.name in ("sample_size", "field_strength", "fwhm") and value < 0:
                raise SchemaError(f"condition {spec.name!r} must be non-negative, got {value}")
            if not allow_extrapolation and not (spec.low <= value <= spec.high):
                raise SchemaError(
                    f"condition {spec.name!r}={value} is outside the schema range [{spec.low:g}, {spec.high:g}]; "
                    "pass allow_extrapolation=True to go beyond it"
                )

    def encode_conditions(
        self, conditions: Mapping[str, Any], allow_extrapolation: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Named conditions (``{"task": ..., "year": ..., ...}``) to one ``(meta [M], meta_mask [C+1])``."""
        self.validate_conditions(conditions, allow_extrapolation)
        values = {
            s.name: np.array([np.nan if conditions.get(s.name) is None else float(conditions[s.name])])
            for s in self.fields
        }
        meta, mask = self.encode(values, [conditions.get("task")])
        return meta[0], mask[0]
