"""One user study against a run: its MA map (the builder's kernel code), posterior, reconstruction, nearest studies
and typicality.

``StudyContext.open(run_dir, dataset_dir)`` loads what every study needs once (model, grid, kernel, the dataset's
maps and the test studies' typicality scores); ``context.analyse(study)`` then costs one render, one encode, a few
decodes and one pass over the dataset's maps. What each number is: ``bundle/docs/study.md``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cbvae_ext.data.dataset import normalise_maps
from cbvae_ext.data.grid import Grid
from cbvae_ext.data.kernels import KernelSpec, render_maps
from cbvae_ext.evaluation.likelihood import bernoulli_nll, entropy_floor
from cbvae_ext.inference import CounterfactualModel, load
from cbvae_ext.run_folder import EVALUATION_FILES, MODEL, RunFolder, replace_atomically

from .options import ATYPICAL_PERCENTILE, OUTSIDE, READING_MARGIN, TYPICALITY_SCORES
from .readers import StudyError, StudyInput, to_mni

__all__ = [
    "ATYPICAL_PERCENTILE",
    "NEAREST_CACHE_BYTES",
    "OUTSIDE",
    "READING_MARGIN",
    "N_PREDICTIVE_DRAWS",
    "TYPICALITY_SCORES",
    "StudyContext",
    "StudyResult",
]

logger = logging.getLogger(__name__)

#: Largest standardised dataset (bytes) that ``nearest`` keeps in memory between calls.
NEAREST_CACHE_BYTES = 1 << 30
#: Prior draws averaged for the prior-predictive map of ``peak_density`` (seeded, every condition unknown).
N_PREDICTIVE_DRAWS = 64
#: Version of the typicality computation (part of the reference cache key).
_SCORE_VERSION = 2


@dataclass
class StudyResult:
    """Everything computed for one study (``report.study_report`` turns it into ``report.json``).

    Attributes:
        study: the input as read.
        ma_map: ``[D, H, W]`` float32 MA map on the run's grid (raw kernel values; for a map input, the resampled map).
        peaks: counts of peaks read / inside the brain mask / outside / used.
        conditions: the conditions given to the model (raw units).
        posterior: ``{"mu": [L], "sd": [L]}`` or ``None`` when the run has no encoder.
        reconstruction: ``[D, H, W]`` decode of the posterior mean (generated) or ``None``.
        conditional_mean: ``[D, H, W]`` the model's map for the conditions alone (generated).
        decode_info: what the decoder filled in (``imputed``/``defaulted`` fields).
        nearest: the most correlated dataset studies (id, title, year, category, split, r).
        typicality: the score, its percentile among the test studies and how it was computed (or ``None``).
        decoding: the task categories and terms that most raise the model's likelihood of the map (or ``None``).
        readings: typicality of alternative readings of the peaks.
        warnings: plain-language warnings.
        notes: what was done to the input on the way.
    """

    study: StudyInput
    ma_map: np.ndarray
    peaks: dict[str, int]
    conditions: dict[str, Any]
    posterior: dict[str, list[float]] | None = None
    reconstruction: np.ndarray | None = None
    conditional_mean: np.ndarray | None = None
    decode_info: dict[str, Any] = field(default_factory=dict)
    nearest: list[dict[str, Any]] = field(default_factory=list)
    typicality: dict[str, Any] | None = None
    decoding: dict[str, Any] | None = None
    readings: dict[str, dict[str, float]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _cache_dir() -> Path:
    root = os.environ.get("CBVAE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cbvae"
    )
    return Path(root) / "study"


class StudyContext:
    """A run (and optionally its dataset) opened once for any number of studies.

    Args:
        model: the run's ``CounterfactualModel``.
        grid: the run's grid.
        kernel: the dataset's kernel (or the builder's default when no dataset says).
        dataset: the run's dataset (``DatasetInfo``) or ``None``.
        notes: how the grid, kernel and dataset were found.
        k: posterior samples of the typicality ELBO.
        seed: seed of those samples.
        n_nearest: dataset studies listed as nearest.
        n_terms: terms (most used in training) the decoding ranks.
        decoding_k: importance samples of each candidate's ``log p(x | c)`` in the decoding.
        cache: keep the test studies' typicality scores in the user's cache folder.
        typicality_score: which of ``TYPICALITY_SCORES`` the percentile ranks.
    """

    def __init__(
        self,
        model: CounterfactualModel,
        grid: Grid,
        kernel: KernelSpec,
        dataset: Any = None,
        notes: Sequence[str] = (),
        k: int = 8,
        seed: int = 0,
        n_nearest: int = 10,
        cache: bool = True,
        n_terms: int = 50,
        decoding_k: int = 4,
        typicality_score: str = next(iter(TYPICALITY_SCORES)),
    ) -> None:
        if typicality_score not in TYPICALITY_SCORES:
            raise StudyError(
                f"--typicality_score {typicality_score!r} is not a score; use one of {', '.join(TYPICALITY_SCORES)}"
            )
        self.model = model
        self.grid = grid
        self.kernel = kernel
        self.dataset = dataset
        self.notes = list(notes)
        self.k = int(k)
        self.seed = int(seed)
        self.n_nearest = int(n_nearest)
        self.cache = cache
        self.n_terms = int(n_terms)
        self.decoding_k = int(decoding_k)
        self.typicality_score = typicality_score
        self._log_density: torch.Tensor | None = None
        self._candidates: list[Any] | None = None
        self.run = RunFolder.open(model.run_dir, require=())
        self.has_encoder = all((model.run_dir / f).is_file() for f in EVALUATION_FILES)
        self.dtype = np.dtype(dataset.manifest.get("dtype", "float32")) if dataset is not None else np.dtype("float32")
        self._cube = kernel.cube(grid)
        self._inside = torch.as_tensor(np.flatnonzero(grid.mask.ravel()))
        self._reference: dict[str, np.ndarray] | None = None
        self._all_standardised: np.ndarray | None = None

    # ----- opening ------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        run_dir: str | Path,
        dataset_dir: str | Path | None = None,
        k: int = 8,
        seed: int = 0,
        n_nearest: int = 10,
        cache: bool = True,
        n_terms: int = 50,
        decoding_k: int = 4,
        typicality_score: str = next(iter(TYPICALITY_SCORES)),
    ) -> StudyContext:
        """Open a run folder and its dataset (``dataset_dir``, else the one the run recorded, when it exists).

        Raises:
            RunFolderError: the run folder is incomplete or its files disagree.
            DataError: the dataset folder is unreadable.
            RunFolderError: the dataset is not the one the run was trained on.
        """
        from cbvae_ext.data import load_dataset_info
        from cbvae_ext.data.sources import file_sha256

        if k < 1:
            raise StudyError(f"--k {k} must be at least 1 posterior sample")
        model = load(run_dir)
        run = RunFolder.open(run_dir, require=())
        notes = []
        if dataset_dir is None and run.dataset_dir is not None and (run.dataset_dir / "manifest.json").is_file():
            dataset_dir = run.dataset_dir
            notes.append(f"dataset: {dataset_dir} (recorded in the run's decoder_schema.json)")
        dataset = None
        if dataset_dir is not None:
            dataset = load_dataset_info(dataset_dir)
            run.check_dataset(dataset.schema, dataset.maps.shape[1:], file_sha256(Path(dataset_dir) / "manifest.json"))
        zooms = np.abs(np.diag(model.affine)[:3])
        grid = Grid(mask=model.mask, affine=model.affine, resolution_mm=int(round(float(zooms.mean()))))
        if dataset is not None and "kernel" in dataset.manifest:
            spec = dataset.manifest["kernel"]
            kernel = KernelSpec.from_dict(spec)
            notes.append(f"kernel: {spec.get('nimare_equivalent', spec['name'])} from the dataset's manifest.json")
        else:
            kernel = KernelSpec()
            notes.append(
                "kernel: the builder's default (ALE, FWHM 10 mm) - no dataset given, so the run's own kernel is not "
                "known; pass --dataset_dir"
            )
        return cls(
            model, grid, kernel, dataset, notes, k, seed, n_nearest, cache, n_terms, decoding_k, typicality_score
        )

    # ----- maps ---------------------------------------------------------------------------------
    def render(self, xyz: np.ndarray, outside: str = "drop") -> tuple[np.ndarray, dict[str, int]]:
        """MA map ``[D, H, W]`` of MNI peaks, as the dataset builder makes it (``grid.voxels``, ``render_maps``).

        Args:
            xyz: ``[P, 3]`` MNI mm.
            outside: ``"drop"`` peaks outside the brain mask (the builder's rule) or ``"keep"`` them (their kernel
                reaches into the mask).
        """
        if outside not in OUTSIDE:
            raise StudyError(f"--outside {outside!r} is not an option; use drop or keep")
        ijk = self.grid.voxels(np.asarray(xyz, dtype=np.float64).reshape(-1, 3))
        inside = self.grid.in_mask(ijk)
        used = ijk if outside == "keep" else ijk[inside]
        counts = {
            "read": len(ijk),
            "inside_mask": int(inside.sum()),
            "outside_mask": int((~inside).sum()),
            "used": len(used),
        }
        if not len(used):
            return np.zeros(self.grid.shape, np.float32), counts
        batch = next(render_maps(self._cube, used, np.zeros(len(used), np.int64), 1, self.grid.mask, 1, self.dtype))
        return np.asarray(batch[0], dtype=np.float32), counts

    def resample(self, image: Any) -> tuple[np.ndarray, list[str]]:
        """A NIfTI map on the run's grid (nilearn, continuous interpolation, when its grid differs), 0 outside the mask."""
        notes = []
        data = np.asarray(image.dataobj, dtype=np.float32)
        same = data.shape == self.grid.shape and np.allclose(image.affine, self.grid.affine, atol=1e-4)
        if not same:
            from nilearn.image import resample_to_img

            zooms = np.abs(np.diag(image.affine)[:3])
            resampled = resample_to_img(
                image, self.grid.mask_img(), interpolation="continuous", force_resample=True, copy_header=True
            )
            data = np.asarray(resampled.get_fdata(), dtype=np.float32)
            notes.append(
                f"map resampled with nilearn.image.resample_to_img (continuous) from shape {list(image.shape)} at "
                f"{'x'.join(f'{z:g}' for z in zooms)} mm to the run's grid {list(self.grid.shape)} at "
                f"{self.grid.resolution_mm} mm"
            )
        if (data < 0).any():
            notes.append(f"{int((data[self.grid.mask] < 0).sum())} negative in-mask values set to 0 (MA maps are >= 0)")
        data = np.where(self.grid.mask, np.clip(np.nan_to_num(data), 0, None), 0).astype(np.float32)
        if data.max() <= 0:
            raise StudyError("the map has no positive value inside the brain mask; give an MA or activation map in MNI")
        return data, notes

    # ----- likelihood ---------------------------------------------------------------------------
    def _network(self) -> torch.nn.Module:
        return self.model.network()

    @torch.no_grad()
    def log_density(self) -> torch.Tensor:
        """``[V]`` log of the model's prior-predictive map as a density over the mask, every condition unknown.

        The mean of ``sigmoid(decode(z_j, unknown))`` over ``N_PREDICTIVE_DRAWS`` seeded prior draws ``z_j``: where
        the model expects a new study's peaks, before anything is known of it. Computed once per context.
        """
        if self._log_density is None:
            net, schema = self._network(), self.model.schema
            imp0 = torch.tensor([self.run.imputed_defaults[f.name] for f in schema.fields], dtype=torch.float32)
            gen = torch.Generator().manual_seed(self.seed + 1)
            z_all = torch.randn((N_PREDICTIVE_DRAWS, self.model.latent_size), generator=gen)
            total = torch.zeros(len(self._inside), dtype=torch.float64)
            for z in z_all.split(16):
                b = len(z)
                m = net.decoder_input(
                    torch.zeros(b, schema.meta_dim), torch.zeros(b, schema.mask_dim), imp0.expand(b, -1)
                )
                total += torch.sigmoid(net.decode(z, m).flatten(1)[:, self._inside]).double().sum(0)
            self._log_density = torch.log(total / total.sum())
        return self._log_density

    @torch.no_grad()
    def score(
        self, maps: np.ndarray, max_decodes: int = 64, n_outside: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """Typicality terms of ``[N, D, H, W]`` maps (raw or scaled), every condition unknown.

        ``peak_density``: the mean of ``log_density()`` over the map's peak voxels (those at its maximum: exactly
        the peaks of an ALE MA map, as ``evaluation.passes.peak_indicator`` reads them), in nats per peak; a peak
        outside the brain mask (``n_outside``, counted by ``render``) counts at the least likely voxel's density.
        ``elbo = mean_j [log p(x | z_j) + log N(z_j; 0, I) - log q(z_j | x)]`` with ``z_j = mu + sd * eps_j``; the
        same ``k`` draws ``eps_j`` (seeded) for every map, so a map's score does not depend on the maps it is
        scored with. ``elbo_score = elbo + H(x)`` (minus the excess NLL and the KL): ``H(x)`` is the NLL floor.
        ``score`` is the context's ``typicality_score`` of the two.

        Args:
            maps: the maps.
            max_decodes: decoder evaluations per batch (maps per batch = ``max_decodes // k``), bounds memory.
            n_outside: ``[N]`` peaks of each map that lay outside the mask (default 0: a stored dataset map, whose
                builder dropped them).
        """
        net = self._network()
        schema = self.model.schema
        k, size = self.k, self.model.latent_size
        eps = torch.randn((k, size), generator=torch.Generator().manual_seed(self.seed))
        imp0 = torch.tensor([self.run.imputed_defaults[f.name] for f in schema.fields], dtype=torch.float32)
        log_2pi = math.log(2 * math.pi)
        log_d = self.log_density()
        outside = np.zeros(len(maps)) if n_outside is None else np.asarray(n_outside, np.float64)
        out: dict[str, list[np.ndarray]] = {
            "elbo": [],
            "iwae": [],
            "floor": [],
            "peak_density": [],
            "n_peak_voxels": [],
        }
        step = max(1, max_decodes // k)
        for start in range(0, len(maps), step):
            x = normalise_maps(np.asarray(maps[start : start + step], dtype=np.float32))
            b = len(x)
            meta, meta_mask = torch.zeros(b, schema.meta_dim), torch.zeros(b, schema.mask_dim)
            mu, logvar = net.encode(x[:, None], meta, meta_mask)
            m = net.decoder_input(meta, meta_mask, imp0.expand(b, -1))
            target = x.flatten(1)[:, self._inside]
            z = mu[:, None] + eps[None] * torch.exp(0.5 * logvar)[:, None]  # [b, k, L]: all k samples in one pass
            logits = net.decode(z.reshape(b * k, size), m.repeat_interleave(k, 0)).flatten(1)[:, self._inside]
            ll = -bernoulli_nll(logits, target.repeat_interleave(k, 0)).view(b, k)
            log_prior = -0.5 * (z.square() + log_2pi).sum(2)
            log_q = -0.5 * (eps.square()[None] + logvar[:, None] + log_2pi).sum(2)
            w = ll + log_prior - log_q
            out["elbo"].append(w.mean(1).double().numpy())
            out["iwae"].append((torch.logsumexp(w, 1) - math.log(k)).double().numpy())
            out["floor"].append(entropy_floor(target.numpy()))
            peak = target >= 1.0 - 1e-6  # normalised maps: the maximum is 1
            n_out = torch.from_numpy(outside[start : start + step])
            n_peak = peak.sum(1) + n_out
            log_p = peak.double() @ log_d + n_out * log_d.min()
            out["peak_density"].append((log_p / n_peak.clamp(min=1)).numpy())
            out["n_peak_voxels"].append(n_peak.numpy())
        res = {key: np.concatenate(v) if v else np.zeros(0) for key, v in out.items()}
        res["elbo_score"] = res["elbo"] + res["floor"]
        res["score"] = res[TYPICALITY_SCORES[self.typicality_score]]
        return res

    def _reference_key(self) -> str:
        from cbvae_ext.data.sources import file_sha256

        blob = "|".join(
            [
                file_sha256(self.model.run_dir / MODEL),
                file_sha256(self.dataset.path / "manifest.json"),
                str(self.k),
                str(self.seed),
                self.typicality_score,
                str(_SCORE_VERSION),
            ]
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def reference(self) -> dict[str, np.ndarray] | None:
        """Typicality terms of the dataset's test studies (``ids`` too), computed once and cached on disk."""
        if self._reference is not None or self.dataset is None or not self.has_encoder:
            return self._reference
        key = self._reference_key() if self.cache else None
        path = _cache_dir() / f"typicality-{key}.npz" if key else None
        if path is not None and path.is_file():
            try:
                with np.load(path, allow_pickle=False) as f:
                    self._reference = {k: f[k] for k in f.files}
                return self._reference
            except (OSError, ValueError):
                logger.warning("ignoring unreadable cache %s", path)
        rows = self.dataset.rows("test")
        maps = np.asarray(self.dataset.maps[rows], dtype=np.float32)
        ref = self.score(maps)
        ref["ids"] = np.asarray(self.dataset.metadata["id"].iloc[rows].astype(str).to_numpy(), dtype=str)
        self._reference = ref
        if path is not None:
            try:
                replace_atomically(path, lambda tmp: np.savez(open(tmp, "wb"), **ref))  # noqa: SIM115
            except OSError as err:
                logger.warning("cannot cache the typicality reference in %s (%s)", path, err)
        return ref

    def typicality(self, maps: np.ndarray, n_outside: np.ndarray | None = None) -> list[dict[str, Any]] | None:
        """Each map's typicality score and its percentile among the test studies (``None`` without both).

        ``n_outside``: as in ``score``.
        """
        ref = self.reference()
        if ref is None or not len(ref["score"]):
            return None
        own = self.score(maps, n_outside=n_outside)
        ranks = ref["score"]
        out = []
        for i, score in enumerate(own["score"]):
            # percentile with ties counted half: 50 for a score in the middle of equal reference scores
            pct = 100.0 * (float((ranks < score).sum()) + 0.5 * float((ranks == score).sum())) / len(ranks)
            out.append(
                {
                    "percentile": round(pct, 2),
                    "score": self.typicality_score,
                    "score_nats": float(score),
                    "peak_density_nats_per_peak": float(own["peak_density"][i]),
                    "n_peak_voxels": int(own["n_peak_voxels"][i]),
                    "elbo_nats": float(own["elbo"][i]),
                    "iwae_nats": float(own["iwae"][i]),
                    "entropy_floor_nats": float(own["floor"][i]),
                    "reference_median_score_nats": float(np.median(ranks)),
                    "n_reference": len(ranks),
                    "reference": "the dataset's test split, each study scored the same way",
                    "k": self.k,
                    "seed": self.seed,
                    "conditions": "all unknown (mask 0, the run's defaults), for this study and every reference alike",
                }
            )
        return out

    # ----- decoding -----------------------------------------------------------------------------
    def candidates(self) -> list[Any]:
        """The decoding candidates (``evaluation.decoding.Candidates``) the training split defines, built once."""
        if self._candidates is not None or self.dataset is None:
            return self._candidates or []
        from cbvae_ext.data.neuroquery import load_terms
        from cbvae_ext.evaluation.decoding import category_candidates, term_candidates
        from cbvae_ext.evaluation.passes import load_split

        rows = self.dataset.rows("train")
        train = load_split(self.dataset, rows, schema=self.model.schema)
        found = [category_candidates(self.model.schema, train.categories, train.maps)]
        terms = load_terms(self.dataset.path)
        if terms is not None:
            found.append(
                term_candidates(
                    self.model.schema,
                    terms.tfidf[rows],
                    terms.vocabulary,
                    train.meta,
                    train.meta_mask,
                    train.maps,
                    self.n_terms,
                )
            )
        self._candidates = [c for c in found if c is not None]
        return self._candidates

    def decoding(self, ma_map: np.ndarray, top: int = 5) -> dict[str, Any] | None:
        """The ``top`` task categories and terms by posterior ``p(c | x)`` (``evaluation.decoding``), or ``None``."""
        from cbvae_ext.evaluation.decoding import RULE, candidate_loglik, posterior, ranked

        candidates = self.candidates()
        if not candidates:
            return None
        volume = normalise_maps(np.asarray(ma_map, np.float32)[None]).numpy()
        imp0 = torch.tensor([self.run.imputed_defaults[f.name] for f in self.model.schema.fields], dtype=torch.float32)
        out: dict[str, Any] = {"rule": RULE, "k": self.decoding_k, "seed": self.seed}
        for cands in candidates:
            ll = candidate_loglik(
                self._network(), volume, self._inside.numpy(), cands, imp0, self.decoding_k, self.seed
            )
            post = posterior(ll, cands.log_prior)
            out[f"{cands.kind}_candidates"] = len(cands)
            out[{"category": "categories", "term": "terms"}[cands.kind]] = ranked(post[0], ll[0], cands.names, top)
        return out

    # ----- nearest ------------------------------------------------------------------------------
    def _standardised(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the dataset as centred unit-norm in-mask vectors (float32)."""
        from cbvae_ext.evaluation.duplicates import _standardise

        return _standardise(np.asarray(self.dataset.maps[start:stop], dtype=np.float32)[:, self.grid.mask])

    def nearest(self, maps: np.ndarray, chunk: int = 1024) -> list[list[dict[str, Any]]]:
        """The ``n_nearest`` dataset studies most correlated (Pearson, in-mask MA maps) with each of ``maps``.

        The standardised dataset is kept in memory when it fits in ``NEAREST_CACHE_BYTES`` (a 1k dataset at 4 mm:
        115 MB), else read in chunks on every call.
        """
        if self.dataset is None or not len(maps):
            return [[] for _ in range(len(maps))]
        from cbvae_ext.evaluation.duplicates import _standardise

        q = _standardise(np.asarray(maps, dtype=np.float32)[:, self.grid.mask])
        n = len(self.dataset.metadata)
        if self._all_standardised is None and n * q.shape[1] * 4 <= NEAREST_CACHE_BYTES:
            self._all_standardised = self._standardised(0, n)
        r = q @ self._all_standardised.T if self._all_standardised is not None else None
        if r is None:
            r = np.concatenate([q @ self._standardised(s, s + chunk).T for s in range(0, n, chunk)], axis=1)
        best_i = np.argsort(-r, axis=1, kind="stable")[:, : self.n_nearest]
        best_r = np.take_along_axis(r, best_i, 1)
        meta = self.dataset.metadata
        out = []
        for rs, idx in zip(best_r, best_i, strict=True):
            rows = []
            for value, i in zip(rs, idx, strict=True):
                row = meta.iloc[int(i)]
                year = row.get("year")
                rows.append(
                    {
                        "id": str(row["id"]),
                        "title": None if row.get("title") is None else str(row["title"]),
                        "year": None if year is None or not np.isfinite(year) else int(year),
                        "category": None if row.get("category") is None else str(row["category"]),
                        "split": str(row["split"]),
                        "r": round(float(value), 4),
                    }
                )
            out.append(rows)
        return out

    # ----- conditions ---------------------------------------------------------------------------
    def conditions(self, metadata: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """The model's named conditions from a study's metadata; text becomes topic weights when the run has topics
        and the terms condition when it has a terms group."""
        schema = self.model.schema
        known = {g.name for g in schema.groups}
        cond: dict[str, Any] = {}
        notes: list[str] = []
        for name in ("year", "sample_size", "task"):
            if metadata.get(name) is not None and name in known:
                cond[name] = metadata[name]
        text = metadata.get("text")
        with_terms = bool(text) and bool(schema.term_dims)
        if with_terms:  # NeuroQuery's terms of the text, embedded as the training studies' text was
            embedded = self.model.text_terms(str(text))
            if embedded is not None:
                cond["terms"] = embedded
                notes.append("text: embedded through NeuroQuery's terms (the run's terms condition)")
            else:
                notes.append("text: no NeuroQuery term recognised; terms left unknown")
        if text and schema.n_topics and schema.topic_keys:
            from cbvae_ext.app.words import TopicVocabulary

            match = TopicVocabulary(schema.topic_keys, schema.topic_names).match(str(text))
            if match.empty:
                notes.append("text: no word matched a topic's key words; topics left unknown")
            else:
                cond["topics"] = match.weights
                notes.append(f"text: mapped to topic weights through {len(match.matched)} matched words or phrases")
        elif text and not with_terms:
            notes.append("text: recorded; this run takes no topic condition, so it does not change the model's maps")
        return cond, notes

    # ----- one study ----------------------------------------------------------------------------
    def analyse(
        self, study: StudyInput, outside: str = "drop", allow_extrapolation: bool = False, readings: bool = True
    ) -> StudyResult:
        """Everything the report holds for one study (nearest studies are filled by ``analyse_many``).

        Raises:
            StudyError: no peak inside the brain mask (with ``outside="drop"``), an empty map.
            SchemaError: a condition the run does not know or out of its range.
        """
        notes = list(study.notes)
        if study.image is not None:
            ma_map, more = self.resample(study.image)
            notes += more
            peaks = {"read": 0, "inside_mask": 0, "outside_mask": 0, "used": 0}
        else:
            ma_map, peaks = self.render(study.xyz, outside)
            if peaks["inside_mask"] == 0:
                raise StudyError(
                    f"study {study.name!r}: none of its {peaks['read']} peaks lies inside the brain mask; check the "
                    "space (MNI or TAL) and that x, y, z are in mm"
                )
            if not ma_map.max() > 0:
                raise StudyError(f"study {study.name!r}: its peaks give an empty map; check the coordinates")
        cond, more = self.conditions(study.metadata)
        notes += more
        result = StudyResult(study, ma_map, peaks, cond, notes=notes)
        if peaks["outside_mask"]:
            verb = "dropped (pass --outside keep to keep them)" if outside == "drop" else "kept"
            result.warnings.append(
                f"{peaks['outside_mask']} of {peaks['read']} peaks lie outside the brain mask and were {verb}"
            )
            if peaks["outside_mask"] > 0.2 * peaks["read"]:
                result.warnings.append(
                    "more than a fifth of the peaks lie outside the brain: check the space label and the units (mm)"
                )
        result.conditional_mean = self.model.conditional_mean(cond, allow_extrapolation).map
        if not self.has_encoder:
            result.warnings.append(
                "this run exports no encoder (model.pt + network_config.json): no posterior, reconstruction or "
                "typicality; the map for the conditions alone is given"
            )
            return result
        mu, logvar, imputed = self.model.encode(ma_map, cond, allow_extrapolation, return_imputed=True)
        decoded = self.model.decode(mu, cond, allow_extrapolation, imputed=imputed)
        result.posterior = {"mu": mu.astype(float).tolist(), "sd": np.exp(0.5 * logvar).astype(float).tolist()}
        result.reconstruction = decoded.map
        result.decode_info = {"imputed": decoded.imputed, "defaulted": decoded.defaulted}
        result.decoding = self.decoding(ma_map)
        alternatives = self._alternatives(study, outside) if readings and self.reference() is not None else {}
        n_outside = [peaks["outside_mask"], *(a[2] for a in alternatives.values())]
        scored = self.typicality(np.stack([ma_map, *(a[0] for a in alternatives.values())]), np.asarray(n_outside))
        if scored is None:
            result.notes.append("typicality: needs the run's dataset (--dataset_dir) for its test studies")
            return result
        result.typicality = own = scored[0]
        pct = own["percentile"]
        if pct < ATYPICAL_PERCENTILE:
            result.warnings.append(
                f"atypical: the model finds this map less likely than {100 - pct:.0f}% of the dataset's test studies"
            )
        for (name, (_, label, _)), typ in zip(alternatives.items(), scored[1:], strict=True):
            result.readings[name] = {"percentile": typ["percentile"], "score_nats": typ["score_nats"]}
            if typ["percentile"] - pct >= READING_MARGIN:
                result.warnings.append(
                    f"looks like {label}: read that way it is at the {typ['percentile']:.0f}th typicality percentile, "
                    f"not the {pct:.0f}th"
                )
        return result

    def _alternatives(self, study: StudyInput, outside: str) -> dict[str, tuple[np.ndarray, str, int]]:
        """MA maps of the peaks read as a known mistake's correction (x flipped; the other space), with their label
        and number of peaks outside the mask."""
        given = study.xyz_given
        if given is None:
            return {}
        xyz = {"x_flipped": (to_mni(given * np.array([-1.0, 1.0, 1.0]), study.space), "left and right swapped")}
        if study.space == "MNI":
            xyz["talairach_labelled_mni"] = (
                to_mni(given, "TAL"),
                "Talairach coordinates labelled MNI (re-run with --space TAL / '// Reference=Talairach')",
            )
        elif study.space == "TAL":
            xyz["mni_labelled_talairach"] = (given, "MNI coordinates labelled Talairach (re-run as MNI)")
        out = {}
        for name, (peaks, label) in xyz.items():
            ma, counts = self.render(peaks, outside)
            if counts["inside_mask"]:
                out[name] = (ma, label, counts["outside_mask"])
        return out

    def analyse_many(self, studies: Sequence[StudyInput], **options: Any) -> list[StudyResult]:
        """``analyse`` every study, then find the nearest dataset studies of all of them in one pass."""
        results = [self.analyse(s, **options) for s in studies]
        for result, near in zip(results, self.nearest(np.stack([r.ma_map for r in results])), strict=True):
            result.nearest = near
        return results
