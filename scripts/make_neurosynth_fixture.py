"""Regenerate the committed Neurosynth-layout test fixture (``tests/data/neurosynth``) from the real v7 files.

The fixture holds a few hundred real studies in exactly the file names and formats of the Neurosynth v7
release (NiMARE's download layout), so the test suite runs in a clone without ``../shared``. Studies are
a deterministic stratified subset (task category x year bin, the builder's own sampler) plus a few
studies with identical coordinate sets (duplicate entries of the database), so the split-grouping rule is
exercised. The data stay under the Open Database License: ``LICENSE.txt`` is copied and the README
carries the attribution.

Usage::

    python scripts/make_neurosynth_fixture.py --neurosynth-dir ../shared/data/neurosynth [--out tests/data/neurosynth]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse

from cbvae_ext.data.sources import NEUROSYNTH_FILES, read_neurosynth
from cbvae_ext.data.splits import provisional_year_bins, strata, stratified_subset

#: Studies drawn by the stratified sampler (the duplicate pairs come on top).
N_STUDIES = 300
#: Pairs of studies with identical coordinate sets to include.
N_DUPLICATE_PAIRS = 3
_NS = "data-neurosynth_version-7_"
#: Files copied unchanged (small, study-independent).
COPIED = [
    NEUROSYNTH_FILES["vocabulary"],
    NEUROSYNTH_FILES["keys"],
    _NS + "vocab-LDA50_metadata.json",
    _NS + "vocab-terms_vocabulary.txt",
    "LICENSE.txt",
]

README = """# Neurosynth v7 test fixture ({n} real studies)

A small subset of the Neurosynth database, version 7 (July 2018), in the release's own file names and
formats (NiMARE's `fetch_neurosynth` layout), so that `cbvae`'s tests run without the full database.
Regenerate it with `python scripts/make_neurosynth_fixture.py --neurosynth-dir DIR` from an intact copy
of the full release (checksums in `SHA256SUMS` of that copy).

- {n} studies ({peaks} peaks): a stratified subset by task category x year bin (seed 0), plus
  {dups} pairs of studies whose coordinate sets are identical (duplicate entries in the database).
- `*_coordinates.tsv.gz`, `*_metadata.tsv.gz`: the rows of those studies, unchanged, in the original order.
- `*_vocab-LDA50_source-abstract_type-weight_features.npz`: the same rows of the 14,371 x 50 topic-weight
  matrix (scipy sparse, same format); vocabulary, keys and metadata files are copied unchanged.
- Not a full database: tests that need all 14,371 studies are marked `full_data` and skip without it.

License: Open Database License (ODbL) 1.0, see `LICENSE.txt`; this fixture is a derived database and
stays under the same license. Attribution: Neurosynth, Yarkoni T, Poldrack RA, Nichols TE, Van Essen DC,
Wager TD (2011). Large-scale automated synthesis of human functional neuroimaging data. Nature Methods
8:665-670. Source: https://github.com/neurosynth/neurosynth-data (commit
209c33cd009d0b069398a802198b41b9c488b9b7).
"""


def _write_tsv_gz(df: pd.DataFrame, path: Path) -> None:
    """Tab-separated, gzip with a fixed timestamp so that regenerating gives identical bytes."""
    with open(path, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(df.to_csv(sep="\t", index=False).encode())


def _duplicate_pairs(coords: pd.DataFrame, n: int) -> list[str]:
    """Ids of the first ``n`` pairs of studies whose coordinate sets are identical."""
    xyz = coords.assign(key=coords["x"] + "," + coords["y"] + "," + coords["z"])
    sets = xyz.groupby("id")["key"].apply(lambda s: "|".join(sorted(s)))
    groups = sets.groupby(sets).apply(lambda s: sorted(s.index))
    pairs = [g[:2] for g in groups if len(g) >= 2]
    return [i for pair in sorted(pairs)[:n] for i in pair]


def make_fixture(neurosynth_dir: Path, out: Path, n_studies: int = N_STUDIES, n_pairs: int = N_DUPLICATE_PAIRS) -> None:
    source = read_neurosynth(neurosynth_dir)  # validates the input and derives the categories
    rows = source.rows
    chosen = stratified_subset(
        rows["id"], strata(rows["category"], provisional_year_bins(rows["year"].to_numpy())), n_studies
    )
    meta = pd.read_csv(neurosynth_dir / NEUROSYNTH_FILES["metadata"], sep="\t", dtype=str, keep_default_na=False)
    coords = pd.read_csv(neurosynth_dir / NEUROSYNTH_FILES["coordinates"], sep="\t", dtype=str, keep_default_na=False)
    ids = set(meta["id"].iloc[chosen]) | set(_duplicate_pairs(coords, n_pairs))
    keep = meta["id"].isin(ids).to_numpy()
    out.mkdir(parents=True, exist_ok=True)
    _write_tsv_gz(meta[keep], out / NEUROSYNTH_FILES["metadata"])
    kept_coords = coords[coords["id"].isin(ids)]
    _write_tsv_gz(kept_coords, out / NEUROSYNTH_FILES["coordinates"])
    features = scipy.sparse.load_npz(neurosynth_dir / NEUROSYNTH_FILES["features"])
    subset = features[np.flatnonzero(keep)].asformat(features.format)
    scipy.sparse.save_npz(out / NEUROSYNTH_FILES["features"], subset, compressed=True)
    for name in COPIED:
        shutil.copyfile(neurosynth_dir / name, out / name)
    (out / "README.md").write_text(README.format(n=int(keep.sum()), peaks=len(kept_coords), dups=n_pairs))
    data_files = sorted(p.name for p in out.iterdir() if p.name.startswith("data-"))
    (out / "SHA256SUMS").write_text(
        "".join(f"{hashlib.sha256((out / n).read_bytes()).hexdigest()}  {n}\n" for n in data_files)
    )
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {int(keep.sum())} studies, {len(kept_coords)} peaks to {out} ({size / 1024:.0f} KiB)")


NQ_README = """# NeuroQuery test fixture ({n} real articles)

