"""Deterministic, resumable, DDP-exact sampling and the DataLoader factory.

The global sample stream
------------------------
Training reads one infinite *global stream* of dataset indices: epoch ``e`` is a permutation of
``range(N)`` seeded by ``(seed, e)`` and the epochs are concatenated, so global position ``g`` is sample
``perm_e[i]`` with ``e, i = divmod(g, N)``. Batches may straddle epoch boundaries: nothing is dropped or
repeated, whatever ``N`` and the batch size are. Each element also carries
``sample_seed(seed, e, i)``, which drives all of that sample's augmentation (see ``SegDataset``); it
depends only on the global position, never on rank, world size, worker or batch size.

Sharding (world size W, per-rank batch b, global batch B = W*b)
--------------------------------------------------------------
Rank ``r`` takes global positions ``r, r+W, r+2W, ...`` (every W-th element). Hence:

* rank r's k-th batch = global positions ``{k*B + r + W*j : j = 0..b-1}``;
* the union over ranks of their k-th batches = global positions ``[k*B, (k+1)*B)`` = exactly the k-th
  batch of a single process run with batch ``B``, same samples *and* same augmentations;
* element order: single-process batch k element ``W*j + r`` is rank r's batch k element ``j``. Concatenating
  the ranks' batches (``all_gather`` + ``cat``) gives the same *set* in interleaved order; to recover the
  single-process order exactly use ``torch.stack(gathered, dim=1).flatten(0, 1)``. A mean loss / averaged
  gradient does not depend on the order.

Striding (rather than giving each rank a contiguous block of the global batch) means the sampler never
needs to know the batch size, so the guarantee holds for any b.

Resuming: ``start`` is the number of samples this rank has already consumed (``iterations * b``); the
stream continues at global position ``start*W + r`` exactly where it stopped, mid-epoch included.

Augmentation pool (``augment_pool = K > 0``, config ``data.augment_pool``)
--------------------------------------------------------------------------
By default (K = 0) every epoch draws fresh augmentations. With K > 0 image ``i`` only ever gets one of K fixed
views, with seeds ``view_seed(pool_seed, i, j)`` for ``j`` in ``range(K)`` (``pool_seed`` = the sampler seed
unless given): in epoch ``e`` it gets view ``pool_choice(seed, i, e, K)``, which shows every view exactly once
in each block of K consecutive epochs, in a per-image, per-block pseudo-random order. The whole run then sees
at most N*K distinct samples, which is what makes teacher outputs cacheable (``c2vkd cache-teacher``).
K = 1 gives one fixed view per image (no augmentation across epochs). The order of the samples (the epoch
permutations) is unchanged, and everything above (DDP, resume) still holds: the stream is still a pure
function of ``(seed, epoch, position)``.
"""
from __future__ import annotations

import random
import signal
from typing import Iterator, Sized

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from c2vkd.data.base import seg_collate
from c2vkd.data.workers import TrackedDataLoader

_M64 = (1 << 64) - 1
_TAG_PERM = 0x5045524D  # "PERM": domain tags keep permutation and augmentation seeds independent
_TAG_SAMPLE = 0x53414D50  # "SAMP"
_TAG_VIEW = 0x56494557  # "VIEW": seeds of the augmentation pool's views
_TAG_PICK = 0x5049434B  # "PICK": which pool view an image gets in an epoch


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def mix_seed(*parts: int) -> int:
    """Hash integers to a 63-bit seed (splitmix64 chain): stable across processes, Python and torch versions."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _M64))
    return h >> 1


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """Augmentation seed of the sample at ``position`` of epoch ``epoch``'s permutation."""
    return mix_seed(seed, _TAG_SAMPLE, epoch, position)


def view_seed(pool_seed: int, index: int, view: int) -> int:
    """Augmentation seed of view ``view`` (0 <= view < K) of image ``index`` in an augmentation pool."""
    return mix_seed(pool_seed, _TAG_VIEW, index, view)


def pool_choice(seed: int, index: int, epoch: int, pool: int) -> int:
    """Which of the ``pool`` views image ``index`` gets in epoch ``epoch``.

    Epochs are grouped in blocks of ``pool``; within a block every view appears exactly once, in an order
    given by a Fisher-Yates shuffle seeded by ``(seed, index, block)`` (splitmix64, so it is stable across
    Python/torch versions)."""
    if pool < 1:
        raise ValueError(f"pool must be >= 1, got {pool}")
    block, slot = divmod(epoch, pool)
    order = list(range(pool))
    for i in range(pool - 1, 0, -1):
        k = mix_seed(seed, _TAG_PICK, index, block, i) % (i + 1)
        order[i], order[k] = order[k], order[i]
    return order[slot]


