"""Conditions as the model sees them: conditional mean maps and category identification.

Condition groups are ``schema.ConditionGroup`` (``schema.groups``); hiding one is
``cbvae_ext.networks.conditioning.hide_groups``, the function condition dropout uses too. The evaluation's
``conditional_maps`` section (``conditional_maps_section``) is here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cbvae_ext.evaluation.columns import MODEL
from cbvae_ext.evaluation.metrics import masked_vectors, pearson_r
from cbvae_ext.evaluation.section import EvalData, Section
from cbvae_ext.export import has_conditional_mean_path

if TYPE_CHECKING:
    from cbvae_ext.evaluation.runs import LoadedRun
    from cbvae_ext.schema import ConditionGroup, MetadataSchema

__all__ = [
    "condition_group",
    "conditional_maps_section",
    "conditional_mean_maps",
    "conditional_mean_probs",
    "decoder_conditions",
    "identification",
    "topic_weights",
]


def conditional_mean_probs(
    model: torch.nn.Module, m: torch.Tensor, n_prior_samples: int, generator: torch.Generator
) -> tuple[torch.Tensor, str]:
    """The model's estimate of the conditional mean map ``E[x | m]`` (probabilities ``[B, 1, D, H, W]``).

    Uses the network's conditional-mean path when it has one, else the average of ``n_prior_samples``
    decodes of ``z ~ N(0, I)`` (a Monte-Carlo estimate of the same expectation under the model).

    Returns:
        ``(probabilities, source)`` where ``source`` says which estimate was used.
    """
    # only a fitted path is a conditional mean; the baseline's would be decode(0, m), a typical map
    if has_conditional_mean_path(model):
        return torch.sigmoid(model.conditional_mean(m).float()), "conditional-mean path of the network"
    latent = int(model.latent_size)
    total = None
    for _ in range(n_prior_samples):
        z = torch.randn((len(m), latent), generator=generator).to(m.device)
        p = torch.sigmoid(model.decode(z, m).float())
        total = p if total is None else total + p
    return total / n_prior_samples, f"average of {n_prior_samples} decodes of z ~ N(0, I)"


def identification(generated: np.ndarray, heldout: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Which held-out group mean each generated group map correlates with best.

    Args:
        generated: ``[C, V]`` one map per group (e.g. the conditional mean of each category).
        heldout: ``[C, V]`` the held-out mean map of the same groups, same order.
        labels: group names.

    Returns:
        ``labels``, ``r`` (``[C, C]`` correlations, generated rows x held-out columns), ``best`` (column index of
        each row's highest r), ``n_correct`` (rows whose best match is their own group), ``n_groups`` and
        ``own_r`` (each group's r with its own held-out mean).
    """
    g, h = np.asarray(generated, dtype=np.float64), np.asarray(heldout, dtype=np.float64)
    r = np.array([pearson_r(np.broadcast_to(row, h.shape), h) for row in g])
    best = np.nanargmax(np.nan_to_num(r, nan=-np.inf), axis=1)
    return {
        "labels": list(labels),
        "r": r.tolist(),
        "best": [int(b) for b in best],
        "n_correct": int((best == np.arange(len(g))).sum()),
        "n_groups": len(g),
        "own_r": [float(r[i, i]) for i in range(len(g))],
    }


def condition_group(schema: MetadataSchema, name: str) -> ConditionGroup | None:
    """The schema's condition group ``name``, or None when it has none."""
    return next((g for g in schema.groups if g.name == name), None)


