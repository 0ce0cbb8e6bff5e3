"""Benchmark: maps/s of a full C-β-VAE train step and TorchScript decode ms/map (prints figures, asserts nothing).

    python scripts/bench_train.py --preset cpu --device cpu [--dataset-dir OUT]
    python scripts/bench_train.py --preset gpu --device cuda --resident-maps 11500

Without ``--dataset-dir`` the maps are random in [0, 1] on the 4 mm grid (48 x 56 x 48) with a synthetic
schema of the production layout (4 continuous fields, 50 topics, 15 categories): speed does not depend on
the values. Decoding is timed for ``decoder.ts`` and ``conditional_mean.ts`` as exported. ``--resident-maps`` allocates that many float16 maps on the
device first (the GPU preset keeps the whole split resident) so the peak memory includes them.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

from cbvae_ext.engine.losses import CBVAELoss
from cbvae_ext.engine.step import TrainStep
from cbvae_ext.engine.workflow import training_preset
from cbvae_ext.export import trace_conditional_mean, trace_decoder
from cbvae_ext.networks import build_network, count_parameters, preset_config
from cbvae_ext.schema import MetadataSchema

__all__ = ["main"]

GRID_4MM = (48, 56, 48)


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
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda requested but no CUDA device is available here", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    settings = training_preset(args.preset)
    batch_size = args.batch_size or settings["batch_size"]
    schema, mask = _schema_and_mask(args.dataset_dir)
    shape = tuple(mask.shape)
    resident = None
    if args.resident_maps:
        resident = torch.empty((args.resident_maps, 1, *shape), dtype=torch.float16, device=device)

    network = build_network(preset_config(args.preset, schema, shape)).to(device)
    if settings["channels_last"] and device.type == "cuda":
        network = network.to(memory_format=torch.channels_last_3d)
    if args.compile:
        network = torch.compile(network)
    engine = SimpleNamespace(
        network=network,
        optimizer=torch.optim.AdamW(network.parameters(), lr=1e-3, betas=(0.9, 0.995)),
        loss_function=CBVAELoss(mask=mask).to(device),
        state=SimpleNamespace(device=device, iteration=0),
    )
    dtype = settings["autocast_dtype"] if device.type == "cuda" else None
    step = TrainStep(
        grad_clip=1.0, autocast_dtype=dtype, channels_last=settings["channels_last"] and device.type == "cuda"
    )
    batch = _batch(schema, shape, batch_size, device)
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
    from cbvae_ext.engine.step import unwrap

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
    print(f"preset: {args.preset}  grid: {shape}  batch: {batch_size}  params: {count_parameters(model):,}")
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
