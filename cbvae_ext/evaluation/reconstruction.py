"""The networks themselves on the test split: reconstruction, likelihoods, hidden conditions, SSIM, PCA equivalent.

Sections (``section(data: EvalData) -> Section``, ``section.py``):

* ``models_section`` (``models``): every run's pass over the test maps (``passes.score_network``):
  reconstruction at μ, the likelihood bound, the conditional-only map, the year adversary, the imputation head.
* ``missing_conditions_section``: reconstruction with each condition group hidden, paired against all given.
* ``likelihood_section``: every likelihood in nats per map and as excess over the entropy floor.
* ``ssim_section``: masked SSIM beside a constant map and the mean map (not a criterion).
* ``pca_equivalent_section``: how many PCA components match the model's reconstruction.

All but ``models_section`` summarise columns of the per-map table (``data.cache["columns"]``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm.auto import tqdm

from cbvae_ext.evaluation.baselines import equivalent_dimension
from cbvae_ext.evaluation.columns import (
    CATEGORY_MEAN,
    COND,
    CONSTANT_MAP,
    DICE_TOP1,
    DICE_TOP5,
    ENTROPY_FLOOR,
    LOGLIK,
    LOGLIK_ELBO,
    LOGLIK_IWAE,
    MEAN_MAP,
    MODEL,
    MODEL_COND,
    NOLAMBDA,
    PEARSON_R,
    RECON,
    SSIM,
    column,
    hidden,
    pca,
    recon,
)
from cbvae_ext.evaluation.conditional import condition_group, conditional_mean_maps
from cbvae_ext.evaluation.imputation import imputation_scores
from cbvae_ext.evaluation.metrics import SSIM_PARAMS
from cbvae_ext.evaluation.passes import imputed_raw, score_network
from cbvae_ext.evaluation.probes import adversary_balanced_accuracy
from cbvae_ext.evaluation.runs import ROLES, LoadedRun, pass_options
from cbvae_ext.evaluation.section import EvalData, Section, prefixed
from cbvae_ext.schema import MetadataSchema

__all__ = [
    "METRICS",
    "likelihood_section",
    "missing_conditions_section",
    "models_section",
    "pca_equivalent_section",
    "per_category",
    "ssim_section",
]

#: The reconstruction metrics compared with PCA.
METRICS = (PEARSON_R, DICE_TOP5, DICE_TOP1)


def per_category(values: np.ndarray, categories: np.ndarray, schema: MetadataSchema) -> dict[str, Any]:
    """Mean and count of a per-map metric within each task category (``(missing)`` for no category)."""
    names = schema.categories
    out: dict[str, Any] = {}
    for c in np.unique(categories):
        sel = (categories == c) & np.isfinite(values)
        label = names[int(c)] if c >= 0 else "(missing)"
        out[label] = {"mean": float(values[sel].mean()) if sel.any() else None, "n": int(sel.sum())}
    return out


def _spread(values: np.ndarray) -> list[float] | None:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return [float(v) for v in np.quantile(values, [0.05, 0.95])] if values.size else None


def models_section(data: EvalData) -> Section:
    """Every run on the test split: reconstruction, likelihood bound, conditional-only maps, heads.

    Writes ``data.cache["scores"]`` (per role the ``score_network`` output: ``mu``, ``imp_mu``, ``examples``, ...)
    and, for the C-β-VAE, ``data.cache["predictions"][MODEL_COND]``, ``data.cache["counterfactual"]``
    (``{"model", "mu", "imputed_defaults", "task"}``) and ``data.cache["title_model"]`` (titles -> conditional
    mean maps by the app's words -> topics rule and, for a run with a terms group, the text embedding) with its
    ``data.cache["topic_vocabulary"]``.
    """
    out: dict[str, Any] = {}
    columns: dict[str, np.ndarray] = {}
    opts, te = data.opts, data.test
    scores = data.cache.setdefault("scores", {})
    for role, spec in ROLES.items():
        if role not in data.runs:
            out[role] = {"absent": f"no --{spec.key} given"}
            continue
        run = data.runs[role]
        options = pass_options(
            run,
            opts["n_prior_samples"],
            iwae_k=opts["iwae_k"] if role != NOLAMBDA else 0,
            iwae_rows=opts["iwae_max_maps"],
            conditional=role == MODEL,
            hidden=tuple(data.schema.groups) if role == MODEL else (),
            ssim=role == MODEL,
        )
        with tqdm(total=te.n, desc=f"test maps, {spec.label}", leave=False, disable=None) as bar:
            sc = score_network(
                run.model,
                te,
                data.mask,
                data.peaks,
                options,
                opts["batch_size"],
                data.device,
                data.generator(f"reconstruction/{role}"),
                opts["n_examples"],
                bar.update,
            )
        scores[role] = sc
        own = prefixed(role, sc["columns"])
        columns.update(own)
        if role == MODEL:
            _cache_model(data, run, sc)
        res: dict[str, Any] = {
            "label": spec.label,
            "run_dir": str(run.run_dir),
            "latent_size": run.latent_size,
            "seconds": sc["seconds"],
            "bounds": "log p(x | m)" if spec.conditional else "log p(x)",
            "reconstruction": data.summaries(own, column(role, RECON)),
        }
        if options.conditional:
            res["conditional_only"] = {**data.summaries(own, column(role, COND)), "source": sc["cond_source"]}
        logits = sc["year_logits"]
        res["adversary"] = {
            "balanced_accuracy": None if logits is None else adversary_balanced_accuracy(logits, te.year_bin),
            "n_year_bins": data.schema.n_year_bins,
            "reason": "this network has no year adversary" if logits is None else None,
        }
        res["imputation"] = _imputation(data, sc["imp_mu"])
        res["per_category_r"] = per_category(sc["columns"][column(RECON, PEARSON_R)], te.categories, data.schema)
        out[role] = res
    return Section("models", out, columns)


def _cache_model(data: EvalData, run: LoadedRun, sc: dict[str, Any]) -> None:
    """What the later sections need of the C-β-VAE: its conditional maps, μ, and the title rule."""
    cache, schema = data.cache, data.schema
    cache.setdefault("predictions", {})[MODEL_COND] = sc["cond_maps"]
    cache["counterfactual"] = {
        "model": run.model,
        "mu": sc["mu"],
        "imputed_defaults": run.imputed_defaults,
        "task": condition_group(schema, "task"),
    }
    topics = condition_group(schema, "topics")
    if topics is not None and not schema.topic_keys:
        topics = None
    terms = condition_group(schema, "terms")
    embedder = run.folder.term_embedder() if terms is not None else None  # the file the app reads
    if topics is None and embedder is None:
        return
    from cbvae_ext.app.words import TopicVocabulary  # the app's own words -> topics rule

    vocabulary = TopicVocabulary(schema.topic_keys, schema.topic_names) if topics is not None else None
    batch = data.opts["batch_size"]

    def title_maps(titles: list[str | None]) -> tuple[np.ndarray, int]:
        meta = np.zeros((len(titles), schema.meta_dim), np.float32)
        meta_mask = np.zeros((len(titles), schema.mask_dim), np.float32)
        hit = np.zeros(len(titles), bool)
        if vocabulary is not None:
            matches = [vocabulary.match(t or "") for t in titles]
            found = np.array([not m.empty for m in matches])
            if found.any():
                meta[found, topics.meta_slice] = np.stack([m.weights for m in matches if not m.empty])
            meta_mask[found, topics.mask_index] = 1.0
            hit |= found
        if embedder is not None:  # NeuroQuery's terms of the text, embedded as a study's text was
            embedded, found = embedder.embed_texts(titles)
            meta[found, terms.meta_slice] = embedded[found]
            meta_mask[found, terms.mask_index] = 1.0
            hit |= found
        # a text with nothing recognised: every condition missing
        maps = np.concatenate(
            [
                conditional_mean_maps(data, run, meta[s : s + batch], meta_mask[s : s + batch])[0]
                for s in range(0, len(titles), batch)
            ]
        )
        return maps, int(hit.sum())

    cache["title_model"] = title_maps
    cache["topic_vocabulary"] = vocabulary  # None: a run conditioned on terms without topics


def _imputation(data: EvalData, imp_mu: np.ndarray | None) -> dict[str, Any]:
    if imp_mu is None:
        return {"absent": "this network has no imputation head"}
    out: dict[str, Any] = {}
    for name, values in imputed_raw(imp_mu, data.schema).items():
        true = data.test.frame[name].to_numpy(dtype=np.float64)
        train_values = data.train.frame[name].to_numpy(dtype=np.float64)
        train_values = train_values[np.isfinite(train_values)]
        if not np.isfinite(true).any() or train_values.size == 0:
            out[name] = {"n": 0, "absent": "not observed in the test or the training split"}
            continue
        # the imputation head reads only the map, so its output for an observed field is a genuine prediction
        out[name] = imputation_scores(values, true, float(np.median(train_values)))
    return out


def missing_conditions_section(data: EvalData) -> Section:
    """Reconstruction with each condition group hidden in turn and all hidden, paired against all given.

    Reads the ``cbvae/hidden_<group>/...`` and ``cbvae/recon/...`` columns and ``data.cache["scores"]``.
    """
    if MODEL not in data.runs:
        return Section("missing_conditions", {"absent": "no --run_dir given"})
    cols = data.cache["columns"]
    out: dict[str, Any] = {"rule": "paired hidden - given per map; passes when the CI lies above -0.03"}
    for name in [g.name for g in data.schema.groups] + ["all"]:
        out[name] = {
            m: {
                "hidden": data.summary(cols[column(column(MODEL, hidden(name)), m)]),
                "paired_vs_given": data.paired(
                    cols[column(column(MODEL, hidden(name)), m)], cols[recon(MODEL, m)], margin=0.03
                ),
            }
            for m in (PEARSON_R, DICE_TOP5)
        }
    imp = data.cache["scores"][MODEL]["imp_mu"]
    spread: dict[str, Any] = {}
    if imp is not None:
        for name, values in imputed_raw(imp, data.schema).items():
            real = data.test.frame[name].to_numpy(np.float64)
            spread[name] = {
                "imputed_5_95": _spread(values),
                "real_5_95": _spread(real),
                "n_real": int(np.isfinite(real).sum()),
            }
    out["imputed_spread"] = spread or {"absent": "this network has no imputation head"}
    return Section("missing_conditions", out)


def likelihood_section(data: EvalData) -> Section:
    """Every likelihood in nats per map and as excess over the entropy floor, conditional ones apart."""
    cols = data.cache["columns"]
    floor = cols[ENTROPY_FLOOR]
    rows: dict[str, Any] = {}
    for role, spec in ROLES.items():
        key = column(role, LOGLIK_IWAE)
        if key not in cols:
            continue
        iwae, elbo = cols[key], cols[column(role, LOGLIK_ELBO)]
        rows[role] = {
            "label": spec.label,
            "bounds": "log p(x | m)" if spec.conditional else "log p(x)",
            "bound": f"IWAE, k = {data.opts['iwae_k']} (lower bound); elbo from the same samples",
            "loglik_iwae": data.summary(iwae),
            "loglik_elbo": data.summary(elbo),
            "excess_nll_iwae": data.summary(-iwae - floor),
            "excess_nll_elbo": data.summary(-elbo - floor),
        }
    for name, label, of in (
        (MEAN_MAP, "training mean map", "log p(x)"),
        (CATEGORY_MEAN, "training category mean map", "log p(x | category)"),
    ):
        ll = cols[column(name, LOGLIK)]
        rows[name] = {
            "label": label,
            "bounds": of,
            "bound": "exact (no latent)",
            "loglik": data.summary(ll),
            "excess_nll": data.summary(-ll - floor),
        }
    return Section(
        "likelihood",
        {
            "entropy_floor": data.summary(floor),
            "models": rows,
            "compare": "conditional (log p(x | ·)) with conditional, unconditional (log p(x)) with unconditional",
        },
    )


def ssim_section(data: EvalData) -> Section:
    """Masked SSIM of the model beside a constant map and the mean map; not a criterion."""
    cols = data.cache["columns"]
    out: dict[str, Any] = {"criterion": False, "params": SSIM_PARAMS}
    for key, col in (
        (MODEL, recon(MODEL, SSIM)),
        (pca(data.latent_size), column(pca(data.latent_size), SSIM)),
        (MEAN_MAP, column(MEAN_MAP, SSIM)),
        (CONSTANT_MAP, column(CONSTANT_MAP, SSIM)),
    ):
        if col in cols:
            out[key] = data.summary(cols[col])
    return Section("ssim", out)


def pca_equivalent_section(data: EvalData) -> Section:
    """The number of PCA components matching the model's reconstruction, per metric (``data.cache["pca_dims"]``)."""
    if MODEL not in data.runs:
        return Section("pca_equivalent", {"absent": "no --run_dir given"})
    cols, dims = data.cache["columns"], data.cache["pca_dims"]
    out: dict[str, Any] = {"dims": dims, "interpolation": "linear in log2(components)"}
    for m in METRICS:
        model = float(np.nanmean(cols[recon(MODEL, m)]))
        curve = [float(np.nanmean(cols[column(pca(d), m)])) for d in dims]
        out[m] = {"model": model, "pca": curve, **equivalent_dimension(dims, curve, model)}
    return Section("pca_equivalent", out)
