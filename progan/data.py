"""Training data order as a pure function of images shown, for exact mid-phase resume.

The global stream of sample indices is epoch after epoch of seeded permutations of the
dataset. The global batch that starts at images-shown position `s` is stream[s : s + B],
and rank r takes its contiguous share. A run resumed at any position therefore reads
exactly the batches the uninterrupted run would have, every batch is full (no batch of 1
reaches minibatch-stddev), and ranks never overlap within a batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class PositionSampler(Sampler[list[int]]):
    """Batch sampler yielding this rank's index lists from `start_images` on, forever."""

    def __init__(
        self,
        dataset_len: int,
        global_batch: int,
        start_images: int = 0,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        if dataset_len < 1:
            raise ValueError("the dataset is empty")
        if global_batch % world_size:
            raise ValueError(
                f"global batch {global_batch} is not divisible by {world_size} workers"
            )
        self.n, self.batch, self.start = dataset_len, global_batch, start_images
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.local = global_batch // world_size
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def index_tensor(self, images_shown: int) -> torch.Tensor:
        """This rank's indices for the global batch starting at `images_shown` (int64, CPU).

        Stream positions k map to permutation(k // n)[k % n]; a batch spans at most a few
        epochs, each gathered at once.
        """
        first = images_shown + self.rank * self.local
        positions = torch.arange(first, first + self.local)
        out = torch.empty(self.local, dtype=torch.long)
        for epoch in range(first // self.n, (first + self.local - 1) // self.n + 1):
            mask = (positions // self.n) == epoch
            out[mask] = self._permutation(epoch)[positions[mask] % self.n]
        return out

    def indices_at(self, images_shown: int) -> list[int]:
        """This rank's indices for the global batch starting at `images_shown`."""
        return self.index_tensor(images_shown).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start
        while True:
            yield self.indices_at(position)
            position += self.batch

    def index_tensors(self) -> Iterator[torch.Tensor]:
        """The same batches as `__iter__`, as int64 CPU tensors."""
        position = self.start
        while True:
            yield self.index_tensor(position)
            position += self.batch


def level_bytes(dataset: Dataset) -> int:
    """Bytes of every image of `dataset` held at once (its first image's size times its length)."""
    first = dataset[0]
    return len(dataset) * first.numel() * first.element_size()


def load_level(dataset: Dataset, device: torch.device, num_workers: int = 0) -> torch.Tensor:
    """Every image of `dataset` stacked into one tensor on `device`, read once in order."""
    loader = DataLoader(dataset, batch_size=256, num_workers=num_workers)
    parts = [batch.to(device) for batch in loader]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def gathered_batches(images: torch.Tensor, sampler: PositionSampler) -> Iterator[torch.Tensor]:
    """`sampler`'s batches gathered from `images` where they lie (no copy through the host).

    On CUDA each index tensor goes up through pinned memory without waiting for the device.
    """
    for indices in sampler.index_tensors():
        if images.device.type == "cuda":
            indices = indices.pin_memory().to(images.device, non_blocking=True)
        yield images.index_select(0, indices)
