"""A training run folder: its file names and the checks every reader of a run makes (formats.md "Run folder").

``RunFolder.open(path, require=...)`` checks that the named files are present and that
``decoder_schema.json`` and ``network_config.json`` are readable and agree with each other (latent size,
grid, a finite affine, the conditioning layout, ``imputed_defaults``, file names that stay inside the
folder); the other checks run where their file is read (``mask``, ``latents``, ``load_network``, and
``load_decoder`` / ``load_conditional_mean``, which decode once with z = 0 and the default conditions and
check the output's shape and range) or against a dataset (``check_dataset``). Every failure is a one-line
``RunFolderError`` naming the file and the fix; ``err.missing`` lists absent files, so a caller can show
how to make them. ``RunFolder`` is the one reader of a run: inference, evaluation and the app use its
typed accessors instead of the raw JSON.

A run folder from someone else must be trusted like code: ``decoder.ts`` is a TorchScript program that
runs with your permissions when loaded (``model.pt`` loads with ``weights_only=True`` and is safe).
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cbvae_ext.errors import CbvaeError
from cbvae_ext.schema import MetadataSchema, SchemaError

__all__ = [
    "APP_FILES",
    "CHECKPOINTS",
    "COND_MEAN",
    "DECODER",
    "EVALUATION_FILES",
    "HISTORY",
    "INFERENCE_FILES",
    "LATENTS",
    "LATENT_COLUMNS",
    "MASK",
    "MODEL",
    "NETWORK_CONFIG",
    "SCHEMA",
    "TERM_EMBEDDING",
    "TRAIN_COMMAND",
    "RunFolder",
    "RunFolderError",
    "remove_stale_temporaries",
    "replace_atomically",
    "trained_on_checksum",
    "write_json_atomically",
    "write_png_atomically",
]

MODEL = "model.pt"  #: best weights (bare state dict)
NETWORK_CONFIG = "network_config.json"  #: ``build_network`` config + dataset checksum and grid
DECODER = "decoder.ts"  #: TorchScript decoder ``(z, cond) -> map in [0, 1]``
COND_MEAN = "conditional_mean.ts"  #: TorchScript conditional-mean path ``cond -> map in [0, 1]``
SCHEMA = "decoder_schema.json"  #: what a client needs to build ``cond`` and place the map
MASK = "mask.nii.gz"  #: brain mask on the grid
TERM_EMBEDDING = "term_embedding.npz"  #: NeuroQuery terms -> the ``terms`` condition (runs with a terms group)
LATENTS = "latents.parquet"  #: every study's posterior mean
HISTORY = "history.csv"  #: per-epoch training record
CHECKPOINTS = "checkpoints"  #: resume checkpoints (a folder)

#: What each reader needs.
INFERENCE_FILES: tuple[str, ...] = (DECODER, SCHEMA, MASK)
APP_FILES: tuple[str, ...] = (DECODER, SCHEMA, LATENTS, MASK)
EVALUATION_FILES: tuple[str, ...] = (NETWORK_CONFIG, MODEL)

#: Columns of ``latents.parquet``.
LATENT_COLUMNS: tuple[str, ...] = ("id", "title", "year", "category", "split", "mu")

#: Keys ``decoder_schema.json`` must have.
_SCHEMA_KEYS = ("latent_size", "model", "meta_schema", "grid")

#: How a run folder is made (named in the errors for missing files).
TRAIN_COMMAND = (
    "python -m monai.bundle run training --config_file bundle/configs/train.yaml --dataset_dir DATA --output_dir RUN"
)

_REEXPORT = "re-export the run with this version of cbvae_ext (" + TRAIN_COMMAND + ")"


class RunFolderError(CbvaeError, ValueError):
    """A run folder is missing a file, a file is unreadable, or its files do not match each other or a dataset.

    Attributes:
        missing: names of required files that are absent (empty for other failures).
    """

    def __init__(self, message: str, missing: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.missing = tuple(missing)


def _temporary_pattern(path: Path) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(path.name)}\.(\d+)-[0-9a-f]+\.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, ValueError):
        return False
    return True


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete the temporary files of ``path`` left by writers that were killed (their PID is gone).

    ``replace_atomically`` names a temporary ``.NAME.PID-RANDOM.tmp``; a SIGKILL or a power cut leaves it
    beside the file. Temporaries of live processes (another writer at work) are kept.

    Returns:
        The files removed.
    """
    path = Path(path)
    pattern, removed = _temporary_pattern(path), []
    try:
        candidates = list(path.parent.iterdir())
    except OSError:
        return removed
    for candidate in candidates:
        match = pattern.fullmatch(candidate.name)
        if match and not _alive(int(match.group(1))):
            try:
                candidate.unlink()
                removed.append(candidate)
            except OSError:  # gone already, or not ours to delete: leave it
                pass
    return removed


