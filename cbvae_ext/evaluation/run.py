"""The evaluation workflow behind ``python -m monai.bundle run evaluate --config_file bundle/configs/evaluate.yaml``.

It loads the C-β-VAE run (and, when given, the baseline VAE run) with ``weights_only=True``, checks them
against the dataset (grid, metadata schema, latent size, state-dict keys), scores both on the **test**
split (validation served model selection during training and is not used here), fits the non-neural
baselines on the training split, and writes ``test_results.json`` plus PNG figures to the output folder.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cbvae_ext.data.errors import DataError
from cbvae_ext.data.sources import file_sha256
from cbvae_ext.engine.bundle_glue import make_loader
from cbvae_ext.engine.history import plot_schedules
from cbvae_ext.engine.losses import CBVAELoss
from cbvae_ext.evaluation.baselines import CategoryMeanBaseline, MeanMapBaseline, PCABaseline
from cbvae_ext.evaluation.figures import plot_per_category_r, plot_probes, plot_recon_examples
from cbvae_ext.evaluation.imputation import imputation_scores
from cbvae_ext.evaluation.metrics import SSIM_PARAMS, bootstrap_summary, masked_vectors, score_maps
from cbvae_ext.evaluation.probes import adversary_balanced_accuracy, year_probes, year_r2
from cbvae_ext.networks import build_network
from cbvae_ext.schema import CONTINUOUS_FIELDS, MetadataSchema, SchemaError

__all__ = ["Evaluation", "EvaluationError", "LoadedRun", "load_run"]

MODEL_LABELS = {"cbvae": "C-β-VAE", "baseline": "baseline VAE"}
_PACKAGES = ("cbvae", "torch", "monai", "numpy", "scikit-learn", "scikit-image", "scipy", "nilearn", "nimare")


class EvaluationError(ValueError):
    """A run folder, checkpoint or dataset that cannot be evaluated together."""


def _read_json(path: Path, fix: str) -> dict[str, Any]:
    if not path.is_file():
        raise EvaluationError(f"{path} not found; {fix}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EvaluationError(f"{path} is not valid JSON ({err}); {fix}") from None


@dataclass
class LoadedRun:
    """A trained network ready for evaluation, with what it was checked against."""

    run_dir: Path
    model: torch.nn.Module
    config: dict[str, Any]
    decoder_schema: dict[str, Any] | None
    checkpoint_sha256: str
    history: pd.DataFrame | None = field(default=None)

    @property
    def kind(self) -> str:
        return str(self.config.get("model", "cbvae"))

    @property
    def latent_size(self) -> int:
        return int(self.config["latent_size"])


def load_run(
    run_dir: str | Path,
    schema: MetadataSchema,
    grid_shape: tuple[int, ...],
    device: str | torch.device = "cpu",
    manifest_sha256: str | None = None,
) -> LoadedRun:
    """Rebuild a run's network, load ``model.pt`` with ``weights_only=True`` and check it against the dataset.

    Args:
        run_dir: training output folder (formats.md "Run folder").
        schema: the evaluation dataset's metadata schema.
        grid_shape: the evaluation dataset's map grid ``(D, H, W)``.
        device: where the network runs.
        manifest_sha256: checksum of the evaluation dataset's ``manifest.json``; a run trained on another
            build is refused, since another build has other splits (training studies could be "test").

    Raises:
        EvaluationError: missing files, another dataset build, or a grid, schema, latent size or state dict
            that does not match.
    """
    run_dir = Path(run_dir)
    fix = "pass the output folder of a bundle training run"
    config = _read_json(run_dir / "network_config.json", fix)
    trained_on = _trained_on(config)
    if manifest_sha256 is not None and trained_on is not None and trained_on != manifest_sha256:
        raise EvaluationError(
            f"dataset mismatch: {run_dir} was trained on the dataset whose manifest.json has sha256 {trained_on[:12]}…, "
            f"not this one ({manifest_sha256[:12]}…); splits differ between builds, so evaluate on the training dataset"
        )
    if "spatial_shape" not in config:
        raise EvaluationError(f"{run_dir / 'network_config.json'} lacks 'spatial_shape'; {fix}")
    run_grid = tuple(int(s) for s in config["spatial_shape"])
    if run_grid != tuple(grid_shape):
        raise EvaluationError(
            f"grid mismatch: {run_dir / 'network_config.json'} has {list(run_grid)} but the dataset has "
            f"{list(grid_shape)}; evaluate on the dataset the run was trained on, or retrain"
        )
    for key, expected in (("meta_dim", schema.meta_dim), ("mask_dim", schema.mask_dim)):
        if key in config and int(config[key]) != expected:
            raise EvaluationError(
                f"schema mismatch: {run_dir / 'network_config.json'} has {key}={config[key]} but the dataset schema "
                f"has {key}={expected}; evaluate on the dataset the run was trained on, or retrain"
            )
    decoder_schema = None
    if (run_dir / "decoder_schema.json").is_file():
        decoder_schema = _read_json(run_dir / "decoder_schema.json", fix)
        if "latent_size" in decoder_schema and int(decoder_schema["latent_size"]) != int(config.get("latent_size", -1)):
            raise EvaluationError(
                f"latent size mismatch: {run_dir / 'decoder_schema.json'} has {decoder_schema['latent_size']} but "
                f"network_config.json has {config.get('latent_size')}; re-export the run"
            )
        run_categories = (decoder_schema.get("meta_schema") or {}).get("categories")
        if run_categories is not None and list(run_categories) != list(schema.categories):
            raise EvaluationError(
                f"schema mismatch: {run_dir / 'decoder_schema.json'} categories {run_categories} differ from the "
                f"dataset's {schema.categories}; evaluate on the dataset the run was trained on, or retrain"
            )
    try:
        model = build_network(config)
    except ValueError as err:
        raise EvaluationError(f"{run_dir / 'network_config.json'}: {err}") from None
    ckpt = run_dir / "model.pt"
    if not ckpt.is_file():
        raise EvaluationError(f"{ckpt} not found; {fix}")
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint gets the same one-line answer
        raise EvaluationError(f"{ckpt} cannot be loaded with weights_only=True ({type(err).__name__}); {fix}") from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()
        raise EvaluationError(
            f"checkpoint mismatch: {ckpt} does not fit {run_dir / 'network_config.json'} "
            f"({' '.join(first[:2])[:300]}); keep model.pt and network_config.json from the same run"
        ) from None
    history = pd.read_csv(run_dir / "history.csv") if (run_dir / "history.csv").is_file() else None
    return LoadedRun(run_dir, model.to(device).eval(), config, decoder_schema, file_sha256(ckpt), history)


def _imputed_defaults(run: LoadedRun, n_continuous: int) -> torch.Tensor | None:
    """The normalised value the run's decoder uses for a missing field (None: the schema's 0)."""
    defaults = (run.decoder_schema or {}).get("imputed_defaults")
    if defaults is None:
        return None
    values = [defaults[f] for f in CONTINUOUS_FIELDS] if isinstance(defaults, dict) else list(defaults)
    return torch.tensor(values[:n_continuous], dtype=torch.float32)


def _package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _summaries(values: dict[str, np.ndarray], n_bootstrap: int, seed: int) -> dict[str, Any]:
    return {k: bootstrap_summary(v, n_bootstrap, seed) for k, v in values.items()}


def _criterion(value: Any, reference: Any, passed: bool | None, rule: str, reason: str | None = None) -> dict:
    return {"value": value, "reference": reference, "passed": passed, "rule": rule, "reason": reason}


class Evaluation:
    """Score a trained C-β-VAE (and optionally the baseline VAE) on the test split.

    Args:
        dataset_dir: dataset folder built by ``python -m cbvae_ext.data build``.
        run_dir: C-β-VAE training run folder (or a baseline run when ``baseline_run_dir`` is not given).
        output_dir: where ``test_results.json`` and the figures go (created).
        baseline_run_dir: baseline VAE run folder; optional, reported as absent when missing.
        device: ``"cuda"``/``"cpu"``; default: CUDA when available.
        batch_size: maps per forward pass.
        n_bootstrap: bootstrap resamples per metric (≥ 1000 for reported figures).
        n_permutations: permutations of each probe's null (≥ 100 for reported figures).
        n_permutations_mlp: permutations of the MLP probe's null (default: ``n_permutations``).
        n_examples: held-out studies shown in ``recon_examples.png``.
        max_train_maps: cap on training maps used to fit PCA and the mean maps (seeded subsample; None = all).
        seed: seed of the bootstrap, the permutations, the ELBO's latent sample and the subsample.
        num_workers: data loader workers.
    """

    def __init__(
        self,
        dataset_dir: str | Path,
        run_dir: str | Path | None = None,
        output_dir: str | Path | None = None,
        baseline_run_dir: str | Path | None = None,
        device: str | None = None,
        batch_size: int = 8,
        n_bootstrap: int = 1000,
        n_permutations: int = 100,
        n_permutations_mlp: int | None = None,
        n_examples: int = 3,
        max_train_maps: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        self.dataset_dir = dataset_dir
        self.run_dir = run_dir
        self.output_dir = output_dir
        self.baseline_run_dir = baseline_run_dir
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = int(batch_size)
        self.n_bootstrap = int(n_bootstrap)
        self.n_permutations = int(n_permutations)
        self.n_permutations_mlp = n_permutations_mlp
        self.n_examples = int(n_examples)
        self.max_train_maps = max_train_maps
        self.seed = int(seed)
        self.num_workers = int(num_workers)

    # ----- entry points -------------------------------------------------------------------
    def run_cli(self) -> dict[str, Any]:
        """``run()`` for the bundle command: a bad input prints one ``error: ...`` line and exits with status 2."""
        try:
            return self.run()
        except (EvaluationError, SchemaError, DataError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    def run(self) -> dict[str, Any]:
        """Evaluate and write ``test_results.json`` and the figures; returns the results dict.

        Raises:
            EvaluationError: missing arguments or runs that do not match the dataset or each other.
        """
        started = time.time()
        if self.dataset_dir is None or self.output_dir is None:
            raise EvaluationError("--dataset_dir and --output_dir are required")
        if self.run_dir is None and self.baseline_run_dir is None:
            raise EvaluationError("give --run_dir (C-β-VAE run) and/or --baseline_run_dir (baseline VAE run)")
        from cbvae_ext.data import load_dataset_info  # the loader pulls in NiMARE: import on use

        info = load_dataset_info(self.dataset_dir)
        schema, mask = info.schema, np.asarray(info.mask) != 0
        grid = tuple(int(s) for s in mask.shape)
        runs: dict[str, LoadedRun] = {}
        for path in (self.run_dir, self.baseline_run_dir):
            if path is not None:
                run = load_run(path, schema, grid, self.device, file_sha256(info.path / "manifest.json"))
                if run.kind in runs:
                    raise EvaluationError(
                        f"both run folders hold a {run.kind!r} model ({runs[run.kind].run_dir}, {run.run_dir}); "
                        "pass the C-β-VAE as --run_dir and the baseline VAE as --baseline_run_dir"
                    )
                runs[run.kind] = run
        sizes = {k: r.latent_size for k, r in runs.items()}
        if len(set(sizes.values())) > 1:
            raise EvaluationError(
                f"latent size mismatch between runs {sizes}; compare models with the same latent size"
            )
        latent_size = next(iter(sizes.values()))
        out_dir = Path(self.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)

        loaders = {
            split: make_loader(
                self.dataset_dir, split, self.batch_size, device=self.device, num_workers=self.num_workers
            )
            for split in ("train", "test")
        }
        train = self._encode_train(loaders["train"], runs, mask)
        test = self._score_test(loaders["test"], runs, mask)
        if test["n"] == 0 or train["n"] == 0:
            raise EvaluationError(f"{self.dataset_dir}: the train and test splits must both hold maps")
        metadata = info.metadata.set_index("id")

        results: dict[str, Any] = {
            "split": "test",
            "model_selection": "validation split, during training only; not used here",
            "n_test": test["n"],
            "n_train": train["n"],
            "units": "maps divided by their own maximum (loader units, [0, 1]); metrics inside the brain mask",
            "metric_definitions": self._definitions(),
            "models": {},
        }
        per_category: dict[str, dict[str, Any]] = {}
        probes: dict[str, Any] = {}
        adversary: dict[str, float | None] = {}
        for kind in ("cbvae", "baseline"):
            if kind not in runs:
                results["models"][kind] = {"absent": f"no {kind} run folder given"}
                continue
            res, cat_r = self._model_results(kind, runs[kind], train, test, metadata, schema)
            results["models"][kind] = res
            per_category[MODEL_LABELS[kind]] = cat_r
            probes[kind] = res["probes"]
            adversary[kind] = res["adversary"]["balanced_accuracy"]
        results["baselines"], base_cat_r = self._baselines(train, test, mask, latent_size, schema)
        per_category.update(base_cat_r)
        results["per_category_r"] = per_category
        results["criteria"] = self._criteria(results, schema)
        results["figures"] = self._figures(out_dir, runs, test, info.affine, per_category, probes, adversary)
        results["provenance"] = self._provenance(runs, started)
        path = out_dir / "test_results.json"
        path.write_text(json.dumps(results, indent=2, allow_nan=False, default=_json_default))
        return results

    # ----- passes over the data -----------------------------------------------------------
    @torch.no_grad()
    def _encode_train(self, loader: Any, runs: dict[str, LoadedRun], mask: np.ndarray) -> dict[str, Any]:
        """Posterior means of every training map per model, plus the in-mask maps for the baselines."""
        rng = np.random.default_rng(self.seed)
        n_total = len(loader.dataset)
        keep = None
        if self.max_train_maps is not None and n_total > self.max_train_maps:
            keep = np.zeros(n_total, dtype=bool)
            keep[rng.choice(n_total, self.max_train_maps, replace=False)] = True
        maps, ids, cats, bins, mus = [], [], [], [], {k: [] for k in runs}
        offset = 0
        for batch in loader:
            image = batch["image"]
            meta, meta_mask = batch["meta"].to(self.device), batch["meta_mask"].to(self.device)
            for kind, run in runs.items():
                mu, _ = run.model.encode(image.to(self.device), meta, meta_mask)
                mus[kind].append(mu.float().cpu().numpy())
            sel = slice(None) if keep is None else keep[offset : offset + len(image)]
            maps.append(masked_vectors(image.numpy(), mask)[sel])
            offset += len(image)
            ids.extend(batch["id"])
            cats.append(batch["category"].numpy())
            bins.append(batch["year_bin"].numpy())
        categories = np.concatenate(cats) if cats else np.zeros(0, int)
        return {
            "n": offset,
            "ids": ids,
            "maps": np.concatenate(maps) if maps else np.zeros((0, int(mask.sum())), np.float32),
            "map_categories": categories if keep is None else categories[keep],
            "categories": categories,
            "year_bin": np.concatenate(bins) if bins else np.zeros(0, int),
            "mu": {k: np.concatenate(v) if v else np.zeros((0, 1)) for k, v in mus.items()},
        }

    @torch.no_grad()
    def _score_test(self, loader: Any, runs: dict[str, LoadedRun], mask: np.ndarray) -> dict[str, Any]:
        """Reconstructions, conditional-only generations, ELBO terms, μ and heads of every test map per model."""
        mask_t = torch.as_tensor(mask)
        loss = CBVAELoss(mask_t).to(self.device)
        gen = torch.Generator().manual_seed(self.seed)
        n_cont = len(CONTINUOUS_FIELDS)
        defaults = {k: _imputed_defaults(r, n_cont) for k, r in runs.items()}
        acc: dict[str, dict[str, list]] = {k: {} for k in runs}
        targets, ids, cats, bins, examples = [], [], [], [], {"real": []}
        for batch in loader:
            image = batch["image"].to(self.device)
            meta, meta_mask = batch["meta"].to(self.device), batch["meta_mask"].to(self.device)
            target = masked_vectors(batch["image"].numpy(), mask)
            targets.append(target)
            ids.extend(batch["id"])
            cats.append(batch["category"].numpy())
            bins.append(batch["year_bin"].numpy())
            n_ex = max(0, self.n_examples - sum(len(e) for e in examples["real"]))
            examples["real"].append(batch["image"][:n_ex, 0].numpy())
            for kind, run in runs.items():
                model, store = run.model, acc[kind]
                out = model(image, meta, meta_mask)  # eval mode: z = μ, the point reconstruction
                recon = torch.sigmoid(out["recon"].float())
                pred = masked_vectors(recon.cpu().numpy(), mask)
                # ELBO at β = 1 with one latent sample z ~ q(z | x, m), the training likelihood (CBVAELoss)
                # missing fields enter the decoder at the run's imputation default, never the map's own
                # imputation: that is information from x that pays no KL, which would loosen the bound
                imp0 = defaults[kind]
                imp0 = None if imp0 is None else imp0.to(self.device).expand(len(image), -1)
                m0 = model.decoder_input(meta, meta_mask, imp0)
                eps = torch.randn(out["mu"].shape, generator=gen).to(self.device)
                z = out["mu"] + eps * torch.exp(0.5 * out["logvar"])
                nll = loss.reconstruction(model.decode(z, m0), image)
                kl = loss.kl(out["mu"], out["logvar"])
                # conditional-only generation: prior mean z = 0 and the study's metadata
                cond = torch.sigmoid(model.decode(torch.zeros_like(out["mu"]), m0))
                cond_pred = masked_vectors(cond.float().cpu().numpy(), mask)
                for key, value in (
                    *((f"recon/{k}", v) for k, v in score_maps(pred, target, mask).items()),
                    *((f"cond/{k}", v) for k, v in score_maps(cond_pred, target, mask).items()),
                    ("elbo/nll", nll.cpu().numpy()),
                    ("elbo/kl", kl.cpu().numpy()),
                    ("mu", out["mu"].float().cpu().numpy()),
                ):
                    store.setdefault(key, []).append(value)
                if out.get("year_logits") is not None:
                    store.setdefault("year_logits", []).append(out["year_logits"].float().cpu().numpy())
                if out.get("imp_mu") is not None:
                    store.setdefault("imp_mu", []).append(out["imp_mu"].float().cpu().numpy())
                # outside the brain the decoder is unconstrained: show only what is scored
                examples.setdefault(kind, []).append(recon[:n_ex, 0].float().cpu().numpy() * mask)
        per_model = {k: {key: np.concatenate(v) for key, v in store.items()} for k, store in acc.items()}
        return {
            "n": len(ids),
            "ids": ids,
            "maps": np.concatenate(targets) if targets else np.zeros((0, int(mask.sum())), np.float32),
            "categories": np.concatenate(cats) if cats else np.zeros(0, int),
            "year_bin": np.concatenate(bins) if bins else np.zeros(0, int),
            "models": per_model,
            "examples": {k: np.concatenate(v) for k, v in examples.items() if v},
        }

    # ----- results ------------------------------------------------------------------------
    def _model_results(
        self,
        kind: str,
        run: LoadedRun,
        train: dict[str, Any],
        test: dict[str, Any],
        metadata: pd.DataFrame,
        schema: MetadataSchema,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        scores = test["models"][kind]
        nll, kl = scores["elbo/nll"], scores["elbo/kl"]
        res: dict[str, Any] = {
            "run_dir": str(run.run_dir),
            "latent_size": run.latent_size,
            "reconstruction": _summaries(
                {k.split("/", 1)[1]: v for k, v in scores.items() if k.startswith("recon/")},
                self.n_bootstrap,
                self.seed,
            ),
            "elbo_beta1": _summaries({"nll": nll, "kl": kl, "elbo": -(nll + kl)}, self.n_bootstrap, self.seed),
            "conditional_only": _summaries(
                {k.split("/", 1)[1]: v for k, v in scores.items() if k.startswith("cond/")}, self.n_bootstrap, self.seed
            ),
        }
        logits = scores.get("year_logits")
        res["adversary"] = {
            "balanced_accuracy": None if logits is None else adversary_balanced_accuracy(logits, test["year_bin"]),
            "n_year_bins": schema.n_year_bins,
            "reason": "the baseline VAE has no year adversary" if logits is None else None,
        }
        mu_train, mu_test = train["mu"][kind], scores["mu"]
        res["probes"] = year_probes(
            mu_train,
            train["year_bin"],
            mu_test,
            test["year_bin"],
            n_permutations=self.n_permutations,
            n_permutations_mlp=self.n_permutations_mlp,
            seed=self.seed,
        )
        years_train = metadata.loc[train["ids"], "year"].to_numpy(dtype=np.float64)
        years_test = metadata.loc[test["ids"], "year"].to_numpy(dtype=np.float64)
        res["year_r2"] = year_r2(mu_train, years_train, mu_test, years_test)
        res["imputation"] = self._imputation(scores.get("imp_mu"), train, test, metadata, schema)
        return res, _per_category(scores["recon/pearson_r"], test["categories"], schema)

    def _imputation(
        self,
        imp_mu: np.ndarray | None,
        train: dict[str, Any],
        test: dict[str, Any],
        metadata: pd.DataFrame,
        schema: MetadataSchema,
    ) -> dict[str, Any]:
        if imp_mu is None:
            return {"absent": "the baseline VAE has no imputation head"}
        out: dict[str, Any] = {}
        for j, spec in enumerate(schema.fields):
            true = metadata.loc[test["ids"], spec.name].to_numpy(dtype=np.float64)
            train_values = metadata.loc[train["ids"], spec.name].to_numpy(dtype=np.float64)
            train_values = train_values[np.isfinite(train_values)]
            if not np.isfinite(true).any() or train_values.size == 0:
                out[spec.name] = {"n": 0, "absent": "not observed in the test or the training split"}
                continue
            # imputation head reads only the map, so its output for an observed field is a genuine prediction
            out[spec.name] = imputation_scores(spec.inverse(imp_mu[:, j]), true, float(np.median(train_values)))
        return out

    def _baselines(
        self, train: dict[str, Any], test: dict[str, Any], mask: np.ndarray, latent_size: int, schema: MetadataSchema
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """PCA (latent-size components), training mean map and category mean map, fit on train, scored on test."""
        test_cats = test["categories"]
        pca = PCABaseline(min(latent_size, *train["maps"].shape), seed=self.seed).fit(train["maps"])
        preds = {
            "pca": pca.predict(test["maps"]),
            "mean_map": MeanMapBaseline().fit(train["maps"]).predict(test["n"]),
            "category_mean": CategoryMeanBaseline().fit(train["maps"], train["map_categories"]).predict(test_cats),
        }
        results, per_cat = {}, {}
        labels = {"pca": "PCA", "mean_map": "training mean map", "category_mean": "category mean map"}
        for name, pred in preds.items():
            scores = score_maps(pred, test["maps"], mask)
            results[name] = {"reconstruction": _summaries(scores, self.n_bootstrap, self.seed)}
            per_cat[labels[name]] = _per_category(scores["pearson_r"], test_cats, schema)
        results["pca"].update(
            n_components=pca.n_components,
            explained_variance_ratio=pca.explained_variance_ratio,
            n_fit_maps=int(len(train["maps"])),
        )
        return results, per_cat

    def _criteria(self, results: dict[str, Any], schema: MetadataSchema) -> dict[str, Any]:
        models = results["models"]
        cb, base = models.get("cbvae", {}), models.get("baseline", {})
        crit: dict[str, Any] = {}
        no_cb = "no C-β-VAE run given"
        no_base = "no baseline VAE run given"
        if "absent" in cb or "absent" in base:
            crit["elbo_better_than_baseline"] = _criterion(
                None, None, None, "C-β-VAE mean ELBO (β=1) > baseline VAE's", no_cb if "absent" in cb else no_base
            )
        else:
            a, b = cb["elbo_beta1"]["elbo"]["mean"], base["elbo_beta1"]["elbo"]["mean"]
            crit["elbo_better_than_baseline"] = _criterion(
                a, b, bool(a > b), "C-β-VAE mean ELBO (β=1) > baseline VAE's"
            )
        n_bins = schema.n_year_bins or 10
        threshold = 1.5 / n_bins  # 0.15 for 10 bins
        adv = None if "absent" in cb else cb["adversary"]["balanced_accuracy"]
        crit["adversary_at_chance"] = _criterion(
            adv,
            threshold,
            None if adv is None else bool(adv <= threshold),
            f"year head balanced accuracy on test <= 1.5 / n_bins ({n_bins} bins)",
            no_cb if "absent" in cb else (None if adv is not None else "no dated test study"),
        )
        for probe in ("logistic", "mlp"):
            rule = f"C-β-VAE post-hoc {probe} probe balanced accuracy < baseline VAE's"
            if "absent" in cb or "absent" in base:
                crit[f"{probe}_probe_below_baseline"] = _criterion(
                    None, None, None, rule, no_cb if "absent" in cb else no_base
                )
                continue
            a = cb["probes"].get(probe, {}).get("balanced_accuracy")
            b = base["probes"].get(probe, {}).get("balanced_accuracy")
            ok = None if a is None or b is None else bool(a < b)
            crit[f"{probe}_probe_below_baseline"] = _criterion(
                a, b, ok, rule, None if ok is not None else cb["probes"].get("skipped")
            )
        pca_r = results["baselines"]["pca"]["reconstruction"]["pearson_r"]["mean"]
        cb_r = None if "absent" in cb else cb["reconstruction"]["pearson_r"]["mean"]
        crit["r_above_pca"] = _criterion(
            cb_r,
            pca_r,
            None if cb_r is None or pca_r is None else bool(cb_r > pca_r),
            "C-β-VAE mean Pearson r > PCA's (same number of components as the latent size)",
            no_cb if "absent" in cb else None,
        )
        return crit

    # ----- figures and provenance ---------------------------------------------------------
    def _figures(
        self,
        out_dir: Path,
        runs: dict[str, LoadedRun],
        test: dict[str, Any],
        affine: np.ndarray,
        per_category: dict[str, Any],
        probes: dict[str, Any],
        adversary: dict[str, float | None],
    ) -> list[str]:
        written = []
        examples = test["examples"]
        n = len(examples["real"])
        if n:
            volumes = {"real": examples["real"], **{MODEL_LABELS[k]: examples[k] for k in runs}}
            written.append(
                plot_recon_examples(volumes, np.asarray(affine), test["ids"][:n], out_dir / "recon_examples.png")
            )
        history = runs["cbvae"].history if "cbvae" in runs else next(iter(runs.values())).history
        if history is not None and {"beta", "grl_lambda", "epoch"} <= set(history.columns):
            written.append(plot_schedules(history, out_dir / "training_curves.png"))
        written.append(plot_per_category_r(per_category, out_dir / "per_category_r.png"))
        shown = {k: v for k, v in probes.items() if "skipped" not in v}
        if shown:
            written.append(plot_probes(shown, adversary, out_dir / "probes.png"))
        return [Path(p).name for p in written]

    def _provenance(self, runs: dict[str, LoadedRun], started: float) -> dict[str, Any]:
        manifest = Path(self.dataset_dir) / "manifest.json"
        manifest_sha = file_sha256(manifest) if manifest.is_file() else None
        device = str(self.device)
        if device.startswith("cuda") and torch.cuda.is_available():
            device = f"{device} ({torch.cuda.get_device_name()})"
        return {
            "dataset_dir": str(self.dataset_dir),
            "dataset_manifest_sha256": manifest_sha,
            "runs": {
                k: {
                    "run_dir": str(r.run_dir),
                    "checkpoint_sha256": r.checkpoint_sha256,
                    "network_config": r.config,
                    "trained_on_manifest_sha256": _trained_on(r.config),
                    "dataset_matches_training": None
                    if _trained_on(r.config) is None
                    else _trained_on(r.config) == manifest_sha,
                }
                for k, r in runs.items()
            },
            "evaluation_config": {
                "n_bootstrap": self.n_bootstrap,
                "n_permutations": self.n_permutations,
                "n_permutations_mlp": self.n_permutations
                if self.n_permutations_mlp is None
                else self.n_permutations_mlp,
                "batch_size": self.batch_size,
                "n_examples": self.n_examples,
                "max_train_maps": self.max_train_maps,
                "seed": self.seed,
            },
            "packages": _package_versions(),
            "python": platform.python_version(),
            "device": device,
            "started_utc": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": round(time.time() - started, 2),
        }

    def _definitions(self) -> dict[str, Any]:
        return {
            "pearson_r": "voxel-wise Pearson correlation within the brain mask",
            "ssim": SSIM_PARAMS,
            "dice_top5": "Dice of the top 5% in-mask voxels of real vs predicted (ties broken by voxel order)",
            "dice_top1": "Dice of the top 1% in-mask voxels of real vs predicted",
            "reconstruction": "decoder output sigmoid(logits) at z = posterior mean μ",
            "elbo_beta1": "per map: nll = Bernoulli cross-entropy over in-mask voxels (CBVAELoss.reconstruction) at one "
            "z ~ q(z|x,m), decoder conditioned on the observed metadata with missing fields at the run's imputation "
            "default; kl = KL(q || N(0, I)); elbo = -(nll + kl), nats, higher is better",
            "conditional_only": "decode(z = 0, the study's metadata; missing fields at the run's imputation default)",
            "bootstrap": f"percentile 95% CI of the mean over held-out maps, {self.n_bootstrap} resamples, seed {self.seed}",
            "probes": "fit on train μ (standardised), scored on test; balanced accuracy over year bins; null = same "
            "probe refit on shuffled train labels; p = (1 + #null >= score) / (1 + n_permutations)",
            "year_r2": "test R² of ridge regression (alpha=1) from standardised μ to raw year",
            "imputation": "imputation head output vs observed test values (raw units) against the training median",
        }


def _trained_on(config: dict[str, Any]) -> str | None:
    for key in ("dataset_manifest_sha256", "manifest_sha256", "dataset_sha256"):
        if config.get(key):
            return str(config[key])
    return None


def _per_category(values: np.ndarray, categories: np.ndarray, schema: MetadataSchema) -> dict[str, Any]:
    """Mean and count of a per-map metric within each task category (``(missing)`` for no category)."""
    names = schema.categories
    out: dict[str, Any] = {}
    for c in np.unique(categories):
        sel = (categories == c) & np.isfinite(values)
        label = names[int(c)] if c >= 0 else "(missing)"
        out[label] = {"mean": float(values[sel].mean()) if sel.any() else None, "n": int(sel.sum())}
    return out


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
