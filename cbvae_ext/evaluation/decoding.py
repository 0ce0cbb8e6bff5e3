"""Bayesian decoding: which task category (and which term) raises the model's likelihood of a map the most.

For each candidate condition ``c`` (a task category; a term, through the topic mixture of the training studies that
use it) the decoder scores ``log p(x | c)`` with an importance-weighted bound and adds a log prior from the training
frequencies; a softmax over the candidates of one kind is the posterior ``p(c | x)``.

Rule of the bound: ``k`` draws ``z_j`` from ``q(z | x, every condition hidden)`` (one encode per map, the same seeded
draws for every map), and for every candidate ``log p(x | c) ≈ logmeanexp_j [log p(x | z_j, c) + log N(z_j; 0, I) -
log q(z_j | x)]``: the decoder sees ``c`` alone (every other condition hidden, continuous fields at the run's
imputation defaults). Sharing the draws across candidates makes the differences between candidates, which is all
the posterior reads, far less noisy than separate bounds.

The baseline is NiMARE's ``nimare.decode.continuous.CorrelationDecoder`` given the same per-candidate maps the
training split defines (``load_imgs``): each category's mean training map and each term's tf-idf-weighted mean
training map, so both decoders know exactly the same training studies and no per-feature meta-analysis is run.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse
import torch

from cbvae_ext.evaluation.columns import CORRELATION_DECODER, DECODING, MODEL, TERM_RECALL, TOP1, TOP5, column
from cbvae_ext.evaluation.likelihood import bernoulli_nll
from cbvae_ext.evaluation.metrics import to_volumes
from cbvae_ext.evaluation.section import EvalData, Section
from cbvae_ext.heap import frozen_heap

__all__ = [
    "Candidates",
    "candidate_loglik",
    "category_candidates",
    "correlation_decoder_scores",
    "decoding_section",
    "posterior",
    "ranked",
    "term_candidates",
]

#: How ``log p(x | c)`` is bounded (written into the results and the study report).
RULE = (
    "log p(x | c): IWAE bound with k draws from q(z | x, every condition hidden), the same draws for every candidate; "
    "the decoder sees c alone (other conditions hidden, continuous fields at the run's imputation defaults); "
    "posterior = softmax over the candidates of one kind of log p(x | c) + log prior (training frequencies, +1 "
    "smoothed)"
)
#: A study's own terms: its top ``OWN_TERMS`` tf-idf terms among the candidates, sought in the decoders' top ``TOP_K``.
OWN_TERMS = 5
TOP_K = 10


@dataclass
class Candidates:
    """Conditions to decode over, one kind (categories or terms).

    Attributes:
        kind: ``"category"`` or ``"term"``.
        names: candidate names.
        meta: ``[C, meta_dim]`` the candidate as the model's conditions.
        meta_mask: ``[C, mask_dim]`` observed flags (only the candidate's group is observed).
        log_prior: ``[C]`` normalised log prior from the training frequencies.
        maps: ``[C, V]`` the candidate's training mean map (the correlation decoder's feature map).
    """

    kind: str
    names: list[str]
    meta: np.ndarray
    meta_mask: np.ndarray
    log_prior: np.ndarray
    maps: np.ndarray

    def __len__(self) -> int:
        return len(self.names)


def _group(schema: Any, name: str) -> Any:
    return next((g for g in schema.groups if g.name == name), None)


def _log_prior(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64) + 1.0
    return np.log(counts / counts.sum())


def category_candidates(schema: Any, categories: np.ndarray, maps: np.ndarray) -> Candidates | None:
    """Every task category seen in training: the one-hot alone, prior = training frequency.

    Args:
        schema: the run's ``MetadataSchema``.
        categories: ``[N]`` training category indices (-1 = missing).
        maps: ``[N, V]`` training maps (loader units).
    """
    task = _group(schema, "task")
    present = [c for c in range(schema.n_categories) if (categories == c).any()] if task is not None else []
    if not present:
        return None
    meta = np.zeros((len(present), schema.meta_dim), np.float32)
    meta_mask = np.zeros((len(present), schema.mask_dim), np.float32)
    meta[np.arange(len(present)), task.meta_slice.start + np.array(present)] = 1.0
    meta_mask[:, task.mask_index] = 1.0
    counts = np.array([(categories == c).sum() for c in present])
    means = np.stack([maps[categories == c].mean(axis=0) for c in present]).astype(np.float32)
    return Candidates("category", [schema.categories[c] for c in present], meta, meta_mask, _log_prior(counts), means)


def term_candidates(
    schema: Any,
    tfidf: scipy.sparse.spmatrix,
    vocabulary: list[str],
    meta: np.ndarray,
    meta_mask: np.ndarray,
    maps: np.ndarray,
    n_terms: int,
) -> Candidates | None:
    """The ``n_terms`` terms used by most training studies, each as the topic mixture of the studies using it.

    A term's condition is the tf-idf-weighted mean topic vector of the training studies with the term (and topic
    weights); its map the tf-idf-weighted mean of their maps; its prior its document frequency. None when the run
    takes no topics or no training study has text.

    Args:
        schema: the run's ``MetadataSchema``.
        tfidf: ``[N, n_vocabulary]`` training tf-idf (rows of studies without text are empty).
        vocabulary: the terms, column order.
        meta: ``[N, meta_dim]`` training conditions.
        meta_mask: ``[N, mask_dim]`` their observed flags.
        maps: ``[N, V]`` training maps.
        n_terms: how many terms to decode over.
    """
    topics = _group(schema, "topics")
    if topics is None:
        return None
    has_topics = meta_mask[:, topics.mask_index] > 0
    weights = scipy.sparse.csc_matrix(tfidf[has_topics])
    df = np.diff(weights.indptr)
    order = np.argsort(-df, kind="stable")
    chosen = [int(t) for t in order[:n_terms] if df[t] > 0]
    if not chosen:
        return None
    w = np.asarray(weights[:, chosen].todense(), dtype=np.float64)  # [N_topics_rows, T]
    w /= w.sum(axis=0, keepdims=True)
    mix = w.T @ meta[has_topics][:, topics.meta_slice]
    out_meta = np.zeros((len(chosen), schema.meta_dim), np.float32)
    out_mask = np.zeros((len(chosen), schema.mask_dim), np.float32)
    out_meta[:, topics.meta_slice] = mix
    out_mask[:, topics.mask_index] = 1.0
    term_maps = (w.T @ maps[has_topics]).astype(np.float32)
    return Candidates("term", [vocabulary[t] for t in chosen], out_meta, out_mask, _log_prior(df[chosen]), term_maps)


@torch.no_grad()
def candidate_loglik(
    net: torch.nn.Module,
    volumes: np.ndarray,
    inside: np.ndarray,
    candidates: Candidates,
    imputed_defaults: torch.Tensor | None,
    k: int = 4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    max_decodes: int = 64,
) -> np.ndarray:
    """``[N, C]`` IWAE bounds of ``log p(x | c)`` (nats) of ``[N, D, H, W]`` maps (loader units) for every candidate.

    Args:
        net: the C-β-VAE network (``encode``, ``decoder_input``, ``decode``), in eval mode.
        volumes: the maps, each divided by its maximum.
        inside: flat indices of the in-mask voxels (the likelihood's voxels).
        candidates: the conditions to score.
        imputed_defaults: ``[n_continuous]`` the decoder's value of a missing continuous field (None: 0).
        k: importance samples (>= 1), the same seeded draws for every map and candidate.
        seed: seed of the draws.
        device: where the network runs.
        max_decodes: decoder evaluations per forward pass (bounds memory).
    """
    if k < 1:
        raise ValueError(f"decoding_k must be >= 1 importance samples, got {k}")
    size = int(net.latent_size)
    eps = torch.randn((k, size), generator=torch.Generator().manual_seed(int(seed))).to(device)
    n_meta, n_mask = candidates.meta.shape[1], candidates.meta_mask.shape[1]
    c_meta = torch.from_numpy(candidates.meta).to(device)
    c_mask = torch.from_numpy(candidates.meta_mask).to(device)
    fill = None if imputed_defaults is None else imputed_defaults.to(device).expand(len(candidates), -1)
    m_all = net.decoder_input(c_meta, c_mask, fill)
    idx = torch.as_tensor(np.asarray(inside), device=device)
    log_2pi = math.log(2 * math.pi)
    per_pass = max(1, max_decodes // k)  # candidates per decoder pass
    out = np.empty((len(volumes), len(candidates)), np.float64)
    for i, vol in enumerate(volumes):
        x = torch.from_numpy(np.asarray(vol, np.float32)).to(device)[None, None]
        x = x.contiguous(memory_format=torch.channels_last_3d)
        mu, logvar = net.encode(x, torch.zeros(1, n_meta, device=device), torch.zeros(1, n_mask, device=device))
        z = mu + eps * torch.exp(0.5 * logvar)  # [k, L]
        log_w0 = -0.5 * (z.square() + log_2pi).sum(1) + 0.5 * (eps.square() + logvar + log_2pi).sum(1)
        target = x.flatten()[idx][None]
        for start in range(0, len(candidates), per_pass):
            m = m_all[start : start + per_pass]
            c = len(m)
            logits = net.decode(z.repeat(c, 1), m.repeat_interleave(k, 0)).flatten(1)[:, idx]
            ll = -bernoulli_nll(logits, target.expand(c * k, -1)).view(c, k)
            w = ll + log_w0[None]
            out[i, start : start + c] = (torch.logsumexp(w, 1) - math.log(k)).double().cpu().numpy()
    return out


def posterior(loglik: np.ndarray, log_prior: np.ndarray) -> np.ndarray:
    """``p(c | x)`` from ``[N, C]`` log-likelihoods and a ``[C]`` log prior (rows sum to 1)."""
    a = np.asarray(loglik, np.float64) + np.asarray(log_prior, np.float64)[None]
    a -= a.max(axis=1, keepdims=True)
    p = np.exp(a)
    return p / p.sum(axis=1, keepdims=True)


def ranked(post: np.ndarray, loglik: np.ndarray, names: list[str], top: int) -> list[dict[str, Any]]:
    """The ``top`` candidates of one map by posterior: name, posterior probability, ``log p(x | c)``."""
    order = np.argsort(-post, kind="stable")[:top]
    return [{"name": names[j], "posterior": float(post[j]), "loglik_nats": float(loglik[j])} for j in order]


def correlation_decoder_scores(candidates: Candidates, maps: np.ndarray, mask: np.ndarray, affine: Any) -> np.ndarray:
    """``[N, C]`` Pearson r of NiMARE's ``CorrelationDecoder`` given the candidates' training maps (``load_imgs``)."""
    import nibabel as nib
    from nilearn.maskers import NiftiMasker
    from nimare.decode.continuous import CorrelationDecoder

    affine = np.asarray(affine, dtype=np.float64)
    mask_img = nib.Nifti1Image(np.asarray(mask, np.uint8), affine)
    with tempfile.TemporaryDirectory() as tmp, frozen_heap():  # nilearn collects garbage for every image
        paths = {}
        for j, (name, vec) in enumerate(zip(candidates.names, candidates.maps, strict=True)):
            paths[name] = str(Path(tmp) / f"{j}.nii.gz")
            nib.save(nib.Nifti1Image(to_volumes(vec, mask)[0], affine), paths[name])
        decoder = CorrelationDecoder()
        decoder.load_imgs(paths, mask=NiftiMasker(mask_img).fit())
        out = np.empty((len(maps), len(candidates)), np.float64)
        for i, vec in enumerate(maps):
            table = decoder.transform(nib.Nifti1Image(to_volumes(vec, mask)[0], affine))
            out[i] = table["r"].reindex(candidates.names).to_numpy(np.float64)
    return np.nan_to_num(out, nan=-np.inf)


def _rank_of(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """0-based rank of each row's target column (ties broken against the target: a constant scorer is not lucky)."""
    own = scores[np.arange(len(scores)), target]
    return (scores >= own[:, None]).sum(axis=1) - 1


def _recall(scores: np.ndarray, own: list[np.ndarray], top: int) -> np.ndarray:
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top]
    return np.array(
        [len(set(o.tolist()) & set(t.tolist())) / len(o) if len(o) else np.nan for o, t in zip(own, order, strict=True)]
    )


