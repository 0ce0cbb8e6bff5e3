"""The committed Neurosynth-layout fixture: intact, licensed, and what the generator script makes from the real files."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse

from cbvae_ext.data.sources import NEUROSYNTH_FILES, read_neurosynth

FIXTURE = Path(__file__).resolve().parent / "data" / "neurosynth"


def test_fixture_is_intact_and_keeps_the_odbl_attribution() -> None:
    sums = dict(line.split()[::-1] for line in (FIXTURE / "SHA256SUMS").read_text().splitlines() if line)
    assert set(NEUROSYNTH_FILES.values()) <= set(sums)
    for name, digest in sums.items():
        assert hashlib.sha256((FIXTURE / name).read_bytes()).hexdigest() == digest, name
    assert "Open Database License" in (FIXTURE / "LICENSE.txt").read_text()
    readme = (FIXTURE / "README.md").read_text()
    assert "ODbL" in readme and "Yarkoni" in readme
    assert sum(p.stat().st_size for p in FIXTURE.iterdir()) < 512 * 1024  # a few hundred KB
    source = read_neurosynth(FIXTURE)  # the builder reads it like the real release
    assert 250 <= len(source.rows) <= 400 and source.topics.shape == (len(source.rows), 50)
    np.testing.assert_allclose(source.topics.sum(axis=1), 1.0, atol=1e-6)
    assert source.rows["category"].nunique() == 15


@pytest.mark.full_data
def test_generator_reproduces_the_fixture(neurosynth_dir: Path, tmp_path: Path, repo_root: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_fixture", repo_root / "scripts" / "make_neurosynth_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.make_fixture(neurosynth_dir, tmp_path)
    for name in [NEUROSYNTH_FILES["coordinates"], NEUROSYNTH_FILES["metadata"], "README.md", "LICENSE.txt"]:
        assert (tmp_path / name).read_bytes() == (FIXTURE / name).read_bytes(), name
    ours = scipy.sparse.load_npz(tmp_path / NEUROSYNTH_FILES["features"])
    committed = scipy.sparse.load_npz(FIXTURE / NEUROSYNTH_FILES["features"])
    assert ours.format == committed.format == "csc" and (ours != committed).nnz == 0
    # rows of the features follow the metadata rows: the fixture's weights are the real studies' weights
    real, small = read_neurosynth(neurosynth_dir), read_neurosynth(FIXTURE)
    index = {i: n for n, i in enumerate(real.rows["id"])}
    np.testing.assert_array_equal(small.topics, real.topics[[index[i] for i in small.rows["id"]]])


def test_nimare_fetcher_brings_every_file_the_builder_reads() -> None:
    """``fetch_neurosynth(version="7", source="abstract", vocab="LDA50")`` downloads what ``read_neurosynth`` reads."""
    import json

    import nimare

    manifest = json.loads((Path(nimare.__file__).parent / "resources" / "database_file_manifest.json").read_text())
    fetched: set[str] = set()
    for database in manifest:
        if database["coordinates"] == NEUROSYNTH_FILES["coordinates"]:
            fetched |= {database["coordinates"], database["metadata"]}
            for features in database["features"]:
                if features["features"] == NEUROSYNTH_FILES["features"]:
                    fetched |= set(features.values())
    assert set(NEUROSYNTH_FILES.values()) <= fetched
