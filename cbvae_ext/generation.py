"""The bundle's ``inference`` workflow: one generated map for given conditions, written as NIfTI with a JSON sidecar.

``bundle/configs/inference.yaml`` calls ``MapGenerator(...).run_cli()``::

    python -m monai.bundle run inference --config_file bundle/configs/inference.yaml \\
        --run_dir RUN --conditions "{'task': 'working memory', 'year': 2010}" --output_file OUT.nii.gz

The map is the run's conditional mean for the conditions (``CounterfactualModel.conditional_mean``) where the run
has that path, else (or when ``z`` is given) the decode of ``z`` (default 0) under them. The NIfTI is labelled
generated in its header (``cbvae_ext.app.downloads.generated_nifti``, as the app's downloads); the sidecar
``OUT.json`` says what was generated from which run. Both files are written atomically.
"""

from __future__ import annotations

import ast
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cbvae_ext.app.downloads import GENERATED_DESCRIPTION, generated_nifti, nifti_bytes
from cbvae_ext.data.builder import package_version
from cbvae_ext.engine.bundle_glue import flag
from cbvae_ext.errors import CbvaeError
from cbvae_ext.folders import json_safe
from cbvae_ext.inference import DecodeResult, load
from cbvae_ext.run_folder import replace_atomically, write_json_atomically

__all__ = ["GenerationError", "MapGenerator", "sidecar_path"]

_SUFFIXES = (".nii.gz", ".nii")


class GenerationError(CbvaeError, ValueError):
    """An ``inference`` option the workflow cannot use (the conditions and the run folder have their own errors)."""


def sidecar_path(output_file: str | Path) -> Path:
    """The JSON sidecar beside a NIfTI file: ``OUT.nii.gz`` -> ``OUT.json``."""
    path = Path(output_file)
    stem = next((path.name[: -len(s)] for s in _SUFFIXES if path.name.endswith(s)), path.stem)
    return path.with_name(f"{stem}.json")


def _literal(value: Any, option: str, example: str) -> Any:
    """A command-line value fire left as text (JSON or a Python literal), else the value itself."""
    if not isinstance(value, str):
        return value
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(value)
        except (ValueError, SyntaxError, RecursionError, MemoryError):
            continue
    raise GenerationError(f"--{option} {value!r} is not a literal; give e.g. --{option} {example}")


class MapGenerator:
    """Generate one map from a run folder for named conditions and write it (the ``inference`` workflow).

    Args:
        run_dir: the trained run folder (``decoder.ts``, ``decoder_schema.json``, ``mask.nii.gz``, ...).
        output_file: the NIfTI to write (``.nii.gz`` or ``.nii``); its sidecar is ``sidecar_path(output_file)``.
        conditions: named raw conditions, as for ``CounterfactualModel.decode`` (``{"task": ..., "year": ...}``);
            a condition left out is unknown.
        z: a latent vector (one value per latent dimension) to decode instead of the conditional mean; None:
            the conditional mean where the run has that path, else the decode of z = 0.
        allow_extrapolation: accept continuous values outside the training range.
    """

    def __init__(
        self,
        run_dir: str | Path | None,
        output_file: str | Path | None,
        conditions: Mapping[str, Any] | str | None = None,
        z: Sequence[float] | str | None = None,
        allow_extrapolation: bool | str = False,
    ) -> None:
        self.run_dir = run_dir
        self.output_file = output_file
        self.conditions = conditions
        self.z = z
        self.allow_extrapolation = allow_extrapolation

    def _options(self) -> tuple[Path, Path, dict[str, Any], np.ndarray | None, bool]:
        if not self.run_dir:
            raise GenerationError("--run_dir is required: the trained run folder, e.g. --run_dir runs/cbvae")
        out = str(self.output_file or "")
        if not out.endswith(_SUFFIXES):
            raise GenerationError(f"--output_file {out or None!r} must end with .nii.gz or .nii, e.g. generated.nii.gz")
        conditions = _literal(self.conditions, "conditions", "\"{'task': 'working memory', 'year': 2010}\"")
        if conditions is None:
            conditions = {}
        if not isinstance(conditions, Mapping) or not all(isinstance(k, str) for k in conditions):
            raise GenerationError(
                f"--conditions must map condition names to values, e.g. \"{{'task': 'working memory'}}\"; "
                f"got {type(conditions).__name__}"
            )
        z = _literal(self.z, "z", "'[0.5, 0, ...]'")
        if z is not None:
            try:
                z = np.asarray(z, dtype=np.float32).ravel()
            except (TypeError, ValueError):
                raise GenerationError(f"--z must be a list of numbers (one per latent dimension), got {z!r}") from None
        return Path(self.run_dir), Path(out), dict(conditions), z, flag(self.allow_extrapolation, "allow_extrapolation")

    def run(self) -> dict[str, Any]:
        """Generate and write the map; returns the sidecar (which names both files).

        Raises:
            GenerationError: a missing or malformed option.
            RunFolderError: the run folder cannot be opened (``cbvae_ext.inference.load``).
            SchemaError: an unknown condition or category, a value out of range, ...
            InferenceError: ``z`` of the wrong size, a non-finite result.
        """
        run_dir, out, conditions, z, extrapolate = self._options()
        model = load(run_dir)
        if z is None and model.has_conditional_mean:
            what = "conditional mean: the model's map of studies with these conditions (no latent code)"
            result: DecodeResult = model.conditional_mean(conditions, allow_extrapolation=extrapolate)
        else:
            what = "decode of the latent vector z under these conditions" + ("" if z is not None else " (z = 0)")
            latent = np.zeros(model.latent_size, np.float32) if z is None else z
            result = model.decode(latent, conditions, allow_extrapolation=extrapolate)
        img = generated_nifti(result.map, result.affine, intent="generated")
        data = nifti_bytes(img) if out.name.endswith(".nii.gz") else img.to_bytes()
        sidecar = json_safe(
            {
                "description": GENERATED_DESCRIPTION,
                "generated": True,
                "what": what,
                "nifti": out.name,
                "run_dir": str(run_dir),
                "model": model.run.model_kind,
                "conditions": conditions,
                "imputed": result.imputed,
                "defaulted": result.defaulted,
                "z": None if z is None else z,
                "allow_extrapolation": extrapolate,
                "space": "MNI152 (the run's grid; affine in the NIfTI header)",
                "cbvae_version": package_version(),
            }
        )
        replace_atomically(out, lambda tmp: Path(tmp).write_bytes(data))
        write_json_atomically(sidecar_path(out), sidecar)
        return sidecar

    def run_cli(self) -> dict[str, Any]:
        """``run()`` for the bundle command: a bad input prints one ``error: ...`` line and exits with status 2."""
        try:
            sidecar = self.run()
        except CbvaeError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        print(f"wrote {self.output_file} and {sidecar_path(str(self.output_file))} ({sidecar['what'].split(':')[0]})")
        return sidecar