def replace_atomically(path: str | Path, write: Any) -> Path:
    """Write a file through a temporary file in the same folder, then rename it over ``path``.

    A kill leaves either the old file or the new one, never a half-written file under the final name;
    the temporary a kill leaves behind is removed by the next write of the same file
    (``remove_stale_temporaries``).

    Args:
        path: the final file.
        write: called with the temporary path; writes the content there.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # claim the name before writing
    try:
        write(str(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomically(path: str | Path, value: Any) -> Path:
    """``replace_atomically`` for a JSON document (indented)."""
    return replace_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=1)))


def write_png_atomically(fig: Any, path: str | Path) -> Path:
    """``replace_atomically`` for a matplotlib figure, saved at its own size and dpi.

    The figure's size is part of its layout, so global ``savefig`` settings are ignored: importing
    ``nimare.reports`` sets ``savefig.bbox = "tight"`` and ``savefig.dpi = 100`` for the whole process.
    """
    from matplotlib import rc_context

    with rc_context({"savefig.bbox": "standard", "savefig.dpi": "figure"}):
        return replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__


def _script_error(err: BaseException) -> str:
    """The informative line of a TorchScript error (its first line is "The following operation failed ...")."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    cause = next((line for line in reversed(lines) if re.match(r"^\w+(Error|Exception):", line)), None)
    return cause[:200] if cause else _first_line(err)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except RecursionError:
        raise RunFolderError(f"{path} is nested too deeply to be a run file; {_REEXPORT}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunFolderError(f"{path} is not readable JSON ({_first_line(err)}); {_REEXPORT}") from None
    if not isinstance(value, dict):
        raise RunFolderError(f"{path} holds a {type(value).__name__}, not a JSON object; {_REEXPORT}")
    return value


def trained_on_checksum(config: Mapping[str, Any]) -> str | None:
    """sha256 of the training dataset's ``manifest.json`` recorded in a network config, or ``None``."""
    # older runs used other key names for the same checksum
    for key in ("dataset_manifest_sha256", "manifest_sha256", "dataset_sha256"):
        if config.get(key):
            return str(config[key])
    return None


@dataclass
class RunFolder:
    """A checked run folder.

    Attributes:
        path: the folder.
        decoder_schema: ``decoder_schema.json`` (``None`` when absent and not required).
        network_config: ``network_config.json`` (``None`` when absent and not required).
    """

    path: Path
    decoder_schema: dict[str, Any] | None = None
    network_config: dict[str, Any] | None = None

    # ----- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, require: Sequence[str] = INFERENCE_FILES) -> RunFolder:
        """Check a run folder and read its JSON files.

        Args:
            path: the run folder.
            require: files that must be present (``INFERENCE_FILES``, ``APP_FILES``, ``EVALUATION_FILES``
                or any of the file-name constants).

        Raises:
            RunFolderError: the folder or a required file is missing (``err.missing``), a JSON file is
                malformed, or ``decoder_schema.json`` and ``network_config.json`` disagree.
        """
        path = Path(path)
        if not path.is_dir():
            raise RunFolderError(
                f"run folder {path} does not exist; train and export a run with: {TRAIN_COMMAND}", missing=require
            )
        missing = [name for name in require if not (path / name).is_file()]
        if missing:
            raise RunFolderError(
                f"run folder {path} has no {', '.join(missing)}; train and export a run with: {TRAIN_COMMAND}",
                missing=missing,
            )
        run = cls(path)
        if (path / SCHEMA).is_file():
            run.decoder_schema = _read_json(path / SCHEMA)
            run._check_decoder_schema()
        if (path / NETWORK_CONFIG).is_file():
            run.network_config = _read_json(path / NETWORK_CONFIG)
            run._check_network_config()
        return run

    def file(self, name: str) -> Path:
        """Path of a file of the run (one of the file-name constants)."""
        return self.path / name

    def term_embedder(self) -> Any:
        """The run's ``TextEmbedder`` (``term_embedding.npz``): typed terms -> the ``terms`` condition; None for
        a run without a terms group.

        Raises:
            RunFolderError: the schema has a terms group but the file is missing, unreadable or of another size.
        """
        schema = self.schema
        if not schema.term_dims:
            return None
        from cbvae_ext.data.errors import DataError
        from cbvae_ext.data.neuroquery import TextEmbedder

        path = self.file(TERM_EMBEDDING)
        if not path.is_file():
            raise RunFolderError(
                f"run folder {self.path} has no {TERM_EMBEDDING}; {_REEXPORT}", missing=(TERM_EMBEDDING,)
            )
        try:
            embedder = TextEmbedder.load(path)
        except DataError as err:
            raise RunFolderError(_first_line(err)) from None
        if embedder.embedding.dims != schema.term_dims:
            raise RunFolderError(
                f"{path} embeds in {embedder.embedding.dims} dimensions but the schema's terms group has "
                f"{schema.term_dims}; {_REEXPORT}"
            )
        return embedder

    def _spec(self) -> dict[str, Any]:
        if self.decoder_schema is None:
            raise RunFolderError(f"run folder {self.path} has no {SCHEMA}; {_REEXPORT}", missing=(SCHEMA,))
        return self.decoder_schema

    def _config(self) -> dict[str, Any]:
        if self.network_config is None:
            raise RunFolderError(
                f"run folder {self.path} has no {NETWORK_CONFIG}; train a run with: {TRAIN_COMMAND}",
                missing=(NETWORK_CONFIG,),
            )
        return self.network_config

    def _check_decoder_schema(self) -> None:
        spec, where = self._spec(), self.path / SCHEMA
        absent = [k for k in _SCHEMA_KEYS if k not in spec]
        if absent:
            raise RunFolderError(f"{where} lacks {', '.join(absent)}; {_REEXPORT}")
        try:
            latent_size = int(spec["latent_size"])
            shape = [int(s) for s in spec["grid"]["shape"]]
            affine = np.asarray(spec["grid"]["affine"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as err:
            raise RunFolderError(
                f"{where} has a malformed latent_size or grid ({_first_line(err)}); {_REEXPORT}"
            ) from None
        if latent_size < 1 or len(shape) != 3 or min(shape) < 1 or affine.shape != (4, 4):
            raise RunFolderError(
                f"{where}: latent_size {latent_size}, grid shape {shape} or a {affine.shape} affine is invalid "
                f"(need latent_size >= 1, 3 positive sizes, a 4x4 affine); {_REEXPORT}"
            )
        if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise RunFolderError(
                f"{where}: the grid affine is not finite and invertible (maps would be placed nowhere); {_REEXPORT}"
            )
        kl = spec.get("latent_kl")
        if kl is not None:
            try:
                kl = np.asarray(kl, dtype=np.float64)
            except (TypeError, ValueError) as err:
                raise RunFolderError(
                    f"{where}: latent_kl is not a list of numbers ({_first_line(err)}); {_REEXPORT}"
                ) from None
            if kl.size != latent_size:
                raise RunFolderError(
                    f"{where}: latent_kl has {kl.size} entries but latent_size is {latent_size}; {_REEXPORT}"
                )
            if not np.isfinite(kl).all():
                raise RunFolderError(f"{where}: latent_kl holds NaN or infinite values; {_REEXPORT}")
        schema = self.schema  # parse the metadata schema now, so a bad one fails at open
        layout = schema.to_dict()
        for key, recorded, derived in (
            ("decoder_input_layout", spec.get("decoder_input_layout"), layout["meta_layout"] + layout["mask_layout"]),
            ("meta_layout", spec["meta_schema"].get("meta_layout"), layout["meta_layout"]),
        ):
            # an edited category or field list no longer gives the layout the decoder was trained on
            if recorded is not None and recorded != derived:
                raise RunFolderError(
                    f"{where}: meta_schema's categories or fields do not give its recorded {key} (the decoder "
                    f"was trained on that layout); restore {SCHEMA} as exported, or re-export the run"
                )
        self._member("mask_file", MASK)
        self._member("conditional_mean_file", COND_MEAN)
        self.imputed_defaults  # noqa: B018 - check them now

    def _check_network_config(self) -> None:
        config, spec = self._config(), self.decoder_schema
        if spec is None:
            return
        fix = "keep both files from the same run, or re-export it"
        for key, label in (("model", "model"), ("latent_size", "latent size")):
            ours, theirs = config.get(key, "cbvae" if key == "model" else None), spec.get(key)
            if str(ours) != str(theirs):
                raise RunFolderError(
                    f"{label} mismatch: {self.path / SCHEMA} has {key} {theirs} but {NETWORK_CONFIG} has {ours}; {fix}"
                )
        grid = config.get("spatial_shape")
        if grid is not None and grid != self.grid_shape_list:
            raise RunFolderError(
                f"{self.path / NETWORK_CONFIG} has spatial_shape {grid} but {SCHEMA} has grid "
                f"{self.grid_shape_list}; {fix}"
            )
        schema = self.schema
        for key, expected in (
            ("meta_dim", schema.meta_dim),
            ("mask_dim", schema.mask_dim),
            ("n_continuous", schema.n_continuous),
        ):
            # the network was built for this many conditioning values: a category added to or removed from
            # decoder_schema.json's meta_schema no longer fits it
            if key in config and config[key] != expected:
                raise RunFolderError(
                    f"schema mismatch: {self.path / NETWORK_CONFIG} has {key}={config[key]} but the meta_schema of "
                    f"{SCHEMA} gives {key}={expected}; {fix}"
                )

    # ----- what the decoder schema says -----------------------------------------------------------
    @cached_property
    def schema(self) -> MetadataSchema:
        """The metadata schema the decoder was trained with."""
        try:
            return MetadataSchema.from_dict(self._spec()["meta_schema"])
        except (SchemaError, KeyError, TypeError, ValueError) as err:
            raise RunFolderError(
                f"{self.path / SCHEMA} has an unreadable meta_schema ({_first_line(err)}); {_REEXPORT}"
            ) from None

    @property
    def latent_size(self) -> int:
        """Number of latent dimensions."""
        source = self.decoder_schema if self.decoder_schema is not None else self._config()
        return int(source["latent_size"])

    @property
    def model_kind(self) -> str:
        """``"cbvae"`` or ``"baseline"`` (or a newer model name)."""
        source = self.decoder_schema if self.decoder_schema is not None else self._config()
        return str(source.get("model", "cbvae"))

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """Map grid ``(D, H, W)``."""
        if self.decoder_schema is not None:
            return tuple(int(s) for s in self.decoder_schema["grid"]["shape"])  # type: ignore[return-value]
        config = self._config()
        if "spatial_shape" not in config:
            raise RunFolderError(f"{self.path / NETWORK_CONFIG} lacks spatial_shape; train a run with: {TRAIN_COMMAND}")
        return tuple(int(s) for s in config["spatial_shape"])  # type: ignore[return-value]

    @property
    def grid_shape_list(self) -> list[int]:
        return list(self.grid_shape)

    @property
    def affine(self) -> np.ndarray:
        """4x4 voxel-to-MNI affine of the grid."""
        return np.asarray(self._spec()["grid"]["affine"], dtype=np.float64)

    @property
    def latent_kl(self) -> np.ndarray | None:
        """Mean KL per latent dimension on the training split, or ``None`` when the export did not record it."""
        kl = self._spec().get("latent_kl")
        return None if kl is None else np.asarray(kl, dtype=np.float64).ravel()

    @property
    def imputed_defaults(self) -> dict[str, float]:
        """Normalised value the decoder gets for each missing continuous field, by field name.

        Exports record the mean imputation-head prediction on the training maps (``export.imputed_defaults``);
        a run exported without them (or before they were recorded) gets 0, the training mean.

        Raises:
            RunFolderError: ``imputed_defaults`` is not an object mapping every field to a finite number.
        """
        names = [f.name for f in self.schema.fields]
        recorded = self._spec().get("imputed_defaults")
        if recorded is None:
            return dict.fromkeys(names, 0.0)
        numbers = isinstance(recorded, Mapping) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in recorded.values()
        )
        if not numbers or sorted(recorded) != sorted(names):
            text = json.dumps(recorded)[:80] if isinstance(recorded, (dict, list, str, int, float)) else type(recorded)
            raise RunFolderError(
                f"{self.path / SCHEMA}: imputed_defaults must map each of {', '.join(names)} to a finite number "
                f"(normalised units), not {text}; {_REEXPORT}"
            )
        return {name: float(recorded[name]) for name in names}

    @property
    def imputed_default_vector(self) -> np.ndarray:
        """``imputed_defaults`` as float32 ``[n_continuous]`` in the schema's field order (the decoder's ``imp_mu``)."""
        defaults = self.imputed_defaults
        return np.array([defaults[f.name] for f in self.schema.fields], dtype=np.float32)

    @property
    def imputed_defaults_raw(self) -> dict[str, float]:
        """``imputed_defaults`` in raw units (years, subjects, tesla, mm), as the app shows them."""
        defaults = self.imputed_defaults
        return {f.name: float(f.inverse(defaults[f.name])) for f in self.schema.fields}

    def default_conditioning(self) -> np.ndarray:
        """Decoder input ``m [meta_dim + mask_dim]`` with every condition unknown: each continuous field at its
        imputed default, every mask entry 0."""
        schema = self.schema
        meta = np.zeros(schema.meta_dim, np.float32)
        meta[: schema.n_continuous] = self.imputed_default_vector
        return np.concatenate([meta, np.zeros(schema.mask_dim, np.float32)])

    def _member(self, key: str, default: str) -> str | None:
        """The file name ``decoder_schema.json`` gives under ``key`` (``default`` if absent, None if null);
        only a bare name is accepted, so a run folder cannot make a reader open a file outside it."""
        spec = self._spec()
        if key not in spec:
            return default
        name = spec[key]
        if name is None:
            return None
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise RunFolderError(
                f"{self.path / SCHEMA}: {key} {str(name)[:80]!r} is not a file name inside the run folder; {_REEXPORT}"
            )
        return name

    @property
    def conditional_mean_file(self) -> Path | None:
        """``conditional_mean.ts``, or None when the run has no conditional-mean path.

        The path exists for a C-β-VAE built with ``cond_mean``; exports of other networks record
        ``conditional_mean_file: null`` (older exports wrote a file for every network: their
        ``network_config.json`` and model name decide).

        Raises:
            RunFolderError: ``decoder_schema.json`` names a file that is absent.
        """
        name = self._member("conditional_mean_file", COND_MEAN)
        config = self.network_config or {}
        if name is None or self.model_kind != "cbvae" or not config.get("cond_mean", True):
            return None
        path = self.path / name
        if not path.is_file():
            if "conditional_mean_file" not in self._spec():
                return None  # exported before the path existed
            raise RunFolderError(
                f"run folder {self.path} has no {name} although {SCHEMA} names it; copy it with the run's other "
                f"files, or re-export the run",
                missing=(name,),
            )
        return path

    @property
    def has_conditional_mean(self) -> bool:
        """Whether the run has a conditional-mean path (``load_conditional_mean``)."""
        return self.conditional_mean_file is not None

    @property
    def dataset_dir(self) -> Path | None:
        """Dataset folder the run was trained on, as recorded at export (may no longer exist)."""
        value = (self.decoder_schema or {}).get("dataset_dir")
        return Path(value) if value else None

    @property
    def trained_on(self) -> str | None:
        """sha256 of the training dataset's ``manifest.json`` (``None`` for runs that did not record it)."""
        return None if self.network_config is None else trained_on_checksum(self.network_config)

    # ----- files checked where they are read ------------------------------------------------------
    def mask(self) -> np.ndarray:
        """Bool brain mask ``[D, H, W]``, checked against the grid."""
        import nibabel as nib

        path = self.path / (self._member("mask_file", MASK) or MASK)
        try:
            mask = np.asarray(nib.load(path).dataobj) > 0
        except Exception as err:  # noqa: BLE001 - nibabel raises many types; all mean "unreadable"
            raise RunFolderError(f"{path} is not a readable NIfTI mask ({_first_line(err)}); {_REEXPORT}") from None
        if mask.shape != self.grid_shape:
            raise RunFolderError(f"{path} has shape {mask.shape}, not the grid {self.grid_shape_list}; {_REEXPORT}")
        return mask

    def latents(self) -> tuple[pd.DataFrame, np.ndarray]:
        """``latents.parquet`` without ``mu``, and ``mu`` as float32 ``[N, latent_size]`` (finite)."""
        path = self.path / LATENTS
        try:
            frame = pd.read_parquet(path)
        except Exception as err:  # noqa: BLE001 - pyarrow raises many types; all mean "unreadable"
            raise RunFolderError(f"{path} is unreadable ({_first_line(err)}); {_REEXPORT}") from None
        absent = [c for c in LATENT_COLUMNS if c not in frame.columns]
        if absent:
            raise RunFolderError(f"{path} lacks columns {', '.join(absent)}; {_REEXPORT}")
        try:
            mu = np.array(frame["mu"].tolist(), dtype=np.float32).reshape(len(frame), -1)
        except (TypeError, ValueError) as err:
            raise RunFolderError(f"{path}: mu is not one vector per study ({_first_line(err)}); {_REEXPORT}") from None
        if len(frame) and mu.shape[1] != self.latent_size:
            raise RunFolderError(
                f"{path}: mu has {mu.shape[1]} entries per study but latent_size is {self.latent_size}; {_REEXPORT}"
            )
        if not np.isfinite(mu).all():
            raise RunFolderError(f"{path}: mu holds NaN or infinite values; {_REEXPORT}")
        return frame.drop(columns=["mu"]), mu

    def history(self) -> pd.DataFrame | None:
        """``history.csv`` or ``None`` when absent."""
        path = self.path / HISTORY
        if not path.is_file():
            return None
        try:
            return pd.read_csv(path)
        except Exception as err:  # noqa: BLE001 - any unreadable CSV gets the same answer
            raise RunFolderError(f"{path} is unreadable ({_first_line(err)}); delete it or retrain") from None

    def checkpoint_sha256(self) -> str:
        """sha256 of ``model.pt`` (recorded with evaluation results)."""
        from cbvae_ext.data.sources import file_sha256

        return file_sha256(self.path / MODEL)

    def load_decoder(self, probe: bool = True) -> torch.jit.ScriptModule:
        """The TorchScript decoder on CPU in eval mode. It is code: load only runs you trust.

        Args:
            probe: decode once with z = 0 and ``default_conditioning()`` and check the output, so a decoder
                of another run (latent size, conditioning layout, grid) or a broken one fails here.
        """
        decoder = self._load_script(self.path / DECODER)
        if probe:
            z = torch.zeros(1, self.latent_size)
            self._probe(decoder, self.path / DECODER, f"z [1, {self.latent_size}] and ", z)
        return decoder

    def load_conditional_mean(self, probe: bool = True) -> torch.jit.ScriptModule:
        """The TorchScript conditional-mean path ``m -> map`` (checked as ``load_decoder``).

        Raises:
            RunFolderError: the run has none (``has_conditional_mean``), or the file is broken.
        """
        path = self.conditional_mean_file
        if path is None:
            raise RunFolderError(
                f"run {self.path} has no conditional-mean path (a {self.model_kind} network without cond_mean); "
                "decode z = 0 instead, or train a C-β-VAE with cond_mean: true"
            )
        module = self._load_script(path)
        if probe:
            self._probe(module, path, "")
        return module

    def _load_script(self, path: Path) -> torch.jit.ScriptModule:
        try:
            return torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as err:  # noqa: BLE001 - torch.jit raises RuntimeError, ValueError, zip errors
            raise RunFolderError(f"{path} is not a TorchScript file ({_first_line(err)}); {_REEXPORT}") from None

    def _probe(self, module: torch.jit.ScriptModule, path: Path, takes: str, *latent: torch.Tensor) -> None:
        """Run ``module(*latent, m)`` once for the default conditions; refuse a wrong shape or a value outside [0, 1]."""
        m = torch.from_numpy(self.default_conditioning()[None])
        fix = f"keep {path.name} and {SCHEMA} from the same export, or re-export the run"
        try:
            with torch.no_grad():
                out = module(*latent, m)
        except Exception as err:  # noqa: BLE001 - a foreign TorchScript program can raise anything
            raise RunFolderError(
                f"{path} does not decode {takes}conditions [1, {m.shape[1]}] as {SCHEMA} describes "
                f"({_script_error(err)}); {fix}"
            ) from None
        want = (1, 1, *self.grid_shape)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise RunFolderError(f"{path} gives maps of shape {got}, not {want} (the grid of {SCHEMA}); {fix}")
        out = out.float()
        if not torch.isfinite(out).all() or out.min() < 0 or out.max() > 1:
            finite = out[torch.isfinite(out)]
            spread = f"{float(finite.min()):.3g}..{float(finite.max()):.3g}" if finite.numel() else "none finite"
            raise RunFolderError(
                f"{path} gives values outside [0, 1] or NaN for z = 0 and unknown conditions (range {spread}); a "
                f"cbvae export ends in a sigmoid, so re-export the run"
            )

    def load_network(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """Rebuild the network from ``network_config.json`` and load ``model.pt`` with ``weights_only=True``.

        Returns:
            The network on ``device`` in eval mode.
        """
        from cbvae_ext.networks import build_network

        config, ckpt = self._config(), self.path / MODEL
        if not ckpt.is_file():
            raise RunFolderError(f"run folder {self.path} has no {MODEL}; train a run with: {TRAIN_COMMAND}", (MODEL,))
        try:
            net = build_network(config)
        except (ValueError, TypeError, KeyError) as err:
            raise RunFolderError(f"{self.path / NETWORK_CONFIG} cannot build a network ({_first_line(err)})") from None
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable checkpoint gets the same one-line answer
            raise RunFolderError(
                f"{ckpt} cannot be loaded with weights_only=True ({_first_line(err)}); keep model.pt from a "
                "bundle training run"
            ) from None
        try:
            net.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError, ValueError) as err:
            raise RunFolderError(
                f"checkpoint mismatch: {ckpt} does not fit {self.path / NETWORK_CONFIG} ({_first_line(err)}); keep model.pt and "
                f"{NETWORK_CONFIG} from the same run"
            ) from None
        return net.to(device).eval()

    # ----- against a dataset ----------------------------------------------------------------------
    def check_dataset(
        self, schema: MetadataSchema, grid_shape: Sequence[int], manifest_sha256: str | None = None
    ) -> None:
        """Refuse a dataset the run was not trained on.

        Args:
            schema: the dataset's metadata schema.
            grid_shape: the dataset's map grid.
            manifest_sha256: checksum of the dataset's ``manifest.json``; another build has other splits,
                so training studies could be scored as test studies.

        Raises:
            RunFolderError: another build, grid, metadata layout or category list.
        """
        fix = "use the dataset the run was trained on, or retrain"
        trained_on = self.trained_on
        if manifest_sha256 is not None and trained_on is not None and trained_on != manifest_sha256:
            raise RunFolderError(
                f"dataset mismatch: {self.path} was trained on the dataset whose manifest.json has sha256 "
                f"{trained_on[:12]}…, not this one ({manifest_sha256[:12]}…); splits differ between builds, so {fix}"
            )
        if self.grid_shape_list != [int(s) for s in grid_shape]:
            raise RunFolderError(
                f"grid mismatch: {self.path} has grid {self.grid_shape_list} but the dataset has "
                f"{[int(s) for s in grid_shape]}; {fix}"
            )
        config = self.network_config or {}
        for key, expected in (("meta_dim", schema.meta_dim), ("mask_dim", schema.mask_dim)):
            if key in config and int(config[key]) != expected:
                raise RunFolderError(
                    f"schema mismatch: {self.path / NETWORK_CONFIG} has {key}={config[key]} but the dataset schema "
                    f"has {key}={expected}; {fix}"
                )
        if self.decoder_schema is not None:
            run_categories = list(self.schema.categories)
            if run_categories != list(schema.categories):
                raise RunFolderError(
                    f"schema mismatch: {self.path / SCHEMA} categories {run_categories} differ from the dataset's "
                    f"{list(schema.categories)}; {fix}"
                )
