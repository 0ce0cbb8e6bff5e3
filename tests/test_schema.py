"""The metadata vector: encoding, missing values, year bins, validation and round trips."""

from __future__ import annotations

import numpy as np
import pytest

from cbvae_ext.schema import (
    CATEGORICALS,
    CONTINUOUS_FIELDS,
    FIELDS,
    PRIORS,
    TERMS,
    TOPICS,
    MetadataSchema,
    SchemaError,
    plausible,
)

CATS = ["working memory", "emotion", "other"]


@pytest.fixture()
def schema() -> MetadataSchema:
    years = np.arange(1997, 2019, dtype=float).repeat(5)
    sizes = np.r_[np.full(len(years) - 10, np.nan), np.linspace(10, 40, 10)]
    return MetadataSchema.fit(CATS, {"year": years, "sample_size": sizes})


def test_layout(schema: MetadataSchema) -> None:
    assert schema.meta_dim == len(CONTINUOUS_FIELDS) + len(CATS) == 7
    assert schema.mask_dim == len(CONTINUOUS_FIELDS) + 1 == 5
    assert schema.n_year_bins == 10
    d = schema.to_dict()
    assert d["meta_layout"][:4] == ["year_z", "sample_size_z", "field_strength_z", "fwhm_z"]
    assert d["meta_layout"][4] == "category=working memory"


def test_fit_uses_training_values_and_priors_for_unobserved(schema: MetadataSchema) -> None:
    year = schema.field("year")
    assert year.observed and year.low == 1997 and year.high == 2018
    assert year.center == pytest.approx(2007.5)
    ss = schema.field("sample_size")
    assert ss.observed and ss.center == pytest.approx(np.log1p(np.linspace(10, 40, 10)).mean())
    fs = schema.field("field_strength")
    assert not fs.observed and fs.center == PRIORS["field_strength"]["center"]


def test_encode_missing_stays_missing(schema: MetadataSchema) -> None:
    meta, mask = schema.encode({"year": [2007.5, np.nan], "sample_size": [np.nan, 20.0]}, ["emotion", None])
    assert meta.shape == (2, 7) and mask.shape == (2, 5)
    np.testing.assert_array_equal(mask, [[1, 0, 0, 0, 1], [0, 1, 0, 0, 0]])
    assert meta[0, 0] == pytest.approx(0.0, abs=1e-6)  # year at the center
    assert meta[1, 0] == 0.0 and meta[0, 1] == 0.0  # missing -> 0 with mask 0
    np.testing.assert_array_equal(meta[0, 4:], [0, 1, 0])
    np.testing.assert_array_equal(meta[1, 4:], [0, 0, 0])
    assert schema.field("sample_size").inverse(meta[1, 1]) == pytest.approx(20.0)


def test_year_bins_are_equal_frequency(schema: MetadataSchema) -> None:
    years = np.arange(1997, 2019, dtype=float).repeat(5)
    counts = np.bincount(schema.year_bin(years), minlength=10)
    assert counts.sum() == len(years) and counts.min() >= 5 and counts.max() <= 20
    np.testing.assert_array_equal(schema.year_bin([np.nan, 1900, 2100]), [-1, 0, 9])


def test_round_trip(schema: MetadataSchema) -> None:
    again = MetadataSchema.from_dict(schema.to_dict())
    assert again == schema
    with pytest.raises(SchemaError, match="malformed"):
        MetadataSchema.from_dict({"categories": CATS})