@torch.no_grad()
def decoding_section(data: EvalData) -> Section:
    """Top-1/top-5 accuracy of each test study's own category and recall of its own top terms, model vs NiMARE.

    Reads ``data.cache["counterfactual"]`` (the C-β-VAE network and its imputation defaults). Options:
    ``decoding_k`` (importance samples), ``decoding_n_terms`` (terms decoded over), ``decoding_max_maps`` (the
    first test maps decoded; None = all).
    """
    ctx = data.cache.get("counterfactual")
    if ctx is None:
        return Section(DECODING, {"absent": "no --run_dir given"})
    opts, te, tr = data.opts, data.test, data.train
    n = te.n if opts.get("decoding_max_maps") is None else min(te.n, int(opts["decoding_max_maps"]))
    k = int(opts.get("decoding_k", 4))
    inside = np.flatnonzero(data.mask.ravel())
    volumes = to_volumes(te.maps[:n], data.mask)
    net, imp0 = ctx["model"], ctx["imputed_defaults"]
    results: dict[str, Any] = {"rule": RULE, "k": k, "n_maps": n, "criteria": {}}
    columns: dict[str, np.ndarray] = {}
    model_col, cd_col = column(MODEL, DECODING), CORRELATION_DECODER

    def score(cands: Candidates, offset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ll = candidate_loglik(net, volumes, inside, cands, imp0, k, int(opts["seed"]) + offset, data.device)
        return (
            ll,
            posterior(ll, cands.log_prior),
            correlation_decoder_scores(cands, te.maps[:n], data.mask, data.info.affine),
        )

    cats = category_candidates(data.schema, tr.categories, tr.maps)
    if cats is None:
        results["categories"] = {"absent": "the run has no task condition or no training study has a category"}
    else:
        ll, post, r = score(cats, 41)
        col_of = {name: j for j, name in enumerate(cats.names)}
        own = np.array([col_of.get(data.schema.categories[c], -1) if c >= 0 else -1 for c in te.categories[:n]])
        ok = own >= 0
        prior_scores = np.broadcast_to(cats.log_prior, post.shape)
        ranks = {key: np.full(te.n, np.nan) for key in ("model", "cd", "prior")}
        for key, s in (("model", post), ("cd", r), ("prior", prior_scores)):
            ranks[key][:n][ok] = _rank_of(np.asarray(s)[ok], own[ok])
        for key, prefix in (("model", model_col), ("cd", cd_col)):
            columns[column(prefix, TOP1)] = np.where(np.isnan(ranks[key]), np.nan, ranks[key] < 1)
            columns[column(prefix, TOP5)] = np.where(np.isnan(ranks[key]), np.nan, ranks[key] < 5)
        n_c = len(cats)
        results["categories"] = {
            "n_candidates": n_c,
            "candidates": cats.names,
            "n_maps": int(ok.sum()),
            "chance": {"top1": 1 / n_c, "top5": min(1.0, 5 / n_c)},
            "prior_only": {
                "top1": float(np.nanmean(ranks["prior"] < 1)) if ok.any() else None,
                "top5": float(np.nanmean(ranks["prior"][np.isfinite(ranks["prior"])] < 5)) if ok.any() else None,
                "rule": "always the most frequent training categories (the trivial answer)",
            },
            "model": {m: data.summary(columns[column(model_col, m)]) for m in (TOP1, TOP5)},
            "correlation_decoder": {m: data.summary(columns[column(cd_col, m)]) for m in (TOP1, TOP5)},
            "paired": {m: data.paired(columns[column(model_col, m)], columns[column(cd_col, m)]) for m in (TOP1, TOP5)},
            "mean_top_posterior": float(post[ok].max(axis=1).mean()) if ok.any() else None,
            "examples": [
                {
                    "id": te.ids[i],
                    "category": cats.names[own[i]] if own[i] >= 0 else None,
                    "top": ranked(post[i], ll[i], cats.names, 3),
                }
                for i in range(min(3, n))
            ],
        }
        results["criteria"]["decoding_top5_at_least_correlation_decoder"] = data.at_least(
            columns[column(model_col, TOP5)],
            columns[column(cd_col, TOP5)],
            "Bayesian decoder top-5 accuracy of the study's own category >= NiMARE CorrelationDecoder's (same training "
            "category mean maps), paired on the test studies",
            column(model_col, TOP5),
            column(cd_col, TOP5),
        )
    results["terms"] = _term_decoding(data, n, score, columns, model_col, cd_col)
    if "criterion" in results["terms"]:
        results["criteria"]["decoding_term_recall_at_least_correlation_decoder"] = results["terms"].pop("criterion")
    return Section(DECODING, results, columns)


def _term_decoding(data: EvalData, n: int, score: Any, columns: dict, model_col: str, cd_col: str) -> dict[str, Any]:
    from cbvae_ext.evaluation.text_protocols import NO_TERMS, _terms_rows

    found = _terms_rows(data)
    if found is None:
        return {"absent": NO_TERMS}
    terms, train_rows, test_rows = found
    tr = data.train
    cands = term_candidates(
        data.schema,
        terms.tfidf[train_rows],
        terms.vocabulary,
        tr.meta,
        tr.meta_mask,
        tr.maps,
        int(data.opts.get("decoding_n_terms", 50)),
    )
    if cands is None:
        return {"absent": "the run takes no topic condition (a term is decoded through its topic mixture)"}
    cols = np.array([terms.vocabulary.index(nm) for nm in cands.names])
    test_tfidf = terms.tfidf[test_rows[:n]][:, cols].toarray()
    own = []
    for row in test_tfidf:
        hit = np.flatnonzero(row > 0)
        own.append(hit[np.argsort(-row[hit], kind="stable")][:OWN_TERMS])
    has = np.array([len(o) > 0 for o in own])
    if not has.any():
        return {"absent": "no test study uses any of the decoded terms"}
    ll, post, r = score(cands, 43)
    top = min(TOP_K, len(cands))
    recall = {key: np.full(data.test.n, np.nan) for key in ("model", "cd", "prior")}
    recall["model"][:n] = _recall(post, own, top)
    recall["cd"][:n] = _recall(r, own, top)
    recall["prior"][:n] = _recall(np.broadcast_to(cands.log_prior, post.shape), own, top)
    columns[column(model_col, TERM_RECALL)] = recall["model"]
    columns[column(cd_col, TERM_RECALL)] = recall["cd"]
    expected = np.array([top / len(cands) for o in own if len(o)])
    data_criteria = data.at_least(
        recall["model"],
        recall["cd"],
        f"Bayesian decoder recall of the study's own top {OWN_TERMS} terms in its top {top} >= NiMARE "
        "CorrelationDecoder's (same training term maps), paired on the test studies with text",
        column(model_col, TERM_RECALL),
        column(cd_col, TERM_RECALL),
    )
    return {
        "criterion": data_criteria,
        "rule": f"recall of the study's top {OWN_TERMS} tf-idf terms (among the candidates) in the decoder's top {top}",
        "n_candidates": len(cands),
        "candidates": cands.names,
        "n_maps": int(has.sum()),
        "chance": float(expected.mean()),
        "prior_only": data.summary(recall["prior"]),
        "model": data.summary(recall["model"]),
        "correlation_decoder": data.summary(recall["cd"]),
        "paired": data.paired(recall["model"], recall["cd"]),
        "examples": [
            {
                "id": data.test.ids[i],
                "own": [cands.names[j] for j in own[i]],
                "top": ranked(post[i], ll[i], cands.names, 5),
            }
            for i in range(min(3, n))
        ],
    }
