"""Non-UI logic of the Counterfactual Machine app: locating and checking a run, starting points, slider
ranges, extrapolation flags and fast slice rendering over the MNI152 template.

Everything here is plain Python/numpy so that it is testable without Streamlit; ``app/streamlit_app.py``
only wires widgets to these functions and caches their results.
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from cbvae_ext.schema import CONTINUOUS_FIELDS, PRIORS, MetadataSchema, SchemaError

__all__ = [
    "FIELD_LABELS",
    "LATENT_RANGE",
    "RUN_FILES",
    "NoRunError",
    "RunInfo",
    "SliceRenderer",
    "StartPoint",
    "extrapolation_note",
    "filter_studies",
    "load_dataset_rows",
    "load_run_info",
    "no_run_message",
    "nifti_bytes",
    "prior_start",
    "resolve_paths",
    "slider_spec",
    "slider_value",
    "study_start",
    "sweep_years",
    "value_range",
]

#: Files of a run folder the app reads (formats.md, "Run folder").
RUN_FILES: tuple[str, ...] = ("decoder.ts", "decoder_schema.json", "latents.parquet", "mask.nii.gz")

#: Latent sliders span this range; starting values are clipped into it so that every slider is valid.
LATENT_RANGE: tuple[float, float] = (-6.0, 6.0)

FIELD_LABELS: dict[str, str] = {
    "year": "Publication year",
    "sample_size": "Sample size (participants)",
    "field_strength": "Field strength (T)",
    "fwhm": "Smoothing FWHM (mm)",
}

# slider step per field; year and sample size are whole numbers
_STEPS: dict[str, float] = {"year": 1.0, "sample_size": 1.0, "field_strength": 0.5, "fwhm": 0.5}

_MAIN_JOB = "bash scripts/run_main.sh"
_TRAIN_COMMAND = (
    "python -m monai.bundle run training --config_file bundle/configs/train.yaml "
    "--dataset_dir runs/data_1000 --output_dir {run_dir}"
)


class NoRunError(FileNotFoundError):
    """The run folder or one of its files is missing; the message says how to create one."""


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
    extra: dict[str, Any] = field(default_factory=dict)


def load_run_info(run_dir: Path) -> RunInfo:
    """Read and cross-check ``decoder_schema.json``, ``latents.parquet`` and ``mask.nii.gz``.

    Raises:
        NoRunError: the folder or a required file is missing.
        SchemaError: the files do not match what the app expects (names the file, field and fix).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NoRunError(no_run_message(run_dir))
    missing = [name for name in RUN_FILES if not (run_dir / name).is_file()]
    if missing:
        raise NoRunError(no_run_message(run_dir, missing))
    fix = "re-export the run with this version of cbvae_ext (python -m monai.bundle run training ...)"
    try:
        spec = json.loads((run_dir / "decoder_schema.json").read_text())
    except json.JSONDecodeError as err:
        raise SchemaError(f"{run_dir / 'decoder_schema.json'} is not valid JSON ({err}); {fix}") from None
    for key in ("latent_size", "meta_schema", "grid", "latent_kl"):
        if key not in spec:
            raise SchemaError(f"{run_dir / 'decoder_schema.json'} lacks field {key!r}; {fix}")
    schema = MetadataSchema.from_dict(spec["meta_schema"])
    latent_size = int(spec["latent_size"])
    try:
        latents = pd.read_parquet(run_dir / "latents.parquet")
    except (OSError, ValueError) as err:  # pyarrow's errors derive from these
        raise SchemaError(f"{run_dir / 'latents.parquet'} is unreadable ({err}); {fix}") from None
    need = {"id", "title", "year", "category", "split", "mu"}
    if not need <= set(latents.columns):
        raise SchemaError(f"latents.parquet lacks columns {sorted(need - set(latents.columns))}; {fix}")
    mu = np.array(latents["mu"].tolist(), dtype=np.float32).reshape(len(latents), -1)
    if len(latents) and mu.shape[1] != latent_size:
        raise SchemaError(f"latents.parquet: mu has {mu.shape[1]} entries per study but latent_size is {latent_size}")
    if spec["latent_kl"] is None:
        # not recorded: rank by the KL of the posterior means alone (0.5 * E[mu^2]), its dominant term
        latent_kl = 0.5 * (mu.astype(np.float64) ** 2).mean(axis=0) if len(mu) else np.zeros(latent_size)
    else:
        latent_kl = np.asarray(spec["latent_kl"], dtype=np.float64).ravel()
    if latent_kl.size != latent_size:
        raise SchemaError(
            f"decoder_schema.json: latent_kl has {latent_kl.size} entries but latent_size is {latent_size}; {fix}"
        )
    mask_img = nib.load(run_dir / spec.get("mask_file", "mask.nii.gz"))
    shape = tuple(int(s) for s in spec["grid"].get("shape", mask_img.shape))
    if tuple(mask_img.shape[:3]) != shape:
        raise SchemaError(f"mask.nii.gz has shape {mask_img.shape} but decoder_schema.json grid is {shape}; {fix}")
    affine = np.asarray(spec["grid"].get("affine", mask_img.affine), dtype=np.float64)
    defaults_z = spec.get("imputed_defaults") or {}
    imputed = {}
    for f in schema.fields:
        zval = defaults_z.get(f.name, 0.0) if isinstance(defaults_z, Mapping) else 0.0
        imputed[f.name] = float(f.inverse(float(zval) if zval is not None else 0.0))
    dataset_dir = spec.get("dataset_dir")
    return RunInfo(
        run_dir=run_dir,
        schema=schema,
        latent_size=latent_size,
        kl_order=np.argsort(-latent_kl, kind="stable"),
        latent_kl=latent_kl,
        imputed_defaults=imputed,
        latents=latents.drop(columns=["mu"]),
        mu_array=mu,
        mask=np.asarray(mask_img.dataobj) > 0,
        affine=affine,
        model_kind=str(spec.get("model", "cbvae")),
        dataset_dir=Path(dataset_dir) if dataset_dir else None,
    )