@pytest.mark.parametrize(
    ("conditions", "message"),
    [
        ({"task": "juggling"}, "unknown task category 'juggling'; valid categories: working memory, emotion, other"),
        ({"year": 2030}, "outside the schema range"),
        ({"sample_size": -3}, "must be non-negative"),
        ({"colour": "red"}, "unknown condition 'colour'"),
        ({"year": float("nan")}, "must be finite"),
    ],
)
def test_invalid_conditions(schema: MetadataSchema, conditions: dict, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        schema.encode_conditions(conditions)


def test_extrapolation_allowed_on_request(schema: MetadataSchema) -> None:
    meta, mask = schema.encode_conditions({"task": "emotion", "year": 2030}, allow_extrapolation=True)
    assert mask[0] == 1 and meta[0] > schema.field("year").forward(2018)
    assert mask[1:4].sum() == 0 and mask[4] == 1


TOPIC_NAMES = [f"{i}_topic_{i}" for i in range(50)]


@pytest.fixture()
def topic_schema() -> MetadataSchema:
    years = np.arange(1997, 2019, dtype=float).repeat(5)
    return MetadataSchema.fit(
        CATS, {"year": years}, topic_names=TOPIC_NAMES, topic_keys=[f"word{i} other{i}" for i in range(50)]
    )


def test_groups_layout_with_topics(topic_schema: MetadataSchema) -> None:
    s = topic_schema
    assert s.meta_dim == 4 + 50 + len(CATS) == 57 and s.mask_dim == 6 and s.n_continuous == 4
    names = [(g.name, g.kind, g.meta_slice.start, g.meta_slice.stop, g.mask_index) for g in s.groups]
    assert names == [
        ("year", "continuous", 0, 1, 0),
        ("sample_size", "continuous", 1, 2, 1),
        ("field_strength", "continuous", 2, 3, 2),
        ("fwhm", "continuous", 3, 4, 3),
        ("topics", "vector", 4, 54, 4),
        ("task", "categorical", 54, 57, 5),
    ]
    d = s.to_dict()
    assert d["meta_layout"][4] == "topic=0_topic_0" and d["meta_layout"][54] == "category=working memory"
    assert d["mask_layout"] == [
        "year_observed", "sample_size_observed", "field_strength_observed", "fwhm_observed",
        "topics_observed", "category_observed",
    ]  # fmt: skip
    again = MetadataSchema.from_dict(d)
    assert again == s and again.topic_keys[3] == "word3 other3" and again.meta_dim == 57


def test_encode_conditions_topics_as_array_or_names(topic_schema: MetadataSchema) -> None:
    s, topics, task = topic_schema, topic_schema.group("topics"), topic_schema.group("task")
    weights = np.zeros(50)
    weights[[3, 7]] = [1.0, 3.0]
    meta_a, mask_a = s.encode_conditions({"topics": weights, "task": "emotion"})
    meta_d, mask_d = s.encode_conditions({"topics": {"3_topic_3": 2.0, "7_topic_7": 6.0}, "task": "emotion"})
    np.testing.assert_array_equal(meta_a, meta_d)
    np.testing.assert_array_equal(mask_a, mask_d)
    assert meta_a[topics.meta_slice][[3, 7]].tolist() == [0.25, 0.75]  # divided by the sum: a mixture
    assert mask_a.tolist() == [0, 0, 0, 0, 1, 1] and meta_a[task.meta_slice].tolist() == [0, 1, 0]
    meta_n, mask_n = s.encode_conditions({"topics": None, "task": None, "year": 2000})
    assert mask_n.tolist() == [1, 0, 0, 0, 0, 0] and not meta_n[4:].any()


@pytest.mark.parametrize(
    ("topics", "message"),
    [
        ({"juggling": 1.0}, "unknown topic 'juggling'"),
        (np.ones(49), "has 49 weights; give 50"),
        (-np.ones(50), "finite and non-negative"),
        (np.zeros(50), "all zero"),
        ({"0_topic_0": "lots"}, "must be a number"),
    ],
)
def test_invalid_topics(topic_schema: MetadataSchema, topics, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        topic_schema.encode_conditions({"topics": topics})


def test_topics_condition_needs_topics(schema: MetadataSchema) -> None:
    with pytest.raises(SchemaError, match="unknown condition 'topics'"):
        schema.encode_conditions({"topics": np.ones(50)})


def test_encode_rows_with_missing_topics(topic_schema: MetadataSchema) -> None:
    raw = np.full((2, 50), 0.02)
    raw[1] = np.nan
    meta, mask = topic_schema.encode({"year": [2000.0, np.nan], "topics": raw}, ["other", None])
    assert mask.tolist() == [[1, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]]
    assert meta[0, 4:54] == pytest.approx(np.full(50, 0.02)) and not meta[1].any()


def test_the_terms_group_follows_the_topics_and_round_trips(topic_schema: MetadataSchema) -> None:
    s = MetadataSchema.fit(
        CATS, {"year": np.arange(1997, 2019, dtype=float)}, topic_names=topic_schema.topic_names, term_dims=3
    )
    assert s.meta_dim == 4 + 50 + 3 + len(CATS) and s.mask_dim == 7 and s.vector_sizes == {"topics": 50, "terms": 3}
    terms = s.group("terms")
    assert (terms.kind, terms.meta_slice, terms.mask_index) == ("vector", slice(54, 57), 5)
    d = s.to_dict()
    assert d["meta_layout"][54:57] == ["term_embedding=0", "term_embedding=1", "term_embedding=2"]
    assert d["mask_layout"][5] == "terms_observed" and MetadataSchema.from_dict(d) == s
    meta, mask = s.encode_conditions({"terms": [0.5, -1.0, 2.0]})
    assert meta[terms.meta_slice].tolist() == [0.5, -1.0, 2.0] and mask.tolist() == [0, 0, 0, 0, 0, 1, 0]
    # an embedding is not a mixture: negative entries are kept, the length and finiteness are checked
    for bad, message in (([1.0, 2.0], "has 2 entries; give the 3 finite numbers"), ([np.nan] * 3, "finite numbers")):
        with pytest.raises(SchemaError, match=message):
            s.encode_conditions({"terms": bad})
    with pytest.raises(SchemaError, match="unknown condition 'terms'"):
        topic_schema.encode_conditions({"terms": [0.0]})


def test_each_field_declared_once() -> None:
    assert CONTINUOUS_FIELDS == tuple(d.name for d in FIELDS) == ("year", "sample_size", "field_strength", "fwhm")
    for d in FIELDS:
        assert PRIORS[d.name]["range"] == (d.low, d.high) and PRIORS[d.name]["center"] == d.center
        assert d.label and d.step > 0 and d.plausible_low <= d.low < d.high <= d.plausible_high
    assert FIELDS[0].whole and not FIELDS[2].whole and FIELDS[1].non_negative and not FIELDS[0].non_negative
    assert "year" in FIELDS[0].sources["neurosynth"]
    assert not FIELDS[2].sources and not FIELDS[3].sources  # no source records field strength or FWHM
    assert TOPICS.size == 50 and [c.name for c in CATEGORICALS] == ["task"]


def test_plausible_ranges() -> None:
    assert plausible("year", np.array([1e9, -5, 2005, np.nan])).tolist() == [False, False, True, False]
    assert plausible("sample_size", np.array([-3, 0, 12, 5e5])).tolist() == [False, False, True, False]


def test_second_categorical_block() -> None:
    s = MetadataSchema.fit(CATS, {}, extra_categoricals={"modality": ["fmri", "pet"]})
    assert s.meta_dim == 4 + 3 + 2 and s.mask_dim == 6
    meta, mask = s.encode_conditions({"task": "other", "modality": "pet"})
    assert meta[4:].tolist() == [0, 0, 1, 0, 1] and mask.tolist() == [0, 0, 0, 0, 1, 1]
    with pytest.raises(SchemaError, match="unknown modality value 'mri'"):
        s.encode_conditions({"modality": "mri"})
    assert MetadataSchema.from_dict(s.to_dict()) == s


def test_errors_share_the_package_base() -> None:
    from cbvae_ext.data import DataError
    from cbvae_ext.errors import CbvaeError

    assert issubclass(SchemaError, CbvaeError) and issubclass(SchemaError, ValueError)
    assert issubclass(DataError, CbvaeError) and issubclass(DataError, ValueError)


def test_declaration_fingerprint_follows_every_declaration(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deterministic (the dataset cache key holds it), and changed by any edit of FIELDS, TOPICS or CATEGORICALS."""
    import dataclasses
    import subprocess
    import sys
    from pathlib import Path

    import cbvae_ext.schema as schema_module

    base = schema_module.declaration_fingerprint()
    fresh = subprocess.run(
        [sys.executable, "-c", "from cbvae_ext.schema import declaration_fingerprint as f; print(f())"],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert len(base) == 64 and fresh.stdout.strip() == base  # the same in another interpreter (no hash seed)
    seen = {base}
    for name, value in [
        ("FIELDS", (dataclasses.replace(FIELDS[0], high=2030.0), *FIELDS[1:])),
        ("FIELDS", (*FIELDS, dataclasses.replace(FIELDS[3], name="echo_time"))),
        ("TOPICS", dataclasses.replace(TOPICS, size=100)),
        ("TERMS", dataclasses.replace(TERMS, size=32)),
        ("CATEGORICALS", (*CATEGORICALS, dataclasses.replace(CATEGORICALS[0], name="modality"))),
    ]:
        with monkeypatch.context() as m:
            m.setattr(schema_module, name, value)
            seen.add(schema_module.declaration_fingerprint())
    assert len(seen) == 6 and schema_module.declaration_fingerprint() == base
