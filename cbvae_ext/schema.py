"""The metadata vector: one declaration shared by data, training, export, inference and the app.

Every conditioning field is declared once below: the continuous fields in ``FIELDS`` (transform, prior
centre/scale, slider range, plausible range, label, slider step, non-negativity, source columns), the
vector fields in ``TOPICS`` and ``TERMS`` and the categorical blocks in ``CATEGORICALS``. Adding a field touches this
module and the source readers (``cbvae_ext/data/sources.py``) only.

Layout of the conditioning vector ``meta`` (length ``schema.meta_dim``)::

    [ year_z, sample_size_z, field_strength_z, fwhm_z,  topics (T entries),  terms (E entries),
      one-hot(task) (K entries) ]

Layout of ``meta_mask`` (length ``schema.mask_dim``), one entry per condition group::

    [ year_observed, sample_size_observed, field_strength_observed, fwhm_observed,
      topics_observed, terms_observed, task_observed ]

``schema.groups`` lists these groups in mask order, each with its ``meta_slice`` and ``mask_index``;
``schema.n_continuous`` (4) still means "the first 4 entries of ``meta``". A schema fitted without topic
names (a NeuroStore-only build, or ``MetadataSchema.fit(categories, values)``) has no topics group
(T = 0 and no ``topics_observed`` entry); one built without NeuroQuery's text has no terms group (E = 0).

Continuous fields are normalised as ``z = (t(x) - center) / scale`` where ``t`` is the identity or
``log1p`` (sample size). A missing value is stored as ``z = 0`` with its mask entry ``0``: the model
imputes it, nothing is invented. A missing category is an all-zero one-hot with mask ``0``.

Topics are Neurosynth's 50 LDA topic weights of the study's abstract (``vocab-LDA50``), stored raw: the
weights are non-negative and sum to 1 per study (a topic mixture). No other normalisation is applied;
``encode_conditions`` divides a user's weights by their sum so that they are a mixture too. Missing
topics (NeuroStore rows) are all-zero with mask ``0``.

Terms are a low-dimensional embedding of the study's NeuroQuery term tf-idf (abstract, title, keywords):
a linear projection fitted on the training split (``cbvae_ext.data.neuroquery.TermEmbedding``), so a
typed query goes through the same map. A study without NeuroQuery text has an all-zero row with mask ``0``.

Normalisation constants come from the training split when the field is observed there; a field that
no source observes (field strength and FWHM for Neurosynth) uses the declared priors, which are scales
for the network, never values written into the metadata table.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cbvae_ext.errors import CbvaeError

__all__ = [
    "CATEGORICALS",
    "CONTINUOUS_FIELDS",
    "FIELDS",
    "PRIORS",
    "TERMS",
    "TOPICS",
    "CategoricalDecl",
    "ConditionGroup",
    "FieldDecl",
    "FieldSpec",
    "MetadataSchema",
    "SchemaError",
    "VectorDecl",
    "declaration_fingerprint",
    "plausible",
]


class SchemaError(CbvaeError, ValueError):
    """Invalid conditions or a schema that does not match its consumer."""


@dataclass(frozen=True)
class FieldDecl:
    """Declaration of one continuous, possibly-missing field.

    Args:
        name: field name (the metadata column and the condition key).
        label: human-readable label with unit (the app's slider label).
        transform: ``"identity"`` or ``"log1p"``.
        center: prior mean of the transformed value (used when the training split never observes the field).
        scale: prior standard deviation of the transformed value.
        low: lower end of the prior range (slider range; value range when unobserved).
        high: upper end of the prior range.
        plausible_low: smallest value a source row may carry; outside ``[plausible_low, plausible_high]`` the
            builder records the value as missing and counts it.
        plausible_high: largest value a source row may carry.
        step: slider step (1 for whole numbers).
        non_negative: whether a condition must be >= 0.
        sources: where each source's value comes from (source kind -> file and column); empty when no source has it.
    """

    name: str
    label: str
    transform: str
    center: float
    scale: float
    low: float
    high: float
    plausible_low: float
    plausible_high: float
    step: float
    non_negative: bool
    sources: Mapping[str, str] = field(default_factory=dict)

    @property
    def whole(self) -> bool:
        """Whether values are whole numbers (integer slider)."""
        return self.step == 1


@dataclass(frozen=True)
class VectorDecl:
    """Declaration of a vector-valued field; its entry names come from the source (``schema.topic_names``).

    Args:
        name: field name (condition key).
        label: human-readable label.
        size: number of entries when the source is read (the layout uses ``len(schema.topic_names)``).
        sources: source kind -> file.
    """

    name: str
    label: str
    size: int
    sources: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CategoricalDecl:
    """Declaration of a categorical block (one-hot); its values live in the schema (e.g. ``schema.categories``).

    Args:
        name: condition key.
        label: human-readable label.
        column: metadata column holding the value.
        sources: source kind -> how the value is derived.
    """

    name: str
    label: str
    column: str
    sources: Mapping[str, str] = field(default_factory=dict)


_NS = "data-neurosynth_version-7_"
#: Continuous fields, in vector order. Ranges: ``low``/``high`` bound the app's sliders and serve as the
#: value range of a never-observed field; ``plausible_*`` reject impossible source values (year 1e9, -5).
FIELDS: tuple[FieldDecl, ...] = (
    FieldDecl(
        "year", "Publication year", "identity", 2010.0, 5.0, 1990.0, 2026.0, 1975.0, 2035.0, 1.0, False,
        {"neurosynth": _NS + "metadata.tsv.gz: year", "neurostore": "studies.parquet: year (when present)"},
    ),
    # participants per study: log1p(20) ~ 3.04, typical fMRI samples 8-200; Biobank-size samples stay plausible
    FieldDecl(
        "sample_size", "Sample size (participants)", "log1p", 3.04, 0.7, 1.0, 2000.0, 1.0, 100000.0, 1.0, True,
        {"neurostore": "annotations.parquet: ParticipantDemographicsExtractor.groups[i].count, summed over "
         "groups not flagged imaging_sample=no"},
    ),
    # Tesla: 1.5 T, 3 T and 7 T scanners dominate the literature; no source records it
    FieldDecl("field_strength", "Field strength (T)", "identity", 3.0, 1.5, 0.5, 9.4, 0.1, 11.7, 0.5, True),
    # smoothing kernel in mm; no source records it
    FieldDecl("fwhm", "Smoothing FWHM (mm)", "identity", 8.0, 3.0, 0.0, 20.0, 0.0, 30.0, 0.5, True),
)  # fmt: skip

#: The topic mixture: Neurosynth's 50 LDA topic weights of the abstract (raw, non-negative, sum 1).
TOPICS = VectorDecl(
    "topics",
    "Topic mixture (Neurosynth LDA50)",
    50,
    {"neurosynth": f"{_NS}vocab-LDA50_source-abstract_type-weight_features.npz (labels: vocab-LDA50_vocabulary.txt, "
     "top words: vocab-LDA50_keys.tsv)"},
)  # fmt: skip

#: The text embedding: a training-split projection of NeuroQuery's term tf-idf (``size``: the default dimensions).
TERMS = VectorDecl(
    "terms",
    "Text (NeuroQuery terms, embedded)",
    64,
    {"neurosynth": "NeuroQuery's data-neuroquery_version-1_vocab-neuroquery7547_source-{abstract,title,keywords}"
     "_type-count_features.npz, joined by PubMed id (terms.npz)"},
)  # fmt: skip

#: Categorical blocks, in vector order.
CATEGORICALS: tuple[CategoricalDecl, ...] = (
    CategoricalDecl(
        "task",
        "Task category",
        "category",
        {
            "neurosynth": "largest summed LDA50 weight over the topics of a category (cbvae_ext.data.categories)",
            "neurostore": "task names matched by keyword rules (cbvae_ext.data.categories)",
        },
    ),
)

#: Continuous field names, in vector order.
CONTINUOUS_FIELDS: tuple[str, ...] = tuple(d.name for d in FIELDS)
_DECL: dict[str, FieldDecl] = {d.name: d for d in FIELDS}

#: Per-field transform, fallback normalisation and slider range (derived from ``FIELDS``; kept for callers).
PRIORS: dict[str, dict[str, Any]] = {
    d.name: {"transform": d.transform, "center": d.center, "scale": d.scale, "range": (d.low, d.high)} for d in FIELDS
}


@dataclass
class FieldSpec:
    """Fitted normalisation and range of one continuous field (its declaration is ``spec.decl``).

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

    @property
    def decl(self) -> FieldDecl:
        """The field's declaration (label, step, non-negativity, plausible range, sources)."""
        return _DECL[self.name]

    def forward(self, x: np.ndarray | float) -> np.ndarray:
        """Raw value(s) to normalised z."""
        x = np.asarray(x, dtype=np.float64)
        t = np.log1p(x) if self.transform == "log1p" else x
        return (t - self.center) / self.scale

    def inverse(self, z: np.ndarray | float) -> np.ndarray:
        """Normalised z to raw value(s)."""
        t = np.asarray(z, dtype=np.float64) * self.scale + self.center
        return np.expm1(t) if self.transform == "log1p" else t


@dataclass(frozen=True)
class ConditionGroup:
    """One condition group: a slice of ``meta`` sharing one entry of ``meta_mask``.

    Attributes:
        name: condition key (``"year"``, ``"topics"``, ``"task"``, ...).
        kind: ``"continuous"``, ``"vector"`` or ``"categorical"``.
        meta_slice: the group's entries in ``meta``.
        mask_index: the group's entry in ``meta_mask``.
    """

    name: str
    kind: str
    meta_slice: slice
    mask_index: int

    @property
    def size(self) -> int:
        return self.meta_slice.stop - self.meta_slice.start

    def to_config(self) -> list[Any]:
        """The JSON form stored in ``network_config.json``: ``[name, kind, meta_start, meta_stop, mask_index]``."""
        return [self.name, self.kind, int(self.meta_slice.start), int(self.meta_slice.stop), int(self.mask_index)]

    @classmethod
    def from_config(cls, item: ConditionGroup | Sequence[Any]) -> ConditionGroup:
        """A group from its JSON form (``to_config``); a ``ConditionGroup`` is returned as it is."""
        if isinstance(item, ConditionGroup):
            return item
        name, kind, start, stop, mask_index = item
        return cls(str(name), str(kind), slice(int(start), int(stop)), int(mask_index))


def declaration_fingerprint() -> str:
    """sha256 of every declaration in this module (``FIELDS``, ``TOPICS``, ``TERMS``, ``CATEGORICALS``).

    The dataset builder puts it in its cache key, so a dataset built before a field was added or changed
    is rebuilt instead of reused (the new field would otherwise be silently absent from training).
    The module globals are read at call time, so a changed declaration changes the fingerprint.
    """
    blob = {
        "fields": [asdict(d) for d in FIELDS],
        "topics": asdict(TOPICS),
        "terms": asdict(TERMS),
        "categoricals": [asdict(d) for d in CATEGORICALS],
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=dict).encode()).hexdigest()


