"""The evaluation's PNG figures: panel layout, labels, legends and colour bars, from small synthetic results."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.image import imread
from matplotlib.patches import Patch

from cbvae_ext.evaluation.figures import (
    _category_maps_figure,
    _examples_figure,
    _identification_figure,
    _per_category_r_figure,
    _probes_figure,
    plot_category_maps,
    plot_probes,
    plot_recon_examples,
)

LABELS = ["working memory", "emotion and affective processing", "language"]
#: 4 mm RAS grid like the dataset's: voxel x ascending is towards the right
RAS = np.diag([4.0, 4.0, 4.0, 1.0]) + np.array([[0, 0, 0, -96], [0, 0, 0, -132], [0, 0, 0, -78], [0, 0, 0, 0]])


@pytest.fixture(autouse=True)
def _close_figures():
    """The ``_*_figure`` helpers hand back pyplot figures; close them so they do not pile up between tests."""
    yield
    plt.close("all")


def _probe(acc: float) -> dict:
    null = np.linspace(0.2, 0.3, 50)
    return {"balanced_accuracy": acc, "null": {"values": null.tolist(), "p95": 0.295}, "n_permutations": 50,
            "p_value": 0.04}  # fmt: skip


def _size(path) -> tuple[int, int]:
    height, width = imread(path).shape[:2]
    return width, height


def test_probes_lie_in_a_grid_of_models_by_probe_kind(tmp_path, foreign_savefig_settings):
    probes = {m: {"logistic": _probe(0.3), "mlp": _probe(0.4)} for m in ("cbvae", "baseline", "data_ceiling")}
    probes["baseline"].pop("mlp")
    adversary = {"cbvae": 0.27, "baseline": None, "data_ceiling": None}
    fig = _probes_figure(probes, adversary)
    grid = np.array(fig.axes).reshape(3, 2)
    assert [ax.get_title() for ax in grid[:, 0]] == [f"{m}: logistic (p=0.040)" for m in probes]
    assert grid[0, 1].get_title() == "cbvae: mlp (p=0.040)" and not grid[1, 1].axison  # no MLP probe: blank cell
    labels = [t.get_text() for t in grid[0, 0].get_legend().get_texts()]
    assert labels == ["null (50 perm.)", "probe 0.300", "null 95th pct", "adversary 0.270"]
    assert "adversary" not in " ".join(t.get_text() for t in grid[2, 0].get_legend().get_texts())
    width, height = _size(plot_probes(probes, adversary, tmp_path / "probes.png"))
    assert width / height < 4 and height / width < 4  # was a 1 x 6 strip


def test_identification_explains_its_boxes():
    res = {"labels": LABELS, "r": np.eye(3).tolist(), "best": [0, 2, 2], "n_correct": 2, "n_groups": 3}
    fig = _identification_figure(res, {**res, "best": [0, 1, 2], "n_correct": 3})
    (legend,) = fig.legends
    handles = legend.legend_handles
    assert all(isinstance(h, Patch) for h in handles)
    assert [tuple(h.get_edgecolor()[:3]) for h in handles] == [(1.0, 1.0, 1.0), (1.0, 0.0, 0.0)]
    assert "identified" in handles[0].get_label() and "another category" in handles[1].get_label()
    # the red box of the first panel sits on row 1, column 2 (its best match)
    red = [p.get_xy() for p in fig.axes[0].patches if tuple(p.get_edgecolor()[:3]) == (1.0, 0.0, 0.0)]
    assert red == [(1.5, 0.5)]


def test_per_category_legend_leaves_the_bars_uncovered():
    per = {p: {c: {"mean": 0.5, "n": 3} for c in LABELS} for p in ("C-β-VAE", "baseline VAE", "PCA 16")}
    fig = _per_category_r_figure(per)
    fig.canvas.draw()
    (ax,) = fig.axes
    legend, frame = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 >= frame.x1  # beside the axes, not over the bars
    assert legend.x1 <= fig.bbox.x1  # and still on the page
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(per)


def _category_columns(mask: np.ndarray) -> dict[str, np.ndarray]:
    x = np.indices(mask.shape)[0][mask].astype(np.float32)
    return {"C-β-VAE conditional mean": np.stack([x, 2 * x, 3 * x]), "held-out mean": np.stack([x, x, x])}


@pytest.mark.parametrize(("affine", "sides"), [(RAS, ("L", "R")), (np.diag([-4.0, 4.0, 4.0, 1.0]), ("R", "L"))])
def test_category_maps_mark_the_sides_and_share_a_scaled_colour_bar(affine, sides):
    mask = np.zeros((12, 14, 10), dtype=bool)
    mask[2:10, 2:12, 2:8] = True
    fig = _category_maps_figure(_category_columns(mask), mask, affine, LABELS)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 2 * len(LABELS) and len(fig.axes) == len(panels) + 1  # one shared colour bar
    for ax in panels:
        left, right = sorted(ax.texts, key=lambda t: t.get_position()[0])
        assert (left.get_text(), right.get_text()) == sides
    bar = next(ax for ax in fig.axes if ax.get_label() == "<colorbar>")
    assert "own maximum" in bar.get_ylabel() and bar.get_ylim() == (0.0, 1.0)
    # each map is scaled to its own maximum: the MIP's brightest voxel is 1 whatever the map's scale
    maps = [im.get_array() for ax in panels for im in ax.get_images()[1:]]
    assert all(float(m.max()) == pytest.approx(1.0) for m in maps)
    # x ascending runs left to right: the ramp along x is brightest at the image's right edge
    assert all(np.argmax(m.max(axis=0)) == 9 for m in maps)


def test_category_maps_png(tmp_path, foreign_savefig_settings):
    mask = np.ones((12, 14, 10), dtype=bool)
    width, height = _size(plot_category_maps(_category_columns(mask), mask, RAS, LABELS, tmp_path / "maps.png"))
    assert 0.25 < width / height < 4


def test_recon_examples_label_rows_and_columns_once_with_one_colour_bar(tmp_path, foreign_savefig_settings):
    from nilearn.datasets import load_mni152_template

    vol = np.zeros((2, 20, 24, 20), dtype=np.float32)
    vol[0, 10, 12, 10] = vol[1, 6, 8, 12] = 1.0
    volumes, affine = {"real": vol, "C-β-VAE": vol * 0.5}, RAS * [2, 2, 2, 1]
    ids = ["neurosynth:12345678-1", "neurostore:a-rather-long-analysis-identifier-0123456789"]
    fig = _examples_figure(volumes, affine, ids, load_mni152_template(resolution=2))
    # row labels, then column headers, each once and whole (were "name | id" per panel, cut at 60 characters)
    assert [t.get_text() for t in fig.texts] == [*ids, "real", "C-β-VAE"]
    bars = [ax for ax in fig.axes if ax.get_ylabel().startswith("modeled activation")]
    assert len(bars) == 1 and bars[0].get_ylim() == (0.0, 1.0)
    width, height = _size(plot_recon_examples(volumes, affine, ids, tmp_path / "examples.png"))
    assert (width, height) == (round(100 * (0.4 + 2 * 5.0 + 1.0)), round(100 * (0.35 + 2 * 2.0 + 0.1)))
