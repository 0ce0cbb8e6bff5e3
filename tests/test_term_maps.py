"""cbvae_ext.evaluation.term_maps on the tiny run: the app's words rule, NeuroQuery and the studies whose text
uses each term, drawn as a real PNG with the r table printed; bad input is one error line and no file."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import run_python
from PIL import Image

from cbvae_ext import inference
from cbvae_ext.data import load_dataset_info
from cbvae_ext.data.neuroquery import load_terms
from cbvae_ext.evaluation.metrics import pearson_r
from cbvae_ext.evaluation.passes import load_split
from cbvae_ext.evaluation.term_maps import (
    ALL_STUDIES,
    HELDOUT_COLUMN,
    MODEL_COLUMN,
    NEUROQUERY_COLUMN,
    TRAINING_COLUMN,
    term_maps,
)

REPO = Path(__file__).resolve().parents[1]
TERMS = ["memory", "visual"]  # used by training and test studies of the fixture


def _cli(*args: str) -> subprocess.CompletedProcess:
    return run_python(["-m", "cbvae_ext.evaluation.term_maps", *args], cwd=REPO, timeout=600)


def test_the_maps_are_the_words_rule_neuroquery_and_the_studies_using_each_term(
    tiny_runs: dict[str, Path], tiny_dataset: Path
) -> None:
    maps, mask, _ = term_maps(tiny_runs["cbvae"], tiny_dataset, TERMS)
    info = load_dataset_info(tiny_dataset)
    text = load_terms(tiny_dataset)
    for split, column, counts in (("train", TRAINING_COLUMN, maps.n_train), ("test", HELDOUT_COLUMN, maps.n_test)):
        rows = info.rows(split)
        split_maps = load_split(info, rows).maps
        for i, term in enumerate(TERMS):
            uses = text.tfidf[rows][:, text.vocabulary.index(term)].toarray()[:, 0] > 0
            assert counts[i] == uses.sum() > 0, (split, term)
            np.testing.assert_allclose(maps.columns[column][i], split_maps[uses].mean(axis=0), rtol=1e-5, atol=1e-7)
    # the words mean something: each term's map differs from the map with every condition missing
    model = inference.load(tiny_runs["cbvae"])
    unknown = model.conditional_mean({}).map[mask]
    assert all(maps.recognised)
    for i in range(len(TERMS)):
        assert np.abs(maps.columns[MODEL_COLUMN][i] - unknown).max() > 1e-4
    assert np.abs(maps.columns[NEUROQUERY_COLUMN][0] - maps.columns[NEUROQUERY_COLUMN][1]).max() > 1e-6
    target = maps.columns[HELDOUT_COLUMN]
    for name in (MODEL_COLUMN, NEUROQUERY_COLUMN, TRAINING_COLUMN):
        np.testing.assert_allclose(maps.r[name], pearson_r(maps.columns[name], target), rtol=1e-6)
    assert set(maps.r) == {MODEL_COLUMN, NEUROQUERY_COLUMN, TRAINING_COLUMN, ALL_STUDIES}


def test_the_command_draws_one_row_per_term_and_prints_the_table(
    tmp_path: Path, tiny_runs: dict[str, Path], tiny_dataset: Path
) -> None:
    out = tmp_path / "term_maps.png"
    proc = _cli("--run_dir", str(tiny_runs["cbvae"]), "--dataset_dir", str(tiny_dataset), "--out", str(out),
                "--terms", ",".join(TERMS), "--no-neuroquery")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    with Image.open(out) as png:
        width, height = png.size
    assert height > 1.5 * 80 * len(TERMS) and width > 80 * 2.2 * 3  # rows of terms, three columns (no NeuroQuery)
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| term")]
    assert [r.split(" | ")[0].strip("| ") for r in rows[1:]] == TERMS
    assert "NeuroQuery" not in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--terms", "memory,zzqqxx"], "error: term 'zzqqxx' is not in NeuroQuery's vocabulary"),
        (["--terms", " , "], "error: no terms given; pass --terms 'pain,reward' (comma-separated)"),
        (["--baseline"], "has no conditional-mean path; give a C-β-VAE run"),
    ],
)
def test_bad_input_is_one_error_line_and_no_file(
    tmp_path: Path, tiny_runs: dict[str, Path], tiny_dataset: Path, args: list[str], message: str
) -> None:
    run = tiny_runs["baseline" if args == ["--baseline"] else "cbvae"]
    args = [] if args == ["--baseline"] else args
    out = tmp_path / "term_maps.png"
    proc = _cli("--run_dir", str(run), "--dataset_dir", str(tiny_dataset), "--out", str(out), *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert not out.exists()