def load_dataset_rows(dataset_dir: Path) -> tuple[np.ndarray, pd.DataFrame] | None:
    """Memory-mapped ``maps.npy`` and ``metadata.parquet`` of a dataset folder, or None when absent."""
    dataset_dir = Path(dataset_dir)
    if not ((dataset_dir / "maps.npy").is_file() and (dataset_dir / "metadata.parquet").is_file()):
        return None
    return np.load(dataset_dir / "maps.npy", mmap_mode="r"), pd.read_parquet(dataset_dir / "metadata.parquet")


# ----- starting points and conditions -------------------------------------------------------------


@dataclass
class StartPoint:
    """A latent code and the conditions it starts from (``None`` = unknown, let the model impute).

    Args:
        key: identifies the starting point (a study id or ``prior:<seed>``).
        z: latent code ``[L]`` (inside ``LATENT_RANGE``).
        conditions: ``{"task": str | None, "year": float | None, ...}``.
        label: human-readable description.
    """

    key: str
    z: np.ndarray
    conditions: dict[str, Any]
    label: str


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
    return StartPoint(f"prior:{seed}", np.clip(z, *LATENT_RANGE), conditions, f"prior draw, seed {seed}")


def slider_spec(schema: MetadataSchema, name: str) -> tuple[float, float, float]:
    """``(min, max, step)`` of a condition slider: the schema's range widened to the plausible range of
    ``PRIORS`` so that extrapolation can be explored (and is flagged by ``extrapolation_note``).

    Whole-number fields (year, sample size) get ``int`` bounds and step, the others ``float``.
    """
    spec = schema.field(name)
    lo, hi = PRIORS[name]["range"]
    step = _STEPS[name]
    lo, hi = math.floor(min(lo, spec.low) / step) * step, math.ceil(max(hi, spec.high) / step) * step
    return (int(lo), int(hi), int(step)) if step == 1 else (float(lo), float(hi), float(step))


def slider_value(schema: MetadataSchema, name: str, value: float) -> float:
    """``value`` snapped onto its slider (clipped, rounded to the step, same type as the bounds)."""
    lo, hi, step = slider_spec(schema, name)
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
        return f"extrapolation: {FIELD_LABELS[name].lower()} was never observed in training"
    if not spec.low <= value <= spec.high:
        return f"extrapolation: outside the training range [{spec.low:g}, {spec.high:g}]"
    return None


def sweep_years(schema: MetadataSchema, n: int = 6) -> list[int]:
    """``n`` whole years evenly spread over the schema's year range."""
    spec = schema.field("year")
    return [int(round(y)) for y in np.linspace(spec.low, spec.high, n)]


def value_range(maps: Sequence[np.ndarray], mask: np.ndarray | None = None) -> tuple[float, float]:
    """``(low, high)`` of the maps inside the mask, with ``high > low``: the colour scale of generated maps,
    so that a barely trained decoder (all values near 0.5) still shows its structure."""
    values = [m[mask] if mask is not None and mask.any() else np.ravel(m) for m in maps]
    lo = min(float(v.min()) for v in values)
    hi = max(float(v.max()) for v in values)
    return lo, max(hi, lo + 1e-6)


