"""Readers for the coordinate sources: Neurosynth v7 files and NeuroStore parquet studysets.

Each reader returns a ``SourceTable``: one row per map (study or analysis) and one row per peak in
MNI mm. Talairach peaks are converted with NiMARE's ``tal2mni`` (Lancaster's tal2icbm). Space rule:
``UNKNOWN`` (and NeuroStore's ``OTHER`` or empty label) is treated as MNI, NiMARE's own convention
for anything that is not Talairach, and the row keeps ``space = UNKNOWN``. Any other label is an error.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cbvae_ext.schema import TOPICS

from .categories import task_category, topic_categories
from .errors import DataError

__all__ = [
    "NEUROSYNTH_FILES",
    "SPACES",
    "SourceTable",
    "fetch_neurosynth_dir",
    "file_sha256",
    "plausible_topics",
    "read_neurostore",
    "read_neurosynth",
    "source_files",
]

logger = logging.getLogger(__name__)

_NS = "data-neurosynth_version-7_"
#: Neurosynth v7 files in NiMARE's download layout.
NEUROSYNTH_FILES = {
    "coordinates": _NS + "coordinates.tsv.gz",
    "metadata": _NS + "metadata.tsv.gz",
    "features": _NS + "vocab-LDA50_source-abstract_type-weight_features.npz",
    "vocabulary": _NS + "vocab-LDA50_vocabulary.txt",
    "keys": _NS + "vocab-LDA50_keys.tsv",
}
#: A topic vector is a mixture: weights in [0, 1] whose sum is 1 within this (the v7 rows are within 4e-15).
TOPIC_SUM_TOLERANCE = 1e-3
#: Space labels the table keeps.
SPACES = ("MNI", "TAL", "UNKNOWN")
_ROW_COLUMNS = ["id", "study_id", "source", "title", "year", "sample_size", "category", "space"]


@dataclass
class SourceTable:
    """One source, read and validated.

    Attributes:
        name: source label stored in the ``source`` column.
        rows: one row per map with ``_ROW_COLUMNS``.
        peaks: one row per peak: ``row`` (index into ``rows``), ``x``, ``y``, ``z`` in MNI mm.
        files: checksum (sha256) of every file read, by path.
        counts: what was read and dropped while reading.
        topics: ``[len(rows), T]`` raw topic weights (NaN rows = missing); None when the source has none.
        topic_names: labels of the topic columns (the LDA50 vocabulary).
        topic_keys: top words of each topic.
        implausible: values the reader set missing, per field (the builder adds the declared fields' counts).
    """

    name: str
    rows: pd.DataFrame
    peaks: pd.DataFrame
    files: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    topics: np.ndarray | None = None
    topic_names: list[str] = field(default_factory=list)
    topic_keys: list[str] = field(default_factory=list)
    implausible: dict[str, int] = field(default_factory=dict)


def plausible_topics(weights: np.ndarray) -> np.ndarray:
    """Bool per row of ``[N, T]`` topic weights: finite, each in [0, 1], summing to 1 (``TOPIC_SUM_TOLERANCE``)."""
    weights = np.asarray(weights, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        ok = np.isfinite(weights).all(axis=1) & ((weights >= 0) & (weights <= 1)).all(axis=1)
        return ok & (np.abs(weights.sum(axis=1) - 1.0) <= TOPIC_SUM_TOLERANCE)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read(path: Path, reader: Callable[[Path], object], what: str, fix: str) -> object:
    """Run ``reader`` on an existing file; any parse failure becomes one ``DataError`` line."""
    if not path.is_file():
        raise DataError(f"missing file {path}; {fix}")
    try:
        return reader(path)
    except (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile, pd.errors.ParserError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"cannot read {what} {path} ({reason}); replace it with an intact copy") from err
    except Exception as err:  # pyarrow/scipy raise their own types for corrupt files
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"cannot read {what} {path} ({reason}); replace it with an intact copy") from err


def _require_columns(df: pd.DataFrame, columns: list[str], path: Path) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{path} lacks column(s) {', '.join(missing)}; use an unmodified copy of the file")


def _check_unique(ids: pd.Series, path: Path, what: str) -> None:
    dup = ids[ids.duplicated()]
    if len(dup):
        raise DataError(f"{path} has duplicate {what} {dup.iloc[0]!r} ({len(dup)} duplicates); keep one row per {what}")


def _check_finite(df: pd.DataFrame, path: Path, id_col: str) -> None:
    xyz = df[["x", "y", "z"]].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(xyz).all(axis=1)
    if bad.any():
        raise DataError(
            f"{path} has {int(bad.sum())} peak(s) with NaN/inf/non-numeric x, y or z (first at {id_col}="
            f"{df[id_col].iloc[int(np.argmax(bad))]!r}); fix or remove those rows"
        )


def _normalise_space(labels: pd.Series, path: Path) -> np.ndarray:
    """Map raw space labels to MNI/TAL/UNKNOWN; unknown labels are an error."""
    raw = labels.fillna("").astype(str).str.strip().str.upper()
    out = np.full(len(raw), "UNKNOWN", dtype=object)
    out[raw.str.startswith("MNI").to_numpy()] = "MNI"
    out[raw.str.startswith("TAL").to_numpy()] = "TAL"
    known = raw.isin(["", "UNKNOWN", "OTHER"]) | raw.str.startswith("MNI") | raw.str.startswith("TAL")
    if not known.all():
        bad = raw[~known].iloc[0]
        raise DataError(
            f"{path} has unknown coordinate space label {bad!r}; use MNI, TAL or UNKNOWN (OTHER/empty = UNKNOWN)"
        )
    return out


def _to_mni(xyz: np.ndarray, is_tal: np.ndarray) -> np.ndarray:
    from nimare.utils import tal2mni

    xyz = xyz.astype(np.float64, copy=True)
    if is_tal.any():
        xyz[is_tal] = tal2mni(xyz[is_tal])
    return xyz


def source_files(kind: str, directory: str | Path) -> list[Path]:
    """The files a source is read from (and checksummed for the build cache)."""
    directory = Path(directory)
    if kind == "neurosynth":
        return [directory / name for name in NEUROSYNTH_FILES.values()]
    return sorted(directory.glob("*.parquet")) + sorted(directory.glob("*.json"))


def fetch_neurosynth_dir(data_dir: str | Path | None = None) -> Path:
    """Neurosynth v7 files through NiMARE's own fetcher (reuses an existing download, else downloads)."""
    from nimare.extract import fetch_neurosynth

    try:
        found = fetch_neurosynth(
            data_dir=data_dir, version="7", overwrite=False, return_type="files", source="abstract", vocab="LDA50"
        )
    except OSError as err:
        raise DataError(
            f"cannot download Neurosynth v7 with nimare.extract.fetch_neurosynth ({err}); pass --neurosynth-dir"
        ) from err
    return Path(found[0]["coordinates"]).parent


def read_neurosynth(directory: str | Path) -> SourceTable:
    """Read Neurosynth v7 (coordinates, metadata, LDA50 topic weights) from NiMARE's file layout.

    Raises:
        DataError: for a missing/corrupt file, missing columns, duplicate ids, NaN coordinates or
            an unknown space label.
    """
    directory = Path(directory)
    paths = {k: directory / v for k, v in NEUROSYNTH_FILES.items()}
    fix = "pass --neurosynth-dir pointing at the Neurosynth v7 files (NiMARE layout), or omit it to download"
    meta = _read(paths["metadata"], lambda p: pd.read_csv(p, sep="\t", dtype={"id": str}), "metadata", fix)
    _require_columns(meta, ["id", "space", "title", "year"], paths["metadata"])
    meta["id"] = meta["id"].astype(str).str.strip()
    _check_unique(meta["id"], paths["metadata"], "study id")
    coords = _read(paths["coordinates"], lambda p: pd.read_csv(p, sep="\t", dtype={"id": str}), "coordinates", fix)
    _require_columns(coords, ["id", "x", "y", "z"], paths["coordinates"])
    _check_finite(coords, paths["coordinates"], "id")

    import scipy.sparse

    weights = _read(paths["features"], lambda p: scipy.sparse.load_npz(p).toarray(), "topic weights", fix)
    vocab = _read(paths["vocabulary"], lambda p: p.read_text().split(), "topic vocabulary", fix)
    keys = _read(paths["keys"], _read_keys, "topic keys", fix)
    if len(vocab) != TOPICS.size:
        raise DataError(
            f"{paths['vocabulary']} lists {len(vocab)} topic labels but LDA50 has {TOPICS.size}; "
            "use an unmodified copy of the v7 file"
        )
    if weights.shape != (len(meta), len(vocab)):
        raise DataError(
            f"{paths['features']} is {weights.shape[0]}x{weights.shape[1]} but {paths['metadata']} has {len(meta)} "
            f"studies and {paths['vocabulary'].name} {len(vocab)} topics; use the matching v7 files"
        )
    if sorted(keys) != list(range(len(vocab))):
        raise DataError(
            f"{paths['keys']} describes topics {sorted(keys)[:3]}... but LDA50 has topics 0-{len(vocab) - 1}; "
            "use an unmodified copy of the v7 file"
        )

    # impossible weights (negative, 1e300, inf, NaN) are missing, never a category's evidence
    bad_topics = ~plausible_topics(weights)
    weights = weights.astype(np.float64)
    weights[bad_topics] = np.nan
    if bad_topics.any():
        logger.warning(
            "%s: %d studies' topic weights are not a mixture (outside [0, 1], not summing to 1, or not finite); "
            "set to missing",
            paths["features"].name,
            bad_topics.sum(),
        )

    space = _normalise_space(meta["space"], paths["metadata"])
    year = pd.to_numeric(meta["year"], errors="coerce").to_numpy(np.float64)
    rows = pd.DataFrame(
        {
            "id": "neurosynth:" + meta["id"],
            "study_id": "neurosynth:" + meta["id"],
            "source": "neurosynth",
            "title": meta["title"].astype(object).where(meta["title"].notna(), None),
            "year": year,
            "sample_size": np.nan,  # Neurosynth records no sample sizes
            "category": topic_categories(weights),
            "space": space,
        }
    )[_ROW_COLUMNS]

    row_of_id = pd.Series(np.arange(len(meta)), index=meta["id"])
    coords_id = coords["id"].astype(str).str.strip()
    row = row_of_id.reindex(coords_id).to_numpy()
    known = ~np.isnan(row)
    row = row[known].astype(np.int64)
    xyz = coords.loc[known, ["x", "y", "z"]].to_numpy(np.float64)
    peaks = pd.DataFrame(_to_mni(xyz, space[row] == "TAL"), columns=["x", "y", "z"])
    peaks.insert(0, "row", row)
    counts = {
        "studies_read": len(rows),
        "peaks_read": len(coords),
        "peaks_without_study": int((~known).sum()),
        "studies_tal": int((space == "TAL").sum()),
        "studies_unknown_space": int((space == "UNKNOWN").sum()),
    }
    files = {str(p): file_sha256(p) for p in source_files("neurosynth", directory)}
    return SourceTable(
        "neurosynth",
        rows,
        peaks,
        files,
        counts,
        weights,
        list(vocab),
        [keys[i] for i in range(len(vocab))],
        {TOPICS.name: int(bad_topics.sum())} if bad_topics.any() else {},
    )


def _read_keys(path: Path) -> dict[int, str]:
    """LDA keys file: ``topic index <tab> weight <tab> top words`` per line -> {index: top words}."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            index, _, words = line.split("\t", 2)
            out[int(index)] = " ".join(words.split())
    return out


# ----- NeuroStore ----------------------------------------------------------------------------------
_GROUP_RX = re.compile(r"^ParticipantDemographicsExtractor\.groups\[(\d+)\]\.(count|imaging_sample)$")
_TASK_RX = re.compile(r"^TaskExtractor\.fMRITasks\[(\d+)\]\.TaskName$")


def _sample_sizes(ann: pd.DataFrame) -> np.ndarray:
    """Participants per analysis: summed ``count`` of the extracted groups not flagged ``imaging_sample=no``.

    NaN when no group has a count (nothing is invented).
    """
    groups = sorted({int(m.group(1)) for c in ann.columns if (m := _GROUP_RX.match(c))})
    total = np.full(len(ann), np.nan)
    for g in groups:
        count = pd.to_numeric(ann.get(f"ParticipantDemographicsExtractor.groups[{g}].count"), errors="coerce")
        if count is None:
            continue
        flag = ann.get(f"ParticipantDemographicsExtractor.groups[{g}].imaging_sample")
        keep = count.notna().to_numpy().copy()
        if flag is not None:
            keep &= flag.astype(str).str.lower().ne("no").to_numpy()
        total = np.where(keep, np.nan_to_num(total) + count.to_numpy(np.float64), total)
    return total


def _task_names(ann: pd.DataFrame) -> list[list[str]]:
    """Task names per analysis: ``matched_task_names`` (``|``-separated) first, then TaskExtractor's."""
    cols = sorted((int(m.group(1)), c) for c in ann.columns if (m := _TASK_RX.match(c)))
    out = []
    matched = ann.get("matched_task_names")
    for i in range(len(ann)):
        names: list[str] = []
        if matched is not None and isinstance(matched.iloc[i], str):
            names += [n for n in matched.iloc[i].split("|")]
        names += [ann[c].iloc[i] for _, c in cols if isinstance(ann[c].iloc[i], str)]
        out.append(names)
    return out


def read_neurostore(directory: str | Path) -> SourceTable:
    """Read a NeuroStore studyset in NiMARE's parquet layout (one map per analysis).

    Year comes from a ``year`` column of ``studies.parquet`` when the release has one (the 2026-07
    release has none, so it stays missing); sample size and task names from ``annotations.parquet``.

    Raises:
        DataError: for a missing/corrupt file, missing columns, duplicate ids, NaN coordinates or
            an unknown space label.
    """
    directory = Path(directory)
    fix = "pass --neurostore-dir pointing at a NiMARE parquet studyset folder"

    def table(
        name: str, required: list[str], optional: bool = False, wanted: Callable[[str], bool] | None = None
    ) -> pd.DataFrame | None:
        path = directory / f"{name}.parquet"
        if optional and not path.is_file():
            return None

        def reader(p: Path) -> pd.DataFrame:
            import pyarrow.parquet as pq

            columns = None if wanted is None else [c for c in pq.read_schema(p).names if wanted(c)]
            return pd.read_parquet(p, columns=columns)

        df = _read(path, reader, f"NeuroStore {name} table", fix)
        _require_columns(df, required, path)
        return df

    analyses = table("analyses", ["id", "study_id"])
    coords = table("coordinates", ["id", "x", "y", "z", "space"])
    studies = table("studies", ["study_id"], optional=True)
    ann = table(
        "annotations",
        ["id"],
        optional=True,
        wanted=lambda c: c in ("id", "matched_task_names") or bool(_GROUP_RX.match(c) or _TASK_RX.match(c)),
    )
    a_path, c_path = directory / "analyses.parquet", directory / "coordinates.parquet"
    analyses["id"] = analyses["id"].astype(str)
    _check_unique(analyses["id"], a_path, "analysis id")
    _check_finite(coords, c_path, "id")

    n = len(analyses)
    year = np.full(n, np.nan)
    title = analyses["name"] if "name" in analyses else pd.Series([None] * n)
    if studies is not None:
        studies = studies.drop_duplicates("study_id").set_index("study_id")
        if "year" in studies:
            year = pd.to_numeric(studies["year"].reindex(analyses["study_id"]), errors="coerce").to_numpy(np.float64)
        if "name" in studies:
            study_name = studies["name"].reindex(analyses["study_id"]).to_numpy()
            title = pd.Series(
                [
                    f"{s} - {a}" if isinstance(s, str) and isinstance(a, str) else (s if isinstance(s, str) else a)
                    for s, a in zip(study_name, title, strict=True)
                ]
            )
    sample_size, category = np.full(n, np.nan), [None] * n
    if ann is not None:
        ann = ann.drop_duplicates("id").set_index("id").reindex(analyses["id"]).reset_index()
        sample_size = _sample_sizes(ann)
        category = [task_category(names) for names in _task_names(ann)]

    raw_space = _normalise_space(coords["space"], c_path)
    row_of_id = pd.Series(np.arange(n), index=analyses["id"])
    row = row_of_id.reindex(coords["id"].astype(str)).to_numpy()
    known = ~np.isnan(row)
    row, raw_space = row[known].astype(np.int64), raw_space[known]
    xyz = coords.loc[known, ["x", "y", "z"]].to_numpy(np.float64)
    peaks = pd.DataFrame(_to_mni(xyz, raw_space == "TAL"), columns=["x", "y", "z"])
    peaks.insert(0, "row", row)
    # an analysis' space is the label most of its peaks carry
    space = np.full(n, "UNKNOWN", dtype=object)
    if len(row):
        mode = pd.DataFrame({"row": row, "space": raw_space}).groupby("row")["space"].agg(lambda s: s.mode().iloc[0])
        space[mode.index.to_numpy()] = mode.to_numpy()

    name = f"neurostore:{directory.name}"
    rows = pd.DataFrame(
        {
            "id": "neurostore:" + analyses["id"],
            "study_id": "neurostore:" + analyses["study_id"].astype(str),
            "source": name,
            "title": title.astype(object).where(title.notna(), None).to_numpy(),
            "year": year,
            "sample_size": sample_size,
            "category": category,
            "space": space,
        }
    )[_ROW_COLUMNS]
    counts = {
        "studies_read": n,
        "peaks_read": len(coords),
        "peaks_without_study": int((~known).sum()),
        "studies_tal": int((space == "TAL").sum()),
        "studies_unknown_space": int((space == "UNKNOWN").sum()),
    }
    files = {str(p): file_sha256(p) for p in source_files("neurostore", directory)}
    return SourceTable(name, rows, peaks, files, counts)
