"""Ablations of the conditional-mean path on a dataset folder (no VAE training: the path is fitted in closed form).

1. Category identification: the task-alone conditional map against each held-out category mean, with the
   task penalty chosen by validation MSE (the old rule) and by validation identification (the default),
   beside the training category means.
2. Terms: peak AUC on the validation split (``--text-split test``: the test split) of the training mean map (the trivial answer), of the path's
   map without the terms group (topics, task, year; the group hidden in the fit and the prediction), with
   it (the dataset's text embedding: ``--term-dims`` and ``--term-embedding`` of the build; on the residual,
   its maps kept outside the path's rank as the preset does, or truncated with the rest), and without it
   plus a NeuroQuery text part
   (``neuroquery.smoothed_regression.SmoothedRegression`` fitted on the training studies with text, on the
   residual maps projected onto a training PCA basis), paired over the split's studies with text
   (``--text``; needs ``terms.npz``). The terms group is tried in the shared penalty and with a penalty
   of its own, chosen by validation MSE or by validation peak AUC. Last, the embedding a build would need for
   the path to carry that text part: the same regression on the residual's principal coordinates, read as a
   64-dim embedding cross-fitted over study-group folds as the build's is (``fit_supervised_embedding``),
   fitted to the residual by the path's own ridge (penalty by validation MSE; a ``--term-embedding
   neuroquery-residual`` build is not this design: its base and targets differ, ``architecture.md``). Each
   row's Pearson r beside its peak AUC.

Usage::

    python scripts/ablate_text.py --dataset DATA [--split test] [--text | --text-only] [--text-split test]
        [--residual-only | --no-group-rows]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from cbvae_ext.data import load_dataset_info, normalise_maps
from cbvae_ext.data.neuroquery import fit_supervised_embedding, load_terms
from cbvae_ext.evaluation.conditional import identification
from cbvae_ext.evaluation.metrics import peak_auc, pearson_r
from cbvae_ext.evaluation.stats import paired_bootstrap
from cbvae_ext.networks import build_network, initialise_from_data, preset_config
from cbvae_ext.networks.conditioning import fit_ridge, hide_groups


def _maps(info, rows: np.ndarray) -> np.ndarray:
    return normalise_maps(np.asarray(info.maps[rows], dtype=np.float32)).numpy()[:, info.mask]


def _path_probs(model, info, meta: np.ndarray, meta_mask: np.ndarray) -> np.ndarray:
    m = torch.from_numpy(np.concatenate([meta, meta_mask], axis=1))
    with torch.no_grad():
        p = torch.sigmoid(model.conditional_mean(m).float()).numpy()
    return p[:, 0][:, info.mask]


def _task_maps(model, info, present: list[int]) -> np.ndarray:
    task = info.schema.group("task")
    meta = np.zeros((len(present), info.schema.meta_dim), np.float32)
    mask = np.zeros((len(present), info.schema.mask_dim), np.float32)
    meta[np.arange(len(present)), task.meta_slice.start + np.array(present)] = 1.0
    mask[:, task.mask_index] = 1.0
    return _path_probs(model, info, meta, mask)


def identification_table(info, split: str, seed: int) -> None:
    train, held = info.rows("train"), info.rows(split)
    cat_tr, cat_te = info.category_index(train), info.category_index(held)
    present = [c for c in range(info.schema.n_categories) if (cat_te == c).any() and (cat_tr == c).any()]
    y_tr, y_te = _maps(info, train), _maps(info, held)
    heldout = np.stack([y_te[cat_te == c].mean(0) for c in present])
    labels = [info.schema.categories[c] for c in present]
    means = identification(np.stack([y_tr[cat_tr == c].mean(0) for c in present]), heldout, labels)
    print(f"| task penalty chosen by | categories identified ({split}) | penalties (others, task) |")
    print("| --- | ---: | --- |")
    rules = (
        ("validation MSE (old)", False, False),
        ("validation identification (default)", True, False),
        ("validation identification, 2nd replica topics hidden", True, True),
    )
    for rule, flag, replica in rules:
        model = build_network(preset_config("cpu", info.schema, info.mask.shape))
        initialise_from_data(model, info.path, seed=seed, identify_task=flag, vector_hidden_replica=replica)
        got = identification(_task_maps(model, info, present), heldout, labels)
        print(
            f"| {rule} | {got['n_correct']} of {got['n_groups']} | {tuple(float(a) for a in model.cond_mean.alpha)} |"
        )
    print(f"| training category means | {means['n_correct']} of {means['n_groups']} | - |")


def _hidden(info, meta: np.ndarray, meta_mask: np.ndarray, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    hide = torch.tensor([g.name in names for g in info.schema.groups])
    m, mm = hide_groups(torch.from_numpy(meta), torch.from_numpy(meta_mask), info.schema.groups, hide)
    return m.numpy(), mm.numpy()


def text_table(
    info,
    seed: int,
    split: str = "val",
    n_components: int = 100,
    rank: int | None = None,
    residual_only: bool = False,
    group_rows: bool = True,
    embedding_dims: int = 64,
) -> None:
    """Peak AUC on ``split`` of the path without the terms group, with it, and with NeuroQuery's text part added
    (every penalty chosen on the validation split)."""
    from neuroquery.smoothed_regression import SmoothedRegression
    from sklearn.decomposition import PCA

    terms = load_terms(info.path)
    if terms is None:
        raise SystemExit(f"{info.path} has no terms.npz; build it with --neuroquery-dir")
    train, val = info.rows("train"), info.rows(split)
    y_tr, y_va = _maps(info, train), _maps(info, val)
    has_tr, has_va = terms.observed[train], terms.observed[val]
    peaks = y_va >= 1.0
    no_terms = ("terms",)
    overrides = {} if rank is None else {"cond_mean_rank": rank}
    model = build_network(preset_config("cpu", info.schema, info.mask.shape, **overrides))
    initialise_from_data(model, info.path, seed=seed, hidden_groups=no_terms)
    base_tr = _path_probs(model, info, *_hidden(info, *info.encode(train), no_terms))
    base_va = _path_probs(model, info, *_hidden(info, *info.encode(val), no_terms))
    probs = {
        "training mean map (trivial)": np.broadcast_to(y_tr.mean(axis=0), y_va.shape),
        "topics + task + year": base_va,
    }
    auc = {name: peak_auc(p, peaks) for name, p in probs.items()}
    kind = info.manifest["options"]["terms"].get("embedding", "svd")
    one_ridge = {"residual_groups": ()}
    truncated = {**overrides, "cond_mean_exact": []}
    ways = (
        (truncated, one_ridge, ", in the one ridge"),
        (truncated, {**one_ridge, "own_penalty": ("terms",)}, ", in the one ridge, its own penalty by MSE"),
        (
            truncated,
            {**one_ridge, "own_penalty": ("terms",), "own_penalty_by": "peak_auc"},
            ", in the one ridge, its own penalty by peak AUC",
        ),
        (truncated, {}, ", fitted on the residual of the path without it, truncated to the path's rank"),
        (overrides, {}, ", fitted on the residual, its maps kept outside the rank (the default)"),
    )
    ways = ways[3:] if residual_only else ways  # the one-ridge rows take a fit each (~4 min on full v7)
    for network, options, label in ways if info.schema.term_dims and group_rows else ():
        model = build_network(preset_config("cpu", info.schema, info.mask.shape, **network))
        initialise_from_data(model, info.path, seed=seed, **options)
        name = f"+ terms group ({info.schema.term_dims}-dim {kind} embedding{label})"
        probs[name] = _path_probs(model, info, *info.encode(val))
        auc[name] = peak_auc(probs[name], peaks)
        print(f"{name}: penalties {model.cond_mean.alpha}")
    pca = PCA(min(n_components, int(has_tr.sum()) - 1), random_state=seed).fit(y_tr[has_tr] - base_tr[has_tr])
    target = pca.transform(y_tr[has_tr] - base_tr[has_tr])
    reg = SmoothedRegression(n_components=min(300, int(has_tr.sum()) - 1)).fit(terms.tfidf[train[has_tr]], target)
    text_va = np.zeros_like(base_va)
    text_va[has_va] = pca.inverse_transform(reg.predict(terms.tfidf[val[has_va]].toarray()))
    probs["+ NeuroQuery text part"] = np.clip(base_va + text_va, 1e-4, 1 - 1e-4)
    auc["+ NeuroQuery text part"] = peak_auc(probs["+ NeuroQuery text part"], peaks)
    fit_rows, val_rows = np.flatnonzero(has_tr), np.flatnonzero(has_va)
    embedding, crossfit = fit_supervised_embedding(
        terms.tfidf[train], has_tr, target, info.metadata["split_group"].to_numpy()[train[has_tr]],
        min(embedding_dims, target.shape[1] - 1), seed=seed,
    )  # fmt: skip
    x_va = embedding.embed(terms.tfidf[val[has_va]])
    strengths = 10.0 ** np.arange(0, 7)
    b2, c2, best, _ = fit_ridge(
        crossfit,
        lambda r: y_tr[fit_rows[r]] - base_tr[fit_rows[r]],
        [x_va],
        lambda r: y_va[val_rows[r]] - base_va[val_rows[r]],
        [np.full(crossfit.shape[1], t) for t in strengths],
    )
    name = f"+ {embedding.dims}-dim cross-fitted NeuroQuery embedding of the residual (ridge {strengths[best]:g})"
    probs[name] = base_va.copy()
    probs[name][has_va] = np.clip(base_va[has_va] + b2 + x_va @ c2, 1e-4, 1 - 1e-4)
    auc[name] = peak_auc(probs[name], peaks)
    r = {name: pearson_r(p, y_va) for name, p in probs.items()}
    name0 = "topics + task + year"
    print(f"{split} studies: {len(val)}, {int(has_va.sum())} with text")
    print(
        "| conditional-mean path | peak AUC, with text | all | paired vs topics + task + year, with text [95% CI] "
        "| Pearson r, with text | paired r vs topics + task + year [95% CI] |"
    )
    print("| --- | ---: | ---: | --- | ---: | --- |")
    for name, values in auc.items():
        da, dr = (paired_bootstrap(x[name][has_va], x[name0][has_va]) for x in (auc, r))
        print(
            f"| {name} | {np.nanmean(values[has_va]):.3f} | {np.nanmean(values):.3f} | "
            f"{da['mean_diff']:+.3f} [{da['ci95'][0]:+.3f}, {da['ci95'][1]:+.3f}] | {np.nanmean(r[name][has_va]):.3f} | "
            f"{dr['mean_diff']:+.3f} [{dr['ci95'][0]:+.3f}, {dr['ci95'][1]:+.3f}] |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--split", default="test", choices=("val", "test"))
    parser.add_argument("--text", action="store_true", help="also the terms ablation (peak AUC on validation)")
    parser.add_argument("--text-only", action="store_true", help="only the terms ablation")
    parser.add_argument("--text-split", choices=("val", "test"), help="the terms ablation's split (default val)")
    parser.add_argument("--cond-mean-rank", type=int, help="the terms ablation's path rank (default: the preset's)")
    parser.add_argument(
        "--residual-only", action="store_true", help="of the terms group's rows only the residual fits (the default's)"
    )
    parser.add_argument(
        "--no-group-rows", action="store_true", help="skip the dataset's own terms-group rows (the other rows only)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = load_dataset_info(args.dataset)
    if not args.text_only:
        identification_table(info, args.split, args.seed)
    if args.text or args.text_only:
        text_table(
            info,
            args.seed,
            args.text_split or "val",
            rank=args.cond_mean_rank,
            residual_only=args.residual_only,
            group_rows=not args.no_group_rows,
        )


if __name__ == "__main__":
    main()
