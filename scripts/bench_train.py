"""Benchmark: maps/s of a full C-β-VAE train step and TorchScript decode ms/map (prints figures, asserts nothing).

    python scripts/bench_train.py --preset cpu --device cpu [--dataset-dir OUT]
    python scripts/bench_train.py --preset gpu --device cuda --resident-maps 11500
    python scripts/bench_train.py --preset cpu --compare --dataset-dir OUT [--maps 1600]
    python scripts/bench_train.py --preset cpu --profile 4 [--dataset-dir OUT] [--plain]

Without ``--dataset-dir`` the maps are random in [0, 1] on the 4 mm grid (48 x 56 x 48) with a synthetic
schema of the production layout (4 continuous fields, 50 topics, 15 categories): speed does not depend on
the values. Decoding is timed for ``decoder.ts`` and ``conditional_mean.ts`` as exported. ``--resident-maps`` allocates that many float16 maps on the
device first (the GPU preset keeps the whole split resident) so the peak memory includes them.

``--profile N`` runs ``N`` train steps under ``torch.profiler`` (after the warm-up) and prints the operators
that take the most self time, by operator and by operator and input shape: where a step goes. The profiler's
overhead lengthens every step (222–288 ms profiled against 178 ms timed on 2 CPU cores), so read the shares.

``--compare`` trains, side by side from the same seed, conditional-mean fit and random streams, on the same
training batches of a real dataset, one step of each in turn (so a shared or busy machine slows all alike):
the plain full network (``fast_path=False``, ``lean_finest_grid=False``, the CPU preset's ``block_layers``
of then, ``START_BLOCK_LAYERS``: the configuration the speed work started from), the fast path of that
network (``cbvae_ext.networks.set_fast_path``), the fast path of its lean version (``lean_finest_grid``,
``cbvae_ext.networks.dense3d``) and the preset's own network (``train.yaml``; left out when it is one of
those, which is then marked the default). After ``--maps`` presentations each, it prints each leg's median maps/s over those steps and its
validation ELBO (β = 1, averaged over ``--val-samples`` posterior draws per map), then each leg's ELBO
difference from plain and its speed-up over plain, the default's on the last line. The plain and fast paths
give the same gradients up to rounding, and two trajectories from there part by tens of nats of ELBO within
a few epochs; ``--control`` adds a leg, the plain path from weights perturbed by one part in a million, whose
ELBO difference from plain is that noise floor. ``--candidate DICT`` adds the default network with those
``build_network`` keys (e.g. ``"{'block_layers': [0, 1]}"``), on the fast path. Set the CPU
threads with ``OMP_NUM_THREADS`` (and ``OMP_WAIT_POLICY=PASSIVE`` on a machine shared with other jobs:
threads that spin while waiting make a busy machine several times slower).
"""

from __future__ import annotations

import argparse
import ast
import copy
import os
import resource
import statistics
import sys
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from cbvae_ext.engine.losses import CBVAELoss
from cbvae_ext.engine.step import EvalStep, TrainStep, unwrap
from cbvae_ext.export import trace_conditional_mean, trace_decoder
from cbvae_ext.networks import build_network, count_parameters, preset_config
from cbvae_ext.networks.dense3d import set_fast_path
from cbvae_ext.presets import training_preset
from cbvae_ext.schema import MetadataSchema

__all__ = ["main"]

GRID_4MM = (48, 56, 48)
#: train.yaml's optimiser and objective (the comparison trains as the bundle does, without its schedules).
TRAIN_KW = {"lr": 1e-3, "betas": (0.9, 0.995), "weight_decay": 1e-4}
LOSS_KW = {"free_bits": 32.0, "prior_sigma": 3.0}


