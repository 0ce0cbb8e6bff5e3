"""A user's study files to coordinates in MNI mm (or a map), through NiMARE's readers where they exist.

Formats, told apart by the file name (``bundle/docs/study.md``):

* Sleuth/GingerALE text (``.txt``): ``nimare.io.convert_sleuth_to_dict``; its ``// Reference=`` header gives
  the space (MNI, TAL or Talairach), ``// Subjects=`` the sample size; each experiment is one study.
* CSV/TSV (``.csv``, ``.tsv``): columns ``x, y, z`` and optionally ``space``, ``study``, ``year``,
  ``sample_size``, ``task``, ``text`` (names case-insensitive); one study per ``study`` value.
* NiMARE dataset JSON (``.json`` whose values hold ``contrasts``): ``nimare.dataset.Dataset``; each contrast is one
  study.
* NeuroStore/NIMADS studyset JSON (``.json`` with ``studies``): ``nimare.nimads.Studyset``; each analysis is one
  study. A NiMARE parquet studyset (a folder, or its ``studyset.json``) is read by the dataset builder's reader.
* A map (``.nii``, ``.nii.gz``): resampled onto the run's grid with nilearn when it lies on another grid.

Talairach peaks are converted with ``nimare.utils.tal2mni``, as the dataset builder does. Every problem is a
one-line ``StudyError`` naming the file and the fix.
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cbvae_ext.errors import CbvaeError

__all__ = [
    "FORMATS",
    "MAX_PEAKS",
    "METADATA_FIELDS",
    "StudyError",
    "StudyInput",
    "normalise_space",
    "read_studies",
    "to_mni",
]

#: Most peaks one study may have (``max_peaks`` raises it): Neurosynth v7's largest study has 713, so a
#: longer table is almost always several contrasts (or a whole meta-analysis) pasted into one study.
MAX_PEAKS = 1000
#: Metadata a study may carry (from the file or the options; options win).
METADATA_FIELDS = ("year", "sample_size", "task", "text")
FORMATS = ("sleuth", "csv", "nimare_dataset", "nimads_studyset", "neurostore_parquet", "nifti")
_SPACE_FIX = "use MNI or TAL (Talairach)"


class StudyError(CbvaeError, ValueError):
    """A study file that cannot be read as given; the message is one line naming the problem and the fix."""


@dataclass
class StudyInput:
    """One study as read from a file.

    Attributes:
        name: the study's name (unique within the file).
        format: one of ``FORMATS``.
        space: ``"MNI"`` or ``"TAL"`` as given (``None`` for a map).
        xyz: ``[P, 3]`` peaks in MNI mm (Talairach converted); ``None`` for a map.
        xyz_given: ``[P, 3]`` peaks as written in the file (``None`` where the reader converts them itself).
        image: the map (a ``nibabel`` image) for a map input.
        metadata: ``year``, ``sample_size``, ``task``, ``text`` (``None`` when missing).
        notes: what was done to the input on the way (conversions).
    """

    name: str
    format: str
    space: str | None = None
    xyz: np.ndarray | None = None
    xyz_given: np.ndarray | None = None
    image: Any = None
    metadata: dict[str, Any] = field(default_factory=lambda: dict.fromkeys(METADATA_FIELDS))
    notes: list[str] = field(default_factory=list)

    @property
    def n_peaks(self) -> int:
        return 0 if self.xyz is None else len(self.xyz)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def normalise_space(label: Any, where: str) -> str | None:
    """``"MNI"``/``"TAL"`` for a space label (NiMARE's rule: ``mni``/``ale`` -> MNI, ``tal`` -> TAL); ``None`` if empty.

    Raises:
        StudyError: any other label.
    """
    if label is None or (isinstance(label, float) and math.isnan(label)):
        return None
    text = str(label).strip().lower()
    if text in ("", "unknown", "none", "nan"):
        return None
    if "mni" in text or "ale" in text:
        return "MNI"
    if "tal" in text:
        return "TAL"
    raise StudyError(f"{where}: unknown coordinate space {str(label)!r}; {_SPACE_FIX}")


def to_mni(xyz: np.ndarray, space: str) -> np.ndarray:
    """Peaks in ``space`` to MNI mm with NiMARE's ``tal2mni`` (the dataset builder's conversion)."""
    xyz = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
    if space != "TAL" or not len(xyz):
        return xyz.copy()
    from nimare.utils import tal2mni

    log = logging.getLogger("nimare.utils")
    level = log.level
    log.setLevel(logging.WARNING)  # a 3-peak study is an "ambiguous 3x3 matrix" to NiMARE: rows are peaks, as here
    try:
        return np.asarray(tal2mni(xyz), dtype=np.float64)
    finally:
        log.setLevel(level)


def _resolve_space(labels: list[Any], given: str | None, where: str) -> str:
    """One space for a study's peaks: its labels (all equal), else ``given``.

    Raises:
        StudyError: labels that disagree, an unknown label, or no label and no ``given``.
    """
    found = {s for s in (normalise_space(x, where) for x in labels) if s is not None}
    if len(found) > 1:
        raise StudyError(
            f"{where} mixes spaces ({' and '.join(sorted(found))}) in one study; split it into one study per space "
            "or convert the peaks to one space first"
        )
    if found:
        return found.pop()
    if given is None:
        raise StudyError(f"{where} gives no coordinate space; add a space column or pass --space MNI (or TAL)")
    return given


def _number(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple, np.ndarray)):  # NiMARE keeps sample sizes as lists
        value = value[0] if len(value) else None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _metadata(year: Any = None, sample_size: Any = None, task: Any = None, text: Any = None) -> dict[str, Any]:
    task = None if task is None or (isinstance(task, float) and math.isnan(task)) or str(task).strip() == "" else task
    text = None if text is None or (isinstance(text, float) and math.isnan(text)) or str(text).strip() == "" else text
    return {
        "year": _number(year),
        "sample_size": _number(sample_size),
        "task": None if task is None else str(task).strip(),
        "text": None if text is None else str(text),
    }


def _peaks(name: str, xyz: Any, space: str, fmt: str, where: str) -> StudyInput:
    given = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
    if not np.isfinite(given).all():
        bad = int((~np.isfinite(given).all(axis=1)).sum())
        raise StudyError(
            f"{where}: {bad} peak(s) of study {name!r} have missing or non-finite x/y/z; fix or remove them"
        )
    notes = ["Talairach peaks converted to MNI with nimare.utils.tal2mni"] if space == "TAL" else []
    return StudyInput(name, fmt, space, to_mni(given, space), given, notes=notes)


# ----- formats ------------------------------------------------------------------------------------
_REFERENCE = re.compile(r"^\s*//\s*reference\s*=\s*(.*)$", re.IGNORECASE)


def _read_sleuth(path: Path, text: str) -> list[StudyInput]:
    lines = [(i + 1, line.strip()) for i, line in enumerate(re.split(r"\r\n|\n|\r", text)) if line.strip()]
    if not lines:
        raise StudyError(f"{path} is empty; give a Sleuth file with a '// Reference=MNI' header and peaks")
    head = _REFERENCE.match(lines[0][1])
    if head is None:
        raise StudyError(
            f"{path} does not start with a Sleuth space header; put '// Reference=MNI' (or Talairach) on its first line"
        )
    space = normalise_space(head.group(1), f"{path} header")
    if space is None:
        raise StudyError(f"{path}: the header names no coordinate space; write '// Reference=MNI' (or Talairach)")
    for number, line in lines[1:]:
        other = _REFERENCE.match(line)
        if other:
            raise StudyError(
                f"{path} has a second space header at line {number} ({other.group(1).strip()}) after "
                f"{head.group(1).strip()}: mixed spaces in one file; split it into one Sleuth file per space"
            )
    if not any(not line.startswith("//") for _, line in lines[1:]):
        raise StudyError(f"{path} has no peaks; add one 'x y z' line per peak under each study's header")
    from nimare.io import convert_sleuth_to_dict

    try:
        parsed = convert_sleuth_to_dict(str(path))
    except (ValueError, IndexError) as err:
        raise StudyError(
            f"{path} is not a valid Sleuth file ({_first_line(err)}); each study needs '// name' and "
            "'// Subjects=N' lines followed by 'x y z' lines"
        ) from None
    studies = []
    for study_name, study in parsed.items():
        for contrast, exp in study["contrasts"].items():
            name = study_name if contrast == "analysis_1" else f"{study_name}; {contrast}"
            coords = exp["coords"]
            item = _peaks(name, np.c_[coords["x"], coords["y"], coords["z"]], space, "sleuth", str(path))
            item.metadata = _metadata(sample_size=exp.get("metadata", {}).get("sample_sizes"))
            studies.append(item)
    return studies


_COLUMN_ALIASES = {
    "study": ("study", "study_id", "id", "name", "experiment"),
    "space": ("space", "reference"),
    "year": ("year",),
    "sample_size": ("sample_size", "n", "subjects", "n_subjects", "sample_sizes"),
    "task": ("task", "category", "task_category"),
    "text": ("text", "abstract", "title"),
}


def _read_table(path: Path, space: str | None) -> list[StudyInput]:
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        table = pd.read_csv(path, sep=sep)
    except pd.errors.EmptyDataError:
        raise StudyError(f"{path} is empty; give one row per peak with columns x, y, z") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as err:
        kind = "TSV" if sep == "\t" else "CSV"
        raise StudyError(f"{path} is not a readable {kind} table ({_first_line(err)}); save it as plain text") from None
    table.columns = [str(c).strip().lower() for c in table.columns]
    missing = [c for c in ("x", "y", "z") if c not in table.columns]
    if missing:
        raise StudyError(
            f"{path} has no column {', '.join(missing)} (columns: {', '.join(table.columns[:8])}); "
            "name the coordinate columns x, y, z"
        )
    if not len(table):
        raise StudyError(f"{path} has a header but no peaks; add one row per peak")
    cols = {key: next((a for a in aliases if a in table.columns), None) for key, aliases in _COLUMN_ALIASES.items()}
    try:
        xyz = table[["x", "y", "z"]].apply(pd.to_numeric, errors="raise")
    except (ValueError, TypeError) as err:
        raise StudyError(f"{path}: x, y, z must be numbers in mm ({_first_line(err)})") from None
    table[["x", "y", "z"]] = xyz
    groups = table.groupby(table[cols["study"]].astype(str), sort=False) if cols["study"] else [(path.stem, table)]
    studies = []
    for name, rows in groups:
        where = f"{path} study {name!r}" if cols["study"] else str(path)
        labels = rows[cols["space"]].tolist() if cols["space"] else []
        item = _peaks(str(name), rows[["x", "y", "z"]].to_numpy(), _resolve_space(labels, space, where), "csv", where)

        def first(key: str, rows: pd.DataFrame = rows) -> Any:
            if not cols[key]:
                return None
            values = rows[cols[key]].dropna()
            return values.iloc[0] if len(values) else None

        item.metadata = _metadata(first("year"), first("sample_size"), first("task"), first("text"))
        studies.append(item)
    return studies


def _read_nimare_dataset(path: Path, data: Mapping[str, Any], space: str | None) -> list[StudyInput]:
    from nimare.dataset import Dataset

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Dataset's deprecation notice and "no mask" warning
            dset = Dataset(dict(data), target=None)  # target None: coordinates and their space labels as written
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise StudyError(
            f"{path} is not a NiMARE dataset JSON ({_first_line(err)}); see nimare.io.convert_sleuth_to_json"
        ) from None
    coords, meta = dset.coordinates, dset.metadata.set_index("id")
    texts = dset.texts.set_index("id") if len(dset.texts.columns) > 3 else None
    studies = []
    for sid in dset.ids:
        rows = coords[coords["id"] == sid]
        where = f"{path} contrast {sid!r}"
        # NiMARE writes a contrast without peaks as one all-NaN row
        rows = rows[rows[["x", "y", "z"]].notna().any(axis=1)]
        if not len(rows):
            continue
        item = _peaks(str(sid), rows[["x", "y", "z"]].to_numpy(), _resolve_space(rows["space"].tolist(), space, where),
                      "nimare_dataset", where)  # fmt: skip
        m = meta.loc[sid] if sid in meta.index else {}
        text = None
        if texts is not None and sid in texts.index:
            text = next((texts.loc[sid][c] for c in ("abstract", "title", "text") if c in texts.columns), None)
        item.metadata = _metadata(
            m.get("year"), m.get("sample_sizes", m.get("sample_size")), m.get("task"), text if text else m.get("title")
        )
        studies.append(item)
    return studies


def _read_nimads(path: Path, data: Mapping[str, Any], space: str | None) -> list[StudyInput]:
    from nimare.nimads import Studyset

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            studyset = Studyset(dict(data), target=None)  # target None: points and spaces as written
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise StudyError(f"{path} is not a NIMADS/NeuroStore studyset ({_first_line(err)})") from None
    studies = []
    for study in studyset.studies:
        for analysis in study.analyses:
            points = list(analysis.points)
            if not points:
                continue
            name = f"{study.id}-{analysis.id}"
            where = f"{path} analysis {name!r}"
            xyz = [[p.x, p.y, p.z] for p in points]
            item = _peaks(name, xyz, _resolve_space([p.space for p in points], space, where), "nimads_studyset", where)
            m = analysis.get_metadata()
            texts = getattr(analysis, "texts", None) or {}
            item.metadata = _metadata(
                m.get("year", study.year),
                m.get("sample_size", m.get("sample_sizes")),
                m.get("task"),
                texts.get("abstract") or texts.get("title") or m.get("title") or study.name,
            )
            studies.append(item)
    return studies


def _read_parquet_studyset(directory: Path) -> list[StudyInput]:
    from cbvae_ext.data.errors import DataError
    from cbvae_ext.data.sources import read_neurostore

    try:
        table = read_neurostore(directory)
    except DataError as err:
        raise StudyError(str(err)) from None
    studies = []
    rows = table.rows.reset_index(drop=True)
    for r, row in rows.iterrows():
        xyz = table.peaks.loc[table.peaks["row"] == r, ["x", "y", "z"]].to_numpy(np.float64)
        if not len(xyz):
            continue
        space = None if row["space"] == "UNKNOWN" else str(row["space"])
        notes = ["read with the dataset builder's NeuroStore reader (Talairach converted with tal2mni)"]
        item = StudyInput(str(row["id"]), "neurostore_parquet", space, xyz, None, notes=notes)
        item.metadata = _metadata(row["year"], row["sample_size"], None, row["title"])
        studies.append(item)
    return studies


def _read_nifti(path: Path) -> list[StudyInput]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:  # noqa: BLE001 - nibabel raises many types; all mean "unreadable"
        raise StudyError(
            f"{path} is not a readable NIfTI map ({_first_line(err)}); give a 3D .nii or .nii.gz"
        ) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise StudyError(f"{path} has shape {list(data.shape)}; give one 3D map (split a 4D file into volumes)")
    if not np.isfinite(data).all():
        raise StudyError(f"{path} holds NaN or infinite values; set them to 0 before giving the map")
    return [StudyInput(path.name.split(".")[0], "nifti", image=nib.Nifti1Image(data, img.affine))]


def read_studies(path: str | Path, space: str | None = None, max_peaks: int = MAX_PEAKS) -> list[StudyInput]:
    """Read every study of a file (format by its name, see the module docstring).

    Args:
        path: the file (or a NiMARE parquet studyset folder).
        space: ``"MNI"`` or ``"TAL"`` for peaks whose file gives no space (a CSV without a space column).
        max_peaks: most peaks one study may have.

    Raises:
        StudyError: unreadable or empty file, unknown or mixed spaces, a study over ``max_peaks``.
    """
    path = Path(path)
    given = None if space is None else normalise_space(space, "--space")
    if space is not None and given is None:
        raise StudyError(f"--space {space!r} names no space; {_SPACE_FIX}")
    if path.is_dir() or (path.name == "studyset.json" and (path.parent / "coordinates.parquet").is_file()):
        studies = _read_parquet_studyset(path if path.is_dir() else path.parent)
    elif not path.is_file():
        raise StudyError(f"{path} does not exist; check the file name")
    else:
        suffix = "".join(path.suffixes[-2:]).lower() if path.name.lower().endswith(".nii.gz") else path.suffix.lower()
        if suffix in (".nii", ".nii.gz"):
            studies = _read_nifti(path)
        else:
            try:
                text = path.read_text(encoding="utf-8-sig")
            except (OSError, UnicodeDecodeError) as err:
                raise StudyError(
                    f"cannot read {path} as text ({_first_line(err)}); give a Sleuth .txt, a .csv/.tsv, a .json or a "
                    ".nii.gz"
                ) from None
            if suffix in (".csv", ".tsv"):
                studies = _read_table(path, given)
            elif suffix == ".json":
                studies = _read_json(path, text, given)
            elif suffix in (".txt", ".sleuth", ""):
                studies = _read_sleuth(path, text)
            else:
                raise StudyError(
                    f"{path}: unknown file type {suffix!r}; give a Sleuth .txt, a .csv/.tsv, a NiMARE or NeuroStore "
                    ".json, or a .nii.gz map"
                )
    if not studies:
        raise StudyError(f"{path} holds no study with peaks; add at least one peak (x, y, z)")
    for s in studies:
        if s.n_peaks > max_peaks:
            raise StudyError(
                f"{path}: study {s.name!r} has {s.n_peaks} peaks, more than the limit of {max_peaks} per study "
                f"(Neurosynth's largest study has 713); give one study per contrast, or pass --max_peaks {s.n_peaks}"
            )
    names = [s.name for s in studies]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise StudyError(f"{path}: two studies are named {dup!r}; give each study its own name")
    return studies


def _read_json(path: Path, text: str, space: str | None) -> list[StudyInput]:
    try:
        data = json.loads(text)
    except ValueError as err:
        raise StudyError(f"{path} is not valid JSON ({_first_line(err)}); fix the file or export it again") from None
    if not isinstance(data, dict) or not data:
        raise StudyError(f"{path} holds no studies; give a NiMARE dataset JSON or a NeuroStore studyset")
    if isinstance(data.get("studies"), list):
        return _read_nimads(path, data, space)
    if data.get("format") == "nimare-studyset-parquet":
        return _read_parquet_studyset(path.parent)
    if all(isinstance(v, dict) and "contrasts" in v for v in data.values()):
        return _read_nimare_dataset(path, data, space)
    raise StudyError(
        f"{path} is neither a NiMARE dataset JSON (study -> contrasts) nor a NeuroStore studyset (a 'studies' list); "
        "export it with nimare.io or NeuroStore"
    )
