"""Time the Counterfactual Machine's interactions on a run folder: the work behind each view, and whole page
reruns through Streamlit's AppTest (widgets, image encoding and all).

Usage: ``python scripts/bench_app.py [RUN_DIR] [--dataset_dir DATA] [--repeats N] [--no_page]`` (default
``runs/cbvae``). Prints median milliseconds; the app's budget is ≤ 300 ms per interaction on 2 CPU cores.
Run it on an idle machine: other processes on the two cores inflate every wall-clock figure. The CPU time
of the page reruns (the app and AppTest run in this process, single-threaded torch) is what an interaction
costs on an idle core; on a busy machine compare it with the wall time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cbvae_ext import inference
from cbvae_ext.app import evidence as ev
from cbvae_ext.app import keys
from cbvae_ext.app import session as al
from cbvae_ext.app.regions import RegionLabeller
from cbvae_ext.app.render import SliceRenderer
from cbvae_ext.app.terms import QueryTokeniser
from cbvae_ext.app.words import TopicMatch, TopicVocabulary
from cbvae_ext.errors import CbvaeError

__all__: list[str] = []

APP = Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py"


def _tokeniser() -> QueryTokeniser | None:
    """NeuroQuery's tokeniser as the page finds it (``CBVAE_NEUROQUERY_DIR`` or ``../shared``), or None."""
    from cbvae_ext.data.neuroquery import resolve_neuroquery_dir

    try:
        return QueryTokeniser.from_directory(resolve_neuroquery_dir(fetch=False))
    except CbvaeError:
        return None


def _ask(vocab: TopicVocabulary, tokeniser: QueryTokeniser | None, text: str) -> TopicMatch:
    """A query read as the page reads it."""
    return vocab.match(text) if tokeniser is None else vocab.match_terms(tokeniser(text))


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (TorchScript profiling runs, caches)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def bench_parts(run_dir: Path, dataset_dir: Path | None, repeats: int) -> None:
    import torch

    torch.set_num_threads(1)  # as the app
    info = al.load_run_info(run_dir)
    model = inference.load(run_dir)
    renderer = SliceRenderer(info.affine, info.mask.shape, info.mask)
    regions = RegionLabeller(info.affine, info.mask.shape, info.mask)
    start = al.prior_start(info, 0)
    z = start.z
    conditions: dict = {**start.conditions, "task": info.schema.categories[0]}
    vocab = None
    if info.schema.n_topics:
        vocab = TopicVocabulary(info.schema.topic_keys, info.schema.topic_names)
        conditions["topics"] = vocab.match("working memory").weights
    unknown = {**conditions, "task": None, "topics": None}
    values = al.sweep_values(info.schema, "year")
    sweep_c = [{**conditions, "year": v} for v in values]
    current = model.decode(z, conditions, allow_extrapolation=True).map
    diff = current - model.decode(z, unknown, allow_extrapolation=True).map
    cut = (0.0, -18.0, 18.0)
    figures = {
        "decode (1 map)": _median_ms(lambda: model.decode(z, conditions, allow_extrapolation=True), repeats),
        "condition contrast decode (2 maps)": _median_ms(
            lambda: model.decode_many(z, [conditions, unknown], allow_extrapolation=True), repeats
        ),
        f"sweep decode ({len(values)} maps)": _median_ms(
            lambda: model.decode_many(z, sweep_c, allow_extrapolation=True), repeats
        ),
        "ortho 2 mm (x4: generated, difference, evidence pair)": 4
        * _median_ms(lambda: renderer.ortho(current, cut, threshold=0.1), repeats),
        "glass brain (x2: generated, difference)": 2
        * _median_ms(lambda: renderer.glass_brain(current, threshold=0.1), repeats),
        f"sweep tiles ({len(values)} axial)": len(values)
        * _median_ms(lambda: renderer.axial(current, 18.0, threshold=0.1), repeats),
        "what changed (atlas regions)": _median_ms(lambda: regions.summary(diff), repeats),
    }
    if vocab is not None:
        figures["ask in words (topic key words)"] = _median_ms(
            lambda: vocab.match("n-back working memory faces"), repeats
        )
        tokeniser = _tokeniser()
        if tokeniser is not None:
            text = "theory of mind, nociception and reward anticipation in n-back working memory"
            figures["ask in words (NeuroQuery's tokeniser, then topics)"] = _median_ms(
                lambda: _ask(vocab, tokeniser, text), repeats
            )
    if dataset_dir is not None:
        data = al.load_dataset_rows(dataset_dir)
        if data is not None:
            topics = al.study_vectors(info, data[1])
            q = conditions.get("topics")
            figures["evidence (nearest studies)"] = _median_ms(
                lambda: ev.find_evidence(info.latents, topics, q, conditions["task"]), repeats
            )
    total = sum(figures.values())
    print(f"run {run_dir} · grid {info.mask.shape} · {info.latent_size} latents · torch threads 1")
    for name, ms in figures.items():
        print(f"  {name:55s} {ms:8.1f} ms")
    print(f"  {'sum of the work behind one interaction':55s} {total:8.1f} ms")


