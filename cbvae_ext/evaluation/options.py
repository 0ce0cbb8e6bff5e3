"""The evaluation options, declared once: ``EvalOptions``.

Each field is one top-level key of ``bundle/configs/evaluate.yaml`` and one keyword of ``Evaluation``
(``--key value`` on the bundle command line). Its default, range and one-line doc give:

- the checks: ``EvalOptions.check`` turns the given values into ints / bools, or one ``EvaluationError``
  naming the option and what it takes;
- the option table in ``bundle/docs/README.md`` (``option_table``; ``python -m cbvae_ext.evaluation.options``
  prints it, a test keeps the document, ``evaluate.yaml`` and ``Evaluation`` equal to it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from cbvae_ext.engine.bundle_glue import BundleConfigError, flag
from cbvae_ext.evaluation.runs import EvaluationError

__all__ = ["EvalOptions", "option_table"]


def _option(default: Any, doc: str, low: int | None = None, *, null: str | None = None) -> Any:
    """An ``EvalOptions`` field: its default, its lowest whole-number value and what null means (None: not allowed)."""
    return dataclasses.field(default=default, metadata={"doc": doc, "low": low, "null": null})


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """Every option of the evaluation (besides the folders and the device), with its default."""

    batch_size: int = _option(8, "maps per forward pass", 1)
    num_workers: int = _option(0, "kept for config compatibility (maps are read in the main process)", 0)
    n_bootstrap: int = _option(
        1000, "bootstrap resamples per summary and paired comparison (1000 for reported figures)", 1
    )
    n_permutations: int = _option(100, "permutations of each post-hoc probe's null (100 for reported figures)", 0)
    n_permutations_mlp: int | None = _option(None, "permutations of the MLP probe's null", 0, null="n_permutations")
    iwae_k: int = _option(64, "importance samples of the likelihood bound (1: the sampled ELBO)", 1)
    iwae_max_maps: int | None = _option(None, "test maps (the first ones) given the bound", 1, null="all")
    n_prior_samples: int = _option(
        32, "prior decodes averaged for a conditional mean map of a network without a conditional-mean path", 1
    )
    n_examples: int = _option(3, "held-out studies shown in recon_examples.png", 0)
    max_train_maps: int | None = _option(
        None,
        "training maps (seeded subsample) fitting PCA, the mean maps, the ridge, the probes",
        2,
        null="all",
    )
    n_counterfactual: int | None = _option(
        20, "held-out studies per category whose task is switched (counterfactual direction)", 1, null="all"
    )
    neuroquery: bool = _option(True, "fit the NeuroQuery baseline when the dataset has terms.npz (false: absent)")
    n_unseen_pairs: int = _option(
        10,
        "term pairs removed from training and predicted (unseen combinations; each refits the path and NeuroQuery: "
        "12 s a pair on the 1k job; 0: off)",
        0,
    )
    n_half_splits: int = _option(2, "random half splits of each study's peaks (completion)", 1)
    joint_k: int = _option(16, "importance samples of the joint peak likelihood", 1)
    n_calibration_samples: int = _option(16, "prior draws per study for the calibrated per-voxel peak probability", 1)
    generative_max_maps: int | None = _option(
        200, "test maps (seeded) of completion, joint likelihood and calibration", 1, null="all"
    )
    decoding_k: int = _option(4, "importance samples of each candidate's log p(x | c) (decoding)", 1)
    decoding_n_terms: int = _option(50, "terms (most used in training) the decoder ranks", 1)
    decoding_max_maps: int | None = _option(None, "test maps (the first ones) decoded", 1, null="all")
    qc_k: int = _option(4, "posterior samples of the typicality score (quality control)", 1)
    qc_max_maps: int | None = _option(None, "test maps (the first ones) corrupted and scored", 1, null="all")
    ood_max_maps: int | None = _option(None, "maps of --ood_dataset_dir scored (a seeded subsample)", 1, null="all")
    seed: int = _option(0, "seed of every resampling, permutation and latent sample", 0)

    @classmethod
    def check(cls, values: Mapping[str, Any]) -> EvalOptions:
        """The options from ``values`` (defaults for the rest), or one ``EvaluationError`` naming the bad one."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise EvaluationError(f"--{unknown[0]} is not an evaluation option; the options: {', '.join(known)}")
        checked = {}
        for name, value in values.items():
            meta = known[name].metadata
            if known[name].type in ("bool", bool):
                try:
                    checked[name] = flag(value, name)
                except BundleConfigError:
                    raise EvaluationError(f"--{name} {value!r} is invalid; give true or false") from None
            elif value is None and meta["null"] is not None:
                checked[name] = None
            else:
                checked[name] = _whole(name, value, meta["low"])
        return cls(**checked)

    def as_dict(self) -> dict[str, Any]:
        """Every option by name, ``n_permutations_mlp`` resolved: what the sections read as ``data.opts``."""
        out = dataclasses.asdict(self)
        if out["n_permutations_mlp"] is None:
            out["n_permutations_mlp"] = self.n_permutations
        return out


def _whole(name: str, value: Any, low: int) -> int:
    try:
        number = int(value)
        ok = not isinstance(value, bool) and number == float(value) and number >= low
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise EvaluationError(f"--{name} {value!r} is invalid; give an integer >= {low}")
    return number


def option_table() -> str:
    """The Markdown table of every option (``bundle/docs/README.md`` holds a copy between ``<!-- options -->``
    markers; a test compares them)."""
    rows = ["| option | default | values | what it sets |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(EvalOptions):
        low, default = f.metadata["low"], f.default
        values = "true or false" if low is None else f"a whole number >= {low}"
        if f.metadata["null"] is not None:
            values += f", or null ({f.metadata['null']})"
        shown = "null" if default is None else str(default).lower()
        rows.append(f"| `{f.name}` | `{shown}` | {values} | {f.metadata['doc']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(option_table())
