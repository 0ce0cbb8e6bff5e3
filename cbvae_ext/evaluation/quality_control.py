"""Quality control: does the typicality score tell a corrupted copy of a held-out study from the clean one?

Each test study's peaks (recovered from its MA map: ``passes.peak_indicator``, the voxel centres in MNI mm) are
rendered again with the dataset's kernel (the clean copy, through ``StudyContext.render``, the study package's
path for a user's peaks) and corrupted four ways, each rendered the same way:

* ``flip_x``: x sign flipped (left and right swapped);
* ``tal_as_mni``: the MNI peaks converted to Talairach (``nimare.utils.mni2tal``) and then read as MNI;
* ``shift_10mm``: every peak moved 10 mm in its own uniformly random direction (seeded);
* ``random``: as many peaks drawn uniformly from the in-mask voxels (seeded).

Every copy is scored with ``StudyContext.score`` (every condition unknown) by each typicality score: the default
``peak_density`` (mean log density of the model's prior-predictive map at the copy's peak voxels, per peak) and
``elbo`` (ELBO plus entropy floor, a whole-map total that grows with the number of peaks, so the spread between
studies swamps what a corruption changes); the ROC AUC of the score separating clean (positive) from corrupted copies is reported per corruption
with a bootstrap CI over studies (a resampled study brings both its copies). A flipped copy of a nearly
left-right symmetric study is nearly the clean map: such studies are counted (r(clean, flipped) above
``SYMMETRIC_R``) and the AUC without them is given beside the AUC over every study, which the criterion reads.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cbvae_ext.evaluation.columns import MODEL, QC, column
from cbvae_ext.evaluation.metrics import pearson_r
from cbvae_ext.evaluation.passes import peak_indicator
from cbvae_ext.evaluation.section import EvalData, Section

__all__ = ["CORRUPTIONS", "SYMMETRIC_R", "corrupt", "paired_auc", "quality_control_section", "roc_auc"]

#: The corruptions, in report order.
CORRUPTIONS = ("flip_x", "tal_as_mni", "shift_10mm", "random")
#: A study whose flipped copy correlates above this with its clean copy is called nearly symmetric.
SYMMETRIC_R = 0.9
#: Criterion thresholds of the AUC per corruption.
THRESHOLDS = {"flip_x": 0.9, "random": 0.9, "tal_as_mni": 0.7, "shift_10mm": 0.7}
SHIFT_MM = 10.0


def roc_auc(clean: np.ndarray, corrupted: np.ndarray) -> float:
    """P(score of a clean copy > score of a corrupted copy), ties half (the Mann-Whitney AUC)."""
    a, b = np.asarray(clean, np.float64), np.asarray(corrupted, np.float64)
    if not a.size or not b.size:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([a, b]))
    return float((ranks[: a.size].sum() - a.size * (a.size + 1) / 2) / (a.size * b.size))


def paired_auc(clean: np.ndarray, corrupted: np.ndarray, n_bootstrap: int, seed: int) -> dict[str, Any]:
    """AUC with a percentile 95% CI over studies resampled with replacement (each brings both its copies)."""
    ok = np.isfinite(clean) & np.isfinite(corrupted)
    a, b = np.asarray(clean)[ok], np.asarray(corrupted)[ok]
    out: dict[str, Any] = {"n": int(ok.sum()), "n_bootstrap": int(n_bootstrap)}
    if a.size < 2:
        return {**out, "auc": None, "ci95": [None, None]}
    rng = np.random.default_rng(seed)
    boot = [roc_auc(a[idx], b[idx]) for idx in rng.integers(0, a.size, size=(int(n_bootstrap), a.size))]
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return {**out, "auc": roc_auc(a, b), "ci95": [float(lo), float(hi)]}


def corrupt(xyz: np.ndarray, kind: str, rng: np.random.Generator, mask_xyz: np.ndarray) -> np.ndarray:
    """A corrupted copy ``[P, 3]`` (MNI mm, as it would be read) of MNI peaks ``xyz`` ``[P, 3]``.

    Args:
        xyz: the clean peaks.
        kind: one of ``CORRUPTIONS``.
        rng: seeded generator (shift directions, random peaks).
        mask_xyz: ``[V, 3]`` centres of the in-mask voxels (where random peaks are drawn).
    """
    xyz = np.asarray(xyz, np.float64)
    if kind == "flip_x":
        return xyz * np.array([-1.0, 1.0, 1.0])
    if kind == "tal_as_mni":
        from nimare.utils import mni2tal

        return np.asarray(mni2tal(xyz), np.float64)
    if kind == "shift_10mm":
        step = rng.standard_normal(xyz.shape)
        return xyz + SHIFT_MM * step / np.linalg.norm(step, axis=1, keepdims=True)
    if kind == "random":
        return mask_xyz[rng.choice(len(mask_xyz), size=len(xyz), replace=len(xyz) > len(mask_xyz))]
    raise ValueError(f"unknown corruption {kind!r}; give one of {', '.join(CORRUPTIONS)}")


def quality_control_section(data: EvalData) -> Section:
    """Typicality of clean and corrupted copies of the test studies, and the AUC per corruption.

    Opens the run as a user's study would be (``cbvae_ext.study.StudyContext``, no cache). Options: ``qc_k``
    (posterior samples of the score), ``qc_max_maps`` (the first test maps; None = all).
    """
    from cbvae_ext.study import TYPICALITY_SCORES, StudyContext

    run = data.runs.get("cbvae")
    if run is None:
        return Section(QC, {"absent": "no --run_dir given"})
    peaks, source = peak_indicator(data.info, data.test.maps)
    if peaks is None:
        return Section(QC, {"absent": source})
    opts = data.opts
    n = data.test.n if opts.get("qc_max_maps") is None else min(data.test.n, int(opts["qc_max_maps"]))
    context = StudyContext.open(run.run_dir, data.info.path, k=int(opts.get("qc_k", 4)), seed=opts["seed"], cache=False)
    affine = np.asarray(data.info.affine, np.float64)
    ijk = np.argwhere(data.mask)  # C order: the order of the in-mask vectors
    mask_xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    rng = data.rng(47)
    copies: dict[str, list[np.ndarray]] = {"clean": [], **{c: [] for c in CORRUPTIONS}}
    outside: dict[str, list[int]] = {name: [] for name in copies}  # peaks moved out of the brain mask
    n_peaks = np.zeros(n, np.int64)
    for i in range(n):
        xyz = mask_xyz[peaks[i]]
        n_peaks[i] = len(xyz)
        for name in copies:
            ma, counts = context.render(xyz if name == "clean" else corrupt(xyz, name, rng, mask_xyz))
            copies[name].append(ma)
            outside[name].append(counts["outside_mask"])
    scored = {name: context.score(np.stack(maps), n_outside=np.asarray(outside[name])) for name, maps in copies.items()}
    scores = {name: s["score"] for name, s in scored.items()}
    columns = {column(f"{MODEL}/{QC}", f"score_{name}"): _pad(s, data.test.n) for name, s in scores.items()}
    clean_v = np.stack(copies["clean"])[:, data.mask]
    flip_r = pearson_r(np.stack(copies["flip_x"])[:, data.mask], clean_v)
    symmetric = np.nan_to_num(flip_r) > SYMMETRIC_R
    ref = np.sort(scores["clean"])
    boot, seed = opts["n_bootstrap"], opts["seed"]
    per: dict[str, Any] = {}
    for kind in CORRUPTIONS:
        res = paired_auc(scores["clean"], scores[kind], boot, seed)
        res["median_percentile"] = float(np.median(np.searchsorted(ref, scores[kind]) / len(ref) * 100))
        res["score_drop_nats"] = data.summary(scores["clean"] - scores[kind])
        res["same_map"] = int(sum(np.array_equal(a, b) for a, b in zip(copies["clean"], copies[kind], strict=True)))
        # every score beside the one the criterion reads (which one: the study package's typicality_score)
        res["auc_by_score"] = {
            key: paired_auc(scored["clean"][term], scored[kind][term], boot, seed)["auc"]
            for key, term in TYPICALITY_SCORES.items()
        }
        res["n_peaks_outside_mask"] = int(sum(outside[kind]))
        res["clean_wins_paired"] = float(np.mean(scores["clean"] > scores[kind]))
        per[kind] = res
    per["flip_x"]["nearly_symmetric"] = {
        "rule": f"r(clean, flipped) > {SYMMETRIC_R}: the flipped copy is nearly the clean map, so no score can tell "
        "them apart; kept in the AUC the criterion reads, and the AUC without them beside it",
        "n": int(symmetric.sum()),
        "ids": [data.test.ids[i] for i in np.flatnonzero(symmetric)[:20]],
        "auc_without": paired_auc(scores["clean"][~symmetric], scores["flip_x"][~symmetric], boot, seed),
    }
    criteria = {
        f"qc_auc_{name}_at_least_{str(t).replace('.', '_')}": _threshold(per[kind]["auc"], t, kind)
        for kind, t in THRESHOLDS.items()
        for name in [{"tal_as_mni": "tal", "shift_10mm": "shift"}.get(kind, kind)]
    }
    results = {
        "rule": f"ROC AUC of the typicality score ({context.typicality_score}, every condition unknown, k = "
        f"{context.k}) separating each clean re-rendered test study (positive) from its corrupted copy; CI: studies "
        f"resampled ({boot} resamples)",
        "peaks": source + "; voxel centres in MNI mm",
        "score": context.typicality_score,
        "n_maps": n,
        "n_peaks": data.summary(n_peaks),
        "clean_vs_stored_r": data.summary(pearson_r(clean_v, data.test.maps[:n])),
        "corruptions": per,
        "criteria": criteria,
    }
    return Section(QC, results, columns)


def _pad(values: np.ndarray, n: int) -> np.ndarray:
    out = np.full(n, np.nan)
    out[: len(values)] = values
    return out


def _threshold(value: float | None, threshold: float, kind: str) -> dict[str, Any]:
    rule = f"typicality ROC AUC, clean vs {kind} copies of the test studies, >= {threshold}"
    if value is None:
        return {"rule": rule, "passed": None, "reason": "fewer than two test studies with peaks"}
    return {"rule": rule, "value": value, "reference": threshold, "passed": bool(value >= threshold), "reason": None}
