"""Build a dataset folder: sources -> peaks on the grid -> stratified subset/splits -> MA maps on disk.

Output (see ``bundle/docs/formats.md``): ``maps.npy``, ``metadata.parquet``, ``mask.nii.gz`` and
``manifest.json`` (with each file's checksum), written into a temporary sibling folder that is renamed to
``OUT`` only when complete, so an interrupted build never leaves a folder that loads; a lock beside ``OUT``
keeps a second build out meanwhile (``folder.py``). A folder whose manifest carries the same cache key
(input checksums, options, package and format version, the schema's declarations and the category rules)
and whose files still match their checksums is reused unless ``force``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cbvae_ext.folders import replace_folder
from cbvae_ext.schema import CONTINUOUS_FIELDS, TERMS, TOPICS, MetadataSchema, declaration_fingerprint, plausible

from .categories import CATEGORIES, category_table
from .errors import DataError
from .folder import (
    DATASET_FILES,
    FORMAT_NAME,
    FORMAT_VERSION,
    OPTIONAL_FILES,
    HashingWriter,
    clean_stale,
    file_checksums,
    is_ours,
    output_lock,
    read_manifest,
    resolve_out,
    verify_files,
)
from .grid import Grid, check_resolution, make_grid
from .kernels import DEFAULT_KERNEL_FWHM_MM, DEFAULT_RADIUS, KernelSpec, render_maps
from .sources import (
    TOPIC_SUM_TOLERANCE,
    SourceTable,
    fetch_neurosynth_dir,
    file_sha256,
    read_neurostore,
    read_neurosynth,
    source_files,
)
from .splits import duplicate_groups, merge_groups, provisional_year_bins, split_groups, strata, stratified_subset

__all__ = [
    "DATASET_FILES",
    "DTYPES",
    "FORMAT_NAME",
    "build_dataset",
    "condition_features",
    "condition_residual",
    "package_version",
    "term_columns",
    "topic_columns",
    "vector_columns",
]

logger = logging.getLogger(__name__)

DTYPES = ("float16", "float32")
#: Fewest maps that fill every split (the splits take 8/1/1 of each block of 10 study groups).
MIN_MAPS = 10


def topic_columns(n: int) -> list[str]:
    """Metadata columns of the topic vector, in ``schema.topic_names`` order."""
    return [f"topic_{i:02d}" for i in range(n)]


def term_columns(n: int) -> list[str]:
    """Metadata columns of the text embedding (``schema.term_dims`` entries)."""
    return [f"term_{i:02d}" for i in range(n)]


def vector_columns(name: str, n: int) -> list[str]:
    """Metadata columns of a vector condition group (``"topics"`` or ``"terms"``)."""
    return topic_columns(n) if name == TOPICS.name else term_columns(n)


def package_version() -> str:
    try:
        return importlib_metadata.version("cbvae")
    except importlib_metadata.PackageNotFoundError:
        return "0+unknown"


def _cache_key(sources: list[tuple[str, Path]], options: dict) -> str | None:
    """Hash of input checksums, options, package and format version, the schema's field declarations and the
    category rules; None when an input file is missing."""
    checksums = []
    for kind, directory in sources:
        files = source_files(kind, directory)
        if not files or not all(p.is_file() for p in files):
            return None
        checksums.append([kind, {p.name: file_sha256(p) for p in files}])
    blob = json.dumps(
        {
            "inputs": checksums,
            "options": options,
            "version": package_version(),
            "format": FORMAT_VERSION,
            "schema": declaration_fingerprint(),
            "categories": category_table(),
            "topic_sum_tolerance": TOPIC_SUM_TOLERANCE,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _cached(out: Path, key: str | None) -> bool:
    """Whether ``out`` holds a build with this cache key whose files still match their checksums."""
    if key is None:
        return False
    try:
        manifest = read_manifest(out)
    except DataError:
        return False  # missing, foreign or of another format: rebuilt (if ours) or refused later
    if manifest["cache_key"] != key:
        return False
    try:
        verify_files(out, manifest)
    except DataError as err:
        logger.warning("%s", str(err).split("; rebuild")[0] + "; rebuilding")
        return False
    return True


def _check_replaceable(out: Path) -> None:
    """Refuse an ``out`` that is not missing, empty, or a dataset folder of ours holding only dataset files.

    So no user file is ever deleted by a rebuild.
    """
    if out.exists():
        if not out.is_dir():
            raise DataError(f"output {out} exists and is not a folder; choose another --out or remove it")
        entries = sorted(p.name for p in out.iterdir())
        if entries and not is_ours(out):
            raise DataError(
                f"output {out} exists and is not a dataset folder (no cbvae dataset manifest); "
                "choose another --out or remove it"
            )
        extra = [e for e in entries if e not in DATASET_FILES + OPTIONAL_FILES]
        if entries and extra:
            raise DataError(
                f"output {out} holds files that are not part of the dataset ({', '.join(extra[:3])}); "
                "move them away or choose another --out"
            )


def _prepare_output(out: Path) -> Path:
    """Check ``out`` can be (re)placed and return a fresh temporary sibling folder (stale ones are gone: the
    caller holds the output lock and ran ``clean_stale``)."""
    _check_replaceable(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        tmp.mkdir()
    except OSError as err:
        raise DataError(f"output folder {out.parent} is not writable ({err.strerror}); choose another --out") from err
    return tmp


def _drop_implausible(table: SourceTable) -> dict[str, int]:
    """Set values outside a field's declared plausible range to missing; returns the count per field."""
    dropped = {}
    for name in CONTINUOUS_FIELDS:
        if name not in table.rows:
            continue
        values = table.rows[name].to_numpy(np.float64)
        bad = np.isfinite(values) & ~plausible(name, values)
        if bad.any():
            table.rows.loc[bad, name] = np.nan
            dropped[name] = int(bad.sum())
            logger.warning("%s: %d %s value(s) outside the plausible range set to missing", table.name, bad.sum(), name)
    return dropped


