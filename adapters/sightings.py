"""Whether a new example is learned by its last sightings, checked after every step.

With `new_passes` passes over the domain's examples an epoch, an example is learned when
every deciding token (adapters/data.py `Tokenised.decides`) was under the bar at each of its
sightings of the epoch. Judged at the epoch's end only, a run whose last examples were
learned early in its final epoch still trained the rest of it; `LastSightings` keeps each
example's worst deciding loss at its last `k` sightings (across epochs), so the run can stop
at the first step after which every example has `k` good ones in a row: at an epoch's end
the same verdict as the epoch's own sightings, before it the same number of good ones.
"""

from __future__ import annotations

from collections import deque

import torch


class LastSightings:
    def __init__(self, examples: int, k: int) -> None:
        self.k = k
        self.seen: list[deque[float]] = [deque(maxlen=k) for _ in range(examples)]

    def add(self, rows: torch.Tensor, owners: torch.Tensor, losses: torch.Tensor, ids) -> None:
        """One step's deciding-token losses, each with its row in the step and its owner
        (a position in the epoch's example list; `ids[owner]` is the new example's index,
        owners past `ids` are not new examples). An example once in a row is one sighting."""
        if not len(losses):
            return
        width = int(owners.max()) + 1
        worst = torch.full(((int(rows.max()) + 1) * width,), -1.0)
        worst.scatter_reduce_(0, rows * width + owners, losses, "amax")
        for key in (worst >= 0).nonzero().flatten().tolist():
            owner = key % width
            if owner < len(ids):
                self.seen[ids[owner]].append(float(worst[key]))

    def learned(self, i: int, bar: float) -> bool:
        last = self.seen[i]
        return len(last) == self.k and max(last) < bar