The NeuroQuery term counts (Dockès et al., 2020, eLife 9:e53385) of the articles that are studies of the
Neurosynth fixture beside it (`../neurosynth`, same PubMed ids), in the release's own file names and
formats (NiMARE's `fetch_neuroquery` layout): the metadata rows and the same rows of the abstract, title
and keywords count matrices ({n} x {v}, scipy sparse); the vocabulary is copied unchanged. Regenerate
with `python scripts/make_neurosynth_fixture.py --neurosynth-dir DIR --neuroquery-dir NQDIR`.

License: BSD 3-Clause, copyright (c) 2019 jeromedockes, see `LICENSE`. Source:
https://github.com/neuroquery/neuroquery_data (commit 4580f86267fb7c14ac1f601e298cbed898d79f2d).
"""


def make_neuroquery_fixture(neuroquery_dir: Path, neurosynth_fixture: Path, out: Path) -> None:
    """The NeuroQuery rows of the fixture's studies, in NeuroQuery's layout (``cbvae_ext.data.neuroquery``)."""
    from cbvae_ext.data.neuroquery import NEUROQUERY_FILES

    ids = set(pd.read_csv(neurosynth_fixture / NEUROSYNTH_FILES["metadata"], sep="\t", dtype=str)["id"])
    meta = pd.read_csv(neuroquery_dir / NEUROQUERY_FILES["metadata"], sep="\t", dtype=str, keep_default_na=False)
    keep = np.flatnonzero(meta["id"].isin(ids).to_numpy())
    out.mkdir(parents=True, exist_ok=True)
    _write_tsv_gz(meta.iloc[keep], out / NEUROQUERY_FILES["metadata"])
    for source in ("abstract", "title", "keywords"):
        counts = scipy.sparse.load_npz(neuroquery_dir / NEUROQUERY_FILES[source])
        scipy.sparse.save_npz(out / NEUROQUERY_FILES[source], counts[keep].asformat(counts.format), compressed=True)
    for name in (NEUROQUERY_FILES["vocabulary"], "LICENSE"):
        shutil.copyfile(neuroquery_dir / name, out / name)
    n_terms = len((out / NEUROQUERY_FILES["vocabulary"]).read_text().splitlines())
    (out / "README.md").write_text(NQ_README.format(n=len(keep), v=n_terms))
    print(f"wrote {len(keep)} NeuroQuery articles to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neurosynth-dir", type=Path, required=True, help="the full Neurosynth v7 files")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/data/neurosynth")
    parser.add_argument("--n-studies", type=int, default=N_STUDIES)
    parser.add_argument("--neuroquery-dir", type=Path, help="the NeuroQuery files (adds tests/data/neuroquery)")
    parser.add_argument(
        "--neuroquery-out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/data/neuroquery"
    )
    parser.add_argument("--skip-neurosynth", action="store_true", help="keep the Neurosynth fixture as it is")
    args = parser.parse_args()
    if not args.skip_neurosynth:
        make_fixture(args.neurosynth_dir, args.out, args.n_studies)
    if args.neuroquery_dir is not None:
        make_neuroquery_fixture(args.neuroquery_dir, args.out, args.neuroquery_out)


if __name__ == "__main__":
    main()
