"""The user's own study: coordinates or a map -> its MA map, posterior, reconstruction, nearest studies, typicality.

CLI: ``python -m cbvae_ext.study FILE --run_dir RUN [--dataset_dir DATA] --out DIR``. Python::

    from cbvae_ext.study import analyse_file
    analysis = analyse_file("my_study.txt", run_dir="runs/cbvae", dataset_dir="data/neurosynth")
    analysis.reports[0]["typicality"]["percentile"]      # report.json of the first study
    analysis.results[0].ma_map                          # [D, H, W] arrays (also .reconstruction, ...)
    analysis.write("out/my_study")                      # NIfTI + JSON sidecars + report.json, atomically

Formats, outputs and every field of the report: ``bundle/docs/study.md``. The analysis (torch) is imported on
first use (``cbvae_ext.lazy``), so a bad file is refused before a run is loaded.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cbvae_ext.lazy import lazy_exports

from .options import ATYPICAL_PERCENTILE, OUTSIDE, READING_MARGIN, TYPICALITY_SCORES
from .readers import FORMATS, MAX_PEAKS, METADATA_FIELDS, StudyError, StudyInput, read_studies

#: the submodules that import torch, and the public names they define
_LAZY = {
    "analysis": "StudyContext StudyResult",
    "report": "REPORT_FORMAT study_report write_reports",
}
_, __getattr__, __dir__ = lazy_exports(__name__, _LAZY)  # __all__ below lists every name
if TYPE_CHECKING:
    from .analysis import StudyContext, StudyResult

__all__ = [
    "TYPICALITY_SCORES",
    "ATYPICAL_PERCENTILE",
    "FORMATS",
    "MAX_PEAKS",
    "OUTSIDE",
    "READING_MARGIN",
    "REPORT_FORMAT",
    "StudyAnalysis",
    "StudyContext",
    "StudyError",
    "StudyInput",
    "StudyResult",
    "analyse_file",
    "read_studies",
    "study_report",
    "write_reports",
]


@dataclass
class StudyAnalysis:
    """What ``analyse_file`` returns: one result and one report per study.

    Attributes:
        context: the opened run (reuse it: ``analyse_file(..., context=analysis.context)``).
        results: per study, the arrays (``ma_map``, ``reconstruction``, ``conditional_mean``) and the rest.
        reports: per study, the ``report.json`` content (JSON-ready dicts).
        source: the file name analysed.
        options: the options used.
        seconds: time from reading the file to the last report (not counting ``write``).
    """

    context: StudyContext
    results: list[StudyResult]
    reports: list[dict[str, Any]]
    source: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def write(self, out: str | Path) -> Path:
        """NIfTI maps, sidecars and reports under ``out`` (one folder per study), atomically."""
        from .report import write_reports

        return write_reports(self.results, self.context, out, self.source, self.options, self.seconds)

    def zip_bytes(self) -> bytes:
        """The files ``write`` makes, as one ``.zip`` (the app's download)."""
        import io
        import zipfile

        with tempfile.TemporaryDirectory() as tmp:
            out = self.write(Path(tmp) / "study")
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
                for path in sorted(out.rglob("*")):
                    if path.is_file():
                        zf.write(path, path.relative_to(out).as_posix())
        return buffer.getvalue()


def analyse_file(
    source: str | Path | bytes,
    run_dir: str | Path | None = None,
    dataset_dir: str | Path | None = None,
    *,
    filename: str | None = None,
    context: StudyContext | None = None,
    space: str | None = None,
    outside: str = "drop",
    max_peaks: int = MAX_PEAKS,
    metadata: Mapping[str, Any] | None = None,
    allow_extrapolation: bool = False,
    readings: bool = True,
    open_options: Mapping[str, Any] | None = None,
) -> StudyAnalysis:
    """Read a study file and analyse every study in it against a run.

    Args:
        source: the file's path, or its bytes (an upload) with ``filename`` giving its name (the format).
        run_dir: the run folder (not needed with ``context``).
        dataset_dir: the run's dataset, for the kernel, the nearest studies and the typicality reference
            (default: the dataset the run recorded, when it exists).
        filename: name of an uploaded ``source`` (``study.txt``, ``peaks.csv``, ``dset.json``, ``map.nii.gz``).
        context: an opened ``StudyContext`` to reuse (the app keeps one per run).
        space: ``"MNI"`` or ``"TAL"`` for peaks whose file gives none.
        outside: ``"drop"`` (default, the dataset builder's rule) or ``"keep"`` peaks outside the brain mask.
        max_peaks: most peaks one study may have (``MAX_PEAKS``).
        metadata: ``year``, ``sample_size``, ``task``, ``text`` for every study (override the file's).
        allow_extrapolation: accept conditions outside the run's training range.
        readings: also score alternative readings (Talairach labelled MNI, x flipped) and warn on a likely one.
        open_options: keyword options of ``StudyContext.open`` when it opens ``run_dir`` (``k``, ``seed``, ...).

    Raises:
        StudyError: bad input (the one-line message names the problem and the fix).
        SchemaError: a condition the run does not know or outside its range.
        RunFolderError, DataError: an unusable run or dataset folder.
    """
    start = time.perf_counter()
    unknown = sorted(set(metadata or {}) - set(METADATA_FIELDS))
    if unknown:
        raise StudyError(f"unknown metadata {', '.join(unknown)}; give any of {', '.join(METADATA_FIELDS)}")
    if context is None and run_dir is None:
        raise StudyError("no run given; pass --run_dir RUN (a trained and exported run folder)")
    if isinstance(source, bytes):
        if not filename:
            raise StudyError("an uploaded file needs its name (filename=...) to tell its format")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(filename).name
            path.write_bytes(source)
            try:
                studies = read_studies(path, space, max_peaks)
            except StudyError as err:  # name the upload, not the temporary copy it was read from
                raise StudyError(str(err).replace(str(path), path.name)) from None
        name = Path(filename).name
    else:
        studies = read_studies(source, space, max_peaks)
        name = str(source)
    for study in studies:
        study.metadata.update({k: v for k, v in (metadata or {}).items() if v is not None})
    if context is None:  # opened once the file is read: a bad file is refused in a second, a run takes longer
        from .analysis import StudyContext

        context = StudyContext.open(run_dir, dataset_dir, **(open_options or {}))
    options = {
        "space": space,
        "outside": outside,
        "max_peaks": max_peaks,
        "metadata": dict(metadata or {}),
        "allow_extrapolation": allow_extrapolation,
        "k": context.k,
        "seed": context.seed,
    }
    results = context.analyse_many(studies, outside=outside, allow_extrapolation=allow_extrapolation, readings=readings)
    from .report import study_report

    reports = [study_report(r, context, name) for r in results]
    return StudyAnalysis(context, results, reports, name, options, time.perf_counter() - start)
