"""PNG figures written next to ``test_results.json``."""

from __future__ import annotations

import gc
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

__all__ = [
    "plot_category_maps",
    "plot_identification",
    "plot_pca_curve",
    "plot_per_category_r",
    "plot_probes",
    "plot_recon_examples",
    "plot_reliability",
]


@contextmanager
def _frozen_gc() -> Iterator[None]:
    """Hide the existing heap from the collector: nilearn calls ``gc.collect()`` for every image it reads,
    which costs seconds per panel in a process holding torch and a dataset."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def plot_recon_examples(
    volumes: Mapping[str, np.ndarray], affine: np.ndarray, titles: Sequence[str], path: str | Path
) -> Path:
    """Orthogonal slices over the MNI152 template, one row per study, one column per source.

    Args:
        volumes: column name (e.g. ``"real"``, ``"C-β-VAE"``, ``"baseline VAE"``) to ``[n, D, H, W]`` maps in [0, 1].
        affine: voxel-to-MNI affine of the maps.
        titles: one label per study (row).
        path: PNG path.
    """
    from nilearn.datasets import load_mni152_template
    from nilearn.plotting import plot_stat_map  # noqa: F401 - imported before freezing so its modules are frozen too

    with _frozen_gc():
        template = load_mni152_template(resolution=2)
        _draw_examples(volumes, affine, titles, template, path)
    return Path(path)


def _draw_examples(
    volumes: Mapping[str, np.ndarray], affine: np.ndarray, titles: Sequence[str], template: Any, path: str | Path
) -> None:
    from nilearn.plotting import plot_stat_map

    columns = list(volumes)
    n = len(titles)
    fig, axes = plt.subplots(n, len(columns), figsize=(4.2 * len(columns), 1.9 * n), dpi=90, squeeze=False)
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
                vmax=1.0,
                threshold=0.05,
                colorbar=False,
                annotate=False,
                draw_cross=False,
                cmap="hot",
                title=f"{name} | {titles[i]}"[:60],
            )
    fig.savefig(path)
    plt.close(fig)


def plot_per_category_r(per_category: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Grouped bars of mean Pearson r per task category, one bar per predictor.

    Args:
        per_category: predictor name to ``{category: {"mean": r, "n": count}}``.
        path: PNG path.
    """
    predictors = list(per_category)
    categories = sorted({c for p in predictors for c in per_category[p]})
    width = 0.8 / max(len(predictors), 1)
    x = np.arange(len(categories))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(categories) + 2), 4), dpi=100)
    for k, name in enumerate(predictors):
        means = [per_category[name].get(c, {}).get("mean") for c in categories]
        ax.bar(x + k * width, [np.nan if m is None else m for m in means], width, label=name)
    ax.set_xticks(x + 0.4 - width / 2, categories, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("mean Pearson r (in mask)")
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_probes(
    probes: Mapping[str, Mapping[str, Any]], adversary: Mapping[str, float | None], path: str | Path
) -> Path:
    """Each probe's test balanced accuracy against the histogram of its permutation null.

    Args:
        probes: model name to the ``year_probes`` result (``{"logistic": {...}, "mlp": {...}}``).
        adversary: model name to the adversarial head's balanced accuracy (None when it has none).
        path: PNG path.
    """
    panels = [(m, p) for m, res in probes.items() for p in ("logistic", "mlp") if p in res]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(3.6 * max(len(panels), 1), 3.2), dpi=100, squeeze=False)
    for ax, (model, probe) in zip(axes[0], panels, strict=False):
        res = probes[model][probe]
        ax.hist(res["null"]["values"], bins=20, color="0.7", label=f"null ({res['n_permutations']} perm.)")
        ax.axvline(res["balanced_accuracy"], color="tab:red", lw=2, label=f"probe {res['balanced_accuracy']:.3f}")
        if res["null"]["p95"] is not None:
            ax.axvline(res["null"]["p95"], color="k", ls=":", label="null 95th pct")
        if adversary.get(model) is not None:
            ax.axvline(adversary[model], color="tab:blue", ls="--", label=f"adversary {adversary[model]:.3f}")
        ax.set_title(f"{model}: {probe} (p={res['p_value']:.3f})", fontsize=9)
        ax.set_xlabel("balanced accuracy (year bin)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_identification(model: Mapping[str, Any], reference: Mapping[str, Any], path: str | Path) -> Path:
    """Category identification: r of each generated category map (rows) with each held-out category mean (columns).

    Args:
        model: ``identification`` result for the model's conditional mean maps.
        reference: the same for the training category means (the bar to reach).
        path: PNG path.
    """
    labels = model["labels"]
    fig, axes = plt.subplots(1, 2, figsize=(2 * (0.45 * len(labels) + 3), 0.45 * len(labels) + 2.5), dpi=100)
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
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_category_maps(
    columns: Mapping[str, np.ndarray], mask: np.ndarray, labels: Sequence[str], path: str | Path
) -> Path:
    """Axial maximum-intensity projections, one row per category, one column per source (each map scaled to its max).

    Args:
        columns: source name to ``[C, V]`` in-mask maps, rows in ``labels`` order.
        mask: bool brain mask ``[D, H, W]``.
        labels: category names.
        path: PNG path.
    """
    names = list(columns)
    fig, axes = plt.subplots(
        len(labels), len(names), figsize=(2.2 * len(names), 1.9 * len(labels)), dpi=80, squeeze=False
    )
    outline = mask.max(axis=2).T
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
            if i == 0:
                ax.set_title(name, fontsize=8)
            if j == 0:
                ax.set_ylabel(label[:22], fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


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
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


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
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
