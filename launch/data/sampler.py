"""Distributed, resumable sampler that never pads with duplicate samples.

Per epoch, the indices ``0..N-1`` are shuffled with a generator seeded by
``seed + epoch`` (every rank computes the same order). The order is cut into
global steps of ``num_replicas * batch_size`` indices; inside a full step rank
``r`` takes the ``r``-th block of ``batch_size``. The last, incomplete step is
split as evenly as possible (block sizes differ by at most one), so ranks may
get unequal counts but every index is used at most once per epoch.

No per-rank batch of ONE sample: with ``batch_size > 1`` the last, incomplete
step is dropped when it cannot give every rank at least 2 samples (fewer than
``2 * num_replicas`` left). A batch of one sample crashes BatchNorm in
training ("Expected more than 1 value per channel"), and dropping the whole
step keeps every rank's number of batches equal. At most
``2 * num_replicas - 1`` samples are skipped per epoch (e.g. the 17th of 17
with batch 8, one or two ranks); ``batch_size=1`` (round robin) uses every index.

Because each global step is a contiguous slice of the epoch order, "how many
samples were consumed" is a single global number (``steps * global batch``,
whatever the world size). ``state_dict()`` stores it with the epoch, and a run
resumed with ``load_state_dict()`` — possibly with another world size or batch
size — yields exactly the remaining indices of that epoch.

Usage in a training loop::

    sampler = ShardedSampler(len(ds), world, rank, batch_size=B, seed=0)
    loader = DataLoader(ds, batch_size=B, sampler=sampler)
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)             # keeps a loaded mid-epoch position
        for x, y in loader:
            ...
            sampler.advance(global_batch)    # samples consumed by all ranks
            ckpt["sampler"] = sampler.state_dict()
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Optional

import torch
from torch.utils.data import Sampler


class ShardedSampler(Sampler[int]):
    """Split a seeded per-epoch permutation across ranks without padding.

    Args:
        num_samples: data set size N (or pass a sized data set).
        num_replicas: world size (default: ``torch.distributed`` world size, else 1).
        rank: this rank (default: ``torch.distributed`` rank, else 0).
        batch_size: per-rank batch size used to lay out global steps (1 gives a
            plain round-robin split).
        shuffle: shuffle each epoch (else the natural order).
        seed: base seed; epoch ``e`` uses ``seed + e``.
        drop_last: drop the final incomplete global step, so every rank gets
            only full batches (those samples are skipped this epoch). Even
            without it, an incomplete step that would give a rank a single
            sample is dropped (when ``batch_size > 1``; see the module docstring).
    """

    def __init__(
        self,
        num_samples: Any,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
        batch_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        n = num_samples if isinstance(num_samples, int) else len(num_samples)
        if num_replicas is None or rank is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            num_replicas = num_replicas if num_replicas is not None else (
                dist.get_world_size() if ready else 1)
            rank = rank if rank is not None else (dist.get_rank() if ready else 0)
        if n < 0 or num_replicas < 1 or not 0 <= rank < num_replicas or batch_size < 1:
            raise ValueError(f"bad sampler arguments: N={n}, world={num_replicas}, "
                             f"rank={rank}, batch_size={batch_size}")
        self.num_samples = n
        self.num_replicas = num_replicas
        self.rank = rank
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.consumed = 0  # samples of this epoch consumed by all ranks together
        self._start = 0  # epoch offset the next iteration starts at

    # ------------------------------------------------------------------ order
    def epoch_order(self, epoch: Optional[int] = None) -> torch.Tensor:
        """The global index order (int64 (N,)) of an epoch, same on every rank."""
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=g)

    def _bounds(self, start: int) -> tuple:
        """[(lo, hi) slices of the epoch order for this rank], from offset ``start``."""
        remaining = self.num_samples - start
        step = self.num_replicas * self.batch_size
        full, rest = divmod(remaining, step)
        spans = [(start + k * step + self.rank * self.batch_size,
                  start + k * step + (self.rank + 1) * self.batch_size) for k in range(full)]
        if self._keeps_incomplete(rest):
            base, extra = divmod(rest, self.num_replicas)
            lo = start + full * step + self.rank * base + min(self.rank, extra)
            hi = lo + base + (1 if self.rank < extra else 0)
            if hi > lo:
                spans.append((lo, hi))
        return tuple(spans)

    def _keeps_incomplete(self, rest: int) -> bool:
        """Whether a last, incomplete step of ``rest`` samples is used: not with
        ``drop_last``, nor when it would leave a rank a batch of one sample (or
        none) while batches are meant to be larger."""
        singles = self.batch_size > 1 and rest < 2 * self.num_replicas
        return rest > 0 and not self.drop_last and not singles

    def steps_left(self) -> int:
        """Global steps this epoch still yields from position ``consumed`` (the same
        number on every rank): full steps, plus one for a used incomplete step."""
        full, rest = divmod(self.num_samples - self.consumed, self.num_replicas * self.batch_size)
        return full + int(self._keeps_incomplete(rest))

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order()
        for lo, hi in self._bounds(self._start):
            yield from order[lo:hi].tolist()

    def __len__(self) -> int:
        """Number of indices this rank yields in the current (remaining) epoch."""
        return sum(hi - lo for lo, hi in self._bounds(self._start))

    # ------------------------------------------------------------------ progress
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate. A different epoch starts at its beginning;
        the current one (e.g. just loaded from a checkpoint) keeps its offset."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.consumed = 0
            self._start = 0

    def advance(self, num_samples: int) -> None:
        """Record that all ranks together consumed ``num_samples`` more samples
        of this epoch (normally the global batch size after each step)."""
        self.consumed = min(self.num_samples, self.consumed + int(num_samples))

    def state_dict(self) -> Dict[str, int]:
        """{epoch, consumed (global samples used this epoch), seed, num_samples}."""
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed,
                "num_samples": self.num_samples}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Resume: the next iteration yields this rank's share of the epoch's
        samples from position ``consumed`` on (any world size / batch size)."""
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(f"sampler state is for {state['num_samples']} samples, "
                             f"this data set has {self.num_samples}")
        consumed = int(state["consumed"])
        if not 0 <= consumed <= self.num_samples:
            raise ValueError(f"bad consumed count {consumed}")
        self.seed = int(state.get("seed", self.seed))
        self.epoch = int(state["epoch"])
        self.consumed = consumed
        self._start = consumed
