"""Session logic of the Counterfactual Machine app: locating and checking a run, starting points, slider
ranges and extrapolation flags.

Everything here is plain Python/numpy so that it is testable without Streamlit; ``app/streamlit_app.py``
only wires widgets to these functions and caches their results.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cbvae_ext.data.folder import check_dataset_files
from cbvae_ext.errors import CbvaeError
from cbvae_ext.run_folder import APP_FILES, DECODER, RunFolder, RunFolderError
from cbvae_ext.schema import CONTINUOUS_FIELDS, FIELDS, MetadataSchema, SchemaError

__all__ = [
    "LATENT_RANGE",
    "RUN_FILES",
    "DatasetUnreadable",
    "NoRunError",
    "RunInfo",
    "StartPoint",
    "extrapolation_note",
    "field_label",
    "filter_studies",
    "load_dataset_rows",
    "load_run_info",
    "no_run_message",
    "one_line",
    "prior_start",
    "resolve_paths",
    "slider_spec",
    "slider_value",
    "start_terms",
    "start_topics",
    "study_start",
    "study_vectors",
    "sweep_values",
    "value_range",
]

#: Files of a run folder the app reads (formats.md, "Run folder").
RUN_FILES: tuple[str, ...] = APP_FILES

#: Latent sliders span this range; starting values are clipped into it so that every slider is valid.
LATENT_RANGE: tuple[float, float] = (-6.0, 6.0)

_MAIN_JOB = "bash scripts/run_main.sh"
_TRAIN_COMMAND = (
    "python -m monai.bundle run training --config_file bundle/configs/train.yaml "
    "--dataset_dir runs/data_1000 --output_dir {run_dir}"
)


class NoRunError(CbvaeError, FileNotFoundError):
    """The run folder or one of its files is missing; the message says how to create one."""


class DatasetUnreadable(CbvaeError, ValueError):
    """The optional dataset folder exists but its files cannot be read (the app goes on without it)."""


def no_run_message(run_dir: Path, missing: Sequence[str] = ()) -> str:
    """One paragraph (markdown) telling the user which run is missing and the exact command that makes it."""
    what = f"`{run_dir}` lacks {', '.join(f'`{m}`' for m in missing)}" if missing else f"`{run_dir}` does not exist"
    return (
        f"No trained run found: {what}.\n\n"
        f"Create one with the main job (dataset, training, evaluation):\n\n```\n{_MAIN_JOB}\n```\n\n"
        f"or, with a dataset folder already built, train only:\n\n```\n{_TRAIN_COMMAND.format(run_dir=run_dir)}\n```\n\n"
        "then reload this page, or point the app at another run with "
        "`streamlit run app/streamlit_app.py -- --run_dir RUN` or `CBVAE_RUN_DIR=RUN`."
    )


def _cli_value(argv: Sequence[str], name: str) -> str | None:
    # tolerant of foreign arguments (pytest's argv under AppTest): never exits like argparse would
    flag = f"--{name}"
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def resolve_paths(argv: Sequence[str], environ: Mapping[str, str], repo_root: Path) -> tuple[Path, Path | None]:
    """Run folder and optional dataset folder: ``--run_dir``/``--dataset_dir`` after ``--``, else
    ``CBVAE_RUN_DIR``/``CBVAE_DATASET_DIR``, else ``runs/cbvae`` under the repository root.

    Relative paths are resolved against ``repo_root``.
    """
    run = _cli_value(argv, "run_dir") or environ.get("CBVAE_RUN_DIR") or "runs/cbvae"
    data = _cli_value(argv, "dataset_dir") or environ.get("CBVAE_DATASET_DIR")
    run_path = Path(run).expanduser()
    run_path = run_path if run_path.is_absolute() else repo_root / run_path
    data_path = None
    if data:
        data_path = Path(data).expanduser()
        data_path = data_path if data_path.is_absolute() else repo_root / data_path
    return run_path, data_path


@dataclass
class RunInfo:
    """What the app needs from a run folder besides the decoder itself.

    Args:
        run_dir: the run folder.
        schema: the metadata schema the decoder was trained with.
        latent_size: number of latent dimensions.
        kl_order: latent dimensions sorted by decreasing mean KL (most informative first).
        latent_kl: mean KL per dimension.
        imputed_defaults: raw value the model uses for each missing continuous field.
        latents: ``latents.parquet`` (``mu`` as a float32 ``[N, L]`` array in ``mu_array``).
        mu_array: the study means.
        mask: brain mask on the decoder grid.
        affine: grid affine (MNI152 mm).
        model_kind: ``cbvae`` or ``baseline``.
        dataset_dir: dataset folder named in the run, if any.
        export_id: what the app loaded, shown on the page: the first 12 hex digits of ``decoder.ts``'s
            SHA-256 and its modification time.
        embedder: NeuroQuery terms -> the ``terms`` condition (``TextEmbedder``; None: a run without terms).
    """

    run_dir: Path
    schema: MetadataSchema
    latent_size: int
    kl_order: np.ndarray
    latent_kl: np.ndarray
    imputed_defaults: dict[str, float]
    latents: pd.DataFrame
    mu_array: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    model_kind: str = "cbvae"
    dataset_dir: Path | None = None
    export_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    embedder: Any = None


def load_run_info(run_dir: Path) -> RunInfo:
    """Open the run with ``RunFolder`` (the same checks as inference and evaluation) and gather what the app shows.

    Raises:
        NoRunError: the folder or a required file is missing (the message says how to make one).
        RunFolderError: the files are damaged or do not match each other (names the file and the fix).
    """
    run_dir = Path(run_dir)
    try:
        run = RunFolder.open(run_dir, require=APP_FILES)
    except RunFolderError as err:
        if err.missing:
            raise NoRunError(no_run_message(run_dir, [] if not run_dir.is_dir() else err.missing)) from None
        raise
    latents, mu = run.latents()
    latent_kl = run.latent_kl
    if latent_kl is None:
        # not recorded: rank by the KL of the posterior means alone (0.5 * E[mu^2]), its dominant term
        latent_kl = 0.5 * (mu.astype(np.float64) ** 2).mean(axis=0) if len(mu) else np.zeros(run.latent_size)
    decoder = run.file(DECODER)
    digest = hashlib.sha256(decoder.read_bytes()).hexdigest()[:12]
    stamp = pd.Timestamp(decoder.stat().st_mtime, unit="s").strftime("%Y-%m-%d %H:%M UTC")
    return RunInfo(
        run_dir=run_dir,
        schema=run.schema,
        latent_size=run.latent_size,
        kl_order=np.argsort(-latent_kl, kind="stable"),
        latent_kl=latent_kl,
        imputed_defaults=run.imputed_defaults_raw,
        latents=latents,
        mu_array=mu,
        mask=run.mask(),
        affine=run.affine,
        model_kind=run.model_kind,
        dataset_dir=run.dataset_dir,
        export_id=f"{DECODER} sha256 {digest}…, exported {stamp}",
        embedder=run.term_embedder(),
    )


def one_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an error message (its type when empty), at most ``limit`` characters: what the page
    shows instead of a traceback."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:limit]


def load_dataset_rows(dataset_dir: Path) -> tuple[np.ndarray, pd.DataFrame] | None:
    """Memory-mapped ``maps.npy`` and ``metadata.parquet`` of a dataset folder, or None when absent.

    Raises:
        DatasetUnreadable: the files exist but are damaged or do not match each other.
    """
    dataset_dir = Path(dataset_dir)
    if not ((dataset_dir / "maps.npy").is_file() and (dataset_dir / "metadata.parquet").is_file()):
        return None
    fix = "rebuild it with python -m cbvae_ext.data build, or start the app without --dataset_dir"
    if (dataset_dir / "manifest.json").is_file():  # a built folder: its files must match their checksums
        try:
            check_dataset_files(dataset_dir)
        except CbvaeError as err:
            raise DatasetUnreadable(f"dataset {dataset_dir}: {one_line(err)}") from None
    try:
        maps = np.load(dataset_dir / "maps.npy", mmap_mode="r", allow_pickle=False)
        meta = pd.read_parquet(dataset_dir / "metadata.parquet")
    except Exception as err:  # noqa: BLE001 - numpy, pyarrow and the OS raise many types for a damaged file
        raise DatasetUnreadable(f"dataset {dataset_dir} is unreadable ({one_line(err)}); {fix}") from None
    if maps.ndim != 4 or len(maps) != len(meta) or "id" not in meta.columns:
        raise DatasetUnreadable(
            f"dataset {dataset_dir}: maps.npy {tuple(maps.shape)} does not match metadata.parquet "
            f"({len(meta)} rows{'' if 'id' in meta.columns else ', no id column'}); {fix}"
        )
    return maps, meta


# ----- starting points and conditions -------------------------------------------------------------


@dataclass
class StartPoint:
    """A latent code and the conditions it starts from (``None`` = unknown, let the model impute).

    Args:
        key: identifies the starting point (a study id or ``prior:<seed>``).
        z: latent code ``[L]`` (inside ``LATENT_RANGE``).
        conditions: ``{"task": str | None, "year": float | None, ...}``.
        label: human-readable description.
        seed: the prior draw's seed; None for a real study.
        upload: a study the user brought (``cbvae_ext.app.upload``), not one of the dataset.
    """

    key: str
    z: np.ndarray
    conditions: dict[str, Any]
    label: str
    seed: int | None = None
    upload: bool = False

    @property
    def study_id(self) -> str | None:
        """The dataset study started from; None for a prior draw or an uploaded study."""
        return None if self.seed is not None or self.upload else self.key


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA or value == ""


def study_start(info: RunInfo, study_id: str, dataset_meta: pd.DataFrame | None = None) -> StartPoint:
    """Starting point of a real study: its posterior mean and its own (observed) metadata.

    Fields the study does not report stay unknown. ``dataset_meta`` (the dataset's ``metadata.parquet``)
    adds the fields that ``latents.parquet`` does not carry (sample size, field strength, FWHM).
    """
    rows = np.flatnonzero(info.latents["id"].to_numpy() == study_id)
    if not rows.size:
        raise KeyError(f"study {study_id!r} is not in {info.run_dir / 'latents.parquet'}")
    row = info.latents.iloc[int(rows[0])]
    values: dict[str, Any] = {"year": row["year"]}
    if dataset_meta is not None:
        hit = dataset_meta.loc[dataset_meta["id"] == study_id]
        if len(hit):
            for name in CONTINUOUS_FIELDS:
                if name in hit.columns and bool(hit.iloc[0].get(f"{name}_observed", True)):
                    values[name] = hit.iloc[0][name]
    conditions: dict[str, Any] = {"task": None if _missing(row["category"]) else str(row["category"])}
    if conditions["task"] is not None and conditions["task"] not in info.schema.categories:
        conditions["task"] = None
    for name in CONTINUOUS_FIELDS:
        value = values.get(name)
        conditions[name] = None if _missing(value) else slider_value(info.schema, name, float(value))
    z = np.clip(info.mu_array[int(rows[0])], *LATENT_RANGE).astype(np.float32)
    title = "" if _missing(row["title"]) else str(row["title"])
    return StartPoint(study_id, z, conditions, f"{title} ({study_id})")


def prior_start(info: RunInfo, seed: int) -> StartPoint:
    """A draw ``z ~ N(0, I)`` (reproducible by seed) with every condition unknown."""
    z = np.random.default_rng(seed).standard_normal(info.latent_size).astype(np.float32)
    conditions: dict[str, Any] = {"task": None, **{name: None for name in CONTINUOUS_FIELDS}}
    return StartPoint(f"prior:{seed}", np.clip(z, *LATENT_RANGE), conditions, f"prior draw, seed {seed}", seed)


def slider_spec(schema: MetadataSchema, name: str) -> tuple[float, float, float]:
    """``(min, max, step)`` of a condition slider: the schema's range widened to the plausible range of
    the field's declaration (``schema.FIELDS``) so that extrapolation can be explored (and is flagged by ``extrapolation_note``).

    Whole-number fields (year, sample size) get ``int`` bounds and step, the others ``float``.
    """
    spec = schema.field(name)
    decl = spec.decl
    lo, hi, step = decl.low, decl.high, decl.step
    lo, hi = math.floor(min(lo, spec.low) / step) * step, math.ceil(max(hi, spec.high) / step) * step
    return (int(lo), int(hi), int(step)) if step == 1 else (float(lo), float(hi), float(step))


def slider_value(schema: MetadataSchema, name: str, value: float) -> float:
    """``value`` snapped onto its slider (clipped, rounded to the step, same type as the bounds).

    Raises:
        SchemaError: ``value`` is not a finite number (``inf``, ``1e400`` and NaN have no slider position).
    """
    lo, hi, step = slider_spec(schema, name)
    if not math.isfinite(float(value)):
        raise SchemaError(f"{name} must be a finite number, got {value!r}")
    snapped = min(max(round(float(value) / step) * step, lo), hi)
    return type(lo)(snapped)


def filter_studies(
    latents: pd.DataFrame, query: str = "", category: str | None = None, split: str | None = None, limit: int = 500
) -> pd.DataFrame:
    """Studies whose title contains ``query`` (case-insensitive), of a category and split (None = any)."""
    keep = np.ones(len(latents), dtype=bool)
    if query.strip():
        keep &= latents["title"].fillna("").str.contains(query.strip(), case=False, regex=False).to_numpy()
    if category:
        keep &= (latents["category"] == category).fillna(False).to_numpy(dtype=bool)
    if split:
        keep &= (latents["split"] == split).fillna(False).to_numpy(dtype=bool)
    return latents.loc[keep].head(limit)


def extrapolation_note(schema: MetadataSchema, name: str, value: float | None) -> str | None:
    """Why a condition value is an extrapolation, or None when the training data cover it."""
    if value is None:
        return None
    spec = schema.field(name)
    if not spec.observed:
        return f"extrapolation: {field_label(name).lower()} was never observed in training"
    if not spec.low <= value <= spec.high:
        return f"extrapolation: outside the training range [{spec.low:g}, {spec.high:g}]"
    return None


def sweep_values(schema: MetadataSchema, name: str, n: int = 6) -> list[float]:
    """``n`` values of a continuous field evenly spread over its training range (its slider range when
    the field was never observed), snapped onto the slider; e.g. six years over the training years."""
    spec = schema.field(name)
    lo, hi, _ = slider_spec(schema, name)
    low, high = (spec.low, spec.high) if spec.observed else (lo, hi)
    return [float(slider_value(schema, name, v)) for v in np.linspace(low, high, n)]


def field_label(name: str) -> str:
    """The label of a continuous field, as declared in ``schema.FIELDS``."""
    return next(d.label for d in FIELDS if d.name == name)


def study_vectors(info: RunInfo, dataset_meta: pd.DataFrame, name: str = "topics") -> np.ndarray | None:
    """``[N, size]`` values of a vector condition (``"topics"`` or ``"terms"``) of the run's studies (rows of
    ``latents.parquet``), NaN where unknown; None when the run or the dataset lacks that group."""
    from cbvae_ext.data.builder import vector_columns

    n = info.schema.vector_sizes.get(name, 0)
    columns = vector_columns(name, n)
    if not n or not set(columns) <= set(dataset_meta.columns):
        return None
    table = dataset_meta.set_index("id")
    rows = table.reindex(info.latents["id"])
    values = rows[columns].to_numpy(np.float64, copy=True)
    observed = rows.get(f"{name}_observed")
    if observed is not None:
        values[~observed.fillna(False).to_numpy(bool)] = np.nan
    return values


def start_terms(info: RunInfo, terms: np.ndarray | None, study_id: str | None) -> np.ndarray | None:
    """A study's own text embedding (``study_vectors(..., "terms")``), None when it has no text or for a prior draw."""
    row = _study_row(info, terms, study_id)
    return None if row is None else row.astype(np.float32)


