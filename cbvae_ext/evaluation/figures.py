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

__all__ = ["plot_per_category_r", "plot_probes", "plot_recon_examples"]


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
