"""Two seeds of one design: do the two evaluations reach the same decisions, and how far apart are their maps?

python -m cbvae_ext.evaluation.seeds EVAL_A EVAL_B [--n_bootstrap N]

``EVAL_A`` and ``EVAL_B`` are evaluation folders (``test_results.json`` + ``per_map_test.parquet``) of two
trainings that differ only in ``--seed``, evaluated on the same dataset. Two things are printed as markdown:

- every criterion of either evaluation, its value and result under each seed, and whether the two decisions
  agree (a criterion undecided in one of them is not counted);
- for every per-map column of the C-β-VAE (``cbvae/...``) in both tables, the paired seed difference (B - A)
  on the same test maps, joined by study id, with its 95% bootstrap CI. A CI that excludes 0 is a seed effect
  that a single-seed claim of that size would not survive.

Evaluations of different test splits, or a folder without its table, end in one ``error:`` line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cbvae_ext.errors import CbvaeError
from cbvae_ext.evaluation.columns import MODEL
from cbvae_ext.evaluation.report import ReportError, criterion_cells, load_results, markdown_table, print_or_fail
from cbvae_ext.evaluation.stats import paired_bootstrap
from cbvae_ext.evaluation.workflow import TEST_TABLE

__all__ = ["SeedComparisonError", "compare_seeds", "main", "seeds_report"]


class SeedComparisonError(CbvaeError, ValueError):
    """Two evaluations that cannot be compared map by map (another test split, a missing or foreign table)."""


def _folder(path: str | Path) -> Path:
    path = Path(path)
    return path.parent if path.is_file() else path


def _table_of(folder: Path) -> pd.DataFrame:
    path = folder / TEST_TABLE
    try:
        table = pd.read_parquet(path)
    except FileNotFoundError:
        raise SeedComparisonError(f"{path} does not exist; rerun the evaluation into {folder}") from None
    except Exception as err:  # pyarrow raises its own types for a damaged file
        raise SeedComparisonError(f"{path} is unreadable ({type(err).__name__}); rerun the evaluation") from None
    if "id" not in table.columns or table["id"].duplicated().any():
        raise SeedComparisonError(f"{path} has no unique 'id' column; rerun the evaluation into {folder}")
    return table.set_index("id")


def compare_seeds(eval_a: str | Path, eval_b: str | Path, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The criteria of both evaluations side by side and the paired seed difference of each model column.

    Args:
        eval_a: the evaluation folder (or its ``test_results.json``) of the first seed.
        eval_b: that of the second seed, on the same test split.
        n_bootstrap: resamples of each paired bootstrap.
        seed: seed of the resampling.

    Returns:
        ``runs`` (the two C-β-VAE run folders), ``n_test``, ``criteria`` (name -> ``{rule, a, b, agree}``; ``agree``
        None when either is undecided), ``n_agree``, ``n_decided`` and ``columns`` (name -> ``paired_bootstrap``
        of B - A, ``direction`` "greater" but ``passed`` replaced by ``differs``: the CI excludes 0).

    Raises:
        SeedComparisonError: a results file or table missing or foreign, or the two test splits differ.
    """
    try:
        res = [load_results(p) for p in (eval_a, eval_b)]
    except ReportError as err:
        raise SeedComparisonError(str(err)) from None
    tables = [_table_of(_folder(p)) for p in (eval_a, eval_b)]
    ids_a, ids_b = set(tables[0].index), set(tables[1].index)
    if ids_a != ids_b:
        raise SeedComparisonError(
            f"{eval_a} and {eval_b} are of different test splits ({len(ids_a)} vs {len(ids_b)} maps, "
            f"{len(ids_a & ids_b)} shared); evaluate both runs on the same dataset"
        )
    a_tab, b_tab = tables[0], tables[1].loc[tables[0].index]  # the same maps in the same order
    criteria: dict[str, Any] = {}
    for name in dict.fromkeys([*res[0]["criteria"], *res[1]["criteria"]]):
        ca, cb = (r["criteria"].get(name) or {"passed": None, "reason": "not in this evaluation"} for r in res)
        decided = ca.get("passed") is not None and cb.get("passed") is not None
        criteria[name] = {
            "rule": ca.get("rule") or cb.get("rule"),
            "a": ca,
            "b": cb,
            "agree": bool(ca["passed"] == cb["passed"]) if decided else None,
        }
    columns: dict[str, Any] = {}
    shared = [c for c in a_tab.columns if c.startswith(f"{MODEL}/") and c in b_tab.columns]
    for name in sorted(shared):
        if not (pd.api.types.is_numeric_dtype(a_tab[name]) and pd.api.types.is_numeric_dtype(b_tab[name])):
            continue
        a, b = a_tab[name].to_numpy(np.float64), b_tab[name].to_numpy(np.float64)
        diff = paired_bootstrap(b, a, "greater", n_bootstrap, seed)
        diff.pop("passed")  # the one-sided verdict; a seed difference is read two-sided, from the CI
        diff["mean_a"], diff["mean_b"] = diff["mean_b"], diff["mean_a"]  # paired_bootstrap's first argument is B
        lo, hi = diff["ci95"]
        columns[name] = {**diff, "differs": None if lo is None else bool(lo > 0 or hi < 0)}
    agree = [c["agree"] for c in criteria.values() if c["agree"] is not None]
    return {
        "runs": [r["models"].get(MODEL, {}).get("run_dir") for r in res],
        "n_test": len(a_tab),
        "criteria": criteria,
        "n_decided": len(agree),
        "n_agree": int(sum(agree)),
        "columns": columns,
    }