def _study_row(info: RunInfo, values: np.ndarray | None, study_id: str | None) -> np.ndarray | None:
    """The row of ``study_vectors`` for ``study_id``; None when absent, unknown (NaN) or for a prior draw."""
    if values is None or study_id is None:
        return None
    rows = np.flatnonzero(info.latents["id"].to_numpy() == study_id)
    if not rows.size or not np.isfinite(values[rows[0]]).all():
        return None
    return values[rows[0]]


def start_topics(info: RunInfo, topics: np.ndarray | None, study_id: str | None) -> np.ndarray | None:
    """A study's own topic mixture on the topic sliders' 0.01 grid (None when unknown or for a prior draw,
    ``study_id`` None), so that the sliders reproduce the starting point exactly."""
    row = _study_row(info, topics, study_id)
    if row is None or row.sum() <= 0:
        return None
    return np.round(row, 2).astype(np.float32)


def value_range(maps: Sequence[np.ndarray], mask: np.ndarray | None = None) -> tuple[float, float]:
    """``(low, high)`` of the maps inside the mask, with ``high > low``: the colour scale of generated maps,
    so that a barely trained decoder (all values near 0.5) still shows its structure."""
    values = [m[mask] if mask is not None and mask.any() else np.ravel(m) for m in maps]
    lo = min(float(v.min()) for v in values)
    hi = max(float(v.max()) for v in values)
    return lo, max(hi, lo + 1e-6)
