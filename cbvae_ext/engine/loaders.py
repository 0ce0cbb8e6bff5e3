"""Batches drawn from tensors already resident on the device (GPU preset: no DataLoader, no host copies)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from cbvae_ext.errors import CbvaeError

__all__ = ["LoaderError", "ResidentBatches"]


class LoaderError(CbvaeError, ValueError):
    """A split or batch size the loader cannot serve."""


class ResidentBatches:
    """Iterate over ``dict`` batches sliced from device tensors, reshuffled each epoch, sharded per rank.

    The permutation depends only on ``seed`` and the epoch counter, so every DDP rank draws the same
    permutation and keeps its own ``rank::world_size`` share (like ``DistributedSampler``).

    Args:
        tensors: equal-length tensors keyed like the dataset items (``image``, ``meta``, ...).
        batch_size: maps per batch.
        shuffle: reshuffle each epoch.
        drop_last: drop the final incomplete batch.
        seed: base seed of the permutation.
        rank: this process's rank.
        world_size: number of processes.

    Raises:
        ValueError: empty or ragged tensors, or a non-positive batch size.
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        lengths = {k: len(v) for k, v in tensors.items()}
        if not lengths or len(set(lengths.values())) != 1 or 0 in lengths.values():
            raise LoaderError(f"ResidentBatches needs non-empty tensors of one length, got lengths {lengths}")
        if batch_size < 1:
            raise LoaderError(f"batch_size must be >= 1, got {batch_size}")
        self.tensors = dict(tensors)
        self.n = next(iter(lengths.values()))
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def _indices(self) -> torch.Tensor:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=gen)
        else:
            order = torch.arange(self.n)
        # pad by repeating the first rows so every rank gets the same number of rows (and of batches):
        # an extra batch on one rank would leave DDP's all-reduce waiting forever, as DistributedSampler
        # (even_divisible) avoids the same way
        padded = torch.cat([order, order[: self._per_rank * self.world_size - self.n]])
        return padded[self.rank :: self.world_size]

    @property
    def _per_rank(self) -> int:
        return -(-self.n // self.world_size)

    def __len__(self) -> int:
        n = self._per_rank
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = self._indices()
        self.epoch += 1
        device = next(iter(self.tensors.values())).device
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size].to(device)
            yield {k: v.index_select(0, idx) for k, v in self.tensors.items()}