def seeds_report(cmp: Mapping[str, Any]) -> str:
    """The comparison as markdown: the criteria under both seeds, then the paired seed differences."""
    out = [
        f"Seeds A ({cmp['runs'][0]}) and B ({cmp['runs'][1]}) on the same {cmp['n_test']} test maps: "
        f"{cmp['n_agree']} of {cmp['n_decided']} criteria decided under both seeds reach the same decision."
    ]
    rows = []
    for name, c in cmp["criteria"].items():
        agree = "—" if c["agree"] is None else ("yes" if c["agree"] else "**no**")
        rows.append([name, *criterion_cells(c["a"]), *criterion_cells(c["b"]), agree])
    out.append(markdown_table(["criterion", "seed A", "result A", "seed B", "result B", "same decision"], rows))
    rows = []
    for name, c in cmp["columns"].items():
        if c["mean_diff"] is None:
            rows.append([name, "—", "—", "—", "no map with both values"])
            continue
        lo, hi = c["ci95"]
        rows.append(
            [
                name,
                f"{c['mean_a']:.4g}",
                f"{c['mean_b']:.4g}",
                f"{c['mean_diff']:+.3g} [{lo:+.3g}, {hi:+.3g}]",
                "**differs**" if c["differs"] else "within resampling",
            ]
        )
    out.append(markdown_table(["per-map column", "mean A", "mean B", "B - A [95% CI]", "seed effect"], rows))
    return "\n\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: print the comparison; one ``error:`` line and exit 2 on bad input."""
    parser = argparse.ArgumentParser(prog="python -m cbvae_ext.evaluation.seeds", description=__doc__.split("\n")[0])
    parser.add_argument("eval_a", help="evaluation folder (or test_results.json) of the first seed")
    parser.add_argument("eval_b", help="the same for the second seed, on the same dataset")
    parser.add_argument("--n_bootstrap", type=int, default=1000, help="resamples per paired difference")
    args = parser.parse_args(argv)
    return print_or_fail(
        lambda: seeds_report(compare_seeds(args.eval_a, args.eval_b, args.n_bootstrap)),
        (SeedComparisonError, ValueError),
    )


if __name__ == "__main__":
    sys.exit(main())