def words_effect(run_dir: Path, dataset_dir: Path) -> None:
    """Does asking in words move the map the right way? For a few queries: the correlation of the generated
    map (``decode(0, topics)`` and the conditional mean) with the mean real map of the query's 25 nearest
    studies, on the diagonal (same query) and off it (other queries)."""
    from cbvae_ext.data import normalise_maps

    info, model = al.load_run_info(run_dir), inference.load(run_dir)
    data = al.load_dataset_rows(dataset_dir)
    if not info.schema.n_topics or data is None:
        return
    maps, meta = data
    topics = al.study_vectors(info, meta)
    vocab = TopicVocabulary(info.schema.topic_keys, info.schema.topic_names)
    tokeniser = _tokeniser()
    queries = ["working memory", "pain", "faces", "reward", "language", "motor", "nociception", "theory of mind"]
    z = np.zeros(info.latent_size, np.float32)
    generated: dict[str, list[np.ndarray]] = {"decode(z=0, topics)": [], "conditional_mean(topics)": []}
    real = []
    for q in queries:
        w = _ask(vocab, tokeniser, q).weights
        generated["decode(z=0, topics)"].append(model.decode(z, {"topics": w}, allow_extrapolation=True).map)
        if hasattr(model, "conditional_mean"):
            generated["conditional_mean(topics)"].append(model.conditional_mean({"topics": w}, True).map)
        rows = np.flatnonzero(meta["id"].isin(ev.find_evidence(info.latents, topics, w, None).matching).to_numpy())
        real.append(normalise_maps(np.asarray(maps[rows])).mean(0).numpy())
    print(f"ask in words vs the real mean of the nearest 25 studies ({', '.join(queries)}):")
    off = ~np.eye(len(queries), dtype=bool)
    for name, maps_q in generated.items():
        if not maps_q:
            continue
        corr = np.array([[ev.map_correlation(g, r, info.mask) for r in real] for g in maps_q])
        hits = int((corr.argmax(axis=1) == np.arange(len(queries))).sum())
        print(
            f"  {name:28s} r same query {np.diag(corr).mean():.3f} · other queries {corr[off].mean():.3f} · "
            f"closest to its own query {hits}/{len(queries)}"
        )


def bench_page(run_dir: Path, dataset_dir: Path | None, repeats: int) -> None:
    """Whole reruns of the page after one widget change each (what the user waits for, minus the network)."""
    from streamlit.testing.v1 import AppTest

    os.environ["CBVAE_RUN_DIR"] = str(run_dir)
    if dataset_dir is not None:
        os.environ["CBVAE_DATASET_DIR"] = str(dataset_dir)
    at = AppTest.from_file(str(APP), default_timeout=600)
    at.run()
    info = al.load_run_info(run_dir)
    cats = info.schema.categories
    lo, hi, _ = al.slider_spec(info.schema, "year")
    d0 = int(info.kl_order[0])
    steps: dict[str, Callable[[int], object]] = {
        "task category": lambda i: at.selectbox(key="task").set_value(cats[i % len(cats)]),
        "year": lambda i: at.slider(key="year_value").set_value(int(lo + (7 * i) % (hi - lo))),
        "latent slider": lambda i: at.slider(key=keys.latent(d0)).set_value(round(-2.0 + 0.35 * i, 2)),
        "condition strength": lambda i: at.slider(key="strength").set_value(round(0.5 + 0.1 * i, 1)),
        "cut": lambda i: at.slider(key=keys.cut("z")).set_value(float(-20 + 4 * i)),
    }
    if info.schema.n_topics:
        words = ["working memory", "pain", "theory of mind", "reward anticipation", "nociception", "motor", "fear"]
        steps["ask in words"] = lambda i: at.text_input(key="words").input(words[i % len(words)])
        steps["topic slider"] = lambda i: next(
            w for w in at.slider if w.key in {keys.topic(t) for t in range(info.schema.n_topics)}
        ).set_value(round(0.1 + 0.08 * i, 2))
        steps["contrast of two queries (new B)"] = lambda i: (
            at.text_input(key="contrast_a").input("pain"),
            at.text_input(key="contrast_b").input(words[(i + 1) % len(words)]),
        )
    print("page reruns (AppTest, median; widgets, images, messages; wall and CPU time of this process):")
    for name, change in steps.items():
        wall, cpu = [], []
        for i in range(repeats + 1):
            change(i)
            t0, c0 = time.perf_counter(), time.process_time()
            at.run()
            wall.append((time.perf_counter() - t0) * 1000)
            cpu.append((time.process_time() - c0) * 1000)
            if at.exception:
                raise SystemExit(f"the page failed after '{name}': {at.exception[0].value}")
        print(f"  {name:45s} wall {statistics.median(wall[1:]):7.1f} ms · CPU {statistics.median(cpu[1:]):7.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", default="runs/cbvae", type=Path)
    parser.add_argument("--dataset_dir", type=Path)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no_page", action="store_true", help="skip the AppTest page reruns")
    args = parser.parse_args()
    bench_parts(args.run_dir, args.dataset_dir, args.repeats)
    if args.dataset_dir is not None:
        words_effect(args.run_dir, args.dataset_dir)
    if not args.no_page:
        bench_page(args.run_dir, args.dataset_dir, max(args.repeats // 2, 3))


if __name__ == "__main__":
    main()
