"""PNG figures written next to ``test_results.json``.

Each ``plot_*`` function builds its figure in a ``_*_figure`` helper (which tests inspect) and saves it with
``_save``.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colorbar import Colorbar  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from cbvae_ext.evaluation.debiasing import PROBES  # noqa: E402
from cbvae_ext.heap import frozen_heap  # noqa: E402
from cbvae_ext.run_folder import write_png_atomically  # noqa: E402

__all__ = [
    "plot_category_maps",
    "plot_identification",
    "plot_pca_curve",
    "plot_per_category_r",
    "plot_probes",
    "plot_recon_examples",
    "plot_reliability",
]

#: maps shown in ``recon_examples.png`` hide values below this (the background of an MA map)
EXAMPLE_THRESHOLD = 0.05


def _save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG and release it from pyplot."""
    try:
        return write_png_atomically(fig, path)
    finally:
        plt.close(fig)


def _unit_colorbar(fig: Figure, cmap: str, label: str, **where: Any) -> Colorbar:
    """One colour bar for 0 to 1 shared by every panel (``where``: ``cax=`` or ``ax=`` of ``Figure.colorbar``)."""
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap=cmap), **where)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return bar


def plot_recon_examples(
    volumes: Mapping[str, np.ndarray], affine: np.ndarray, titles: Sequence[str], path: str | Path
) -> Path:
    """Orthogonal slices over the MNI152 template, one row per study, one column per source.

    Args:
        volumes: column name (e.g. ``"real"``, ``"C-β-VAE"``, ``"baseline VAE"``) to ``[n, D, H, W]`` maps in [0, 1]
            (the real modeled-activation map and each model's reconstructed voxel probabilities).
        affine: voxel-to-MNI affine of the maps.
        titles: one label per study (row).
        path: PNG path.
    """
    from nilearn.datasets import load_mni152_template
    from nilearn.plotting import plot_stat_map  # noqa: F401 - imported before freezing so its modules are frozen too

    with frozen_heap():
        template = load_mni152_template(resolution=2)
        fig = _examples_figure(volumes, affine, titles, template)
    return _save(fig, path)


def _examples_figure(
    volumes: Mapping[str, np.ndarray], affine: np.ndarray, titles: Sequence[str], template: Any
) -> Figure:
    from nilearn.plotting import plot_stat_map

    columns = list(volumes)
    n = len(titles)
    # margins in inches: row labels on the left, column headers on top, the shared colour bar on the right
    panel_w, panel_h, left, top, right, bottom = 5.0, 2.0, 0.4, 0.35, 1.0, 0.1
    width, height = left + panel_w * len(columns) + right, top + panel_h * n + bottom
    fig, axes = plt.subplots(n, len(columns), figsize=(width, height), dpi=100, squeeze=False)
    fig.subplots_adjust(
        left=left / width,
        right=1 - right / width,
        top=1 - top / height,
        bottom=bottom / height,
        wspace=0.03,
        hspace=0.04,
    )
    real = volumes[columns[0]]
    for i in range(n):
        # every column of a row cuts through the real map's peak so the panels are comparable
        peak = np.unravel_index(int(np.argmax(real[i])), real[i].shape)
        cut = tuple(float(c) for c in (affine @ np.r_[peak, 1.0])[:3])
        for j, name in enumerate(columns):
            img = nib.Nifti1Image(np.asarray(volumes[name][i], dtype=np.float32), affine)
            plot_stat_map(
                img,
                bg_img=template,
                axes=axes[i, j],
                display_mode="ortho",
                cut_coords=cut,
                vmin=0.0,
                vmax=1.0,
                threshold=EXAMPLE_THRESHOLD,
                colorbar=False,
                annotate=False,
                draw_cross=False,
                cmap="hot",
            )
        box = axes[i, 0].get_position()
        fig.text(
            0.5 * left / width, (box.y0 + box.y1) / 2, titles[i], rotation=90, ha="center", va="center", fontsize=8
        )
    for j, name in enumerate(columns):
        box = axes[0, j].get_position()
        fig.text((box.x0 + box.x1) / 2, 1 - 0.5 * top / height, name, ha="center", va="center", fontsize=10)
    # nilearn draws each panel in its own axes, so the bar gets a slot of its own: 3 in tall at most, centred
    bar_h = min(panel_h * n, 3.0) / height
    cax = fig.add_axes(
        (1 - 0.75 * right / width, 0.5 * (1 + bottom / height - top / height - bar_h), 0.15 / width, bar_h)
    )
    _unit_colorbar(
        fig, "hot", f"modeled activation / predicted probability\n(hidden below {EXAMPLE_THRESHOLD})", cax=cax
    )
    return fig


