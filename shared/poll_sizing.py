"""How many records the projection runner's next batch may hold (issue 16, "Poll sizing").

A record waits for the batch in front of it and then for its own, so a batch that takes
longer than half the latency budget makes the records behind it miss the budget. While
the projector keeps up, batches are therefore cut at what the measured pace applies in
half the budget. Once more records wait than such a batch holds, the newest of them will
miss the budget whatever the batch size; then the largest batches (the runner's ceiling,
`CARGOTRACK_PROJECTOR_MAX_RECORDS`) drain the backlog fastest, because each batch has a
fixed cost (a transaction, state loads, a commit) that a larger batch shares out.

Pure: no clock and no I/O. The runner reports each committed batch (`observe`) and
asks before each poll (`limit`).
"""

from __future__ import annotations


class PollSizer:
    """The record limit of the next poll, from a latency budget and the observed pace.

    `budget_s` None means no budget: every poll may take `ceiling` records (the
    behaviour without sizing). `floor` is the smallest limit (a batch must make
    progress); `ceiling` the largest (it bounds memory).
    """

    def __init__(self, budget_s: float | None, ceiling: int, floor: int = 1) -> None:
        if ceiling < 1 or not 1 <= floor <= ceiling:
            raise ValueError(f"need 1 <= floor ({floor}) <= ceiling ({ceiling})")
        if budget_s is not None and budget_s <= 0:
            raise ValueError(f"the latency budget must be positive, not {budget_s}")
        self.budget_s = budget_s
        self.ceiling = ceiling
        self.floor = floor
        #: Records a batch may hold to be applied within half the budget, as last
        #: estimated. Starts at the ceiling: the first batches measure the pace.
        self.fits = ceiling

    @property
    def target_s(self) -> float | None:
        """How long one batch may take: half the budget (a record waits for the batch
        in front of it, then for its own)."""
        return None if self.budget_s is None else self.budget_s / 2

    def limit(self, waiting: int) -> int:
        """Most records the next poll may take, with `waiting` records not yet applied
        beyond those already in hand (the consumer lag less the batches in flight).

        Keeping up (`waiting` at most `fits`): `fits`. Catching up: the ceiling.
        """
        if self.budget_s is None or waiting > self.fits:
            return self.ceiling
        return self.fits

    def observe(self, records: int, seconds: float) -> None:
        """A batch of `records` was applied and committed in `seconds`.

        Too slow for the target: `fits` shrinks to the records this batch's pace
        applies in the target (a smaller batch is faster by its per-record part, so
        repeated observations converge on the size that fits). A batch that filled
        the limit and finished within the target lets `fits` grow, at most doubling
        per batch. A batch below the limit that was fast says nothing about larger
        ones and changes nothing.
        """
        target = self.target_s
        if target is None or records <= 0:
            return
        at_pace = records * target / seconds if seconds > 0 else float("inf")
        if seconds > target:
            self.fits = max(self.floor, min(self.fits, int(at_pace)))
        elif records >= self.fits:
            grown = min(at_pace, 2.0 * self.fits)
            self.fits = min(self.ceiling, max(self.fits, int(grown)))