def topic_weights(schema: MetadataSchema, split: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """``(topic weights [N, T], observed [N])`` of a split in the model's units, or None without a topic group."""
    g = condition_group(schema, "topics")
    if g is None:
        return None
    return split.meta[:, g.meta_slice], split.meta_mask[:, g.mask_index] > 0


def decoder_conditions(
    run: LoadedRun, meta: np.ndarray, meta_mask: np.ndarray, device: str | torch.device
) -> torch.Tensor:
    """The decoder's conditioning vectors for ``(meta, meta_mask)``, missing fields at the run's default."""
    imp0 = run.imputed_defaults
    imp0 = None if imp0 is None else imp0.to(device).expand(len(meta), -1)
    return run.model.decoder_input(torch.from_numpy(meta).to(device), torch.from_numpy(meta_mask).to(device), imp0)


def conditional_mean_maps(
    data: EvalData, run: LoadedRun, meta: np.ndarray, meta_mask: np.ndarray
) -> tuple[np.ndarray, str]:
    """``[B, V]`` in-mask conditional mean maps of ``run`` for the conditions, and their source.

    Prior draws (without a conditional-mean path) reuse one seeded set of latent codes for every call:
    common random numbers, so two conditions' maps differ by their conditions, not by their draws.
    """
    with torch.no_grad():
        probs, source = conditional_mean_probs(
            run.model,
            decoder_conditions(run, meta, meta_mask, data.device),
            data.opts["n_prior_samples"],
            data.generator("conditional_mean_maps"),
        )
    return masked_vectors(probs.cpu().numpy(), data.mask), source


def conditional_maps_section(data: EvalData) -> Section:
    """Per category (and topic): the model's conditional mean map against the held-out mean map.

    Reads ``data.cache["category_mean"]`` (the fitted ``CategoryMeanBaseline``, written by ``baselines_section``).
    """
    if MODEL not in data.runs:
        return Section("conditional_maps", {"absent": "no --run_dir given"})
    run, schema, te = data.runs[MODEL], data.schema, data.test
    out: dict[str, Any] = {}
    task = condition_group(schema, "task")
    present = [c for c in range(schema.n_categories) if (te.categories == c).any()]
    meta = np.zeros((len(present), schema.meta_dim), np.float32)
    meta_mask = np.zeros((len(present), schema.mask_dim), np.float32)
    meta[np.arange(len(present)), task.meta_slice.start + np.array(present, dtype=int)] = 1.0
    meta_mask[:, task.mask_index] = 1.0
    generated, source = conditional_mean_maps(data, run, meta, meta_mask)
    heldout = np.stack([te.maps[te.categories == c].mean(axis=0) for c in present])
    training = np.stack([data.cache["category_mean"].means[c] for c in present])
    labels = [schema.categories[c] for c in present]
    model_id, train_id = identification(generated, heldout, labels), identification(training, heldout, labels)
    # centred: the shared activation pattern (the training mean map) removed from every map, so the match
    # is made on what distinguishes the categories rather than on what they share
    overall = data.train.maps.mean(axis=0)
    out["source"] = source
    out["categories"] = {
        "n_test": {lab: int((te.categories == c).sum()) for lab, c in zip(labels, present, strict=True)},
        "model": model_id,
        "training_category_means": train_id,
        "model_centred": identification(generated - overall, heldout - overall, labels),
        "training_category_means_centred": identification(training - overall, heldout - overall, labels),
    }
    out["topics"] = _topic_maps(data, run)
    return Section("conditional_maps", out, figure_data={"category_maps": (generated, heldout, training, labels)})


def _topic_maps(data: EvalData, run: LoadedRun, min_maps: int = 3) -> dict[str, Any]:
    """Per dominant topic: the conditional mean for the topic mixture of its training maps vs its held-out mean."""
    schema = data.schema
    g = condition_group(schema, "topics")
    tr_t, te_t = topic_weights(schema, data.train), topic_weights(schema, data.test)
    if g is None or tr_t is None:
        return {"absent": "the dataset's schema has no topic weights"}
    (x_tr, obs_tr), (x_te, obs_te) = tr_t, te_t
    dom_tr = np.where(obs_tr, x_tr.argmax(axis=1), -1)
    dom_te = np.where(obs_te, x_te.argmax(axis=1), -1)
    topics = [t for t in range(x_tr.shape[1]) if (dom_te == t).sum() >= min_maps and (dom_tr == t).any()]
    if not topics:
        return {"absent": f"no topic dominates >= {min_maps} test maps"}
    meta = np.zeros((len(topics), schema.meta_dim), np.float32)
    meta_mask = np.zeros((len(topics), schema.mask_dim), np.float32)
    meta[:, g.meta_slice] = np.stack([x_tr[dom_tr == t].mean(axis=0) for t in topics])
    meta_mask[:, g.mask_index] = 1.0
    generated, _ = conditional_mean_maps(data, run, meta, meta_mask)
    heldout = np.stack([data.test.maps[dom_te == t].mean(axis=0) for t in topics])
    names = list(getattr(schema, "topic_names", None) or [f"topic {t}" for t in range(x_tr.shape[1])])
    labels = [names[t] for t in topics]
    return {
        "rule": f"topics dominating >= {min_maps} test maps; condition = mean topic mixture of the training maps "
        "the topic dominates",
        "model": identification(generated, heldout, labels),
    }
