"""Distributed evaluation: cook under ``torchrun``, each rank tasting a shard of the held-out data.

Launch a cook with torchrun, on one node or many (the launcher is torchrun's own)::

    torchrun --nproc-per-node 4 -m modelsoup.cli cook soup.yaml

Every rank opens the same ingredients and walks the same recipes. A built-in
classifier evaluator runs only its rank's share of the cached batches (batch ``i`` on
rank ``i % world_size``); the logits are then gathered back in the original example
order. Every rank therefore scores every candidate from exactly the logits one process
would have computed: the same scores, bit for bit, and the same accept/reject
decisions. Any other evaluator runs in full on every rank and rank 0's score is used.

Rank 0 alone reads and writes the journal and writes the soups and the report; each
journal look-up is answered by rank 0 for all ranks, so they all skip the same
evaluations. A collective that does not finish within ``timeout_s`` (a rank crashed,
hung or was killed) ends the run with an :class:`~modelsoup.errors.EvaluationError`
rather than a hang.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import copy
import datetime
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from modelsoup.errors import ConfigError, EvaluationError
from modelsoup.evaluators import ClassifierEvaluator, Evaluator
from modelsoup.journal import Journal

T = TypeVar("T")

#: set by :func:`one_process`: cook in this process alone, whatever group is live
_ALONE: contextvars.ContextVar[bool] = contextvars.ContextVar("modelsoup_alone", default=False)


@contextlib.contextmanager
def one_process() -> Iterator[None]:
    """Within it, a cook runs in this process alone even inside a multi-process job.

    A training callback on rank 0 cooks while the other ranks wait: its cook must not
    look for them (they are not cooking), nor start a process group of its own.

    Example:
        >>> with one_process():
        ...     launched_distributed(), init_distributed() is None
        (False, True)
    """
    token = _ALONE.set(True)
    try:
        yield
    finally:
        _ALONE.reset(token)


def launched_distributed() -> bool:
    """True when this process is one of several ranks (torchrun's env, or a live group).

    Example:
        >>> launched_distributed()  # a plain python process
        False
    """
    if _ALONE.get():
        return False
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


class DistContext:
    """This rank's place in the group, and the few collectives a cook needs.

    Built by :func:`init_distributed`; the constructor itself starts nothing, so the
    bookkeeping can be shown in one process.

    Example:
        >>> ctx = DistContext(rank=1, world_size=3)
        >>> list(ctx.positions(7)), ctx.is_main
        ([1, 4], False)
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        *,
        timeout_s: float = 600.0,
        device: torch.device | None = None,
        owns_group: bool = False,
    ):
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        #: where tensors travel: CPU for gloo, this rank's GPU for NCCL
        self.device = device or torch.device("cpu")
        self.owns_group = owns_group
        self._shared: list[ClassifierEvaluator] = []

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files."""
        return self.rank == 0

    def positions(self, count: int) -> range:
        """The batch positions this rank evaluates, out of ``count``."""
        return range(self.rank, count, self.world_size)

    # -- collectives ----------------------------------------------------------------
    def _collective(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except RuntimeError as err:  # gloo and NCCL report timeouts and lost peers this way
            cause = str(err).strip().splitlines()[0][:200] if str(err).strip() else "no detail"
            # The group is unusable now; tearing it down lets the process exit cleanly
            # (a live gloo group at interpreter exit can abort instead of exiting).
            self.close()
            raise EvaluationError(
                f"rank {self.rank} of {self.world_size}: another rank stopped responding within "
                f"{self.timeout_s:g} s while {what} (it crashed, hung or was killed; see its log; "
                f"backend said: {cause}); re-run: the journal resumes"
            ) from err

    def gather(self, parts: Mapping[int, torch.Tensor], count: int) -> torch.Tensor:
        """Concatenate every rank's per-batch outputs in batch order (0 .. ``count``-1).

        ``parts`` maps this rank's batch positions to their outputs. Shapes are exchanged
        first, so batches may differ in size and a rank may have none.
        """
        mine = {i: (tuple(t.shape), t.dtype) for i, t in parts.items()}
        table: list[Any] = [None] * self.world_size
        self._collective("exchanging output shapes", lambda: dist.all_gather_object(table, mine))
        dtypes = [d for m in table for _, d in m.values()]
        dtype = dtypes[0] if dtypes else torch.float32
        order = sorted(parts)
        flat = (
            torch.cat([parts[i].reshape(-1).to(dtype) for i in order])
            if order
            else torch.empty(0, dtype=dtype)
        )
        sizes = [sum(math.prod(s) for s, _ in m.values()) for m in table]
        # all_gather wants equal sizes: pad every rank's buffer to the longest
        send = torch.zeros(max(sizes), dtype=dtype, device=self.device)
        send[: flat.numel()] = flat.to(self.device)
        recv = [torch.empty_like(send) for _ in range(self.world_size)]
        self._collective("gathering outputs", lambda: dist.all_gather(recv, send))
        pieces: list[torch.Tensor | None] = [None] * count
        for r, m in enumerate(table):
            offset = 0
            for i in sorted(m):
                shape = m[i][0]
                n = math.prod(shape)
                pieces[i] = recv[r][offset : offset + n].reshape(shape).cpu()
                offset += n
        missing = [i for i, p in enumerate(pieces) if p is None]
        if missing:
            raise EvaluationError(
                f"rank {self.rank}: no rank evaluated batch {missing[0]}; every rank must hold "
                "the same evaluation data"
            )
        return torch.cat(pieces)

    def sum_all(self, values: Sequence[float], what: str) -> list[float]:
        """Element-wise sums of ``values`` over every rank (float64)."""
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        self._collective(what, lambda: dist.all_reduce(t))
        return t.cpu().tolist()

    def broadcast(self, obj: T, what: str) -> T:
        """Rank 0's ``obj`` on every rank (any picklable object)."""
        box = [obj if self.is_main else None]
        self._collective(what, lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    # -- wiring a cook --------------------------------------------------------------
    def share(self, evaluator: Evaluator) -> Evaluator:
        """The evaluator to use on this rank: sharded if built in, else rank 0's scores.

        A built-in evaluator is copied (its cached data is shared, not duplicated) and the
        copy is sharded: the user's own object is left as it was.

        Example:
            >>> import torch
            >>> from modelsoup.evaluators import Accuracy, as_evaluator
            >>> type(DistContext(0, 2).share(as_evaluator(lambda m: 1.0))).__name__
            'RankZeroScores'
            >>> mine = Accuracy((torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)))
            >>> ctx = DistContext(0, 2)
            >>> ctx.share(mine).sharding is ctx, mine.sharding
            (True, None)
        """
        if isinstance(evaluator, ClassifierEvaluator):
            if dist.is_available() and dist.is_initialized():
                self.check_same_data(evaluator)
            sharded = copy.copy(evaluator)
            sharded.sharding = self
            self._shared.append(sharded)
            return sharded
        return RankZeroScores(evaluator, self)

    def check_same_data(self, evaluator: ClassifierEvaluator) -> None:
        """Raise :class:`~modelsoup.errors.ConfigError` on every rank unless every rank
        holds the same evaluation data: modelsoup shards the batches itself, so a rank
        given only its own part (a ``DistributedSampler``) would score the others'
        logits against its own labels."""
        mine = (evaluator.fingerprint(), int(evaluator.labels.numel()))
        table: list[Any] = [None] * self.world_size
        self._collective("comparing evaluation data", lambda: dist.all_gather_object(table, mine))
        differ = [r for r, theirs in enumerate(table) if theirs != table[0]]
        if differ:
            raise ConfigError(
                f"{evaluator.name}: the evaluation data differs between ranks (rank 0 holds "
                f"{table[0][1]} examples, rank {differ[0]} {table[differ[0]][1]}; a "
                "DistributedSampler?): give every rank the whole data set, modelsoup shards "
                "its batches over the ranks itself"
            )

    def journal(self, path: str | Path | None) -> Journal:
        """A journal kept by rank 0 and consulted by all ranks (see :class:`SharedJournal`)."""
        return SharedJournal(path, self)

    def close(self) -> None:
        """Stop sharding the evaluators; end the process group if this context started it."""
        for ev in self._shared:
            ev.sharding = None
        self._shared.clear()
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


class RankZeroScores:
    """Any evaluator that is not a built-in classifier, under torchrun.

    Every rank runs it in full (so an evaluator that does its own collectives still
    works) and every rank then uses rank 0's result, so decisions agree even when the
    evaluator is not deterministic.
    """

    def __init__(self, inner: Evaluator, ctx: DistContext):
        self.inner = inner
        self.ctx = ctx
        self.name = inner.name
        self.higher_is_better = inner.higher_is_better

    def evaluate(self, model: torch.nn.Module) -> float:
        value = self.inner.evaluate(model)
        return self.ctx.broadcast(value, f"sharing the score of {self.name}")

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self.inner, attr)
        if attr == "logits":
            return lambda model: self.ctx.broadcast(value(model), f"sharing {self.name} logits")
        return value


