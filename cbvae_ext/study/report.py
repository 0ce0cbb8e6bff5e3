"""The study outputs on disk: one folder per study (NIfTI maps, JSON sidecars, ``report.json``) and an index.

Everything is written into a hidden sibling folder that is renamed to ``OUT`` only when complete, so a killed run
never leaves a folder that looks finished. An existing ``OUT`` is replaced only when it is empty or an earlier
study report (its ``report.json`` carries ``REPORT_FORMAT``). Fields: ``bundle/docs/study.md``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from cbvae_ext.app.downloads import GENERATED_DESCRIPTION, generated_nifti
from cbvae_ext.data.builder import package_version
from cbvae_ext.folders import json_safe, replace_folder

from .analysis import StudyContext, StudyResult
from .readers import StudyError

__all__ = ["MAP_FILES", "REPORT_FORMAT", "REPORT_VERSION", "study_report", "write_reports"]

REPORT_FORMAT = "cbvae-study-report"
REPORT_VERSION = 1
#: Map files of a study folder: name -> (generated?, what it is).
MAP_FILES = {
    "ma_map": (False, "modeled-activation (MA) map of the study's peaks on the run's grid with the run's kernel"),
    "reconstruction": (True, "the model's reconstruction: decode of the posterior mean under the study's conditions"),
    "conditional_mean": (True, "the model's map for the study's conditions alone (no latent code)"),
}


def _slug(name: str, index: int) -> str:
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:48] or "study"
    return f"{index + 1:03d}-{text}"


def study_report(result: StudyResult, context: StudyContext, source: str | None = None) -> dict[str, Any]:
    """The ``report.json`` of one study."""
    s, model = result.study, context.model
    return json_safe(
        {
            "format": REPORT_FORMAT,
            "format_version": REPORT_VERSION,
            "cbvae_version": package_version(),
            "study": {
                "name": s.name,
                "file": source,
                "format": s.format,
                "space_given": s.space,
                "metadata": s.metadata,
            },
            "peaks": result.peaks,
            "conditions": result.conditions,
            "run": {
                "run_dir": str(model.run_dir),
                "model": str(model.info.get("model", "cbvae")),
                "latent_size": model.latent_size,
                "encoder": context.has_encoder,
                "dataset_dir": None if context.dataset is None else str(context.dataset.path),
            },
            "grid": context.grid.to_dict(),
            "kernel": context.kernel.to_dict(context.grid.resolution_mm),
            "posterior": result.posterior,
            "decode": result.decode_info,
            "nearest": result.nearest,
            "typicality": result.typicality,
            "decoding": result.decoding,
            "readings": result.readings,
            "warnings": result.warnings,
            "notes": [*context.notes, *result.notes],
        }
    )


def _sidecar(name: str, result: StudyResult, context: StudyContext) -> dict[str, Any]:
    generated, what = MAP_FILES[name]
    doc = {
        "description": GENERATED_DESCRIPTION if generated else "computed from the study's own peaks (not generated)",
        "generated": generated,
        "what": what,
        "study": result.study.name,
        "space": "MNI152 (NiMARE mni152_2mm brain mask grid)",
        "run_dir": str(context.model.run_dir),
        "conditions": result.conditions,
        "kernel": context.kernel.to_dict(context.grid.resolution_mm),
        "cbvae_version": package_version(),
    }
    if name == "ma_map" and result.study.image is not None:
        doc["what"] = "the given map on the run's grid (resampled where its grid differed)"
    return json_safe(doc)


def _write_study(folder: Path, result: StudyResult, context: StudyContext, source: str | None) -> dict[str, Any]:
    folder.mkdir()
    report = study_report(result, context, source)
    affine = context.grid.affine
    files = {}
    for name in MAP_FILES:
        data = getattr(result, name)
        if data is None:
            continue
        if MAP_FILES[name][0]:
            img = generated_nifti(data, affine, intent=name)
        else:
            img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
            img.header["descrip"] = b"cbvae MA map of the study's peaks (not generated)"
        nib.save(img, folder / f"{name}.nii.gz")
        (folder / f"{name}.json").write_text(json.dumps(_sidecar(name, result, context), indent=1))
        files[name] = {"nifti": f"{name}.nii.gz", "sidecar": f"{name}.json", "generated": MAP_FILES[name][0]}
    report["files"] = files
    (folder / "report.json").write_text(json.dumps(report, indent=1))
    return report


def _is_ours(out: Path) -> bool:
    try:
        return json.loads((out / "report.json").read_text()).get("format") == REPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def write_reports(
    results: Sequence[StudyResult],
    context: StudyContext,
    out: str | Path,
    source: str | None = None,
    options: Mapping[str, Any] | None = None,
    seconds: float | None = None,
) -> Path:
    """Write every study's folder and the index ``OUT/report.json``, atomically; returns ``OUT``.

    Raises:
        StudyError: ``OUT`` exists and is neither empty nor an earlier study report, or it cannot be written.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _is_ours(out))):
        raise StudyError(f"--out {out} exists and is not an earlier study report; choose another --out or remove it")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        index = []
        for i, result in enumerate(results):
            folder = _slug(result.study.name, i)
            report = _write_study(tmp / folder, result, context, source)
            index.append(
                {
                    "name": result.study.name,
                    "folder": folder,
                    "n_peaks": result.peaks["read"],
                    "typicality_percentile": (report["typicality"] or {}).get("percentile"),
                    "nearest": report["nearest"][0]["id"] if report["nearest"] else None,
                    "warnings": result.warnings,
                }
            )
        summary = {
            "format": REPORT_FORMAT,
            "format_version": REPORT_VERSION,
            "cbvae_version": package_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "file": source,
            "run_dir": str(context.model.run_dir),
            "dataset_dir": None if context.dataset is None else str(context.dataset.path),
            "options": dict(options or {}),
            "seconds": None if seconds is None else round(seconds, 3),
            "notes": context.notes,
            "studies": index,
        }
        (tmp / "report.json").write_text(json.dumps(json_safe(summary), indent=1))
        replace_folder(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StudyError(f"cannot write {out} ({err.strerror or err}); check free space and permissions") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