def nifti_bytes(img: nib.Nifti1Image) -> bytes:
    """A NIfTI image as ``.nii.gz`` bytes (fast compression: the download is the bottleneck, not size)."""
    return gzip.compress(img.to_bytes(), compresslevel=1)


# ----- rendering ----------------------------------------------------------------------------------


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        return ImageFont.load_default()


class SliceRenderer:
    """Renders maps on one grid as orthogonal slices over the MNI152 template, as RGB arrays.

    The template is resampled onto the map grid once (the constructor), and both are reoriented to RAS so
    that slicing is plain indexing; colouring uses a precomputed lookup table. One ortho view costs a
    few milliseconds, well inside the app's interaction budget.

    Args:
        affine: the map grid's affine (mm).
        shape: the map grid's shape.
        mask: optional brain mask on the grid; values outside it are not drawn.
        template: background image; default nilearn's MNI152 template (2 mm).
        panel_px: approximate height in pixels of one slice panel.
    """

    def __init__(
        self,
        affine: np.ndarray,
        shape: Sequence[int],
        mask: np.ndarray | None = None,
        template: nib.Nifti1Image | None = None,
        panel_px: int = 200,
    ) -> None:
        from nilearn.datasets import load_mni152_template
        from nilearn.image import resample_to_img

        shape = tuple(int(s) for s in shape)
        affine = np.asarray(affine, dtype=np.float64)
        self._ornt = nib.orientations.ornt_transform(
            nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt("RAS")
        )
        self.affine = affine @ nib.orientations.inv_ornt_aff(self._ornt, shape)
        ref = nib.Nifti1Image(np.zeros(shape, dtype=np.float32), affine)
        template = template if template is not None else load_mni152_template(resolution=2)
        bg = resample_to_img(template, ref, interpolation="continuous", force_resample=True, copy_header=True)
        self.template_img = bg  # on the map grid: a cheap background for nilearn's view_img
        bg = self.canonical(np.asarray(bg.dataobj, dtype=np.float32))
        top = float(np.percentile(bg[bg > 0], 99.5)) if (bg > 0).any() else 1.0
        self.background = np.clip(bg / top, 0.0, 1.0)
        self.mask = self.canonical(mask.astype(bool)) if mask is not None else None
        self.shape = self.background.shape
        self.scale = max(1, round(panel_px / max(self.shape[2], self.shape[1])))
        self._font = _font(13)

    def canonical(self, volume: np.ndarray) -> np.ndarray:
        """A volume on the map grid reoriented to RAS (a view when possible)."""
        return nib.orientations.apply_orientation(np.asarray(volume), self._ornt)

    def bounds_mm(self) -> list[tuple[float, float]]:
        """World (mm) extent of the grid along x, y, z."""
        lo = self.affine @ np.array([0, 0, 0, 1.0])
        hi = self.affine @ np.array([*(s - 1 for s in self.shape), 1.0])
        return [(float(min(a, b)), float(max(a, b))) for a, b in zip(lo[:3], hi[:3], strict=True)]

    def voxel(self, cut_mm: Sequence[float]) -> tuple[int, int, int]:
        """Nearest voxel (RAS grid) of a world coordinate, clipped into the grid."""
        ijk = np.linalg.solve(self.affine, np.array([*cut_mm, 1.0]))[:3]
        return tuple(int(np.clip(round(v), 0, s - 1)) for v, s in zip(ijk, self.shape, strict=True))  # type: ignore[return-value]

    def peak_mm(self, volume: np.ndarray) -> tuple[float, float, float]:
        """World coordinate of a volume's maximum inside the mask (for 'cut at peak')."""
        vol = self.canonical(volume)
        vol = np.where(self.mask, vol, -np.inf) if self.mask is not None else vol
        ijk = np.unravel_index(int(np.argmax(vol)), vol.shape)
        return tuple(float(v) for v in (self.affine @ np.array([*ijk, 1.0]))[:3])  # type: ignore[return-value]

    def _colorize(self, bg: np.ndarray, val: np.ndarray, lut: np.ndarray, vmin: float, vmax: float, thr: float):
        rgb = np.repeat(bg[..., None], 3, axis=-1)
        span = vmax - vmin if vmax > vmin else 1.0
        idx = np.clip(((val - vmin) / span * (len(lut) - 1)).astype(np.int64), 0, len(lut) - 1)
        show = np.abs(val) > thr
        rgb[show] = lut[idx[show]]
        return rgb

    def _panels(self, volume: np.ndarray, ijk: tuple[int, int, int]) -> list[tuple[np.ndarray, np.ndarray, str]]:
        # rot90 puts the second array axis upwards: superior (sagittal, coronal) and anterior (axial) at the top
        i, j, k = ijk
        vol = self.canonical(volume)
        vol = np.where(self.mask, vol, 0.0) if self.mask is not None else vol
        bg = self.background
        return [
            (np.rot90(bg[i]), np.rot90(vol[i]), "x"),
            (np.rot90(bg[:, j]), np.rot90(vol[:, j]), "y"),
            (np.rot90(bg[:, :, k]), np.rot90(vol[:, :, k]), "z"),
        ]

    def _upsample(self, rgb: np.ndarray) -> np.ndarray:
        s = self.scale
        return np.repeat(np.repeat(rgb, s, axis=0), s, axis=1) if s > 1 else rgb

    def _colorbar(self, height: int, cmap: str, vmin: float, vmax: float) -> np.ndarray:
        lut = colormaps[cmap](np.linspace(1.0, 0.0, max(height - 20, 2)))[:, :3].astype(np.float32)
        bar = np.ones((height, 76, 3), dtype=np.float32)
        bar[10 : 10 + len(lut), 4:16] = lut[:, None, :]
        img = Image.fromarray((bar * 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for frac, value in ((0.0, vmax), (0.5, (vmin + vmax) / 2), (1.0, vmin)):
            y = int(10 + frac * (len(lut) - 1)) - 7
            draw.text((19, max(0, min(height - 14, y))), f"{value:.2g}", fill=(0, 0, 0), font=self._font)
        return np.asarray(img, dtype=np.float32) / 255.0

    def ortho(
        self,
        volume: np.ndarray,
        cut_mm: Sequence[float],
        cmap: str = "hot",
        vmin: float = 0.0,
        vmax: float | None = None,
        threshold: float = 0.0,
    ) -> np.ndarray:
        """Sagittal, coronal and axial slices through ``cut_mm`` with a colour bar, as ``uint8 [H, W, 3]``.

        Args:
            volume: map on the grid given to the constructor.
            cut_mm: world coordinates (x, y, z) of the cuts.
            cmap: matplotlib colour map name (use a diverging one, e.g. ``RdBu_r``, with ``vmin = -vmax``).
            vmin: value at the bottom of the colour map.
            vmax: value at the top (default: the volume's maximum).
            threshold: voxels with ``|value| < threshold`` show only the template.
        """
        ijk = self.voxel(cut_mm)
        vmax = float(np.max(volume)) if vmax is None else float(vmax)
        lut = colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3].astype(np.float32)
        tiles = []
        for (bg, val, axis), cut in zip(self._panels(volume, ijk), cut_mm, strict=True):
            tiles.append((self._upsample(self._colorize(bg, val, lut, vmin, vmax, threshold)), f"{axis}={cut:.0f}"))
        height = max(t.shape[0] for t, _ in tiles) + 18
        parts = []
        for tile, _ in tiles:
            pad = np.ones((height, tile.shape[1] + 6, 3), dtype=np.float32)
            pad[18 : 18 + tile.shape[0], 3 : 3 + tile.shape[1]] = tile
            parts.append(pad)
        parts.append(self._colorbar(height, cmap, vmin, vmax))
        img = Image.fromarray((np.concatenate(parts, axis=1) * 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        x = 3
        for n, (tile, label) in enumerate(tiles):
            draw.text((x, 1), label, fill=(0, 0, 0), font=self._font)
            if n:  # coronal and axial panels: neurological convention, left on the left
                draw.text((x + tile.shape[1] - 10, 1), "R", fill=(0, 0, 0), font=self._font)
                draw.text((x + 30 + 8 * len(label), 1), "L", fill=(0, 0, 0), font=self._font)
            x += tile.shape[1] + 6
        return np.asarray(img)

    def axial(
        self,
        volume: np.ndarray,
        z_mm: float,
        cmap: str = "hot",
        vmin: float = 0.0,
        vmax: float | None = None,
        threshold: float = 0.0,
    ) -> np.ndarray:
        """One axial slice at ``z_mm`` (no colour bar), as ``uint8 [H, W, 3]``; for small multiples."""
        k = self.voxel((0.0, 0.0, z_mm))[2]
        vol = self.canonical(volume)
        vol = np.where(self.mask, vol, 0.0) if self.mask is not None else vol
        vmax = float(np.max(volume)) if vmax is None else float(vmax)
        lut = colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3].astype(np.float32)
        rgb = self._colorize(np.rot90(self.background[:, :, k]), np.rot90(vol[:, :, k]), lut, vmin, vmax, threshold)
        return (self._upsample(rgb) * 255).astype(np.uint8)
