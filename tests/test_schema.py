"""The metadata vector: encoding, missing values, year bins, validation and round trips."""

from __future__ import annotations

import numpy as np
import pytest

from cbvae_ext.schema import CONTINUOUS_FIELDS, PRIORS, MetadataSchema, SchemaError

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