def _topics(tables: list[SourceTable]) -> tuple[np.ndarray, list[str], list[str]]:
    """Topic weights of all rows (NaN rows where a source has none), with the topic names and keys."""
    named = [t for t in tables if t.topics is not None]
    if not named:
        return np.zeros((sum(len(t.rows) for t in tables), 0)), [], []
    names, keys = named[0].topic_names, named[0].topic_keys
    if any(t.topic_names != names for t in named):
        raise DataError("sources carry different topic vocabularies; build from one Neurosynth release")
    parts = [t.topics if t.topics is not None else np.full((len(t.rows), len(names)), np.nan) for t in tables]
    return np.concatenate(parts), list(names), list(keys)


def _place_peaks(tables: list[SourceTable], grid: Grid) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Concatenate sources, voxelise peaks and drop those outside the mask; returns rows, peaks, counts."""
    rows, peaks, counts, offset = [], [], {}, 0
    for table in tables:
        ijk = grid.voxels(table.peaks[["x", "y", "z"]].to_numpy())
        inside = grid.in_mask(ijk)
        frame = pd.DataFrame(ijk[inside], columns=["i", "j", "k"])
        frame.insert(0, "row", table.peaks["row"].to_numpy()[inside] + offset)
        n_peaks = np.bincount(table.peaks["row"].to_numpy()[inside], minlength=len(table.rows))
        counts[table.name] = {
            **table.counts,
            "peaks_outside_mask": int((~inside).sum()),
            "studies_without_peaks": int((n_peaks == 0).sum()),
            # the reader's (topic vectors) and the declared fields' plausible ranges
            "implausible_values_set_missing": {**table.implausible, **_drop_implausible(table)},
        }
        part = table.rows.assign(n_peaks=n_peaks)
        rows.append(part)
        peaks.append(frame)
        offset += len(table.rows)
    rows_df = pd.concat(rows, ignore_index=True)
    dup = rows_df["id"][rows_df["id"].duplicated()]
    if len(dup):
        raise DataError(f"id {dup.iloc[0]!r} comes from two sources; give each --neurostore-dir only once")
    return rows_df, pd.concat(peaks, ignore_index=True), counts


def _write_npy(path: Path, batches, shape: tuple[int, ...], dtype: str, total: int) -> str:
    """Stream map batches into a memory-mappable ``.npy`` (header, then rows in order); returns its sha256.

    Writing through the file instead of an ``open_memmap`` keeps dirty pages out of our RSS, so a
    full build never holds more than one batch of float32 maps; the checksum is taken on the way.
    """
    with open(path, "wb") as f:
        out = HashingWriter(f)
        np.lib.format.write_array_header_1_0(
            out, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
        )
        with tqdm(total=total, unit="map", desc="MA maps", disable=None) as bar:
            for batch in batches:
                out.write(np.ascontiguousarray(batch, dtype=dtype).data)
                bar.update(len(batch))
    return out.digest.hexdigest()


def build_dataset(
    neurosynth_dir: str | Path | None = None,
    out: str | Path = "data/neurosynth",
    subset: int | None = None,
    resolution: int = 4,
    kernel: str = "ale",
    neurostore_dirs: Sequence[str | Path] = (),
    dtype: str = "float16",
    force: bool = False,
    kernel_fwhm_mm: float = DEFAULT_KERNEL_FWHM_MM,
    radius: float = DEFAULT_RADIUS,
    neurosynth: bool = True,
    seed: int = 0,
    batch_size: int = 256,
    neuroquery_dir: str | Path | None = None,
    term_dims: int = 0,
    term_embedding: str = "svd",
) -> Path:
    """Build (or reuse) a dataset folder and return its path.

    Args:
        neurosynth_dir: folder with the Neurosynth v7 files; None downloads them with
            ``nimare.extract.fetch_neurosynth`` (reusing an existing download).
        out: dataset folder to write (a symlink: its target is replaced, the link kept).
        subset: keep this many Neurosynth studies (deterministic, stratified by category x year bin);
            None keeps all. NeuroStore sources are always kept whole.
        resolution: grid voxel size in mm (4 or 2).
        kernel: ``"ale"`` (Gaussian, ``kernel_fwhm_mm``) or ``"mkda"`` (sphere, ``radius``).
        neurostore_dirs: NiMARE parquet studyset folders to add.
        dtype: ``"float16"`` or ``"float32"`` for ``maps.npy``.
        force: rebuild even when ``out`` holds a build with the same cache key.
        kernel_fwhm_mm: ALE Gaussian FWHM in mm (the kernel's, not the metadata field ``fwhm``).
        radius: MKDA sphere radius in mm.
        neurosynth: include Neurosynth (False builds from NeuroStore folders only).
        seed: seed of the hash ranks behind the subset and the splits.
        batch_size: maps rendered per batch (bounds memory).
        neuroquery_dir: NeuroQuery's term-count files; given, the build adds ``terms.npz`` (see
            ``cbvae_ext.data.neuroquery``); None: no terms.
        term_dims: entries of the text embedding fitted on the training split, the network's ``terms``
            condition (with ``neuroquery_dir``; ``TERMS.size`` is the tested size); 0 (the default: no
            validation gain on the 1k or the full build, ``bundle/docs/architecture.md``): ``terms.npz`` only.
        term_embedding: how that embedding is fitted, one of ``neuroquery.TERM_EMBEDDINGS`` (``"svd"``: the
            tf-idf's truncated SVD; ``"neuroquery"``: NeuroQuery's regression of the training maps, cross-fitted;
            ``"neuroquery-residual"``: the same regression of their residual after the other conditions).

    Raises:
        DataError: bad option or input, nothing left after filtering, an unwritable output, or another
            build writing ``out``.
    """
    start = time.perf_counter()
    out = Path(out)
    if dtype not in DTYPES:
        raise DataError(f"--dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if subset is not None and (int(subset) != subset or subset < MIN_MAPS):
        raise DataError(
            f"--subset {subset!r} is too small; use at least {MIN_MAPS} (every block of 10 study groups gives "
            "8 training, 1 validation and 1 test map)"
        )
    spec = KernelSpec(kernel, float(kernel_fwhm_mm), float(radius))
    check_resolution(int(resolution))
    if not neurosynth and not neurostore_dirs:
        raise DataError("no source selected; drop --no-neurosynth or add --neurostore-dir")

    inputs: list[tuple[str, Path]] = []
    if neurosynth:
        inputs.append(("neurosynth", Path(neurosynth_dir) if neurosynth_dir else fetch_neurosynth_dir()))
    inputs += [("neurostore", Path(d)) for d in neurostore_dirs]
    for kind, directory in inputs:
        if not directory.is_dir():
            flag = "--neurosynth-dir" if kind == "neurosynth" else "--neurostore-dir"
            raise DataError(f"{kind} folder {directory} does not exist; check {flag}")
    options = {
        "subset": subset,
        "resolution": int(resolution),
        "kernel": spec.to_dict(int(resolution)),
        "dtype": dtype,
        "seed": seed,
    }
    if neuroquery_dir is not None:
        from .neuroquery import TERM_EMBEDDINGS, neuroquery_checksums

        if int(term_dims) != term_dims or term_dims < 0:
            raise DataError(f"--term-dims {term_dims!r} must be a whole number >= 0 (0: no terms condition)")
        if term_embedding not in TERM_EMBEDDINGS:
            raise DataError(
                f"--term-embedding {term_embedding!r} is not known; use one of {', '.join(TERM_EMBEDDINGS)}"
            )
        options["terms"] = {
            "neuroquery_files": neuroquery_checksums(neuroquery_dir),
            "embedding_dims": int(term_dims),
            "embedding": term_embedding,
        }
    key = _cache_key(inputs, options)
    target = resolve_out(out)
    if not force and target.parent.is_dir() and not os.access(target.parent, os.W_OK) and _cached(target, key):
        # a read-only copy (a shared mount) is used as it is: there is nothing to lock or clean
        logger.info("reusing %s (same inputs and options; its folder is read-only)", out)
        return out
    with output_lock(target):
        clean_stale(target)
        if not force and _cached(target, key):
            logger.info("reusing %s (same inputs and options; pass --force to rebuild)", out)
            return out
        _check_replaceable(target)  # fail before the slow part; checked again just before the rename
        _build(
            target, inputs, options, key, spec, int(resolution), subset, seed, neurosynth, dtype, batch_size, neuroquery_dir,
            int(term_dims), term_embedding, start,
        )  # fmt: skip
    return out


def condition_features(rows: pd.DataFrame, tcols: Sequence[str]) -> np.ndarray:
    """``[N, F]`` float64 non-text conditions of the build's rows: the topic weights and their observed flag, the
    task one-hot (none where unknown) and each continuous field standardised on train (0 where missing) with its
    observed flag."""
    train = (rows["split"] == "train").to_numpy()
    parts = [rows[list(tcols)].to_numpy(np.float64), rows[[f"{TOPICS.name}_observed"]].to_numpy(np.float64)]
    parts.append((rows["category"].to_numpy()[:, None] == np.array(CATEGORIES)[None, :]).astype(np.float64))
    for name in CONTINUOUS_FIELDS:
        v = rows[name].to_numpy(np.float64)
        seen = np.isfinite(v)
        ref = v[seen & train]
        centre, scale = (ref.mean(), ref.std() or 1.0) if len(ref) else (0.0, 1.0)
        parts.append(np.stack([np.where(seen, (v - centre) / scale, 0.0), seen.astype(np.float64)], axis=1))
    return np.concatenate(parts, axis=1)


def condition_residual(
    maps: Callable[[np.ndarray], np.ndarray], rows: pd.DataFrame, tcols: Sequence[str]
) -> Callable[[np.ndarray], np.ndarray]:
    """``rows -> maps(rows) - ridge(conditions)``: what topics, task and the continuous fields do not explain.

    The ridge (``networks.conditioning.fit_ridge``, one penalty for every feature, chosen by validation MSE) is
    fitted on the training rows; the ``"neuroquery-residual"`` text embedding is fitted to its residual, so the
    embedding carries what the text adds to the conditional-mean path rather than what the topics already say.
    """
    from cbvae_ext.networks.conditioning import fit_ridge

    x = condition_features(rows, tcols)
    train, val = (np.flatnonzero((rows["split"] == s).to_numpy()) for s in ("train", "val"))
    b0, coef, best, _ = fit_ridge(
        x[train],
        lambda r: maps(train[r]),
        [x[val]],
        lambda r: maps(val[r]),
        [np.full(x.shape[1], a) for a in 10.0 ** np.arange(0, 7)],
    )
    logger.info("text embedding target: the residual of a ridge on %d conditions (penalty 1e%d)", x.shape[1], best)
    return lambda r: maps(r) - (b0 + x[r] @ coef).astype(np.float32)


def _network_maps(path: Path, rows: np.ndarray, mask: np.ndarray, chunk: int = 512) -> np.ndarray:
    """``[len(rows), n_voxels]`` float32 maps of a written ``maps.npy`` inside ``mask``, scaled as the networks read them."""
    from .dataset import normalise_maps

    maps = np.load(path, mmap_mode="r")
    return np.concatenate(
        [normalise_maps(maps[rows[i : i + chunk]]).numpy()[:, mask] for i in range(0, len(rows), chunk)]
    ).astype(np.float32, copy=False)


def _build(
    out: Path,
    inputs: list[tuple[str, Path]],
    options: dict,
    key: str | None,
    spec: KernelSpec,
    resolution: int,
    subset: int | None,
    seed: int,
    neurosynth: bool,
    dtype: str,
    batch_size: int,
    neuroquery_dir: str | Path | None,
    term_dims: int,
    term_embedding: str,
    start: float,
) -> None:
    """Read, filter, split and render into a temporary sibling of ``out``, then swap it in (see ``build_dataset``)."""
    tables = [read_neurosynth(d) if kind == "neurosynth" else read_neurostore(d) for kind, d in inputs]
    # made only now: NiMARE's template and its resampling cost seconds that a reused build or missing files do not
    grid = make_grid(resolution)
    rows, peaks, counts = _place_peaks(tables, grid)
    topics, topic_names, topic_keys = _topics(tables)
    keep = rows["n_peaks"].to_numpy() > 0
    if subset is not None and neurosynth:
        ns = np.flatnonzero(keep & (rows["source"] == "neurosynth").to_numpy())
        ns_rows = rows.iloc[ns]
        chosen = ns[
            stratified_subset(
                ns_rows["id"],
                strata(ns_rows["category"], provisional_year_bins(ns_rows["year"].to_numpy())),
                int(subset),
                seed,
            )
        ]
        counts["neurosynth"]["studies_not_in_subset"] = int(len(ns) - len(chosen))
        keep &= (rows["source"] != "neurosynth").to_numpy()
        keep[chosen] = True
    if not keep.any():
        raise DataError("no study has a peak inside the brain mask; check the coordinates and their space labels")
    new_index = np.full(len(rows), -1)
    new_index[keep] = np.arange(int(keep.sum()))
    rows = rows[keep].reset_index(drop=True)
    topics = topics[keep]
    peaks = peaks[keep[peaks["row"].to_numpy()]]
    row_of_peak = new_index[peaks["row"].to_numpy()]
    for name, c in counts.items():
        c["n_maps"] = int((rows["source"] == name).sum())
        logger.info(
            "%s: read %d studies / %d peaks; dropped %d peaks outside the brain mask, %d peaks without a study, "
            "%d studies with no peak left%s; kept %d maps",
            name,
            c["studies_read"],
            c["peaks_read"],
            c["peaks_outside_mask"],
            c["peaks_without_study"],
            c["studies_without_peaks"],
            f", {c['studies_not_in_subset']} studies outside --subset" if "studies_not_in_subset" in c else "",
            c["n_maps"],
        )

    # splits: stratify on provisional bins over all rows, then fit the stored bin edges on train
    # split groups: a study with all its analyses, joined with studies whose maps are identical
    ijk = peaks[["i", "j", "k"]].to_numpy(np.int64)
    duplicates = duplicate_groups(row_of_peak, np.ravel_multi_index(tuple(ijk.T), grid.shape), len(rows))
    rows["split_group"] = merge_groups(rows["study_id"], duplicates)
    rows["split"] = split_groups(
        rows["split_group"], strata(rows["category"], provisional_year_bins(rows["year"].to_numpy())), seed
    )
    for name in CONTINUOUS_FIELDS:
        if name not in rows:
            rows[name] = np.nan
        rows[name] = rows[name].astype(np.float64)
        rows[f"{name}_observed"] = np.isfinite(rows[name].to_numpy())
    tcols = topic_columns(len(topic_names))
    rows = pd.concat([rows, pd.DataFrame(topics.astype(np.float32), columns=tcols)], axis=1)
    rows[f"{TOPICS.name}_observed"] = np.isfinite(topics).all(axis=1) if tcols else False
    rows[tcols] = rows[tcols].fillna(0.0)  # missing topics: zeros with topics_observed False
    rows["category_observed"] = rows["category"].notna()
    empty = [s for s in ("train", "val", "test") if not (rows["split"] == s).any()]
    if empty:
        raise DataError(
            f"the build has {len(rows)} maps in {rows['split_group'].nunique()} study groups, which leaves the "
            f"{'/'.join(empty)} split empty; give at least {MIN_MAPS} studies (--subset or more sources)"
        )
    tmp = _prepare_output(out)
    try:
        shape = (len(rows), *grid.shape)
        maps = render_maps(
            spec.cube(grid), peaks[["i", "j", "k"]].to_numpy(), row_of_peak, len(rows), grid.mask, batch_size, dtype
        )
        maps_sha256 = _write_npy(tmp / "maps.npy", maps, shape, dtype, len(rows))
        terms, ecols = None, []
        if neuroquery_dir is not None:
            from .neuroquery import build_terms

            is_train = (rows["split"] == "train").to_numpy()
            targets = functools.partial(_network_maps, tmp / "maps.npy", mask=grid.mask)
            if term_dims and term_embedding == "neuroquery-residual":
                targets = condition_residual(targets, rows, tcols)
            terms, counts["neuroquery"] = build_terms(
                neuroquery_dir, rows["id"], is_train, term_dims, seed, term_embedding,
                maps=targets, groups=rows["split_group"].to_numpy(),
            )  # fmt: skip
            if terms.embedding is not None:
                ecols = term_columns(terms.embedding.dims)
                embedded = pd.DataFrame(np.nan_to_num(terms.embedded()).astype(np.float32), columns=ecols)
                rows = pd.concat([rows, embedded], axis=1)  # no text: zeros with terms_observed False
                rows[f"{TERMS.name}_observed"] = terms.observed
        train = rows[rows["split"] == "train"]
        schema = MetadataSchema.fit(
            CATEGORIES,
            {f: train[f].to_numpy() for f in CONTINUOUS_FIELDS},
            topic_names=topic_names,
            topic_keys=topic_keys,
            term_dims=len(ecols),
        )
        rows["year_bin"] = schema.year_bin(rows["year"].to_numpy())
        rows["n_peaks"] = rows["n_peaks"].astype(np.int64)
        columns = ["id", "study_id", "source", "title"]
        for name in CONTINUOUS_FIELDS:
            columns += [name, f"{name}_observed"]
        columns += [*tcols, f"{TOPICS.name}_observed"]
        if ecols:
            columns += [*ecols, f"{TERMS.name}_observed"]
        rows = rows[[*columns, "category", "category_observed", "space", "n_peaks", "year_bin", "split_group", "split"]]

        rows.to_parquet(tmp / "metadata.parquet", index=False)
        nib.save(grid.mask_img(), tmp / "mask.nii.gz")
        if terms is not None:
            from .neuroquery import TERMS_FILE, save_terms

            save_terms(tmp / TERMS_FILE, terms)
        written = [*DATASET_FILES[:3], *(f for f in OPTIONAL_FILES if (tmp / f).is_file())]
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "package_version": package_version(),
            "cache_key": key,
            "schema_fingerprint": declaration_fingerprint(),
            "files": file_checksums(tmp, written, {"maps.npy": maps_sha256}),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "options": options,
            "n_maps": len(rows),
            "dtype": dtype,
            "grid": grid.to_dict(),
            "kernel": spec.to_dict(grid.resolution_mm),
            "image_scaling": "loader divides each map by its own maximum",
            "sources": [
                {
                    "name": t.name,
                    "kind": kind,
                    "path": str(Path(d).resolve()),
                    "files": {Path(p).name: h for p, h in t.files.items()},
                }
                for t, (kind, d) in zip(tables, inputs, strict=True)
            ],
            "counts": counts,
            "split_counts": {s: int((rows["split"] == s).sum()) for s in ("train", "val", "test")},
            "duplicate_maps": {
                "rule": "studies whose kept peaks fall on exactly the same voxels (identical maps) share a split",
                "n_groups": len(duplicates),
                "n_maps": int(sum(len(g) for g in duplicates)),
                "groups": [[str(rows["id"].iloc[r]) for r in g] for g in duplicates],
            },
            "category_counts": {str(k): int(v) for k, v in rows["category"].value_counts(dropna=False).items()},
            "category_table": category_table(),
            "space_rule": "TAL converted with nimare.utils.tal2mni; UNKNOWN/OTHER treated as MNI, kept as UNKNOWN",
            "year_bin_edges": schema.year_bin_edges,
            "schema": schema.to_dict(),
            "build_seconds": round(time.perf_counter() - start, 2),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        replace_folder(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(
            f"cannot write dataset to {out} ({err.strerror or err}); check free space and permissions"
        ) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %d maps %s to %s in %.1f s", len(rows), list(grid.shape), out, time.perf_counter() - start)
