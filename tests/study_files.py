"""Real studies of the tiny dataset written out as a user's tool would export them: Sleuth/GingerALE text, CSV/TSV,
NiMARE dataset JSON and NIMADS studyset JSON (shared by ``test_study.py`` and ``test_app.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["test_split_studies", "write_csv", "write_nimare_json", "write_sleuth", "write_studyset_json"]

_COORDS = "data-neurosynth_version-7_coordinates.tsv.gz"


def test_split_studies(meta: pd.DataFrame, neurosynth_dir: Path) -> dict[str, dict]:
    """The first MNI and the first Talairach test-split study of a dataset's ``metadata``, with their peaks as
    Neurosynth lists them: ``{space: {"id", "row", "xyz", "year"}}``."""
    coords = pd.read_csv(neurosynth_dir / _COORDS, sep="\t", dtype={"id": str})
    out = {}
    for space in ("MNI", "TAL"):
        pick = meta[(meta["space"] == space) & (meta["split"] == "test")].iloc[0]
        raw = coords.loc[coords["id"] == pick["id"].split(":", 1)[1], ["x", "y", "z"]].to_numpy(np.float64)
        out[space] = {"id": pick["id"], "row": int(pick.name), "xyz": raw, "year": float(pick["year"])}
    return out


test_split_studies.__test__ = False  # a helper, not a test


def write_sleuth(path: Path, studies: list[tuple[str, np.ndarray]], reference: str, subjects: int = 20) -> Path:
    lines = [f"// Reference={reference}"]
    for name, xyz in studies:
        lines += [f"// {name}", f"// Subjects={subjects}", *("\t".join(f"{v:g}" for v in p) for p in xyz), ""]
    path.write_text("\n".join(lines))
    return path


def write_csv(path: Path, studies: list[tuple[str, np.ndarray, str]], sep: str = ",") -> Path:
    frames = [
        pd.DataFrame(xyz, columns=["x", "y", "z"]).assign(space=space, study=name) for name, xyz, space in studies
    ]
    pd.concat(frames).to_csv(path, index=False, sep=sep)
    return path


def write_nimare_json(path: Path, studies: list[tuple[str, np.ndarray, str]]) -> Path:
    doc = {
        name: {
            "contrasts": {
                "1": {
                    "coords": {
                        "space": space,
                        "x": xyz[:, 0].tolist(),
                        "y": xyz[:, 1].tolist(),
                        "z": xyz[:, 2].tolist(),
                    },
                    "metadata": {"sample_sizes": [20]},
                }
            }
        }
        for name, xyz, space in studies
    }
    path.write_text(json.dumps(doc))
    return path


def write_studyset_json(path: Path, studies: list[tuple[str, np.ndarray, str]]) -> Path:
    doc = {
        "id": "mine",
        "name": "",
        "studies": [
            {
                "id": name,
                "name": name,
                "authors": "",
                "publication": "",
                "metadata": {},
                "analyses": [
                    {
                        "id": "1",
                        "name": "1",
                        "conditions": [],
                        "weights": [],
                        "images": [],
                        "points": [{"space": space, "coordinates": list(map(float, p))} for p in xyz],
                    }
                ],
            }
            for name, xyz, space in studies
        ],
    }
    path.write_text(json.dumps(doc))
    return path