def plausible(name: str, values: np.ndarray) -> np.ndarray:
    """Bool per value: finite and inside the declared plausible range of field ``name``."""
    decl = _DECL[name]
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.isfinite(values) & (values >= decl.plausible_low) & (values <= decl.plausible_high)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value)


@dataclass
class MetadataSchema:
    """Declares the conditioning vector and converts between named values and tensors.

    Args:
        categories: task category names; ``"other"`` must be one of them.
        fields: one ``FieldSpec`` per entry of ``CONTINUOUS_FIELDS``, in that order.
        year_bin_edges: 11 increasing edges of the 10 equal-frequency year bins (training split).
        topic_names: labels of the topic vector's entries (the LDA50 vocabulary); empty: no topics group.
        topic_keys: top words of each topic (same order), for mapping words to topics.
        extra_categoricals: further categorical blocks after ``task``, name -> values (declared in
            ``CATEGORICALS``).
        term_dims: entries of the text embedding (``TERMS``); 0: no terms group.
    """

    categories: list[str]
    fields: list[FieldSpec]
    year_bin_edges: list[float] = field(default_factory=list)
    topic_names: list[str] = field(default_factory=list)
    topic_keys: list[str] = field(default_factory=list)
    extra_categoricals: dict[str, list[str]] = field(default_factory=dict)
    term_dims: int = 0

    # ----- layout -------------------------------------------------------------------------
    @property
    def n_continuous(self) -> int:
        return len(self.fields)

    @property
    def n_categories(self) -> int:
        return len(self.categories)

    @property
    def n_topics(self) -> int:
        return len(self.topic_names)

    @property
    def vector_sizes(self) -> dict[str, int]:
        """The vector groups present, name -> entries, in vector order (topics, then terms)."""
        sizes = {TOPICS.name: self.n_topics, TERMS.name: self.term_dims}
        return {name: size for name, size in sizes.items() if size}

    @property
    def categoricals(self) -> dict[str, list[str]]:
        """Every categorical block, name -> values, in vector order (``task`` first)."""
        return {"task": list(self.categories), **{k: list(v) for k, v in self.extra_categoricals.items()}}

    @property
    def groups(self) -> list[ConditionGroup]:
        """Condition groups in mask order: continuous fields, the topic and term vectors (if any), categorical blocks."""
        out, start = [], 0
        for spec in self.fields:
            out.append(ConditionGroup(spec.name, "continuous", slice(start, start + 1), len(out)))
            start += 1
        for name, size in self.vector_sizes.items():
            out.append(ConditionGroup(name, "vector", slice(start, start + size), len(out)))
            start += size
        for name, values in self.categoricals.items():
            out.append(ConditionGroup(name, "categorical", slice(start, start + len(values)), len(out)))
            start += len(values)
        return out

    def group(self, name: str) -> ConditionGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise SchemaError(f"unknown condition {name!r}; valid conditions: {', '.join(g.name for g in self.groups)}")

    @property
    def meta_dim(self) -> int:
        return self.n_continuous + sum(self.vector_sizes.values()) + sum(len(v) for v in self.categoricals.values())

    @property
    def mask_dim(self) -> int:
        return len(self.groups)

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
        cls,
        categories: Sequence[str],
        train_values: Mapping[str, np.ndarray],
        n_year_bins: int = 10,
        topic_names: Sequence[str] = (),
        topic_keys: Sequence[str] = (),
        extra_categoricals: Mapping[str, Sequence[str]] | None = None,
        term_dims: int = 0,
    ) -> MetadataSchema:
        """Build the schema from the training split's raw values (NaN = missing).

        Args:
            categories: task category names.
            train_values: raw arrays per continuous field for the training rows.
            n_year_bins: number of equal-frequency year bins.
            topic_names: labels of the topic vector (empty: no topics group).
            topic_keys: top words per topic, same order (empty strings when unknown).
            extra_categoricals: further categorical blocks, name -> values.
            term_dims: entries of the text embedding (0: no terms group).
        """
        specs = []
        for decl in FIELDS:
            values = np.asarray(train_values.get(decl.name, np.array([])), dtype=np.float64)
            values = values[np.isfinite(values)]
            spec = FieldSpec(decl.name, decl.transform, decl.center, decl.scale, decl.low, decl.high, False)
            if values.size >= 2:
                t = np.log1p(values) if spec.transform == "log1p" else values
                spec.center = float(t.mean())
                spec.scale = float(t.std()) or decl.scale
                spec.low, spec.high = float(values.min()), float(values.max())
                spec.observed = True
            specs.append(spec)
        years = np.asarray(train_values.get("year", np.array([])), dtype=np.float64)
        years = years[np.isfinite(years)]
        edges: list[float] = []
        if years.size:
            edges = [float(e) for e in np.quantile(years, np.linspace(0.0, 1.0, n_year_bins + 1))]
        keys = list(topic_keys) or [""] * len(topic_names)
        if len(keys) != len(topic_names):
            raise SchemaError(f"{len(topic_keys)} topic keys for {len(topic_names)} topics; pass one key per topic")
        extra = {k: list(v) for k, v in (extra_categoricals or {}).items()}
        return cls(list(categories), specs, edges, list(topic_names), keys, extra, int(term_dims))

    def to_dict(self) -> dict[str, Any]:
        meta_layout = [f"{s.name}_z" for s in self.fields] + [f"topic={t}" for t in self.topic_names]
        meta_layout += [f"term_embedding={i}" for i in range(self.term_dims)]
        for name, values in self.categoricals.items():
            meta_layout += [f"{'category' if name == 'task' else name}={v}" for v in values]
        return {
            "categories": list(self.categories),
            "continuous_fields": [asdict(s) for s in self.fields],
            "year_bin_edges": list(self.year_bin_edges),
            "topic_names": list(self.topic_names),
            "topic_keys": list(self.topic_keys),
            "extra_categoricals": {k: list(v) for k, v in self.extra_categoricals.items()},
            "term_dims": self.term_dims,
            "field_declarations": [{**asdict(d), "sources": dict(d.sources)} for d in FIELDS],
            "groups": [
                {
                    "name": g.name,
                    "kind": g.kind,
                    "meta_start": g.meta_slice.start,
                    "meta_stop": g.meta_slice.stop,
                    "mask_index": g.mask_index,
                }
                for g in self.groups
            ],  # fmt: skip
            "meta_layout": meta_layout,
            "mask_layout": [f"{'category' if g.name == 'task' else g.name}_observed" for g in self.groups],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MetadataSchema:
        try:
            specs = [FieldSpec(**s) for s in d["continuous_fields"]]
            schema = cls(
                list(d["categories"]),
                specs,
                [float(e) for e in d.get("year_bin_edges", [])],
                [str(t) for t in d.get("topic_names", [])],
                [str(t) for t in d.get("topic_keys", [])],
                {str(k): [str(x) for x in v] for k, v in d.get("extra_categoricals", {}).items()},
                int(d.get("term_dims", 0)),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise SchemaError(
                f"metadata schema is malformed ({err}); rebuild the dataset or re-export the run"
            ) from err
        if tuple(s.name for s in specs) != CONTINUOUS_FIELDS:
            raise SchemaError(
                f"metadata schema fields {[s.name for s in specs]} differ from {list(CONTINUOUS_FIELDS)}; "
                "rebuild the dataset with this version of cbvae_ext"
            )
        if len(schema.topic_keys) != len(schema.topic_names):
            raise SchemaError(
                "metadata schema has topic_keys and topic_names of different lengths; rebuild the dataset"
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

    def category_index(self, name: str | None, block: str = "task") -> int:
        """Index of a category name in a categorical block; -1 for missing (None/NaN/empty)."""
        if _missing(name):
            return -1
        values = self.categoricals.get(block)
        if values is None:
            raise SchemaError(f"unknown categorical block {block!r}; valid blocks: {', '.join(self.categoricals)}")
        try:
            return values.index(str(name))
        except ValueError:
            what = "task category" if block == "task" else f"{block} value"
            raise SchemaError(f"unknown {what} {name!r}; valid categories: {', '.join(values)}") from None

    def encode(
        self,
        values: Mapping[str, Any],
        categories: Sequence[str | None],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encode raw per-row values into ``(meta [N, meta_dim], meta_mask [N, mask_dim])`` float32.

        Args:
            values: raw arrays per continuous field (NaN or absent = missing); ``"topics"``: ``[N, T]`` raw
                weights and ``"terms"``: ``[N, E]`` embeddings (a row with any NaN, or the key absent = missing); a further categorical block by
                its name: one value per row (None = missing).
            categories: task category name per row (None/NaN = missing).
        """
        n = len(categories)
        meta = np.zeros((n, self.meta_dim), dtype=np.float32)
        mask = np.zeros((n, self.mask_dim), dtype=np.float32)
        for g in self.groups:
            col = g.meta_slice.start
            if g.kind == "continuous":
                raw = np.asarray(values.get(g.name, np.full(n, np.nan)), dtype=np.float64)
                ok = np.isfinite(raw)
                meta[ok, col] = self.field(g.name).forward(raw[ok])
                mask[ok, g.mask_index] = 1.0
            elif g.kind == "vector":
                if values.get(g.name) is None:
                    continue
                raw = np.asarray(values[g.name], dtype=np.float64).reshape(n, -1)
                if raw.shape[1] != g.size:
                    raise SchemaError(f"{g.name} has {raw.shape[1]} entries per row; the schema expects {g.size}")
                ok = np.isfinite(raw).all(axis=1)
                meta[ok, g.meta_slice] = raw[ok]
                mask[ok, g.mask_index] = 1.0
            else:
                names = categories if g.name == "task" else values.get(g.name, [None] * n)
                for i, name in enumerate(names):
                    k = self.category_index(name, g.name)
                    if k >= 0:
                        meta[i, col + k] = 1.0
                        mask[i, g.mask_index] = 1.0
        return meta, mask

    def topic_vector(self, topics: Any) -> np.ndarray:
        """A topic condition (array of T weights or ``{topic_name: weight}``) as a mixture summing to 1.

        Raises:
            SchemaError: unknown topic name, wrong length, negative/non-finite weights or all zero.
        """
        if not self.n_topics:
            raise SchemaError("this schema has no topics (built without Neurosynth); drop the 'topics' condition")
        if isinstance(topics, Mapping):
            vec = np.zeros(self.n_topics)
            for name, weight in topics.items():
                if name not in self.topic_names:
                    raise SchemaError(
                        f"unknown topic {name!r}; valid topics are schema.topic_names, e.g. {self.topic_names[0]!r}"
                    )
                vec[self.topic_names.index(name)] = _number("topics", weight)
        else:
            try:
                vec = np.asarray(topics, dtype=np.float64).reshape(-1)
            except (TypeError, ValueError):
                raise SchemaError(
                    f"condition 'topics' must be {self.n_topics} numbers or a dict, got {topics!r}"
                ) from None
            if vec.size != self.n_topics:
                raise SchemaError(f"condition 'topics' has {vec.size} weights; give {self.n_topics}, one per topic")
        if not np.isfinite(vec).all() or (vec < 0).any():
            raise SchemaError("condition 'topics' weights must be finite and non-negative")
        if vec.sum() <= 0:
            raise SchemaError("condition 'topics' weights are all zero; give at least one positive weight, or None")
        return vec / vec.sum()

    def term_vector(self, terms: Any) -> np.ndarray:
        """A terms condition: the ``term_dims`` entries of a text embedding (``TermEmbedding.embed`` of a query).

        Raises:
            SchemaError: the schema has no terms group, or the wrong length or non-finite entries.
        """
        if not self.term_dims:
            raise SchemaError("this schema has no terms (built without NeuroQuery's text); drop the 'terms' condition")
        try:
            vec = np.asarray(terms, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise SchemaError(f"condition 'terms' must be {self.term_dims} numbers (an embedded text)") from None
        if vec.size != self.term_dims or not np.isfinite(vec).all():
            raise SchemaError(
                f"condition 'terms' has {vec.size} entries; give the {self.term_dims} finite numbers of an embedded "
                "text (cbvae_ext.data.neuroquery.TermEmbedding.embed)"
            )
        return vec

    def validate_conditions(self, conditions: Mapping[str, Any], allow_extrapolation: bool = False) -> None:
        """Raise ``SchemaError`` naming the bad condition and the valid values."""
        known = [g.name for g in self.groups]
        for key in conditions:
            if key not in known:
                raise SchemaError(f"unknown condition {key!r}; valid conditions: {', '.join(sorted(known))}")
        for name in self.categoricals:
            if conditions.get(name) is not None:
                self.category_index(conditions[name], name)
        if conditions.get(TOPICS.name) is not None:
            self.topic_vector(conditions[TOPICS.name])
        if conditions.get(TERMS.name) is not None:
            self.term_vector(conditions[TERMS.name])
        for spec in self.fields:
            if conditions.get(spec.name) is None:
                continue
            value = _number(spec.name, conditions[spec.name])
            if spec.decl.non_negative and value < 0:
                raise SchemaError(f"condition {spec.name!r} must be non-negative, got {value}")
            if not allow_extrapolation and not (spec.low <= value <= spec.high):
                raise SchemaError(
                    f"condition {spec.name!r}={value} is outside the schema range [{spec.low:g}, {spec.high:g}]; "
                    "pass allow_extrapolation=True to go beyond it"
                )

    def encode_conditions(
        self, conditions: Mapping[str, Any], allow_extrapolation: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Named conditions to one ``(meta [meta_dim], meta_mask [mask_dim])``.

        Args:
            conditions: ``{"task": str | None, "topics": array[T] | {topic_name: weight} | None,
                "terms": array[E] | None, "year": ..., ...}``; a condition absent or None is missing (mask 0). Topic weights are divided by their sum.
            allow_extrapolation: accept continuous values outside the schema's range.
        """
        self.validate_conditions(conditions, allow_extrapolation)
        values: dict[str, Any] = {
            s.name: np.array([np.nan if conditions.get(s.name) is None else float(conditions[s.name])])
            for s in self.fields
        }
        if self.n_topics and conditions.get(TOPICS.name) is not None:
            values[TOPICS.name] = self.topic_vector(conditions[TOPICS.name])[None]
        if self.term_dims and conditions.get(TERMS.name) is not None:
            values[TERMS.name] = self.term_vector(conditions[TERMS.name])[None]
        for name in self.extra_categoricals:
            values[name] = [conditions.get(name)]
        meta, mask = self.encode(values, [conditions.get("task")])
        return meta[0], mask[0]


def _number(name: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise SchemaError(f"condition {name!r} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise SchemaError(f"condition {name!r} must be finite, got {value!r}")
    return value
