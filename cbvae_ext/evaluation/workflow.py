"""The evaluation workflow behind ``python -m monai.bundle run evaluate --config_file bundle/configs/evaluate.yaml``.

It loads the C-β-VAE run and, when given, its conditioning-off and λ = 0 twins and the ResNet-10
baseline VAE (``weights_only=True``), checks each against the dataset (grid, metadata schema, latent
size, state-dict keys, dataset build), scores them on the **test** split (validation served model
selection during training only), fits the non-neural baselines on the training split, and writes
``test_results.json`` (layout ``cbvae-test-results`` version 2, formats.md), the per-map tables
(parquet) from which every paired criterion can be recomputed, and PNG figures.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from cbvae_ext.data.errors import DataError
from cbvae_ext.data.sources import file_sha256
from cbvae_ext.engine.bundle_glue import flag
from cbvae_ext.engine.history import plot_schedules
from cbvae_ext.errors import CbvaeError
from cbvae_ext.evaluation.baselines import (
    CategoryMeanBaseline,
    MeanMapBaseline,
    PCABaseline,
    TopicRidgeBaseline,
    equivalent_dimension,
)
from cbvae_ext.evaluation.columns import CATEGORY_MEAN, MEAN_MAP, MODEL_COND, NEUROQUERY, TOPIC_RIDGE
from cbvae_ext.evaluation.conditional import conditional_mean_probs, identification
from cbvae_ext.evaluation.counterfactual import counterfactual_section
from cbvae_ext.evaluation.criteria import count_criterion, evaluate_criteria, section_criteria, threshold_criterion
from cbvae_ext.evaluation.decoding import decoding_section
from cbvae_ext.evaluation.duplicates import duplicate_report
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
from cbvae_ext.evaluation.imputation import imputation_scores
from cbvae_ext.evaluation.likelihood import entropy_floor, latent_free_nll
from cbvae_ext.evaluation.metrics import SSIM_PARAMS, masked_vectors, peak_auc, score_maps, ssim_masked, to_volumes
from cbvae_ext.evaluation.passes import (
    PassOptions,
    SplitData,
    encode_split,
    imputed_raw,
    load_split,
    peak_indicator,
    score_network,
)
from cbvae_ext.evaluation.probes import adversary_balanced_accuracy, year_probes, year_r2
from cbvae_ext.evaluation.quality_control import quality_control_section
from cbvae_ext.evaluation.section import EvalData, Section, SectionFn
from cbvae_ext.evaluation.stats import balanced_accuracy_terms, bootstrap_summary, paired_bootstrap
from cbvae_ext.evaluation.text_protocols import neuroquery_section, protocols_section, title_section
from cbvae_ext.folders import json_safe, replace_folder
from cbvae_ext.logs import log_to_console
from cbvae_ext.run_folder import EVALUATION_FILES, RunFolder, trained_on_checksum
from cbvae_ext.schema import ConditionGroup, MetadataSchema, SchemaError

__all__ = [
    "RESULTS_LAYOUT",
    "RESULTS_LAYOUT_VERSION",
    "ROLES",
    "Evaluation",
    "EvaluationError",
    "LoadedRun",
    "json_safe",
    "load_run",
]

logger = logging.getLogger(__name__)

_PACKAGES = ("cbvae", "torch", "monai", "numpy", "scikit-learn", "scikit-image", "scipy", "nilearn", "nimare", "pandas")


class EvaluationError(CbvaeError, ValueError):
    """A run folder, checkpoint or dataset that cannot be evaluated together."""


@dataclass
class LoadedRun:
    """A trained network ready for evaluation, with the run folder it was read from (the one reader, ``RunFolder``)."""

    folder: RunFolder
    model: torch.nn.Module
    checkpoint_sha256: str
    history: pd.DataFrame | None = field(default=None)

    @property
    def run_dir(self) -> Path:
        return self.folder.path

    @property
    def config(self) -> dict[str, Any]:
        return self.folder.network_config or {}

    @property
    def decoder_schema(self) -> dict[str, Any] | None:
        return self.folder.decoder_schema

    @property
    def kind(self) -> str:
        return self.folder.model_kind

    @property
    def latent_size(self) -> int:
        return self.folder.latent_size

    @property
    def imputed_defaults(self) -> torch.Tensor | None:
        """The normalised value the decoder gets for each missing continuous field (None: not exported)."""
        if self.folder.decoder_schema is None:
            return None
        return torch.from_numpy(self.folder.imputed_default_vector)


def load_run(
    run_dir: str | Path,
    schema: MetadataSchema,
    grid_shape: tuple[int, ...],
    device: str | torch.device = "cpu",
    manifest_sha256: str | None = None,
) -> LoadedRun:
    """Rebuild a run's network, load ``model.pt`` with ``weights_only=True`` and check it against the dataset.

    Args:
        run_dir: training output folder (formats.md "Run folder").
        schema: the evaluation dataset's metadata schema.
        grid_shape: the evaluation dataset's map grid ``(D, H, W)``.
        device: where the network runs.
        manifest_sha256: checksum of the evaluation dataset's ``manifest.json``; a run trained on another
            build is refused, since another build has other splits (training studies could be "test").

    Raises:
        EvaluationError: missing files, another dataset build, or a grid, schema, latent size or state dict
            that does not match.
    """
    run = RunFolder.open(run_dir, require=EVALUATION_FILES)
    run.check_dataset(schema, grid_shape, manifest_sha256)
    # channels_last_3d: oneDNN's 3D convolutions run ~2.7x faster on CPU (scripts/bench_eval.py)
    model = run.load_network(device).to(memory_format=torch.channels_last_3d).eval()
    return LoadedRun(run, model, run.checkpoint_sha256(), run.history())


@dataclass(frozen=True)
class Role:
    """A run the evaluation can take: its CLI key, label, network kind and which likelihood it bounds."""

    key: str
    label: str
    model: str
    conditional: bool


#: The runs, by role. The twins are C-β-VAE networks trained with one change (bundle overlays
#: ``train_uncond.yaml``: conditioning off; ``train_nolambda.yaml``: λ = 0).
ROLES: dict[str, Role] = {
    "cbvae": Role("run_dir", "C-β-VAE", "cbvae", True),
    "baseline": Role("baseline_run_dir", "baseline VAE (ResNet-10)", "baseline", False),
    "uncond": Role("uncond_run_dir", "conditioning-off twin", "cbvae", False),
    "nolambda": Role("nolambda_run_dir", "λ = 0 twin", "cbvae", True),
}
RESULTS_LAYOUT = "cbvae-test-results"
RESULTS_LAYOUT_VERSION = 2
METRICS = ("pearson_r", "dice_top5", "dice_top1")


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


#: Options where None means "all".
_OPTIONAL = (
    "iwae_max_maps",
    "max_train_maps",
    "n_counterfactual",
    "generative_max_maps",
    "decoding_max_maps",
    "qc_max_maps",
)


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
        batch_size: maps per forward pass (>= 1).
        n_bootstrap: bootstrap resamples per summary and paired comparison (>= 1; 1000 for reported figures).
        n_permutations: permutations of each probe's null (>= 0; 100 for reported figures).
        n_permutations_mlp: permutations of the MLP probe's null (default: ``n_permutations``).
        iwae_k: importance samples of the likelihood bound (>= 1).
        iwae_max_maps: test maps (the first ones) that get the bound; None = all.
        n_prior_samples: prior decodes averaged for a conditional mean map when a network has no
            conditional-mean path (>= 32 for reported figures).
        n_examples: held-out studies shown in ``recon_examples.png``.
        max_train_maps: cap on training maps (seeded subsample) used to fit PCA, the mean maps, the ridge,
            the probes and the duplicate search; None = all.
        n_counterfactual: held-out studies per category whose task is switched (seeded); None = all.
        neuroquery: fit the NeuroQuery baseline when the dataset has ``terms.npz`` (False: reported absent).
        n_half_splits: random half splits of each study's peaks for completion (>= 1).
        joint_k: importance samples of the joint peak likelihood (>= 1).
        n_calibration_samples: prior draws per study for the calibrated peak probability (>= 1).
        generative_max_maps: test maps (seeded subsample) of completion, joint likelihood and calibration, and
            training maps fitting the calibration's isotonic map; None = all.
        decoding_k: importance samples of each candidate's ``log p(x | c)`` in the decoding section (>= 1).
        decoding_n_terms: terms (most used in training) the decoding section decodes over (>= 1).
        decoding_max_maps: test maps (the first ones) decoded; None = all.
        qc_k: posterior samples of the typicality score in the quality-control section (>= 1).
        qc_max_maps: test maps (the first ones) corrupted and scored; None = all.
        seed: seed of every resampling, permutation and latent sample.
        num_workers: kept for config compatibility (maps are read in the main process).
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
        batch_size: int = 8,
        n_bootstrap: int = 1000,
        n_permutations: int = 100,
        n_permutations_mlp: int | None = None,
        iwae_k: int = 64,
        iwae_max_maps: int | None = None,
        n_prior_samples: int = 32,
        n_examples: int = 3,
        max_train_maps: int | None = None,
        n_counterfactual: int | None = 20,
        neuroquery: bool | str = True,
        n_half_splits: int = 2,
        joint_k: int = 16,
        n_calibration_samples: int = 16,
        generative_max_maps: int | None = 200,
        decoding_k: int = 4,
        decoding_n_terms: int = 50,
        decoding_max_maps: int | None = None,
        qc_k: int = 4,
        qc_max_maps: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
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
        self.n_counterfactual = n_counterfactual
        self.options = {
            "batch_size": batch_size,
            "n_bootstrap": n_bootstrap,
            "n_permutations": n_permutations,
            "n_permutations_mlp": n_permutations if n_permutations_mlp is None else n_permutations_mlp,
            "iwae_k": iwae_k,
            "iwae_max_maps": iwae_max_maps,
            "n_prior_samples": n_prior_samples,
            "n_examples": n_examples,
            "max_train_maps": max_train_maps,
            "n_counterfactual": n_counterfactual,
            "n_half_splits": n_half_splits,
            "joint_k": joint_k,
            "n_calibration_samples": n_calibration_samples,
            "generative_max_maps": generative_max_maps,
            "decoding_k": decoding_k,
            "decoding_n_terms": decoding_n_terms,
            "decoding_max_maps": decoding_max_maps,
            "qc_k": qc_k,
            "qc_max_maps": qc_max_maps,
            "seed": seed,
        }
        self.neuroquery = neuroquery
        self.num_workers = num_workers

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
        """The numeric options as ints, or a one-line ``EvaluationError`` naming the bad one."""
        minimum = {
            "batch_size": 1,
            "n_bootstrap": 1,
            "n_permutations": 0,
            "n_permutations_mlp": 0,
            "iwae_k": 1,
            "iwae_max_maps": 1,
            "n_prior_samples": 1,
            "n_examples": 0,
            "max_train_maps": 2,
            "n_counterfactual": 1,
            "n_half_splits": 1,
            "joint_k": 1,
            "n_calibration_samples": 1,
            "generative_max_maps": 1,
            "decoding_k": 1,
            "decoding_n_terms": 1,
            "decoding_max_maps": 1,
            "qc_k": 1,
            "qc_max_maps": 1,
            "seed": 0,
        }
        out: dict[str, Any] = {}
        for key, low in minimum.items():
            value = self.options[key]
            if value is None and key in _OPTIONAL:
                out[key] = None
                continue
            try:
                number = int(value)
                ok = number == float(value) and number >= low
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise EvaluationError(f"--{key} {value!r} is invalid; give an integer >= {low}")
            out[key] = number
        out["neuroquery"] = flag(self.neuroquery, "neuroquery")
        return out

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
        ctx = _Context(self, opts, info, schema, mask, runs, train, test, peaks, latent_size)

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
        for name, step in (
            ("baselines", ctx.baselines),
            ("models", ctx.models),
            ("neuroquery", ctx.section(neuroquery_section)),
            ("protocols", ctx.section(protocols_section)),
            ("title_only", ctx.section(title_section)),
            ("counterfactual", ctx.section(counterfactual_section)),
            ("completion", ctx.section(completion_section)),
            ("joint_peak_likelihood", ctx.section(joint_likelihood_section)),
            ("calibration", ctx.section(calibration_section)),
            ("decoding", ctx.section(decoding_section)),
            ("quality_control", ctx.section(quality_control_section)),
            ("conditional_maps", ctx.conditional_maps),
            ("debiasing", ctx.debiasing),
            ("missing_conditions", ctx.missing_conditions),
            ("likelihood", ctx.likelihood),
            ("ssim", ctx.ssim),
            ("pca_equivalent", ctx.pca_equivalent),
            ("duplicates", lambda r: r.update(duplicates=ctx.duplicates())),
            ("ood", lambda r: r.update(ood=ctx.ood(self.ood_dataset_dir))),
            ("criteria", lambda r: r.update(criteria=ctx.criteria(r))),
        ):
            logger.info("evaluation section %s ...", name)
            tic = time.perf_counter()
            step(results)
            timings[name] = round(time.perf_counter() - tic, 2)
            logger.info("evaluation section %s done in %.1f s", name, timings[name])
        results["metric_definitions"] = _definitions(opts)
        with _folder_set(out_dir) as tmp_dir:
            pd.DataFrame(ctx.columns).to_parquet(tmp_dir / "per_map_test.parquet", index=False)
            tables = ["per_map_test.parquet"]
            if ctx.ood_columns:
                pd.DataFrame(ctx.ood_columns).to_parquet(tmp_dir / "per_map_ood.parquet", index=False)
                tables.append("per_map_ood.parquet")
            results["per_map_tables"] = tables
            results["figures"] = ctx.figures(tmp_dir, results)
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


class _Context:
    """One evaluation's data, runs and per-map columns; each method fills one section of the results."""

    def __init__(
        self,
        ev: Evaluation,
        opts: dict[str, Any],
        info: Any,
        schema: MetadataSchema,
        mask: np.ndarray,
        runs: dict[str, LoadedRun],
        train: SplitData,
        test: SplitData,
        peaks: np.ndarray | None,
        latent_size: int,
    ) -> None:
        self.ev, self.opts, self.info, self.schema, self.mask = ev, opts, info, schema, mask
        self.runs, self.train, self.test, self.peaks, self.latent_size = runs, train, test, peaks, latent_size
        self.groups = schema.groups
        self.generator = torch.Generator().manual_seed(opts["seed"])
        names = schema.categories
        self.columns: dict[str, Any] = {
            "id": test.ids,
            "category": [names[c] if c >= 0 else None for c in test.categories],
            "year_bin": test.year_bin,
            "entropy_floor": entropy_floor(test.maps),
        }
        if peaks is not None:
            self.columns["n_peak_voxels"] = peaks.sum(axis=1)
        self.ood_columns: dict[str, Any] = {}
        self.scores: dict[str, dict[str, Any]] = {}
        self.figure_data: dict[str, Any] = {}
        # the sections written as functions (section.py) read this; ``cache["predictions"]``: per predictor
        # (columns.PROTOCOL_PREDICTORS) its [N_test, V] test maps, NaN rows where it predicts nothing
        self.data = EvalData(opts, info, schema, mask, runs, train, test, peaks, latent_size, ev.device)
        self.data.cache.update(predictions={}, columns=self.columns)

    def section(self, fn: SectionFn) -> Callable[[dict[str, Any]], None]:
        """A ``section(data) -> Section`` as a workflow step: its results under its name, its columns joined."""

        def step(results: dict[str, Any]) -> None:
            sec: Section = fn(self.data)
            if sec.top_level:
                results.update(sec.results)
            else:
                results[sec.name] = sec.results
            self.columns.update({k: np.asarray(v, dtype=np.float64) for k, v in sec.columns.items()})
            self.figure_data.update(sec.figure_data)

        return step

    # ----- helpers ------------------------------------------------------------------------
    def summary(self, values: np.ndarray) -> dict[str, Any]:
        return bootstrap_summary(values, self.opts["n_bootstrap"], self.opts["seed"])

    def paired(self, a: np.ndarray, b: np.ndarray, direction: str = "greater", margin: float = 0.0) -> dict[str, Any]:
        return paired_bootstrap(a, b, direction, self.opts["n_bootstrap"], self.opts["seed"], margin)

    def add(self, prefix: str, values: dict[str, np.ndarray], columns: dict[str, Any] | None = None) -> None:
        target = self.columns if columns is None else columns
        for key, value in values.items():
            target[f"{prefix}/{key}"] = np.asarray(value, dtype=np.float64)

    def summaries(self, prefix: str) -> dict[str, Any]:
        """Bootstrap summaries of every column under ``prefix/``, keyed by the rest of the name."""
        n = len(prefix) + 1
        return {k[n:]: self.summary(v) for k, v in self.columns.items() if k.startswith(prefix + "/")}

    def group(self, name: str) -> ConditionGroup | None:
        return next((g for g in self.groups if g.name == name), None)

    def pass_options(self, run: LoadedRun, **overrides: Any) -> PassOptions:
        defaults = run.imputed_defaults
        base = {"n_prior_samples": self.opts["n_prior_samples"], "imputed_defaults": defaults}
        return PassOptions(**{**base, **overrides})

    def decoder_conditions(self, run: LoadedRun, meta: np.ndarray, meta_mask: np.ndarray) -> torch.Tensor:
        """The decoder's conditioning vectors for ``(meta, meta_mask)``, missing fields at the run's default."""
        device = self.ev.device
        imp0 = run.imputed_defaults
        imp0 = None if imp0 is None else imp0.to(device).expand(len(meta), -1)
        return run.model.decoder_input(torch.from_numpy(meta).to(device), torch.from_numpy(meta_mask).to(device), imp0)

    def topics(self, data: SplitData) -> tuple[np.ndarray, np.ndarray] | None:
        """``(topic weights [N, T], observed [N])`` in the model's units, or None without a topic group."""
        g = self.group("topics")
        if g is None:
            return None
        return data.meta[:, g.meta_slice], data.meta_mask[:, g.mask_index] > 0

    # ----- sections -----------------------------------------------------------------------
    def baselines(self, results: dict[str, Any]) -> None:
        """PCA at L, 2L, 4L, 8L, the mean map, a constant map, the category mean and the topic ridge (train fit)."""
        tr, te, mask, latent = self.train, self.test, self.mask, self.latent_size
        limit = min(tr.n, tr.maps.shape[1])
        if latent > limit:
            raise EvaluationError(f"PCA with {latent} components needs more than {tr.n} training maps; use more")
        self.pca_dims = [d for d in (latent, 2 * latent, 4 * latent, 8 * latent) if d <= limit]
        pca = PCABaseline(max(self.pca_dims), seed=self.opts["seed"]).fit(tr.maps)
        self.pca = self.data.cache["pca"] = pca
        curve = []
        for d in self.pca_dims:
            self.add(f"pca_{d}", score_maps(pca.predict(te.maps, d), te.maps, mask, ssim=d == latent))
            curve.append(
                {
                    "n_components": d,
                    "explained_variance_ratio": pca.explained_variance_at(d),
                    **self.summaries(f"pca_{d}"),
                }
            )
        out: dict[str, Any] = {"pca": {**curve[0], "n_fit_maps": tr.n}, "pca_curve": curve}
        mean = MeanMapBaseline().fit(tr.maps)
        predictions = {"mean_map": mean.predict(te.n)}
        category = CategoryMeanBaseline().fit(tr.maps, tr.categories)
        self.category_baseline = category
        predictions["category_mean"] = category.predict(te.categories)
        self.data.cache["predictions"].update(
            {MEAN_MAP: predictions["mean_map"], CATEGORY_MEAN: predictions["category_mean"]}
        )
        for name, pred in predictions.items():
            scores = score_maps(pred, te.maps, mask, ssim=name == "mean_map")
            if self.peaks is not None:
                scores["peak_auc"] = peak_auc(pred, self.peaks)
            scores["loglik"] = -latent_free_nll(pred, te.maps)
            self.add(name, scores)
            out[name] = self.summaries(name)
        constant = np.full_like(te.maps, float(tr.maps.mean()))
        self.add("constant_map", {"ssim": ssim_masked(constant, te.maps, mask)})
        out["constant_map"] = {"value": float(tr.maps.mean()), **self.summaries("constant_map")}
        out["topic_ridge"] = self._topic_ridge()
        results["baselines"] = out

    def _topic_ridge(self) -> dict[str, Any]:
        tr_topics, te_topics = self.topics(self.train), self.topics(self.test)
        if tr_topics is None:
            return {"absent": "the dataset's schema has no topic weights (rebuild the dataset with topics)"}
        (x_tr, obs_tr), (x_te, obs_te) = tr_topics, te_topics
        if obs_tr.sum() < 10 or not obs_te.any():
            return {"absent": "too few training or test maps with topic weights"}
        ridge = TopicRidgeBaseline(seed=self.opts["seed"]).fit(x_tr[obs_tr], self.train.maps[obs_tr])
        pred = ridge.predict(x_te)
        self.data.cache["predictions"][TOPIC_RIDGE] = np.where(obs_te[:, None], pred, np.nan).astype(np.float32)
        scores = score_maps(pred, self.test.maps, self.mask)
        if self.peaks is not None:
            scores["peak_auc"] = peak_auc(pred, self.peaks)
        self.add("topic_ridge", {k: np.where(obs_te, v, np.nan) for k, v in scores.items()})
        return {"alpha": ridge.alpha, "n_fit_maps": int(obs_tr.sum()), **self.summaries("topic_ridge")}

    def models(self, results: dict[str, Any]) -> None:
        """Every run on the test split: reconstruction, likelihood bound, conditional-only maps, heads."""
        out: dict[str, Any] = {}
        opts = self.opts
        for role, spec in ROLES.items():
            if role not in self.runs:
                out[role] = {"absent": f"no --{spec.key} given"}
                continue
            run = self.runs[role]
            options = self.pass_options(
                run,
                iwae_k=opts["iwae_k"] if role != "nolambda" else 0,
                iwae_rows=opts["iwae_max_maps"],
                conditional=role == "cbvae",
                hidden=tuple(self.groups) if role == "cbvae" else (),
                ssim=role == "cbvae",
            )
            with tqdm(total=self.test.n, desc=f"test maps, {spec.label}", leave=False, disable=None) as bar:
                sc = score_network(
                    run.model,
                    self.test,
                    self.mask,
                    self.peaks,
                    options,
                    opts["batch_size"],
                    self.ev.device,
                    self.generator,
                    opts["n_examples"],
                    bar.update,
                )
            self.scores[role] = sc
            self.add(role, sc["columns"])
            if role == "cbvae":
                self._cache_model(run, sc)
            res: dict[str, Any] = {
                "label": spec.label,
                "run_dir": str(run.run_dir),
                "latent_size": run.latent_size,
                "seconds": sc["seconds"],
                "bounds": "log p(x | m)" if spec.conditional else "log p(x)",
                "reconstruction": self.summaries(f"{role}/recon"),
            }
            if options.conditional:
                res["conditional_only"] = {**self.summaries(f"{role}/cond"), "source": sc["cond_source"]}
            logits = sc["year_logits"]
            res["adversary"] = {
                "balanced_accuracy": None
                if logits is None
                else adversary_balanced_accuracy(logits, self.test.year_bin),
                "n_year_bins": self.schema.n_year_bins,
                "reason": "this network has no year adversary" if logits is None else None,
            }
            res["imputation"] = self._imputation(sc["imp_mu"])
            res["per_category_r"] = _per_category(sc["columns"]["recon/pearson_r"], self.test.categories, self.schema)
            out[role] = res
        results["models"] = out

    def _cache_model(self, run: LoadedRun, sc: dict[str, Any]) -> None:
        """What the function sections need of the C-β-VAE: its conditional maps, μ, and the title rule."""
        cache = self.data.cache
        cache["predictions"][MODEL_COND] = sc["cond_maps"]
        task = self.group("task")
        cache["counterfactual"] = {
            "model": run.model,
            "mu": sc["mu"],
            "imputed_defaults": run.imputed_defaults,
            "task": task,
        }
        topics = self.group("topics")
        if topics is None or not self.schema.topic_keys:
            return
        from cbvae_ext.app.words import TopicVocabulary  # the app's own words -> topics rule

        vocabulary = TopicVocabulary(self.schema.topic_keys, self.schema.topic_names)

        def title_maps(titles: list[str | None]) -> tuple[np.ndarray, int]:
            matches = [vocabulary.match(t or "") for t in titles]
            meta = np.zeros((len(titles), self.schema.meta_dim), np.float32)
            meta_mask = np.zeros((len(titles), self.schema.mask_dim), np.float32)
            hit = np.array([not m.empty for m in matches])
            if hit.any():
                meta[hit, topics.meta_slice] = np.stack([m.weights for m in matches if not m.empty])
            meta_mask[hit, topics.mask_index] = 1.0  # no matched word: every condition missing
            maps = np.concatenate(
                [
                    self._conditional_mean(run, meta[sl], meta_mask[sl])[0]
                    for sl in (
                        slice(s, s + self.opts["batch_size"]) for s in range(0, len(titles), self.opts["batch_size"])
                    )
                ]
            )
            return maps, int(hit.sum())

        cache["title_model"] = title_maps

    def _imputation(self, imp_mu: np.ndarray | None) -> dict[str, Any]:
        if imp_mu is None:
            return {"absent": "this network has no imputation head"}
        imputed = imputed_raw(imp_mu, self.schema)
        out: dict[str, Any] = {}
        for name, values in imputed.items():
            true = self.test.frame[name].to_numpy(dtype=np.float64)
            train_values = self.train.frame[name].to_numpy(dtype=np.float64)
            train_values = train_values[np.isfinite(train_values)]
            if not np.isfinite(true).any() or train_values.size == 0:
                out[name] = {"n": 0, "absent": "not observed in the test or the training split"}
                continue
            # the imputation head reads only the map, so its output for an observed field is a genuine prediction
            out[name] = imputation_scores(values, true, float(np.median(train_values)))
        return out

    def conditional_maps(self, results: dict[str, Any]) -> None:
        """Per category (and topic): the model's conditional mean map against the held-out mean map."""
        if "cbvae" not in self.runs:
            results["conditional_maps"] = {"absent": "no --run_dir given"}
            return
        run, schema, te = self.runs["cbvae"], self.schema, self.test
        out: dict[str, Any] = {}
        task = self.group("task")
        present = [c for c in range(schema.n_categories) if (te.categories == c).any()]
        meta = np.zeros((len(present), schema.meta_dim), np.float32)
        meta_mask = np.zeros((len(present), schema.mask_dim), np.float32)
        meta[np.arange(len(present)), task.meta_slice.start + np.array(present, dtype=int)] = 1.0
        meta_mask[:, task.mask_index] = 1.0
        generated, source = self._conditional_mean(run, meta, meta_mask)
        heldout = np.stack([te.maps[te.categories == c].mean(axis=0) for c in present])
        training = np.stack([self.category_baseline.means[c] for c in present])
        labels = [schema.categories[c] for c in present]
        model_id, train_id = identification(generated, heldout, labels), identification(training, heldout, labels)
        # centred: the shared activation pattern (the training mean map) removed from every map, so the match
        # is made on what distinguishes the categories rather than on what they share
        overall = self.train.maps.mean(axis=0)
        out["source"] = source
        out["categories"] = {
            "n_test": {lab: int((te.categories == c).sum()) for lab, c in zip(labels, present, strict=True)},
            "model": model_id,
            "training_category_means": train_id,
            "model_centred": identification(generated - overall, heldout - overall, labels),
            "training_category_means_centred": identification(training - overall, heldout - overall, labels),
        }
        self.figure_data["category_maps"] = (generated, heldout, training, labels)
        out["topics"] = self._topic_maps(run)
        results["conditional_maps"] = out

    def _conditional_mean(self, run: LoadedRun, meta: np.ndarray, meta_mask: np.ndarray) -> tuple[np.ndarray, str]:
        with torch.no_grad():
            probs, source = conditional_mean_probs(
                run.model,
                self.decoder_conditions(run, meta, meta_mask),
                self.opts["n_prior_samples"],
                self.generator,
            )
        return masked_vectors(probs.cpu().numpy(), self.mask), source

    def _topic_maps(self, run: LoadedRun, min_maps: int = 3) -> dict[str, Any]:
        """Per dominant topic: the conditional mean for the topic mixture of its training maps vs its held-out mean."""
        g = self.group("topics")
        tr_t, te_t = self.topics(self.train), self.topics(self.test)
        if g is None or tr_t is None:
            return {"absent": "the dataset's schema has no topic weights"}
        (x_tr, obs_tr), (x_te, obs_te) = tr_t, te_t
        dom_tr = np.where(obs_tr, x_tr.argmax(axis=1), -1)
        dom_te = np.where(obs_te, x_te.argmax(axis=1), -1)
        topics = [t for t in range(x_tr.shape[1]) if (dom_te == t).sum() >= min_maps and (dom_tr == t).any()]
        if not topics:
            return {"absent": f"no topic dominates >= {min_maps} test maps"}
        meta = np.zeros((len(topics), self.schema.meta_dim), np.float32)
        meta_mask = np.zeros((len(topics), self.schema.mask_dim), np.float32)
        meta[:, g.meta_slice] = np.stack([x_tr[dom_tr == t].mean(axis=0) for t in topics])
        meta_mask[:, g.mask_index] = 1.0
        generated, _ = self._conditional_mean(run, meta, meta_mask)
        heldout = np.stack([self.test.maps[dom_te == t].mean(axis=0) for t in topics])
        names = list(getattr(self.schema, "topic_names", None) or [f"topic {t}" for t in range(x_tr.shape[1])])
        labels = [names[t] for t in topics]
        return {
            "rule": f"topics dominating >= {min_maps} test maps; condition = mean topic mixture of the training maps "
            "the topic dominates",
            "model": identification(generated, heldout, labels),
        }

    def debiasing(self, results: dict[str, Any]) -> None:
        """Year probes on μ of the model, its λ = 0 twin and the data ceiling (PCA-L codes), paired on test maps."""
        tr, te, opts = self.train, self.test, self.opts
        codes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for role in ("cbvae", "nolambda"):
            if role in self.runs:
                with tqdm(total=1, desc=f"train μ, {ROLES[role].label}", leave=False, disable=None):
                    mu_train = encode_split(self.runs[role].model, tr, self.mask, opts["batch_size"], self.ev.device)
                codes[role] = (mu_train, self.scores[role]["mu"])
        codes["data_ceiling"] = (
            self.pca.transform(tr.maps, self.latent_size),
            self.pca.transform(te.maps, self.latent_size),
        )
        years_tr = tr.frame["year"].to_numpy(np.float64)
        years_te = te.frame["year"].to_numpy(np.float64)
        dated = te.year_bin >= 0
        out: dict[str, Any] = {"probes": {}, "year_r2": {}}
        for name, (c_tr, c_te) in codes.items():
            res = year_probes(
                c_tr,
                tr.year_bin,
                c_te,
                te.year_bin,
                n_permutations=opts["n_permutations"],
                n_permutations_mlp=opts["n_permutations_mlp"],
                seed=opts["seed"],
            )
            for probe, r in res.items():
                if isinstance(r, dict) and "predictions" in r:
                    terms = np.full(te.n, np.nan)
                    terms[dated] = balanced_accuracy_terms(te.year_bin[dated], r.pop("predictions"))
                    self.columns[f"{name}/probe_{probe}"] = terms
            out["probes"][name] = res
            out["year_r2"][name] = year_r2(c_tr, years_tr, c_te, years_te)
        out["data_ceiling_codes"] = f"PCA with {self.latent_size} components of the raw maps (fit on train)"
        if "cbvae" in codes and "nolambda" in codes:
            out["paired_vs_nolambda"] = {
                probe: self.paired(
                    self.columns[f"cbvae/probe_{probe}"], self.columns[f"nolambda/probe_{probe}"], "less"
                )
                for probe in ("logistic", "mlp")
                if f"cbvae/probe_{probe}" in self.columns
            }
            out["reconstruction_cost"] = {
                "rule": "paired r of the λ > 0 model minus its λ = 0 twin (negative = de-biasing costs reconstruction)",
                **self.paired(self.columns["cbvae/recon/pearson_r"], self.columns["nolambda/recon/pearson_r"]),
            }
        else:
            out["paired_vs_nolambda"] = {"absent": "no --nolambda_run_dir given"}
        results["debiasing"] = out

    def missing_conditions(self, results: dict[str, Any]) -> None:
        """Reconstruction with each condition group hidden in turn and all hidden, paired against all given."""
        if "cbvae" not in self.runs:
            results["missing_conditions"] = {"absent": "no --run_dir given"}
            return
        out: dict[str, Any] = {"rule": "paired hidden - given per map; passes when the CI lies above -0.03"}
        for name in [g.name for g in self.groups] + ["all"]:
            out[name] = {
                m: {
                    "hidden": self.summary(self.columns[f"cbvae/hidden_{name}/{m}"]),
                    "paired_vs_given": self.paired(
                        self.columns[f"cbvae/hidden_{name}/{m}"], self.columns[f"cbvae/recon/{m}"], margin=0.03
                    ),
                }
                for m in ("pearson_r", "dice_top5")
            }
        imp = self.scores["cbvae"]["imp_mu"]
        spread: dict[str, Any] = {}
        if imp is not None:
            for name, values in imputed_raw(imp, self.schema).items():
                real = self.test.frame[name].to_numpy(np.float64)
                spread[name] = {
                    "imputed_5_95": _spread(values),
                    "real_5_95": _spread(real),
                    "n_real": int(np.isfinite(real).sum()),
                }
        out["imputed_spread"] = spread or {"absent": "this network has no imputation head"}
        results["missing_conditions"] = out

    def likelihood(self, results: dict[str, Any]) -> None:
        """Every likelihood in nats per map and as excess over the entropy floor, conditional ones apart."""
        floor = self.columns["entropy_floor"]
        rows: dict[str, Any] = {}
        for role, spec in ROLES.items():
            key = f"{role}/loglik_iwae"
            if key not in self.columns:
                continue
            iwae, elbo = self.columns[key], self.columns[f"{role}/loglik_elbo"]
            rows[role] = {
                "label": spec.label,
                "bounds": "log p(x | m)" if spec.conditional else "log p(x)",
                "bound": f"IWAE, k = {self.opts['iwae_k']} (lower bound); elbo from the same samples",
                "loglik_iwae": self.summary(iwae),
                "loglik_elbo": self.summary(elbo),
                "excess_nll_iwae": self.summary(-iwae - floor),
                "excess_nll_elbo": self.summary(-elbo - floor),
            }
        for name, of in (("mean_map", "log p(x)"), ("category_mean", "log p(x | category)")):
            ll = self.columns[f"{name}/loglik"]
            rows[name] = {
                "label": {"mean_map": "training mean map", "category_mean": "training category mean map"}[name],
                "bounds": of,
                "bound": "exact (no latent)",
                "loglik": self.summary(ll),
                "excess_nll": self.summary(-ll - floor),
            }
        results["likelihood"] = {
            "entropy_floor": self.summary(floor),
            "models": rows,
            "compare": "conditional (log p(x | ·)) with conditional, unconditional (log p(x)) with unconditional",
        }

    def ssim(self, results: dict[str, Any]) -> None:
        """Masked SSIM of the model beside a constant map and the mean map; not a criterion."""
        out: dict[str, Any] = {"criterion": False, "params": SSIM_PARAMS}
        for key, col in (
            ("cbvae", "cbvae/recon/ssim"),
            (f"pca_{self.latent_size}", f"pca_{self.latent_size}/ssim"),
            ("mean_map", "mean_map/ssim"),
            ("constant_map", "constant_map/ssim"),
        ):
            if col in self.columns:
                out[key] = self.summary(self.columns[col])
        results["ssim"] = out

    def pca_equivalent(self, results: dict[str, Any]) -> None:
        """The number of PCA components matching the model's reconstruction, per metric."""
        if "cbvae" not in self.runs:
            results["pca_equivalent"] = {"absent": "no --run_dir given"}
            return
        out: dict[str, Any] = {"dims": self.pca_dims, "interpolation": "linear in log2(components)"}
        for m in METRICS:
            model = float(np.nanmean(self.columns[f"cbvae/recon/{m}"]))
            pca = [float(np.nanmean(self.columns[f"pca_{d}/{m}"])) for d in self.pca_dims]
            out[m] = {"model": model, "pca": pca, **equivalent_dimension(self.pca_dims, pca, model)}
        results["pca_equivalent"] = out

    def duplicates(self) -> dict[str, Any]:
        report = duplicate_report(self.test.maps, self.train.maps, self.test.ids, self.train.ids)
        nearest = report.pop("nearest_r")
        self.columns["nearest_train_r"] = nearest
        if "cbvae/recon/pearson_r" in self.columns:
            keep = nearest <= report["threshold_r"]
            report["cbvae_r_without_near_duplicates"] = self.summary(self.columns["cbvae/recon/pearson_r"][keep])
        report["searched_train_maps"] = self.train.n
        return report

    def ood(self, path: str | Path | None) -> dict[str, Any]:
        """Reconstruction, conditional generation and sample-size imputation on a NeuroStore-only dataset."""
        if path is None:
            return {
                "absent": "no --ood_dataset_dir given; build one with python -m cbvae_ext.data build --no-neurosynth "
                "--neurostore-dir <nimare>/resources/nback_vs_flanker_studyset_2026-07 --out OOD"
            }
        if "cbvae" not in self.runs:
            return {"absent": "no --run_dir given"}
        from cbvae_ext.data import load_dataset_info

        ood = load_dataset_info(path)
        if ood.mask.shape != self.mask.shape or not np.array_equal(ood.mask, self.mask):
            raise EvaluationError(f"--ood_dataset_dir {path} has another grid or mask; build it with the same options")
        if ood.manifest.get("kernel") != self.info.manifest.get("kernel"):
            raise EvaluationError(f"--ood_dataset_dir {path} was built with another kernel; build it with the same one")
        data = load_split(ood, ood.rows("all"), schema=self.schema)
        peaks, _ = peak_indicator(ood, data.maps)
        run = self.runs["cbvae"]
        options = self.pass_options(run, conditional=True)
        sc = score_network(
            run.model, data, self.mask, peaks, options, self.opts["batch_size"], self.ev.device, self.generator
        )
        cols: dict[str, Any] = {"id": data.ids, "category": list(data.frame["category"])}
        self.add("cbvae", sc["columns"], cols)
        baselines = {
            "category_mean": self.category_baseline.predict(data.categories),
            "mean_map": MeanMapBaseline().fit(self.train.maps).predict(data.n),
        }
        for name, pred in baselines.items():
            scores = score_maps(pred, data.maps, self.mask)
            if peaks is not None:
                scores["peak_auc"] = peak_auc(pred, peaks)
            self.add(name, scores, cols)
        self.ood_columns = cols
        n = len("cbvae/")
        out: dict[str, Any] = {
            "dataset_dir": str(path),
            "n_maps": data.n,
            "sources": sorted(set(data.frame["source"])),
            "categories": {str(k): int(v) for k, v in data.frame["category"].value_counts().items()},
            "cbvae": {k[n:]: self.summary(v) for k, v in cols.items() if k.startswith("cbvae/")},
            "category_mean": {
                k[len("category_mean/") :]: self.summary(v) for k, v in cols.items() if k.startswith("category_mean/")
            },
            "cond_only_r_vs_category_mean": self.paired(cols["cbvae/cond/pearson_r"], cols["category_mean/pearson_r"]),
        }
        imp = sc["imp_mu"]
        if imp is None:
            out["sample_size_imputation"] = {"absent": "this network has no imputation head"}
            return out
        true = data.frame["sample_size"].to_numpy(np.float64)
        train_ss = self.train.frame["sample_size"].to_numpy(np.float64)
        train_ss = train_ss[np.isfinite(train_ss)]
        # Neurosynth records no sample sizes: then the reference predictor is the studyset's own median,
        # an oracle the model cannot know (it only makes the comparison harder for the model)
        reference, source = (
            (float(np.median(train_ss)), "training median")
            if train_ss.size
            else (float(np.nanmedian(true)), "median of the studyset itself (no training map has a sample size)")
        )
        imputed = imputed_raw(imp, self.schema)["sample_size"]
        out["sample_size_imputation"] = {**imputation_scores(imputed, true, reference), "reference": source}
        return out

    def criteria(self, results: dict[str, Any]) -> dict[str, Any]:
        absent = {role: f"no --{spec.key} given" for role, spec in ROLES.items() if role not in self.runs}
        absent["topic_ridge"] = results["baselines"]["topic_ridge"].get("absent", "")
        if "absent" in results["neuroquery"]:
            absent[NEUROQUERY] = results["neuroquery"]["absent"]
        if self.peaks is None:
            for name in (MODEL_COND, CATEGORY_MEAN, NEUROQUERY):
                absent[f"{name}/peak_auc"] = "peak voxels unknown for this kernel"
        table = pd.DataFrame({k: v for k, v in self.columns.items() if k not in ("id", "category")})
        crit = evaluate_criteria(table, self.latent_size, self.opts["n_bootstrap"], self.opts["seed"], absent)
        n_bins = self.schema.n_year_bins or 10
        cb = results["models"].get("cbvae", {})
        adv = None if "absent" in cb else cb["adversary"]["balanced_accuracy"]
        crit["adversary_at_chance"] = threshold_criterion(
            adv,
            1.5 / n_bins,
            f"year head balanced accuracy on test <= 1.5 / n_bins ({n_bins} bins)",
            absent.get("cbvae", "no dated test study"),
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
        crit.update(section_criteria(results, ("decoding", "quality_control")))
        return crit

    def figures(self, out_dir: Path, results: dict[str, Any]) -> list[str]:
        written: list[Path] = []
        n = min(self.opts["n_examples"], self.test.n)
        if n:
            volumes = {"real": to_volumes(self.test.maps[:n], self.mask)}
            for role in ("cbvae", "baseline"):
                if role in self.scores:
                    volumes[ROLES[role].label] = to_volumes(self.scores[role]["examples"][:n], self.mask)
            written.append(
                plot_recon_examples(
                    volumes, np.asarray(self.info.affine), self.test.ids[:n], out_dir / "recon_examples.png"
                )
            )
        run = self.runs.get("cbvae") or next(iter(self.runs.values()))
        if run.history is not None and {"beta", "grl_lambda", "epoch"} <= set(run.history.columns):
            written.append(plot_schedules(run.history, out_dir / "training_curves.png"))
        per_category = {
            ROLES[r].label: res["per_category_r"] for r, res in results["models"].items() if "absent" not in res
        }
        for name, label in (
            ("category_mean", "category mean map"),
            ("mean_map", "training mean map"),
            (f"pca_{self.latent_size}", f"PCA {self.latent_size}"),
        ):
            per_category[label] = _per_category(self.columns[f"{name}/pearson_r"], self.test.categories, self.schema)
        written.append(plot_per_category_r(per_category, out_dir / "per_category_r.png"))
        probes = {k: v for k, v in results["debiasing"]["probes"].items() if "skipped" not in v}
        if probes:
            adversary = {k: results["models"].get(k, {}).get("adversary", {}).get("balanced_accuracy") for k in probes}
            written.append(plot_probes(probes, adversary, out_dir / "probes.png"))
        if "category_maps" in self.figure_data:
            generated, heldout, training, labels = self.figure_data["category_maps"]
            ident = results["conditional_maps"]["categories"]
            written.append(
                plot_identification(
                    ident["model"], ident["training_category_means"], out_dir / "category_identification.png"
                )
            )
            written.append(
                plot_category_maps(
                    {"C-β-VAE conditional mean": generated, "held-out mean": heldout, "training mean": training},
                    self.mask,
                    labels,
                    out_dir / "category_maps.png",
                )
            )
        if "reliability" in self.figure_data:
            written.append(plot_reliability(self.figure_data["reliability"], out_dir / "calibration_reliability.png"))
        if "cbvae" in self.runs:
            written.append(
                plot_pca_curve(results["baselines"]["pca_curve"], results["pca_equivalent"], out_dir / "pca_curve.png")
            )
        return [Path(p).name for p in written]


def _per_category(values: np.ndarray, categories: np.ndarray, schema: MetadataSchema) -> dict[str, Any]:
    """Mean and count of a per-map metric within each task category (``(missing)`` for no category)."""
    names = schema.categories
    out: dict[str, Any] = {}
    for c in np.unique(categories):
        sel = (categories == c) & np.isfinite(values)
        label = names[int(c)] if c >= 0 else "(missing)"
        out[label] = {"mean": float(values[sel].mean()) if sel.any() else None, "n": int(sel.sum())}
    return out