def plot_per_category_r(per_category: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Grouped bars of mean Pearson r per task category, one bar per predictor.

    Args:
        per_category: predictor name to ``{category: {"mean": r, "n": count}}``.
        path: PNG path.
    """
    return _save(_per_category_r_figure(per_category), path)


def _per_category_r_figure(per_category: Mapping[str, Mapping[str, Any]]) -> Figure:
    predictors = list(per_category)
    categories = sorted({c for p in predictors for c in per_category[p]})
    width = 0.8 / max(len(predictors), 1)
    x = np.arange(len(categories))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(categories) + 2) + 2.0, 4), dpi=100, layout="constrained")
    for k, name in enumerate(predictors):
        means = [per_category[name].get(c, {}).get("mean") for c in categories]
        ax.bar(x + k * width, [np.nan if m is None else m for m in means], width, label=name)
    ax.set_xticks(x + 0.4 - width / 2, categories, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("mean Pearson r (in mask)")
    ax.axhline(0, color="k", lw=0.5)
    # beside the axes: inside, the legend hid the bars of the first categories
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="predictor")
    return fig


def plot_probes(
    probes: Mapping[str, Mapping[str, Any]], adversary: Mapping[str, float | None], path: str | Path
) -> Path:
    """Each probe's test balanced accuracy against the histogram of its permutation null.

    One row per model, one column per probe kind (logistic, MLP).

    Args:
        probes: model name to the ``year_probes`` result (``{"logistic": {...}, "mlp": {...}}``).
        adversary: model name to the adversarial head's balanced accuracy (None when it has none).
        path: PNG path.
    """
    return _save(_probes_figure(probes, adversary), path)


def _probes_figure(probes: Mapping[str, Mapping[str, Any]], adversary: Mapping[str, float | None]) -> Figure:
    kinds = [k for k in PROBES if any(k in res for res in probes.values())] or list(PROBES)
    models = list(probes) or [""]
    fig, axes = plt.subplots(
        len(models), len(kinds), figsize=(3.8 * len(kinds), 2.9 * len(models)), dpi=100, squeeze=False,
        sharex=True, layout="constrained",
    )  # fmt: skip
    for i, model in enumerate(models):
        for j, probe in enumerate(kinds):
            ax = axes[i, j]
            res = probes.get(model, {}).get(probe)
            if res is None:  # a result without this probe: a blank cell keeps the grid
                ax.set_axis_off()
                continue
            ax.hist(res["null"]["values"], bins=20, color="0.7", label=f"null ({res['n_permutations']} perm.)")
            ax.axvline(res["balanced_accuracy"], color="tab:red", lw=2, label=f"probe {res['balanced_accuracy']:.3f}")
            if res["null"]["p95"] is not None:
                ax.axvline(res["null"]["p95"], color="k", ls=":", label="null 95th pct")
            if adversary.get(model) is not None:
                ax.axvline(adversary[model], color="tab:blue", ls="--", label=f"adversary {adversary[model]:.3f}")
            ax.set_title(f"{model}: {probe} (p={res['p_value']:.3f})", fontsize=9)
            ax.legend(fontsize=6)
            if i == len(models) - 1:
                ax.set_xlabel("balanced accuracy (year bin)")
            if j == 0:
                ax.set_ylabel("permutations")
    return fig


def plot_identification(model: Mapping[str, Any], reference: Mapping[str, Any], path: str | Path) -> Path:
    """Category identification: r of each generated category map (rows) with each held-out category mean (columns).

    Each row's box marks its best-matching column: white on the diagonal (identified), red elsewhere.

    Args:
        model: ``identification`` result for the model's conditional mean maps.
        reference: the same for the training category means (the bar to reach).
        path: PNG path.
    """
    return _save(_identification_figure(model, reference), path)


def _identification_figure(model: Mapping[str, Any], reference: Mapping[str, Any]) -> Figure:
    labels = model["labels"]
    size = 0.45 * len(labels)
    fig, axes = plt.subplots(1, 2, figsize=(2 * (size + 3), size + 3.0), dpi=100, layout="constrained")
    for ax, res, title in (
        (axes[0], model, "C-β-VAE conditional mean"),
        (axes[1], reference, "training category mean"),
    ):
        r = np.asarray(res["r"], dtype=np.float64)
        im = ax.imshow(r, cmap="viridis")
        for i, j in enumerate(res["best"]):
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red" if i != j else "white", lw=1.5))
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("held-out category mean map")
        ax.set_title(f"{title}: {res['n_correct']}/{res['n_groups']} identified", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.7, label="Pearson r")
    axes[0].set_ylabel("generated for category")
    # a dark face (a low r) on a grey legend, so the white edge shows as it does on the matrix
    face = plt.get_cmap("viridis")(0.1)
    fig.legend(
        handles=[
            Patch(fc=face, ec="white", lw=1.5, label="best match is the row's own category (identified)"),
            Patch(fc=face, ec="red", lw=1.5, label="best match is another category (not identified)"),
        ],
        loc="outside lower center", ncol=2, fontsize=8, facecolor="0.75", edgecolor="none",
        handlelength=1.5, handleheight=1.5,
        title="box: the held-out mean each generated map correlates with best", title_fontsize=8,
    )  # fmt: skip
    return fig


def plot_category_maps(
    columns: Mapping[str, np.ndarray], mask: np.ndarray, affine: np.ndarray, labels: Sequence[str], path: str | Path
) -> Path:
    """Axial maximum-intensity projections, one row per category, one column per source (each map scaled to its max).

    Args:
        columns: source name to ``[C, V]`` in-mask maps, rows in ``labels`` order.
        mask: bool brain mask ``[D, H, W]``.
        affine: voxel-to-MNI affine of the mask: its first axis sets which side of the image is L and which R.
        labels: category names.
        path: PNG path.
    """
    return _save(_category_maps_figure(columns, mask, affine, labels), path)


def _sides(affine: np.ndarray) -> tuple[str, str] | None:
    """The anatomical sides at the left and right of an image whose columns are voxel x ascending (None: oblique)."""
    first = nib.aff2axcodes(np.asarray(affine))[0]
    return {"R": ("L", "R"), "L": ("R", "L")}.get(first)


def _mark_sides(ax: Axes, sides: tuple[str, str] | None) -> None:
    if sides is None:
        return
    for x, side, ha in ((0.03, sides[0], "left"), (0.97, sides[1], "right")):
        ax.text(x, 0.04, side, transform=ax.transAxes, ha=ha, va="bottom", fontsize=7, fontweight="bold", color="0.2")


def _category_maps_figure(
    columns: Mapping[str, np.ndarray], mask: np.ndarray, affine: np.ndarray, labels: Sequence[str]
) -> Figure:
    names = list(columns)
    fig, axes = plt.subplots(
        len(labels), len(names), figsize=(2.2 * len(names) + 0.9, 1.9 * len(labels) + 0.3), dpi=80, squeeze=False,
        layout="constrained",
    )  # fmt: skip
    # x voxel index runs left to right (transpose, origin lower), so the image's left is the side x decreases to
    outline = mask.max(axis=2).T
    sides = _sides(affine)
    for j, name in enumerate(names):
        vol = np.zeros((len(labels), *mask.shape), dtype=np.float32)
        vol[:, mask] = columns[name]
        for i, label in enumerate(labels):
            mip = vol[i].max(axis=2).T
            ax = axes[i, j]
            ax.imshow(outline, cmap="gray", origin="lower", alpha=0.25)
            ax.imshow(
                np.ma.masked_where(~outline, mip / max(float(mip.max()), 1e-12)),
                cmap="hot",
                origin="lower",
                vmin=0,
                vmax=1,
            )
            ax.set_xticks([])
            ax.set_yticks([])
            _mark_sides(ax, sides)
            if i == 0:
                ax.set_title(name, fontsize=8)
            if j == 0:
                ax.set_ylabel(textwrap.fill(label, 22), fontsize=7)
    _unit_colorbar(
        fig,
        "hot",
        "fraction of the map's own maximum\n(axial maximum projection)",
        ax=axes,
        shrink=min(1.0, 4 / len(labels)),
        fraction=0.05,
        aspect=25,
    )
    return fig


def plot_pca_curve(curve: Sequence[Mapping[str, Any]], equivalent: Mapping[str, Any], path: str | Path) -> Path:
    """PCA reconstruction quality against the number of components, with the model's level as a line.

    Args:
        curve: ``baselines.pca_curve`` entries (``n_components`` and per-metric summaries).
        equivalent: ``pca_equivalent`` (the model's mean per metric and its PCA-equivalent dimension).
        path: PNG path.
    """
    metrics = [m for m in ("pearson_r", "dice_top5", "dice_top1") if m in equivalent]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.2), dpi=100, squeeze=False)
    dims = [c["n_components"] for c in curve]
    for ax, m in zip(axes[0], metrics, strict=True):
        means = [c[m]["mean"] for c in curve]
        lo = [c[m]["ci95"][0] for c in curve]
        hi = [c[m]["ci95"][1] for c in curve]
        ax.fill_between(dims, lo, hi, color="0.8")
        ax.plot(dims, means, "o-", color="k", label="PCA (fit on train)")
        eq = equivalent[m]
        ax.axhline(eq["model"], color="tab:red", label="C-β-VAE")
        if eq.get("components"):
            ax.axvline(eq["components"], color="tab:red", ls=":", label=f"≈ {eq['components']:.0f} components")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("PCA components")
        ax.set_title(m, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_reliability(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path) -> Path:
    """Reliability diagram: observed frequency of the event against the predicted probability, per predictor.

    Args:
        curves: label -> ``expected_calibration_error`` bins (``mean_predicted``, ``observed_frequency``, ``n``).
        path: PNG path.
    """
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.8), dpi=100)
    axes[0].plot([0, 1], [0, 1], color="0.6", ls="--", label="perfect calibration")
    for label, bins in curves.items():
        full = [b for b in bins if b["n"]]
        x = [b["mean_predicted"] for b in full]
        axes[0].plot(x, [b["observed_frequency"] for b in full], "o-", ms=3, label=label)
        axes[1].plot(x, [b["n"] for b in full], "o-", ms=3, label=label)
    axes[0].set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted probability (bin mean)", ylabel="observed frequency")
    axes[0].set_title("reliability (test split, every study x voxel)", fontsize=9)
    axes[0].legend(fontsize=6, loc="upper left")
    axes[1].set(yscale="log", xlim=(0, 1), xlabel="predicted probability (bin mean)", ylabel="(study, voxel) pairs")
    axes[1].set_title("pairs per bin", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