def check_augment_pool(value: object, where: str = "data.augment_pool") -> int:
    """Validate an augmentation pool size (an int >= 0) and return it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where} must be an integer >= 0 (0 = fresh augmentation every epoch), got {value!r}")
    return value


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """Order of the dataset in epoch ``epoch`` (identity when not shuffling)."""
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed(mix_seed(seed, _TAG_PERM, epoch))
    return torch.randperm(n, generator=g)


def _length(data: Sized | int) -> int:
    return data if isinstance(data, int) else len(data)


class TrainSampler(Sampler[tuple[int, int]]):
    """Infinite sampler yielding ``(index, sample_seed)`` for one rank (see the module docstring).

    It has no ``len``: training is iteration-based, so a DataLoader over it is endless. ``augment_pool``
    (K > 0) restricts each image to K fixed augmentation views seeded by ``pool_seed`` (default ``seed``);
    see the module docstring.
    """

    def __init__(
        self,
        data: Sized | int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        shuffle: bool = True,
        augment_pool: int = 0,
        pool_seed: int | None = None,
    ) -> None:
        self.n = _length(data)
        if self.n <= 0:
            raise ValueError("TrainSampler needs a non-empty dataset")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.seed, self.rank, self.world_size, self.start, self.shuffle = int(seed), rank, world_size, start, shuffle
        self.augment_pool = check_augment_pool(augment_pool, "augment_pool")
        self.pool_seed = self.seed if pool_seed is None else int(pool_seed)

    def seed_at(self, index: int, epoch: int, position: int) -> int:
        """Augmentation seed of dataset item ``index`` at ``position`` of epoch ``epoch``."""
        if self.augment_pool == 0:
            return sample_seed(self.seed, epoch, position)
        return view_seed(self.pool_seed, index, pool_choice(self.seed, index, epoch, self.augment_pool))

    def global_position(self, k: int) -> int:
        """Global stream position of this rank's k-th sample (k counts from 0, not from ``start``)."""
        return k * self.world_size + self.rank

    def locate(self, global_position: int) -> tuple[int, int]:
        """``(epoch, position in that epoch)`` of a global stream position."""
        return divmod(global_position, self.n)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = self.global_position(self.start)
        epoch, pos = self.locate(g)
        perm = epoch_permutation(self.n, self.seed, epoch, self.shuffle).tolist()
        while True:
            yield perm[pos], self.seed_at(perm[pos], epoch, pos)
            pos += self.world_size
            while pos >= self.n:  # world_size may exceed n on tiny datasets: skip whole epochs if needed
                pos -= self.n
                epoch += 1
                perm = epoch_permutation(self.n, self.seed, epoch, self.shuffle).tolist()

    def __repr__(self) -> str:
        return (
            f"TrainSampler(n={self.n}, seed={self.seed}, rank={self.rank}, world_size={self.world_size}, "
            f"start={self.start}, shuffle={self.shuffle}, augment_pool={self.augment_pool})"
        )


class ShardedEvalSampler(Sampler[int]):
    """Rank r evaluates indices ``r, r+W, ...`` - every sample exactly once over all ranks, no padding
    duplicates (so ranks may get one sample more or less: sum confusion matrices, do not run per-batch
    collectives in evaluation)."""

    def __init__(self, data: Sized | int, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.n, self.rank, self.world_size = _length(data), rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


def seed_worker(worker_id: int) -> None:
    """Seed numpy/random in each worker from torch's per-worker seed.

    Our augmentations never use these global RNGs (everything comes from the sample seed), but any
    third-party code that does should not get identical streams in every worker.
    """
    s = torch.initial_seed()
    np.random.seed(s % 2**32)
    random.seed(s)


def init_worker(worker_id: int) -> None:
    """``worker_init_fn`` of every loader: :func:`seed_worker`, then SIGTERM ignored in the worker.

    A scheduler's group kill (Slurm's scancel, ``kill -- -PGID``, ``pkill -f``) sends SIGTERM to the workers as
    well as to the main process. torch's worker handler dies on a SIGTERM from anyone but its parent, and the
    main process then fails on "DataLoader worker ... killed by signal" before the trainer's checkpoint-and-stop
    (engine/failures.py ``StopSignals``) can run. Ignored here, the main process alone decides: it finishes the
    step, checkpoints, and shuts the workers down through the loader's done event (a worker whose parent has
    gone also exits on its own: torch's watchdog). SIGINT (Ctrl-C to the terminal's group) needs nothing: a
    worker already leaves quietly on it. SIGKILL still kills.
    """
    seed_worker(worker_id)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_dataloader(
    dataset: Dataset,
    *,
    batch_size: int,
    train: bool,
    seed: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start_sample: int = 0,
    drop_last: bool = True,
    augment_pool: int = 0,
    pool_seed: int | None = None,
) -> DataLoader:
    """DataLoader for one rank.

    * train: endless, over :class:`TrainSampler` (yields ``(index, sample_seed)`` keys); ``start_sample`` =
      samples this rank already consumed (iterations done * batch_size) for an exact resume. Batches are
      always full (the stream never ends), so ``drop_last`` has no effect here. ``augment_pool`` /
      ``pool_seed``: see :class:`TrainSampler`.
    * eval: finite, sequential, sharded by :class:`ShardedEvalSampler` when ``world_size > 1``. Evaluation
      never drops samples: ``drop_last`` is ignored.

    Batches are dicts from :func:`seg_collate` (``image``, ``label``, ``name``, ``image_size``,
    ``label_size``); differently sized eval images are padded (image 0, label 255).
    """
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if int(num_workers) < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers!r}")
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError(f"cannot build a DataLoader over an empty dataset ({dataset!r})")
    sampler: Sampler
    if train:
        sampler = TrainSampler(len(dataset), seed=seed, rank=rank, world_size=world_size,  # type: ignore[arg-type]
                               start=start_sample, augment_pool=augment_pool, pool_seed=pool_seed)
    else:
        sampler = ShardedEvalSampler(len(dataset), rank, world_size)  # type: ignore[arg-type]
    kwargs: dict = {}
    if num_workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=2)
    return TrackedDataLoader(  # data/workers.py: its workers are shut down even when a run dies
        dataset,
        batch_size=int(batch_size),
        sampler=sampler,
        drop_last=bool(drop_last) if train else False,
        num_workers=int(num_workers),
        collate_fn=seg_collate,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=init_worker,
        # A private generator for the workers' base seed: otherwise creating the iterator draws from
        # the global torch RNG and silently shifts everything seeded after it (e.g. model init).
        generator=torch.Generator().manual_seed(mix_seed(seed, rank)),
        **kwargs,
    )