class SharedJournal(Journal):
    """The journal of a distributed cook: rank 0 owns the file, every rank gets its answers.

    Other ranks keep their own scores in memory only. Every look-up is answered by
    rank 0, so a score found in rank 0's file is skipped by every rank alike.
    """

    def __init__(self, path: str | Path | None, ctx: DistContext):
        super().__init__(path if ctx.is_main else None)
        self.persistent = path is not None  # the same on every rank, so keys agree
        self.ctx = ctx

    def lookup(self, key: str, bounds: tuple[float, float] | None = None) -> float | None:
        found = super().lookup(key, bounds) if self.ctx.is_main else None
        return self.ctx.broadcast(found, "looking up the journal")

    def load_outputs(self, key: str) -> torch.Tensor | None:
        found = super().load_outputs(key) if self.ctx.is_main else None
        return self.ctx.broadcast(found, "loading cached outputs")

    def rejection(
        self, key: str, to_beat: float, strict: bool, higher: bool, test: Mapping | None = None
    ) -> dict | None:
        # rank 0's file may hold a rejection the others never saw: every rank skips alike
        found = super().rejection(key, to_beat, strict, higher, test) if self.ctx.is_main else None
        return self.ctx.broadcast(found, "looking up an early rejection")


def init_distributed(timeout_s: float = 600.0, device: str = "cpu") -> DistContext | None:
    """Join the ranks started by torchrun, or ``None`` when running as one process.

    A group already initialised by the caller is used as it is (with its own timeout);
    otherwise one is started from torchrun's environment: NCCL when ``device`` is a GPU,
    gloo on CPU, with ``timeout_s`` on every collective.

    Example:
        >>> init_distributed(timeout_s=60) is None  # not launched by torchrun
        True
    """
    if timeout_s <= 0:
        raise ConfigError(f"dist_timeout_s={timeout_s} must be > 0 seconds")
    if _ALONE.get():
        return None
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() == 1:
            return None
        backend, owns = dist.get_backend(), False
    elif launched_distributed():
        if not dist.is_available():
            raise ConfigError("this torch build has no torch.distributed; run in one process")
        backend, owns = ("nccl" if str(device).startswith("cuda") else "gloo"), True
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as err:
            raise EvaluationError(
                f"rank {os.environ.get('RANK')}: cannot join the other ranks within "
                f"{timeout_s:g} s ({err}); check MASTER_ADDR/MASTER_PORT and that every rank "
                "started"
            ) from err
    else:
        return None
    comm = (
        torch.device("cuda", torch.cuda.current_device())
        if backend == "nccl"
        else torch.device("cpu")
    )
    ctx = DistContext(
        dist.get_rank(), dist.get_world_size(), timeout_s=timeout_s, device=comm, owns_group=owns
    )
    if owns:
        atexit.register(ctx.close)  # also on errors outside a collective
    return ctx
