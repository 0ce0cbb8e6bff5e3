"""The evaluation workflow behind ``python -m monai.bundle run evaluate --config_file bundle/configs/evaluate.yaml``.

It loads the C-β-VAE run and, when given, its conditioning-off and λ = 0 twins and the ResNet-10
baseline VAE (``weights_only=True``), checks each against the dataset (grid, metadata schema, latent
size, state-dict keys, dataset build), scores them on the **test** split (validation served model
selection during training only), fits the non-neural baselines on the training split, and writes
``test_results.json`` (layout ``cbvae-test-results`` version 2, formats.md), the per-map tables
(parquet) from which every paired criterion can be recomputed, and PNG figures.

Each part of the results is a section ``section(data: EvalData) -> Section`` (``section.py``), run in the
order of ``SECTIONS``: the workflow joins their columns into the per-map table, then adds the criteria, the
figures and the provenance.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cbvae_ext.data.errors import DataError
from cbvae_ext.data.sources import file_sha256
from cbvae_ext.engine.history import plot_training_curves
from cbvae_ext.errors import CbvaeError
from cbvae_ext.evaluation.baselines import baselines_section
from cbvae_ext.evaluation.columns import (
    BASELINE,
    CATEGORY_MEAN,
    ENTROPY_FLOOR,
    MEAN_MAP,
    MODEL,
    MODEL_COND,
    NEUROQUERY,
    PEAK_AUC,
    PEARSON_R,
    TOPIC_RIDGE,
    column,
    pca,
)
from cbvae_ext.evaluation.conditional import conditional_maps_section
from cbvae_ext.evaluation.counterfactual import counterfactual_section
from cbvae_ext.evaluation.criteria import count_criterion, evaluate_criteria, section_criteria, threshold_criterion
from cbvae_ext.evaluation.debiasing import debiasing_section
from cbvae_ext.evaluation.decoding import decoding_section
from cbvae_ext.evaluation.duplicates import duplicates_section
from cbvae_ext.evaluation.figures import (
    plot_category_maps,
    plot_identification,
    plot_pca_curve,
    plot_per_category_r,
    plot_probes,
    plot_recon_examples,
    plot_reliability,
)
from cbvae_ext.evaluation.generative import (
    calibration_section,
    completion_section,
    generative_criteria,
    joint_likelihood_section,
)
from cbvae_ext.evaluation.likelihood import entropy_floor
from cbvae_ext.evaluation.metrics import SSIM_PARAMS, to_volumes
from cbvae_ext.evaluation.ood import ood_section
from cbvae_ext.evaluation.options import EvalOptions
from cbvae_ext.evaluation.passes import load_split, peak_indicator
from cbvae_ext.evaluation.quality_control import quality_control_section
from cbvae_ext.evaluation.reconstruction import (
    likelihood_section,
    missing_conditions_section,
    models_section,
    pca_equivalent_section,
    per_category,
    ssim_section,
)
from cbvae_ext.evaluation.runs import ROLES, EvaluationError, LoadedRun, load_run
from cbvae_ext.evaluation.section import EvalData, Section, SectionFn
from cbvae_ext.evaluation.text_protocols import neuroquery_section, protocols_section, title_section
from cbvae_ext.evaluation.unseen_pairs import unseen_pairs_section
from cbvae_ext.folders import json_safe, replace_folder
from cbvae_ext.logs import log_to_console
from cbvae_ext.run_folder import trained_on_checksum
from cbvae_ext.schema import MetadataSchema, SchemaError

__all__ = [
    "RESULTS_LAYOUT",
    "RESULTS_LAYOUT_VERSION",
    "ROLES",
    "SECTIONS",
    "TEST_TABLE",
    "Evaluation",
    "EvaluationError",
    "LoadedRun",
    "json_safe",
    "load_run",
]

logger = logging.getLogger(__name__)

_PACKAGES = ("cbvae", "torch", "monai", "numpy", "scikit-learn", "scikit-image", "scipy", "nilearn", "nimare", "pandas")


RESULTS_LAYOUT = "cbvae-test-results"
RESULTS_LAYOUT_VERSION = 2
#: The file of the per-map test table.
TEST_TABLE = "per_map_test.parquet"


def _package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _spread(values: np.ndarray) -> list[float] | None:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return [float(v) for v in np.quantile(values, [0.05, 0.95])] if values.size else None


def _check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device this machine has, or a one-line ``EvaluationError``."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise EvaluationError(
            f"--device {device!r} is not a device this evaluation runs on; give cpu or cuda"
        ) from None
    if dev.type not in ("cpu", "cuda"):
        raise EvaluationError(f"--device {device!r} is not supported; give cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"--device {device!r}: no CUDA device on this machine; give --device cpu")
    return dev


#: Files an evaluation writes; a folder holding anything else is not replaced.
_OUTPUT_SUFFIXES = (".json", ".parquet", ".png")


def _check_output_dir(out_dir: Path) -> None:
    """Refuse a file, or a folder holding anything an evaluation does not write (it is replaced on success)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise EvaluationError(f"--output_dir {out_dir} is a file; give a folder (it is created if missing)")
    if out_dir.is_dir():
        foreign = [p.name for p in out_dir.iterdir() if p.is_dir() or p.suffix not in _OUTPUT_SUFFIXES]
        if foreign:
            raise EvaluationError(
                f"--output_dir {out_dir} holds {foreign[0]!r}, not an evaluation's file; give a new or an evaluation "
                "folder (it is replaced when the evaluation succeeds)"
            )