def _schema_and_mask(dataset_dir: str | None) -> tuple[MetadataSchema, torch.Tensor]:
    if dataset_dir:
        from cbvae_ext.data import load_dataset_info

        info = load_dataset_info(dataset_dir)
        return info.schema, torch.as_tensor(np.asarray(info.mask) != 0)
    years = np.linspace(1997, 2018, 200)
    schema = MetadataSchema.fit(
        [f"c{i}" for i in range(14)] + ["other"], {"year": years}, topic_names=[f"topic{i}" for i in range(50)]
    )
    return schema, torch.ones(GRID_4MM, dtype=torch.bool)


def _batch(schema: MetadataSchema, shape, n: int, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    meta_mask = (torch.rand(n, schema.mask_dim, generator=gen) > 0.5).float()
    return {
        "image": torch.rand(n, 1, *shape, generator=gen).to(device),
        "meta": torch.randn(n, schema.meta_dim, generator=gen).to(device),
        "meta_mask": meta_mask.to(device),
        "year_bin": torch.randint(-1, max(schema.n_year_bins, 1), (n,), generator=gen).to(device),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _engine(network: torch.nn.Module, mask: torch.Tensor, device: torch.device) -> SimpleNamespace:
    """What ``TrainStep``/``EvalStep`` read of a MONAI engine, with train.yaml's optimiser and loss."""
    return SimpleNamespace(
        network=network,
        optimizer=torch.optim.AdamW(network.parameters(), **TRAIN_KW),
        loss_function=CBVAELoss(mask=mask, **LOSS_KW).to(device),
        state=SimpleNamespace(device=device, iteration=0),
    )


def _steps(settings: dict[str, Any], device: torch.device) -> tuple[TrainStep, str | None, bool]:
    dtype = settings.get("autocast_dtype") if device.type == "cuda" else None
    channels_last = bool(settings.get("channels_last"))  # as the bundle: on CPU too (oneDNN's 3D conv)
    return TrainStep(grad_clip=1.0, autocast_dtype=dtype, channels_last=channels_last), dtype, channels_last


def _place(network: torch.nn.Module, device: torch.device, channels_last: bool) -> torch.nn.Module:
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    return network.to(device=device, memory_format=fmt)


def _val_elbo(engine: SimpleNamespace, loader: Any, step: EvalStep, samples: int, seed: int) -> dict[str, float]:
    """Validation terms at β = 1 (EvalStep: one posterior draw per map), averaged over ``samples`` draws."""
    totals: dict[str, float] = {}
    n = 0
    for s in range(samples):
        torch.manual_seed(seed + s)
        for batch in loader:
            out = step(engine, batch)
            k = len(batch["image"])
            for key in ("loss", "recon", "kl", "imp"):
                totals[key] = totals.get(key, 0.0) + out[key] * k
            n += k
    terms = {key: value / n for key, value in totals.items()}
    terms["neg_elbo"] = terms["recon"] + terms["kl"]
    return terms


def _loader_ms(dataset_dir: str, batch_size: int, device: torch.device) -> dict[bool, float]:
    """ms per training batch of ``make_loader``, memory-mapped (MONAI DataLoader) and resident, interleaved."""
    from cbvae_ext.engine.bundle_glue import make_loader

    loaders = {
        r: make_loader(dataset_dir, "train", batch_size, shuffle=True, resident=r, device=device) for r in (False, True)
    }
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(2):
        for resident, loader in loaders.items():
            start = time.perf_counter()
            n = sum(1 for _ in loader)
            times[resident].append(1000 * (time.perf_counter() - start) / n)
    return {r: min(t) for r, t in times.items()}


def _profile(step: TrainStep, engine: SimpleNamespace, batch: dict[str, torch.Tensor], warmup: int, n: int) -> int:
    """Print the operators with the most self time over ``n`` profiled train steps (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step(engine, batch)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if batch["image"].is_cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(n):
            step(engine, batch)
    print(f"torch.profiler over {n} train steps (self time, all steps together):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=20))
    return 0


def _perturb(network: torch.nn.Module, seed: int, scale: float = 1e-6) -> None:
    """Multiply every parameter by ``1 + scale * N(0, 1)``: a control leg that differs from plain by about rounding."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in network.parameters():
            p.mul_(1.0 + scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


#: ``block_layers`` of the network the speed work started from, per preset, so that plain stays that network
#: when the default changes (today the CPU preset's own); a preset not listed started from its own.
START_BLOCK_LAYERS = {"cpu": [0, 2]}


def start_architecture(preset: str, lean: bool = False) -> dict[str, Any]:
    """``build_network`` keys of the full network the speed work started from (``lean``: without its finest-grid passes)."""
    start = {"block_layers": START_BLOCK_LAYERS[preset]} if preset in START_BLOCK_LAYERS else {}
    return {**start, "lean_finest_grid": lean}


#: ``--compare``'s legs: label, fast path, architecture (``start``: the full network the speed work started
#: from; ``lean``: it without the finest-grid passes; ``default``: the preset's own, ``train.yaml``), perturbed
#: weights. The first is the configuration the speed issue started from; a leg that repeats an earlier one's
#: path and network is left out (the GPU preset's default is its lean network).
LEGS = (
    ("plain (start)", False, "start", False),
    ("fast path", True, "start", False),
    ("fast + lean", True, "lean", False),
    ("default", True, "default", False),
)
CONTROL_LEG = ("plain, perturbed", False, "start", True)


def compare(args: argparse.Namespace, device: torch.device) -> int:
    """Train the legs side by side (see the module docstring); print the default's ratio to plain last."""
    from cbvae_ext.engine.bundle_glue import make_loader
    from cbvae_ext.networks import initialise_from_data

    settings = training_preset(args.preset)
    batch_size = args.batch_size or settings["batch_size"]
    schema, mask = _schema_and_mask(args.dataset_dir)
    train_step, _, channels_last = _steps(settings, device)
    eval_step = EvalStep(CBVAELoss(mask=mask).to(device), train_step.autocast_dtype, channels_last)
    architectures = {"start": start_architecture(args.preset), "lean": start_architecture(args.preset, lean=True)}
    architectures["default"] = {}
    legs_wanted = list(LEGS) + ([CONTROL_LEG] if args.control else [])
    if args.candidate:  # the default network with these build_network keys, on the fast path
        architectures["candidate"] = dict(args.candidate)
        legs_wanted.append(("candidate", True, "candidate", False))
    configs = {key: preset_config(args.preset, schema, tuple(mask.shape), **o) for key, o in architectures.items()}
    bases = {}
    for key, config in configs.items():  # one initialisation per architecture, from the same seed
        torch.manual_seed(args.seed)
        bases[key] = build_network(config)
    print(f"fitting the conditional-mean path on {args.dataset_dir} (shared by every leg) ...", flush=True)
    initialise_from_data(bases["start"], args.dataset_dir, seed=args.seed)
    for net in bases.values():  # the same fit: the path does not depend on the architecture
        net.cond_mean.load_state_dict(bases["start"].cond_mean.state_dict())
    legs, seen = {}, []
    for name, fast, arch, perturbed in legs_wanted:
        if not perturbed and (fast, configs[arch]) in seen:
            print(f"{name}: the same path and network as an earlier leg, left out")
            continue
        seen.append((fast, configs[arch]))
        network = set_fast_path(copy.deepcopy(bases[arch]), fast)
        if perturbed:
            _perturb(network, args.seed)
        network = _place(network, device, channels_last)
        engine = _engine(network, mask, device)
        set_fast_path(engine.loss_function, fast)
        default = fast and configs[arch] == configs["default"] and not perturbed
        legs[name] = SimpleNamespace(engine=engine, default=default, perturbed=perturbed, times=[], rng=None)

    loader = make_loader(args.dataset_dir, "train", batch_size, shuffle=True, seed=args.seed, device=device)
    val = make_loader(args.dataset_dir, "val", batch_size, device=device)
    steps_per_epoch = len(loader)
    n_steps = max(1, -(-args.maps // batch_size))
    params = "  ".join(f"{key} {count_parameters(net):,}" for key, net in bases.items())
    print(
        f"device: {device} ({torch.get_num_threads()} CPU threads, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', 'unset')})  preset: {args.preset}  batch: {batch_size}  "
        f"params: {params}"
    )
    print(
        f"training {len(legs)} legs {n_steps} steps = {n_steps * batch_size} map presentations each "
        f"({n_steps / steps_per_epoch:.1f} epochs of {len(loader.dataset)} training maps), interleaved",
        flush=True,
    )
    done = 0
    torch.manual_seed(args.seed)
    for leg in legs.values():  # the same random streams (condition dropout, posterior draws) in each leg
        leg.rng = torch.get_rng_state()
    while done < n_steps:
        for batch in loader:
            if done == n_steps:
                break
            for leg in legs.values():
                torch.set_rng_state(leg.rng)
                _sync(device)
                start = time.perf_counter()
                train_step(leg.engine, batch)
                _sync(device)
                leg.times.append(time.perf_counter() - start)
                leg.rng = torch.get_rng_state()
                leg.engine.state.iteration += 1
            done += 1
            if done % max(1, n_steps // 10) == 0:
                rates = "  ".join(f"{n}: {batch_size / statistics.median(v.times):.1f}" for n, v in legs.items())
                print(f"  step {done}/{n_steps}  median maps/s  {rates}", flush=True)
    warm = min(args.warmup, n_steps - 1)
    for leg in legs.values():
        leg.rate = batch_size / statistics.median(leg.times[warm:])
        leg.terms = _val_elbo(leg.engine, val, eval_step, args.val_samples, args.seed)
    print(f"\nvalidation after {n_steps * batch_size} presentations ({args.val_samples} draws per map, β = 1):")
    print(f"{'leg':18s} {'maps/s':>8s} {'-ELBO':>10s} {'recon':>10s} {'KL':>8s} {'imp':>7s} {'val loss':>10s}")
    for name, leg in legs.items():
        t = leg.terms
        print(
            f"{name:18s} {leg.rate:8.1f} {t['neg_elbo']:10.1f} {t['recon']:10.1f} {t['kl']:8.2f} {t['imp']:7.3f} "
            f"{t['loss']:10.1f}{'  (default)' if leg.default else ''}"
        )
    loading = _loader_ms(args.dataset_dir, batch_size, device)
    print(
        f"loader, ms per batch (not in the step times): memory-mapped {loading[False]:.1f}, "
        f"resident (--resident true) {loading[True]:.1f}"
    )
    plain, *others = legs.items()
    base = plain[1].terms["neg_elbo"]
    for name, leg in others:
        what = (
            " (the same path, weights x (1 + 1e-6 noise): how far two trajectories part by rounding alone)"
            if leg.perturbed
            else ""
        )
        print(
            f"validation -ELBO, {name} - plain: {leg.terms['neg_elbo'] - base:+.2f} nats/map ({base:.1f} plain){what}"
        )
    n = n_steps - warm
    for name, leg in sorted(others, key=lambda item: item[1].default):  # the default's ratio last
        label = "default" if leg.default else name
        print(f"speed-up ({label} / plain, median over {n} interleaved steps): {leg.rate / plain[1].rate:.2f}x")
    return 0


def _mapping(text: str) -> dict[str, Any]:
    """``--candidate``'s value: a Python literal mapping of ``build_network`` keys."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping such as \"{{'block_layers': [0, 1]}}\", got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dataset-dir", default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--decode-maps", type=int, default=16)
    parser.add_argument("--resident-maps", type=int, default=0)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--plain", action="store_true", help="time the plain full network (--compare's first leg)")
    parser.add_argument("--compare", action="store_true", help="plain, fast and lean legs, trained side by side")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="profile N train steps; print the top ops")
    parser.add_argument(
        "--control", action="store_true", help="--compare: a third leg, plain from weights perturbed by 1e-6"
    )
    parser.add_argument("--maps", type=int, default=1600, help="--compare: map presentations per path")
    parser.add_argument("--val-samples", type=int, default=4, help="--compare: posterior draws per val map")
    parser.add_argument(
        "--candidate",
        type=_mapping,
        default=None,
        metavar="DICT",
        help="--compare: one more leg, the default network with these build_network keys, e.g. \"{'block_layers': [0, 1]}\"",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda requested but no CUDA device is available here", file=sys.stderr)
        return 2
    if args.compare:
        if not args.dataset_dir:
            print(
                "error: --compare trains on a real dataset; pass --dataset-dir (build one with: "
                "python -m cbvae_ext.data build --out DIR --subset 1000)",
                file=sys.stderr,
            )
            return 2
        return compare(args, device)
    torch.manual_seed(0)
    settings = training_preset(args.preset)
    batch_size = args.batch_size or settings["batch_size"]
    schema, mask = _schema_and_mask(args.dataset_dir)
    shape = tuple(mask.shape)
    resident = None
    if args.resident_maps:
        resident = torch.empty((args.resident_maps, 1, *shape), dtype=torch.float16, device=device)

    step, _, channels_last = _steps(settings, device)
    plain = {"fast_path": False, **start_architecture(args.preset)} if args.plain else {}  # the compare's first leg
    network = build_network(preset_config(args.preset, schema, shape, **plain))
    network = _place(network, device, channels_last)
    if args.compile:
        network = torch.compile(network)
    engine = _engine(network, mask, device)
    set_fast_path(engine.loss_function, not args.plain)
    batch = _batch(schema, shape, batch_size, device)
    if args.profile:
        return _profile(step, engine, batch, args.warmup, args.profile)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step(engine, batch)
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step(engine, batch)
    _sync(device)
    train_s = time.perf_counter() - start
    maps_per_s = args.steps * batch_size / train_s

    # decode through TorchScript, one map at a time (the app's use)
    model = unwrap(network).eval().to("cpu").float()
    z = torch.randn(1, model.latent_size)
    m = model.decoder_input(batch["meta"][:1].cpu(), batch["meta_mask"][:1].cpu(), None)
    decoder = trace_decoder(model, m.shape[1])  # exactly what decoder.ts holds
    with torch.no_grad():
        for _ in range(2):
            decoder(z, m)
        start = time.perf_counter()
        for _ in range(args.decode_maps):
            decoder(z, m)
        decode_ms = 1000 * (time.perf_counter() - start) / args.decode_maps
        cond_mean = trace_conditional_mean(model, m.shape[1])
        cond_mean(m)
        start = time.perf_counter()
        for _ in range(args.decode_maps):
            cond_mean(m)
        cond_mean_ms = 1000 * (time.perf_counter() - start) / args.decode_maps

    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} "
          f"({torch.get_num_threads()} CPU threads)")  # fmt: skip
    path = "plain full network" if args.plain else "default network (fast path)"
    print(f"preset: {args.preset}  grid: {shape}  batch: {batch_size}  params: {count_parameters(model):,}  {path}")
    print(f"train step: {maps_per_s:.1f} maps/s  ({1000 * train_s / args.steps:.1f} ms/step, {args.steps} steps)")
    print(f"decode (TorchScript, CPU, batch 1): {decode_ms:.1f} ms/map")
    print(f"conditional mean (TorchScript, CPU, batch 1): {cond_mean_ms:.1f} ms/map")
    print(f"peak RSS: {rss_gb:.2f} GB")
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 1024**3
        extra = f" including {args.resident_maps} resident float16 maps" if resident is not None else ""
        print(f"peak GPU memory: {peak:.2f} GB{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