@contextlib.contextmanager
def _folder_set(out_dir: Path) -> Iterator[Path]:
    """A temporary sibling of ``out_dir`` to write into, renamed to ``out_dir`` when the block succeeds.

    An existing ``out_dir`` is moved aside and removed only after the rename; on failure the temporary
    folder is removed and ``out_dir`` is untouched.
    """
    out_dir = out_dir.absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the results folder is an ordinary one
    try:
        yield tmp
        replace_folder(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _timed(name: str, timings: dict[str, float]) -> Iterator[None]:
    """Log the start and the seconds of evaluation step ``name``; the seconds go into ``timings[name]``."""
    logger.info("evaluation section %s ...", name)
    tic = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - tic, 2)
    logger.info("evaluation section %s done in %.1f s", name, timings[name])


class Evaluation:
    """Score a trained C-β-VAE, its twins and the baseline VAE on the test split, with paired statistics.

    Args:
        dataset_dir: dataset folder built by ``python -m cbvae_ext.data build``.
        run_dir: C-β-VAE training run folder.
        output_dir: where ``test_results.json``, the per-map tables and the figures go (created).
        baseline_run_dir: ResNet-10 baseline VAE run folder (``train_baseline.yaml``).
        uncond_run_dir: the conditioning-off twin (``train_uncond.yaml``).
        nolambda_run_dir: the λ = 0 twin (``train_nolambda.yaml``).
        ood_dataset_dir: a dataset built from NeuroStore studysets only (out-of-distribution maps).
        device: ``"cuda"``/``"cpu"``; default: CUDA when available.
        options: the evaluation options by name (``EvalOptions``: defaults, ranges and what each sets;
            checked when the evaluation runs, so a bad one is one ``error:`` line).
    """

    def __init__(
        self,
        dataset_dir: str | Path,
        run_dir: str | Path | None = None,
        output_dir: str | Path | None = None,
        baseline_run_dir: str | Path | None = None,
        uncond_run_dir: str | Path | None = None,
        nolambda_run_dir: str | Path | None = None,
        ood_dataset_dir: str | Path | None = None,
        device: str | None = None,
        **options: Any,
    ) -> None:
        self.dataset_dir = dataset_dir
        self.output_dir = output_dir
        self.run_dirs = {
            "cbvae": run_dir,
            "baseline": baseline_run_dir,
            "uncond": uncond_run_dir,
            "nolambda": nolambda_run_dir,
        }
        self.ood_dataset_dir = ood_dataset_dir
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.options = options

    # ----- entry points -------------------------------------------------------------------
    def run_cli(self) -> dict[str, Any]:
        """``run()`` for the bundle command: a bad input prints one ``error: ...`` line and exits with status 2."""
        try:
            with log_to_console():
                return self.run()
        except (CbvaeError, SchemaError, DataError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    def _check_options(self) -> dict[str, Any]:
        """The options checked (``EvalOptions.check``: ints and bools, or a one-line ``EvaluationError``)."""
        return EvalOptions.check(self.options).as_dict()

    def run(self) -> dict[str, Any]:
        """Evaluate and write ``test_results.json``, ``per_map_test.parquet`` and the figures; returns the results.

        The folder is written as a set: everything goes to a temporary sibling folder, renamed to
        ``output_dir`` at the end; an existing evaluation folder is replaced only then, so a failed run
        leaves the previous results whole and never mixes files of two runs.

        Raises:
            EvaluationError: bad options, missing arguments, or runs that do not match the dataset or each other.
        """
        started = time.time()
        opts = self._check_options()
        self.device = _check_device(self.device)
        if self.dataset_dir is None or self.output_dir is None:
            raise EvaluationError("--dataset_dir and --output_dir are required")
        out_dir = Path(self.output_dir)
        _check_output_dir(out_dir)
        if self.run_dirs["cbvae"] is None and self.run_dirs["baseline"] is None:
            raise EvaluationError("give --run_dir (C-β-VAE run) and/or --baseline_run_dir (baseline VAE run)")
        from cbvae_ext.data import load_dataset_info  # the loader pulls in NiMARE: import on use

        info = load_dataset_info(self.dataset_dir)
        schema, mask = info.schema, np.asarray(info.mask) != 0
        runs = self._load_runs(info, schema, mask)
        latent_size = next(iter(r.latent_size for r in runs.values()))
        rng = np.random.default_rng(opts["seed"])
        train_rows, test_rows = info.rows("train"), info.rows("test")
        if opts["max_train_maps"] is not None and len(train_rows) > opts["max_train_maps"]:
            train_rows = np.sort(rng.choice(train_rows, opts["max_train_maps"], replace=False))
        if len(train_rows) == 0 or len(test_rows) == 0:
            raise EvaluationError(f"{self.dataset_dir}: the train and test splits must both hold maps")
        train, test = load_split(info, train_rows), load_split(info, test_rows)
        peaks, peak_source = peak_indicator(info, test.maps)
        data = EvalData(opts, info, schema, mask, runs, train, test, peaks, latent_size, self.device)
        columns = _base_columns(data)
        data.cache.update(columns=columns, predictions={})

        results: dict[str, Any] = {
            "layout": RESULTS_LAYOUT,
            "layout_version": RESULTS_LAYOUT_VERSION,
            "split": "test",
            "model_selection": "validation split, during training only; not used here",
            "n_test": test.n,
            "n_train": len(info.rows("train")),
            "n_train_used": train.n,
            "units": "maps divided by their own maximum (loader units, [0, 1]); metrics inside the brain mask",
            "peaks": peak_source,
        }
        timings: dict[str, float] = {}
        figure_data: dict[str, Any] = {}
        tables: dict[str, dict[str, Any]] = {}
        for name, fn in (*SECTIONS, ("ood", functools.partial(ood_section, path=self.ood_dataset_dir))):
            with _timed(name, timings):
                sec: Section = fn(data)
            if sec.top_level:
                results.update(sec.results)
            else:
                results[sec.name] = sec.results
            columns.update({k: np.asarray(v, dtype=np.float64) for k, v in sec.columns.items()})
            figure_data.update(sec.figure_data)
            tables.update(sec.tables)
        with _timed("criteria", timings):
            results["criteria"] = _criteria(data, results)
        results["metric_definitions"] = _definitions(opts)
        with _folder_set(out_dir) as tmp_dir:
            pd.DataFrame(columns).to_parquet(tmp_dir / TEST_TABLE, index=False)
            results["per_map_tables"] = [TEST_TABLE]
            for file_name, table in tables.items():
                pd.DataFrame(table).to_parquet(tmp_dir / file_name, index=False)
                results["per_map_tables"].append(file_name)
            results["figures"] = _figures(data, results, figure_data, tmp_dir)
            results["provenance"] = {**self._provenance(runs, opts, started), "section_seconds": timings}
            results = json_safe(results)
            (tmp_dir / "test_results.json").write_text(json.dumps(results, indent=2, allow_nan=False))
        return results

    def _load_runs(self, info: Any, schema: MetadataSchema, mask: np.ndarray) -> dict[str, LoadedRun]:
        runs: dict[str, LoadedRun] = {}
        seen: dict[Path, str] = {}
        manifest_sha = file_sha256(info.path / "manifest.json")
        for role, path in self.run_dirs.items():
            if path is None:
                continue
            spec = ROLES[role]
            resolved = Path(path).resolve()
            if resolved in seen:
                raise EvaluationError(
                    f"--{spec.key} and --{ROLES[seen[resolved]].key} are the same folder {path}; give each run once"
                )
            seen[resolved] = role
            run = load_run(path, schema, tuple(int(s) for s in mask.shape), self.device, manifest_sha)
            if run.kind != spec.model:
                raise EvaluationError(
                    f"--{spec.key} {path} holds a {run.kind!r} model, not a {spec.model!r} one; pass the "
                    f"{'baseline VAE as --baseline_run_dir' if run.kind == 'baseline' else 'C-β-VAE as --run_dir'}"
                )
            runs[role] = run
        sizes = {k: r.latent_size for k, r in runs.items()}
        if len(set(sizes.values())) > 1:
            raise EvaluationError(
                f"latent size mismatch between runs {sizes}; compare models with the same latent size"
            )
        return runs

    def _provenance(self, runs: dict[str, LoadedRun], opts: dict[str, Any], started: float) -> dict[str, Any]:
        manifest = Path(self.dataset_dir) / "manifest.json"
        manifest_sha = file_sha256(manifest) if manifest.is_file() else None
        device = str(self.device)
        if device.startswith("cuda") and torch.cuda.is_available():
            device = f"{device} ({torch.cuda.get_device_name()})"
        return {
            "dataset_dir": str(self.dataset_dir),
            "dataset_manifest_sha256": manifest_sha,
            "ood_dataset_dir": None if self.ood_dataset_dir is None else str(self.ood_dataset_dir),
            "runs": {
                k: {
                    "role": ROLES[k].label,
                    "run_dir": str(r.run_dir),
                    "checkpoint_sha256": r.checkpoint_sha256,
                    "network_config": r.config,
                    "trained_on_manifest_sha256": trained_on_checksum(r.config),
                    "dataset_matches_training": None
                    if trained_on_checksum(r.config) is None
                    else trained_on_checksum(r.config) == manifest_sha,
                }
                for k, r in runs.items()
            },
            "evaluation_config": opts,
            "packages": _package_versions(),
            "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
            "device": device,
            "started_utc": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": round(time.time() - started, 2),
        }


def _definitions(opts: dict[str, Any]) -> dict[str, Any]:
    n_boot, seed = opts["n_bootstrap"], opts["seed"]
    return {
        "pearson_r": "voxel-wise Pearson correlation within the brain mask",
        "dice_top5": "Dice of the top 5% in-mask voxels of real vs predicted; ties at the k-th value share the "
        "remaining places (expected Dice under random tie-breaking, independent of voxel order)",
        "dice_top1": "as dice_top5 with the top 1%",
        "ssim": SSIM_PARAMS,
        "peak_auc": "NeuroQuery protocol: ROC AUC of a map ranking the study's peak voxels above the other in-mask "
        "voxels (ties count half)",
        "reconstruction": "sigmoid(decoder logits) at z = posterior mean μ, decoder conditioned on the observed "
        "metadata with missing fields imputed by the model",
        "conditional_only": "the model's conditional mean map from the study's conditions alone (no map): the "
        "network's conditional-mean path, or the average of n_prior_samples prior decodes (see conditional_maps.source)",
        "likelihood": "soft-target Bernoulli log-likelihood over in-mask voxels, nats/map; 'excess' = NLL minus the "
        "map's entropy floor (summed binary entropy of its voxels), >= 0. IWAE bound with iwae_k samples of q(z|x,m), "
        "elbo = mean of the same log-weights (beta = 1, sampled, never at z = mu); missing fields at the run's "
        "imputation default. Conditional models bound log p(x|m), unconditional ones log p(x)",
        "paired": f"per-map differences a - b on the same maps, percentile 95% CI of the mean difference from "
        f"{n_boot} resamples (seed {seed}); a criterion passes only when the CI lies on the claimed side",
        "bootstrap": f"percentile 95% CI of the mean over held-out maps, {n_boot} resamples, seed {seed}",
        "probes": "fit on train μ (standardised), scored on test; balanced accuracy over year bins; null = same "
        "probe refit on shuffled train labels; p = (1 + #null >= score) / (1 + n_permutations); per-map terms "
        "N [correct] / (C n_class) average to the balanced accuracy and are paired between models",
        "year_r2": "test R² of ridge regression (alpha=1) from standardised μ to raw year",
        "imputation": "imputation head output vs observed test values (raw units) against the training median",
        "duplicates": "test maps whose Pearson r with some training map exceeds 0.99 (exact = every voxel equal)",
    }


#: The sections in the order they run (later ones read what earlier ones put in ``data.cache``; section.py and
#: each section's docstring name the keys); ``ood`` runs last, given ``--ood_dataset_dir``.
SECTIONS: tuple[tuple[str, SectionFn], ...] = (
    ("baselines", baselines_section),
    ("models", models_section),
    ("neuroquery", neuroquery_section),
    ("protocols", protocols_section),
    ("title_only", title_section),
    ("unseen_pairs", unseen_pairs_section),
    ("counterfactual", counterfactual_section),
    ("completion", completion_section),
    ("joint_peak_likelihood", joint_likelihood_section),
    ("calibration", calibration_section),
    ("decoding", decoding_section),
    ("quality_control", quality_control_section),
    ("conditional_maps", conditional_maps_section),
    ("debiasing", debiasing_section),
    ("missing_conditions", missing_conditions_section),
    ("likelihood", likelihood_section),
    ("ssim", ssim_section),
    ("pca_equivalent", pca_equivalent_section),
    ("duplicates", duplicates_section),
)


def _base_columns(data: EvalData) -> dict[str, Any]:
    """The per-map test table's own columns: id, category, year bin, entropy floor, peak voxel count."""
    names, test = data.schema.categories, data.test
    columns: dict[str, Any] = {
        "id": test.ids,
        "category": [names[c] if c >= 0 else None for c in test.categories],
        "year_bin": test.year_bin,
        ENTROPY_FLOOR: entropy_floor(test.maps),
    }
    if data.peaks is not None:
        columns["n_peak_voxels"] = data.peaks.sum(axis=1)
    return columns


def _criteria(data: EvalData, results: dict[str, Any]) -> dict[str, Any]:
    """Every criterion: the paired ones on the per-map table, then the adversary, identification and the sections'."""
    absent = {role: f"no --{spec.key} given" for role, spec in ROLES.items() if role not in data.runs}
    absent[TOPIC_RIDGE] = results["baselines"][TOPIC_RIDGE].get("absent", "")
    if "absent" in results["neuroquery"]:
        absent[NEUROQUERY] = results["neuroquery"]["absent"]
    if data.peaks is None:
        for name in (MODEL_COND, CATEGORY_MEAN, NEUROQUERY):
            absent[column(name, PEAK_AUC)] = "peak voxels unknown for this kernel"
    table = pd.DataFrame({k: v for k, v in data.cache["columns"].items() if k not in ("id", "category")})
    crit = evaluate_criteria(table, data.latent_size, data.opts["n_bootstrap"], data.opts["seed"], absent)
    n_bins = data.schema.n_year_bins or 10
    cb = results["models"].get(MODEL, {})
    adv = None if "absent" in cb else cb["adversary"]["balanced_accuracy"]
    crit["adversary_at_chance"] = threshold_criterion(
        adv,
        1.5 / n_bins,
        f"year head balanced accuracy on test <= 1.5 / n_bins ({n_bins} bins)",
        absent.get(MODEL, "no dated test study"),
    )
    cm = results["conditional_maps"]
    cats = cm.get("categories", {})
    crit["category_identification"] = count_criterion(
        cats.get("model", {}).get("n_correct"),
        cats.get("training_category_means", {}).get("n_correct"),
        "categories whose conditional map correlates best with their own held-out mean >= as many as the "
        "training category means manage",
        cm.get("absent"),
    )
    crit.update(generative_criteria(results))
    crit.update(section_criteria(results))
    return crit


def _figures(data: EvalData, results: dict[str, Any], figure_data: dict[str, Any], out_dir: Path) -> list[str]:
    """Write the PNG figures into ``out_dir``; returns their file names."""
    written: list[Path] = []
    columns, scores = data.cache["columns"], data.cache.get("scores", {})
    n = min(data.opts["n_examples"], data.test.n)
    if n:
        volumes = {"real": to_volumes(data.test.maps[:n], data.mask)}
        for role in (MODEL, BASELINE):
            if role in scores:
                volumes[ROLES[role].label] = to_volumes(scores[role]["examples"][:n], data.mask)
        written.append(
            plot_recon_examples(
                volumes, np.asarray(data.info.affine), data.test.ids[:n], out_dir / "recon_examples.png"
            )
        )
    run = data.runs.get(MODEL) or next(iter(data.runs.values()))
    if run.history is not None and (curves := plot_training_curves(run.history, out_dir / "training_curves.png")):
        written.append(curves)
    per_category_r = {
        ROLES[r].label: res["per_category_r"] for r, res in results["models"].items() if "absent" not in res
    }
    for name, label in (
        (CATEGORY_MEAN, "category mean map"),
        (MEAN_MAP, "training mean map"),
        (pca(data.latent_size), f"PCA {data.latent_size}"),
    ):
        per_category_r[label] = per_category(columns[column(name, PEARSON_R)], data.test.categories, data.schema)
    written.append(plot_per_category_r(per_category_r, out_dir / "per_category_r.png"))
    probes = {k: v for k, v in results["debiasing"]["probes"].items() if "skipped" not in v}
    if probes:
        adversary = {k: results["models"].get(k, {}).get("adversary", {}).get("balanced_accuracy") for k in probes}
        written.append(plot_probes(probes, adversary, out_dir / "probes.png"))
    if "category_maps" in figure_data:
        generated, heldout, training, labels = figure_data["category_maps"]
        ident = results["conditional_maps"]["categories"]
        written.append(
            plot_identification(
                ident["model"], ident["training_category_means"], out_dir / "category_identification.png"
            )
        )
        written.append(
            plot_category_maps(
                {"C-β-VAE conditional mean": generated, "held-out mean": heldout, "training mean": training},
                data.mask,
                np.asarray(data.info.affine),
                labels,
                out_dir / "category_maps.png",
            )
        )
    if "reliability" in figure_data:
        written.append(plot_reliability(figure_data["reliability"], out_dir / "calibration_reliability.png"))
    if MODEL in data.runs:
        written.append(
            plot_pca_curve(results["baselines"]["pca_curve"], results["pca_equivalent"], out_dir / "pca_curve.png")
        )
    return [Path(p).name for p in written]
