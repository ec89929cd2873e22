"""The taster: scores candidate soups on held-out data, as cheaply as possible.

Every evaluation-guided recipe talks to one :class:`Taster`. It owns one module (the
materialised soup) and one :class:`~modelsoup.accumulator.Accumulator`; moving from one
candidate to the next adds or removes only the ingredients that change, writes the
mean into the same module in place, and evaluates. Each score is looked up in the
:class:`~modelsoup.journal.Journal` first and recorded there after, so no subset is
ever scored twice, within a cook or across an interrupted one.

A recipe may mix its candidates with another merge rule than the average
(:meth:`Taster.merging`, e.g. TIES from the taster's ``base``): each such candidate is
then re-mixed from its members into the module (one read of each member, more for the
rules that need whole-tensor statistics), and its journal key names the rule, its
options and the base, so two rules never share a score.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from modelsoup._util import format_bytes, parse_dtype, progress
from modelsoup.accumulator import Accumulator, saturating_cast
from modelsoup.errors import ConfigError
from modelsoup.evaluators import (
    ClassifierEvaluator,
    Evaluator,
    LogitsEvaluator,
    StatisticalRacing,
    as_evaluator,
    check_score,
    checked_score,
    checked_value,
    identity,
    model_device,
    score_range,
)
from modelsoup.ingredients import (
    Ingredient,
    check_compatible,
    check_not_sharing,
    open_ingredient,
    warn_if_duplicated,
)
from modelsoup.journal import Journal
from modelsoup.memory import check_budget, memory_budget
from modelsoup.merge import MergeSpec, as_merge, check_base
from modelsoup.repair.batchnorm import as_recalibration, keep_bn_statistics, recalibration_tag
from modelsoup.soup import Soup

_logger = logging.getLogger(__name__)


class RejectedScore(float):
    """What a raced candidate scores when it was stopped early: its float value is the
    best score it could still have reached (``bound``), which cannot meet the score to
    beat; with statistical racing, at the ``confidence`` it names. It is never recorded
    as a score.

    Example:
        >>> r = RejectedScore(0.4, seen=20, total=100)
        >>> r < 0.9, r.rejected, r.seen, r.confidence
        (True, True, 20, None)
    """

    rejected = True

    def __new__(cls, bound: float, *, seen: int, total: int, confidence: float | None = None):
        obj = super().__new__(cls, bound)
        obj.seen, obj.total, obj.confidence = seen, total, confidence
        return obj


RACING = ("exact", "off")


def racing_mode(racing: str | Mapping | StatisticalRacing) -> str | StatisticalRacing:
    """``"exact"``, ``"off"``, or statistical racing from ``{confidence: ..}`` (with
    optional ``clip`` and ``seed``).

    Example:
        >>> racing_mode({"confidence": 0.999})
        StatisticalRacing(confidence=0.999, clip=None, seed=0)
        >>> racing_mode("fast")
        Traceback (most recent call last):
        ...
        modelsoup.errors.ConfigError: racing 'fast' is unknown; use exact, off or {confidence: ...}
    """
    if isinstance(racing, StatisticalRacing):
        return racing
    if isinstance(racing, Mapping):
        unknown = sorted(set(racing) - {"confidence", "clip", "seed"})
        if unknown or "confidence" not in racing:
            what = f"unknown key '{unknown[0]}'" if unknown else "no confidence"
            raise ConfigError(f"racing {dict(racing)}: {what}; write {{confidence: 0.999}}")
        return StatisticalRacing(**racing)
    if racing not in RACING:
        raise ConfigError(
            f"racing '{racing}' is unknown; use {', '.join(RACING)} or {{confidence: ...}}"
        )
    return racing


class Taster:
    """Scores soups of ``ingredients`` with ``held_out``, through one module.

    Args:
        ingredients: the pool, by position.
        model: a module of the ingredients' architecture; candidate soups are written
            into it in place (its own weights are overwritten).
        held_out: the evaluator recipes choose with.
        journal: where scores are remembered (in memory if not given).
        recalibrate: a function ``module -> None`` run after writing each candidate's
            weights when ``recalibrate_candidates`` (e.g. BatchNorm re-estimation), or
            unlabeled data to re-estimate BatchNorm statistics on
            (:func:`~modelsoup.repair.batchnorm.as_recalibration`).
        share_outputs: score single ingredients from their cached logits, which an
            ensemble computes anyway.
        racing: ``"exact"`` (default) stops a candidate's evaluation as soon as it
            provably cannot meet the score to beat, for evaluators with per-example
            bounds (accuracy); decisions equal a full evaluation's. ``"off"`` always
            evaluates in full. ``{"confidence": 0.999}`` (or a
            :class:`~modelsoup.evaluators.StatisticalRacing`) races statistically: the
            candidate against the incumbent soup, example by example, stopped once it is
            worse at that confidence (``ClassifierEvaluator.race_paired``).
        sum_device: where the accumulator's running sum lives (default: the model's
            device, so candidates are mixed where they are evaluated).
        prefetch: read the ingredient the recipe will try next (:meth:`prefetch`) on a
            background thread while the evaluator scores the current candidate. Memory:
            the model, the float32 sum and one staging buffer of one ingredient's
            tensors. ``None`` (default): on when that fits ``max_memory``; ``True``: on,
            or :class:`~modelsoup.errors.MemoryBudgetError` when it does not fit;
            ``False``: off. Results are the same either way, bit for bit.
        max_memory: the memory budget (``"8GB"``-style or bytes; default half the RAM),
            for prefetch and for the learned soup (unless it is given its own).
        base: the base model (pretrained start) for merge rules on task vectors.
        out_dtype: the dtype soups will be saved in (default: the ingredients'). A
            model finer than it (float32 against bf16 checkpoints or fp16 output) gets
            every candidate rounded to it, so scores are of the soup as saved.

    Example:
        >>> import torch
        >>> from modelsoup.ingredients import open_ingredients
        >>> ings = open_ingredients([{"weight": torch.ones(1, 1)}, {"weight": torch.zeros(1, 1)}])
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> taster = Taster(ings, model, lambda m: float(m.weight.detach()))
        >>> taster.individual_scores(), taster.score([1, 1])
        ([1.0, 0.0], 0.5)
    """

    def __init__(
        self,
        ingredients: Sequence[Ingredient],
        model: torch.nn.Module,
        held_out: Evaluator | Callable,
        *,
        journal: Journal | None = None,
        accum_dtype: torch.dtype = torch.float32,
        int_policy: str = "strict",
        recalibrate: Callable[[torch.nn.Module], None] | None = None,
        recalibrate_candidates: bool = False,
        share_outputs: bool = False,
        racing: str | Mapping | StatisticalRacing = "exact",
        sum_device: str | torch.device | None = None,
        prefetch: bool | None = None,
        max_memory: int | str | None = None,
        progress: bool = False,
        base: Ingredient | str | Path | Mapping | torch.nn.Module | None = None,
        out_dtype: torch.dtype | str | None = None,
    ):
        if not ingredients:
            raise ConfigError("no ingredients to taste")
        #: the dtype soups are saved in: every candidate is scored rounded to it, so a
        #: score is of the soup as written (an fp16 file scores as fp16 weights)
        self.out_dtype = parse_dtype(out_dtype)
        self.racing = racing_mode(racing)
        self.ingredients = list(ingredients)
        self.base = open_ingredient(base, label="base") if base is not None else None
        if self.base is not None:
            check_compatible([self.base, self.ingredients[0]], warn_duplicates=False)
        #: how candidates are mixed: the weighted average unless a recipe says otherwise
        self.merge: MergeSpec = as_merge(None)
        check_not_sharing(model, [*self.ingredients, self.base])
        self.model = model
        # the model's classes and layers: the same tensors in another architecture (a new
        # head, another activation module) score differently, so never share a score
        layout = f"{type(model).__module__}.{type(model).__qualname__}\n{model!r}"
        # and the precision it computes in: a bf16 copy of it is another candidate (float32
        # tensors, the default, keep the keys they always had)
        layout += "".join(
            f"\n{name}:{t.dtype}"
            for name, t in model.state_dict(keep_vars=True).items()
            if t.is_floating_point() and t.dtype != torch.float32
        )
        self._model_tag = hashlib.sha256(layout.encode()).hexdigest()[:16]
        self.held_out = as_evaluator(held_out)
        self.journal = journal or Journal(None)
        if self.journal.persistent:
            # Keys of a journal on disk hash every ingredient anyway: duplicates are free.
            warn_if_duplicated(self.ingredients, by_content=True)
        self.accumulator = Accumulator(
            ingredients,
            accum_dtype=accum_dtype,
            int_policy=int_policy,
            device=sum_device if sum_device is not None else model_device(model),
        )
        self._round_to = self._rounding()
        self.int_policy = int_policy
        self.recalibrate = as_recalibration(recalibrate)
        self.recalibrate_candidates = recalibrate_candidates and recalibrate is not None
        self.progress = progress
        self.evaluations = 0  # evaluator calls actually run
        self.reused = 0  # scores found in the journal
        self.eval_seconds = 0.0
        self.mix_seconds = 0.0
        self.recalibrations = 0  # BatchNorm re-estimations (extra forward passes)
        self.races = 0  # candidates evaluated batch by batch against a score to beat
        self.rejected_early = 0  # of those, stopped before the end
        self.race_examples = 0  # examples those races evaluated
        self.race_full_examples = 0  # examples full passes of them would have evaluated
        self.statistical_races = 0  # of the races, those decided by the statistical test
        self.incumbent_passes = 0  # full passes run only for an incumbent's per-example values
        #: statistical racing: the tests used, with the seed and hash of the examples' order
        self.racing_tests: list[dict] = []
        #: evaluators statistical racing could not read in one random order, with why:
        #: they are raced exactly instead (logged once, at WARNING)
        self.racing_fallbacks: dict[str, str] = {}
        #: per-example held-out values of soups, by journal key: the incumbents of
        #: statistical racing (kept from their own evaluation; recomputed when missing)
        self._values: dict[str, torch.Tensor] = {}
        self._orders: dict[tuple[str, int], str] = {}  # sha256 of each examples' order
        #: score single ingredients from their cached logits (when an ensemble is cooked)
        self.share_outputs = share_outputs
        #: the memory budget, as given (``None``: half the RAM): for prefetch, and the
        #: default of recipes that hold more than one model (``learned``)
        self.max_memory = max_memory
        self._individual: dict[str, list[float]] = {}
        self._outputs: dict[tuple[str, int], torch.Tensor] = {}
        self.prefetch_enabled = self._prefetch_fits(prefetch, max_memory)
        self._upcoming: int | None = None  # the position the next candidate will read
        # the position the candidate being mixed changes, as the recipe's hint named it
        self._next_change: int | None = None
        self.prefetched = 0  # ingredients read ahead, during an evaluation
        self.prefetch_wait_seconds = 0.0  # waiting, after an evaluation, for a read ahead

    # -- reading ahead --------------------------------------------------------------
    def memory_bytes(self) -> dict[str, int]:
        """What tasting holds in memory, in bytes: the model's tensors, the running sum,
        and the staging buffer a read ahead fills (:meth:`prefetch`).

        Example:
            >>> import torch
            >>> from modelsoup.ingredients import open_ingredients
            >>> ings = open_ingredients([{"weight": torch.zeros(2, 2)}])
            >>> Taster(ings, torch.nn.Linear(2, 2, bias=False), lambda m: 0.0).memory_bytes()
            {'model': 16, 'sum': 16, 'staging': 16}
        """
        acc = self.accumulator
        model = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        total = sum(t.numel() * t.element_size() for t in acc._sum.values())
        return {"model": model, "sum": total, "staging": acc.staging_bytes()}

    def _prefetch_fits(self, prefetch: bool | None, max_memory: int | str | None) -> bool:
        if prefetch is False:
            return False
        need = sum(self.memory_bytes().values())
        budget = memory_budget(max_memory)
        if prefetch is True:
            check_budget(
                need,
                budget,
                "tasting with prefetch",
                "raise max_memory or set prefetch: false",
                detail="(model + sum + staging buffer)",
            )
            return True
        if need > budget:
            _logger.info(
                "prefetch off: model + sum + staging buffer need ~%s, budget is %s",
                format_bytes(need),
                format_bytes(budget),
            )
            return False
        return True

    def prefetch(self, position: int | None) -> None:
        """Say which ingredient the next candidate adds or removes: with prefetch on, it
        is read into the staging buffer while the evaluator scores the current candidate
        (the read waits for nothing but the disk; torch and file reads release the GIL).

        Recipes call it before scoring each candidate with the position tried after it
        (``None``: nothing more). A hint that is never used costs one read, nothing else.

        Example:
            >>> import torch
            >>> from modelsoup.ingredients import open_ingredients
            >>> ings = open_ingredients([{"weight": torch.full((1, 1), v)} for v in (1.0, 3.0)])
            >>> taster = Taster(ings, torch.nn.Linear(1, 1, bias=False), lambda m: 0.0)
            >>> taster.prefetch(1); taster.score([1, 0]); taster.prefetched
            0.0
            1
        """
        if position is not None and not 0 <= position < len(self.ingredients):
            raise ConfigError(f"prefetch position {position} is outside the pool")
        self._upcoming = position

    @contextmanager
    def _reading_ahead(self) -> Iterator[None]:
        """Around one evaluation: read the upcoming ingredient meanwhile, on a thread, and
        wait for it after, so the accumulator is only ever used by one thread at a time."""
        position, self._upcoming = self._upcoming, None
        self._next_change = position
        acc = self.accumulator
        # other merge rules mix from the ingredients themselves, not the accumulator
        unused = not self.merge.is_average or position == acc._staged_position
        if not self.prefetch_enabled or position is None or unused:
            yield
            return
        failed: list[BaseException] = []

        def read() -> None:
            try:
                acc.stage(position)
            except BaseException as e:  # noqa: BLE001 - re-read, and raised, where it is used
                failed.append(e)

        thread = threading.Thread(target=read, name="modelsoup-prefetch", daemon=True)
        thread.start()
        try:
            yield
        finally:
            start = time.perf_counter()
            thread.join()
            self.prefetch_wait_seconds += time.perf_counter() - start
            if failed:
                # Nothing is staged: the ordinary read will raise the same error in its place.
                _logger.debug("prefetch of position %d failed: %s", position, failed[0])
            else:
                self.prefetched += 1

    # -- comparing ----------------------------------------------------------------
    def better(self, a: float, b: float, *, strict: bool = False) -> bool:
        """Is score ``a`` at least as good as ``b`` (strictly better if ``strict``)?"""
        if self.held_out.higher_is_better:
            return a > b if strict else a >= b
        return a < b if strict else a <= b

    def best(self, scores: Sequence[float]) -> int:
        """Position of the best score (the first one on ties)."""
        pick = max if self.held_out.higher_is_better else min
        return scores.index(pick(scores))

    def order(self, scores: Sequence[float]) -> list[int]:
        """Positions from best to worst score (stable on ties)."""
        sign = -1 if self.held_out.higher_is_better else 1
        return sorted(range(len(scores)), key=lambda i: sign * scores[i])

    # -- scoring ------------------------------------------------------------------
    @contextlib.contextmanager
    def merging(self, merge: str | Mapping | MergeSpec | None) -> Iterator[MergeSpec]:
        """Mix candidates with ``merge`` (a rule name or ``{rule: ..., options}``) inside
        the block; ``None`` is the weighted average. A rule that needs a base, when the
        taster has none, is refused here, naming the rule.

        Example:
            >>> import torch
            >>> from modelsoup.ingredients import open_ingredients
            >>> ings = open_ingredients([{"weight": torch.full((1, 1), 3.0)}])
            >>> t = Taster(ings, torch.nn.Linear(1, 1, bias=False),
            ...            lambda m: float(m.weight.detach()), base={"weight": torch.ones(1, 1)})
            >>> with t.merging({"rule": "task_arithmetic", "lambda": 0.5}):
            ...     t.score([1.0])
            2.0
        """
        spec = as_merge(merge)
        check_base(spec, self.base)
        saved, self.merge = self.merge, spec
        try:
            yield spec
        finally:
            self.merge = saved

    def key_context(
        self, members: Sequence[int], merge: MergeSpec | Mapping | str | None = None
    ) -> dict:
        """What, besides the evaluator and the mixture, names a score in the journal.

        The model's tag, the accumulation dtype when it is not float32, the dtypes the
        candidate is written in, the BatchNorm recalibration, and for a rule other than
        the average its options, members and base. Recipes that journal scores of their
        own (``learned``) build their keys from it, so that a change of any of these never
        reuses a score.

        Example:
            >>> import torch
            >>> from modelsoup.ingredients import open_ingredients
            >>> ings = open_ingredients([{"weight": torch.ones(1, 1)},
            ...                          {"weight": torch.zeros(1, 1)}])
            >>> t = Taster(ings, torch.nn.Linear(1, 1, bias=False), lambda m: 0.0)
            >>> sorted(t.key_context([0, 1]))
            ['model']
            >>> sorted(t.key_context([0, 1], {"rule": "slerp", "t": 0.5}))
            ['members', 'merge', 'model']
        """
        merge = self.merge if merge is None else as_merge(merge)
        extra: dict = {"model": self._model_tag}
        if self.accumulator.accum_dtype != torch.float32:
            # mixed in another precision: another candidate, to the last bits (float32,
            # the default, keeps the keys it always had)
            extra["accum"] = str(self.accumulator.accum_dtype).removeprefix("torch.")
        if self._round_to:
            extra["written"] = sorted(
                {str(d).removeprefix("torch.") for d in self._round_to.values()}
            )
        if self.recalibrate_candidates:
            # The recalibration's own description (data, batches) when it has one, so
            # scores taken with other recalibration settings are never reused.
            if getattr(self, "_bn_tag", None) is None:  # once per taster: code is read once
                self._bn_tag = recalibration_tag(self.recalibrate)
            extra["bn"] = self._bn_tag
        if not merge.is_average:
            extra["merge"] = merge.canonical()
            # SLERP's ends and DARE's masks follow the members' places in the pool (and any
            # rule's float sums their order): a reordered pool is another candidate
            extra["members"] = [f"{i}:{self.ident(i)}" for i in members]
            if self.base is not None:
                extra["base"] = self.base.identity if self.journal.persistent else "base"
        return extra

    def ident(self, position: int) -> str:
        """How journal keys name an ingredient: by content (sha256) when the journal is
        kept on disk, so a re-run recognises it; by position otherwise, which costs no
        hashing."""
        if self.journal.persistent:
            return self.ingredients[position].identity
        return f"position-{position}"

    def key(self, weights: Sequence[float], evaluator: Evaluator) -> str:
        members = [i for i, w in enumerate(weights) if w > 0]
        mixture = [(self.ident(i), weights[i]) for i in members]
        return self.journal.key(identity(evaluator), mixture, self.key_context(members))

    def soup_key(self, soup: Soup, evaluator: Evaluator) -> str:
        """The journal key of any soup; for a plain one it is :meth:`key` of its weights.

        Per-tensor coefficients and override tensors (e.g. recalibrated BatchNorm
        statistics) are hashed by value, so different overrides never share a score.
        """
        if not soup.tensor_coefficients and not soup.overrides:
            with self._merging_as(soup):
                return self.key(soup.coefficients, evaluator)
        digest = hashlib.sha256(json.dumps(soup.tensor_coefficients, sort_keys=True).encode())
        for name in sorted(soup.overrides):
            t = soup.overrides[name].detach().cpu().contiguous().reshape(-1)
            digest.update(name.encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        extra = {**self.key_context(soup.chosen, soup.merge), "per_tensor": digest.hexdigest()}
        if self.recalibrate_candidates and not soup.overrides:
            # scored recalibrated (modelsoup before this scored these soups as mixed):
            # another measurement than such an older journal's under the same key
            extra["bn_recalibrated"] = True
        mixture = [(self.ident(i), c) for i, c in enumerate(soup.coefficients) if c > 0]
        return self.journal.key(identity(evaluator), mixture, extra)

    def _journaled(
        self, key: str, detail: dict, run: Callable[[], float], evaluator: Evaluator
    ) -> float:
        """A recorded score within the evaluator's range, or ``run()`` recorded in the journal."""
        found = self.journal.lookup(key, score_range(evaluator))
        if found is not None:
            self.reused += 1
            return found
        value = check_score(run(), evaluator.name, score_range(evaluator))
        self.journal.record(key, value, detail)
        return value

    def _evaluate(self, evaluator: Evaluator) -> float:
        """Score the model as it stands, counting the call and its time."""
        with self._reading_ahead():
            start = time.perf_counter()
            value = checked_score(evaluator, self.model)
            self.eval_seconds += time.perf_counter() - start
        self.evaluations += 1
        return value

    def materialise(self, weights: Sequence[float]) -> torch.nn.Module:
        """Write the soup with these per-position weights into the model, in place."""
        start = time.perf_counter()
        acc = self.accumulator
        extra = [i for i, w in enumerate(weights) if w != acc.weights[i]]
        hinted, self._next_change = self._next_change, None
        if self.merge.is_average and len(extra) > 1 and hinted in extra:
            # The candidate is the recipe's current soup with the hinted ingredient added
            # or removed; the sum still holds the previous candidate. Settle the sum on
            # the current soup first, so that this candidate, and every later one while
            # they are rejected, is tasted with one read and the sum left alone.
            settled = list(weights)
            settled[hinted] = acc.weights[hinted]
            if any(w > 0 for w in settled):
                acc.set_weights(settled)
                extra = [hinted]
        if not self.merge.is_average:
            # Another rule: re-mixed from its members, straight into the module.
            self.soup(weights, recipe="candidate").apply(self.model)
        elif (
            len(extra) == 1
            and acc.total > 0
            and (weights[extra[0]] > acc.weights[extra[0]] or sum(w > 0 for w in weights) > 1)
        ):
            # The current soup plus or minus one ingredient (greedy's and pruned's
            # candidates): leave the sum alone, so a rejection costs no second read. (A
            # soup of one is rebuilt by set_weights instead: exactly its ingredient.)
            i = extra[0]
            acc.write_into_with(self.model, i, weights[i] - acc.weights[i])
        else:
            acc.set_weights(weights)
            acc.write_into(self.model)
        self._as_written()
        if self.recalibrate_candidates:
            self.recalibrate(self.model)
            self.recalibrations += 1
        self.mix_seconds += time.perf_counter() - start
        return self.model

    def _as_written(self) -> None:
        """Round the soup's tensors in the model to the dtype they are saved in and back:
        the model then holds what loading the saved file gives (a float32 model scoring
        a soup saved as fp16 or bf16 would otherwise score other weights)."""
        if not self._round_to:
            return
        held = self.model.state_dict(keep_vars=True)
        with torch.no_grad():
            for name, dtype in self._round_to.items():
                t = held[name]
                t.copy_(saturating_cast(t.detach(), dtype, name))

    def _rounding(self) -> dict[str, torch.dtype]:
        # the tensors whose saved dtype (out_dtype, else the ingredients') is coarser than
        # the model's: an fp32 model tasting bf16 checkpoints, or fp16 output
        held = self.model.state_dict(keep_vars=True)
        found = {}
        for name, meta in self.accumulator.layout.items():
            t = held.get(name)
            if not meta.is_floating or t is None or not t.is_floating_point():
                continue
            saved = self.out_dtype or meta.dtype
            coarse, fine = torch.finfo(saved), torch.finfo(t.dtype)
            if fine.eps < coarse.eps or fine.max > coarse.max:
                found[name] = saved
        return found

    def start_bar(self, label: str) -> None:
        """Show a progress bar of candidates tasted for one recipe (if ``progress``)."""
        self.close_bar()
        if self.progress:
            self._bar = progress(desc=f"tasting {label}", unit="soup", leave=False)

    def close_bar(self) -> None:
        bar = getattr(self, "_bar", None)
        if bar is not None:
            bar.close()
        self._bar = None

    def _tick(self, weights: Sequence[float], score: float, to_beat: float | None) -> None:
        bar = getattr(self, "_bar", None)
        if bar is None:
            return
        size = sum(1 for w in weights if w > 0)
        shown = (
            f"<{score:.4f} (stopped early)" if getattr(score, "rejected", False) else f"{score:.4f}"
        )
        post = {"size": size, "score": shown}
        if to_beat is not None:
            post["to beat"] = f"{to_beat:.4f}"
        bar.set_postfix(post, refresh=False)
        bar.update()

    def score(
        self,
        weights: Sequence[float],
        evaluator: Evaluator | None = None,
        *,
        to_beat: float | None = None,
        strict: bool = False,
        incumbent: Sequence[float] | None = None,
    ) -> float:
        """Held-out score of the soup with per-position ``weights`` (journal first).

        ``to_beat`` is the score the candidate must match (``>=``, or ``>`` with
        ``strict``). With exact racing and a bounded evaluator, a candidate that
        provably cannot is stopped early and a :class:`RejectedScore` comes back. With
        statistical racing, ``incumbent`` is the weights of the soup that scored
        ``to_beat``, compared with the candidate example by example (without it, the
        race is exact).
        """
        value = self._score(weights, evaluator, to_beat, strict, incumbent)
        if evaluator is None or evaluator is self.held_out:
            self._tick(weights, value, to_beat)
        return value

    def _score(
        self,
        weights: Sequence[float],
        evaluator: Evaluator | None,
        to_beat: float | None = None,
        strict: bool = False,
        incumbent: Sequence[float] | None = None,
    ) -> float:
        evaluator = evaluator or self.held_out
        if len(weights) != len(self.ingredients):
            raise ConfigError(f"{len(weights)} weights for {len(self.ingredients)} ingredients")
        members = [self.ingredients[i].label for i, w in enumerate(weights) if w > 0]
        detail = {"evaluator": evaluator.name, "members": members}
        if not self.merge.is_average:
            detail["merge"] = self.merge.describe()
        key = self.key(weights, evaluator)
        if to_beat is not None and self._can_race(evaluator):
            return self._raced(key, detail, weights, evaluator, to_beat, strict, incumbent)

        def run() -> float:
            self.materialise(weights)
            if evaluator is self.held_out and self._statistical(evaluator):
                # keep its per-example values: it may be an incumbent
                return self._evaluate_keeping(key, evaluator)
            return self._evaluate(evaluator)

        return self._journaled(key, detail, run, evaluator)

    def _can_race(self, evaluator: Evaluator) -> bool:
        if self._statistical(evaluator):
            return True
        return (
            self.racing != "off"
            and getattr(evaluator, "bounds", None) is not None
            and callable(getattr(evaluator, "race", None))
            # a built-in subclass that scores otherwise than the mean is evaluated in full
            and (not isinstance(evaluator, ClassifierEvaluator) or evaluator.scored_as_mean())
        )

    def _statistical(self, evaluator: Evaluator) -> bool:
        """Is ``evaluator`` raced statistically (a built-in one, with per-example bounds
        or a clipped loss, scored as the mean of its per-example values)?"""
        return (
            isinstance(self.racing, StatisticalRacing)
            and evaluator.name not in self.racing_fallbacks
            and isinstance(evaluator, ClassifierEvaluator)
            and evaluator.scored_as_mean()
            and evaluator.racing_bounds(self.racing) is not None
        )

    def _evaluate_keeping(self, key: str, evaluator: ClassifierEvaluator) -> float:
        """Score the model as a full evaluation does, keeping every example's value."""
        start = time.perf_counter()
        logits = evaluator.logits(self.model)
        value = checked_value(evaluator, evaluator.score_logits(logits))
        self._values[key] = evaluator.per_example(logits).detach().cpu()
        self.eval_seconds += time.perf_counter() - start
        self.evaluations += 1
        return value

    def incumbent_values(
        self, weights: Sequence[float], evaluator: ClassifierEvaluator
    ) -> torch.Tensor:
        """Every held-out example's value for the soup with these weights: kept from its
        own evaluation, or from an ingredient's shared logits, else evaluated again now
        (never read from anything stale, such as a journal of another run).

        Example:
            >>> import torch
            >>> from modelsoup.evaluators import Accuracy
            >>> from modelsoup.ingredients import open_ingredients
            >>> ings = open_ingredients([{"weight": torch.eye(2)}])
            >>> ev = Accuracy((torch.eye(2), torch.tensor([0, 0])))
            >>> Taster(ings, torch.nn.Linear(2, 2, bias=False), ev).incumbent_values([1.0], ev)
            tensor([1., 0.])
        """
        key = self.key(weights, evaluator)
        found = self._values.get(key)
        if found is not None:
            return found
        members = [i for i, w in enumerate(weights) if w > 0]
        single = len(members) == 1 and self.merge.is_average  # an ingredient as it is
        shared = self._outputs.get((identity(evaluator), members[0])) if single else None
        if shared is not None:
            self._values[key] = evaluator.per_example(shared).detach().cpu()
            return self._values[key]
        self.materialise(weights)
        self._evaluate_keeping(key, evaluator)
        self.incumbent_passes += 1
        return self._values[key]

    def _raced(
        self,
        key: str,
        detail: dict,
        weights: Sequence[float],
        evaluator: Evaluator,
        to_beat: float,
        strict: bool,
        incumbent: Sequence[float] | None = None,
    ) -> float:
        """Score a candidate batch by batch, stopping once it cannot meet ``to_beat``:
        provably (exact racing), or at the stated confidence against ``incumbent``."""
        found = self.journal.lookup(key, score_range(evaluator))
        if found is not None:
            self.reused += 1
            return found
        statistical = self._statistical(evaluator) and incumbent is not None
        test = self._test(evaluator) if statistical else None
        prior = self.journal.rejection(key, to_beat, strict, evaluator.higher_is_better, test)
        if prior is not None:  # still holds against this bar: no evaluation needed
            self.reused += 1
            if prior.get("test") is not None:
                self._used(test)
            confidence = (prior.get("test") or {}).get("confidence")
            return RejectedScore(
                prior["bound"], seen=prior["seen"], total=prior["total"], confidence=confidence
            )
        reference = self.incumbent_values(incumbent, evaluator) if statistical else None
        self.materialise(weights)
        with self._reading_ahead():
            start = time.perf_counter()
            if statistical:
                race = evaluator.race_paired(
                    self.model, reference, to_beat, racing=self.racing, strict=strict
                )
            else:
                race = evaluator.race(self.model, to_beat, strict=strict)
            self.eval_seconds += time.perf_counter() - start
        self.evaluations += 1
        if statistical and race.fallback is not None:
            self._fall_back(evaluator, race.fallback)
        # labelled and counted by the test that decided, not by the one asked for
        decided_statistically = race.test == "statistical"
        test = test if decided_statistically else None
        if decided_statistically:
            self.statistical_races += 1
            self._used(test)
        self.races += 1
        self.race_examples += max(race.seen, 0)
        self.race_full_examples += max(race.total, 0)
        if race.rejected:
            self.rejected_early += 1
            self.journal.record_rejection(
                key,
                bound=race.bound,
                seen=race.seen,
                total=race.total,
                to_beat=to_beat,
                strict=strict,
                detail=detail,
                test=test,
            )
            confidence = test["confidence"] if test else None
            return RejectedScore(
                race.bound, seen=race.seen, total=race.total, confidence=confidence
            )
        value = checked_value(evaluator, race.score)
        if race.values is not None and decided_statistically:
            self._values[key] = race.values.detach().cpu()  # the next incumbent, maybe
        self.journal.record(key, value, detail)
        return value

    def _test(self, evaluator: ClassifierEvaluator) -> dict:
        """The statistical test racing uses now, with the order of the examples (its seed
        and a hash of the permutation)."""
        seed = self.racing.seed
        digest = self._orders.get((identity(evaluator), seed))
        if digest is None:
            order = evaluator.race_order(seed)
            digest = hashlib.sha256(order.numpy().tobytes()).hexdigest()[:16]
            self._orders[(identity(evaluator), seed)] = digest
        return {**self.racing.tag(), "order_seed": self.racing.seed, "order_sha256": digest}

    def _used(self, test: dict) -> None:
        """Record, once, a statistical test that decided a race, for the report."""
        if test not in self.racing_tests:
            self.racing_tests.append(test)

    def _fall_back(self, evaluator: Evaluator, reason: str) -> None:
        """Race ``evaluator`` exactly from now on: statistical racing cannot order it."""
        self.racing_fallbacks[evaluator.name] = reason
        _logger.warning(
            "statistical racing is off for evaluator %s: %s; its candidates are raced "
            "exactly (provable bounds) instead",
            evaluator.name,
            reason,
        )

    def score_members(
        self,
        members: Sequence[int],
        evaluator: Evaluator | None = None,
        *,
        to_beat: float | None = None,
        strict: bool = False,
        incumbent: Sequence[int] | None = None,
    ) -> float:
        """Score of the uniform soup of the given positions (a position may repeat);
        ``incumbent``: the positions of the soup that scored ``to_beat``."""
        weights = self._uniform(members)
        against = self._uniform(incumbent) if incumbent is not None else None
        return self.score(weights, evaluator, to_beat=to_beat, strict=strict, incumbent=against)

    def _uniform(self, members: Sequence[int]) -> list[float]:
        weights = [0.0] * len(self.ingredients)
        for i in members:
            weights[i] += 1.0
        return weights

    def individual_scores(self, evaluator: Evaluator | None = None) -> list[float]:
        """Each ingredient's own score; computed once and shared by every recipe."""
        evaluator = evaluator or self.held_out
        if identity(evaluator) not in self._individual:
            scores = []
            bar = progress(
                self.ingredients,
                desc=f"tasting ingredients on {evaluator.name}",
                unit="ingredient",
                enabled=self.progress,
            )
            # each ingredient as it is, whatever rule the recipe mixes its soups with
            with self.merging(None):
                for i, _ in enumerate(bar):
                    self.prefetch(i + 1 if i + 1 < len(self.ingredients) else None)
                    scores.append(self._individual_score(i, evaluator))
                    bar.set_postfix(score=f"{scores[-1]:.4f}")
            self._individual[identity(evaluator)] = scores
        return list(self._individual[identity(evaluator)])

    def _individual_score(self, position: int, evaluator: Evaluator) -> float:
        if not (self.share_outputs and isinstance(evaluator, LogitsEvaluator)):
            return self.score_members([position], evaluator)
        # An ensemble will need this ingredient's logits anyway: score from them, so each
        # ingredient costs one forward pass over the data, not two.
        weights = [0.0] * len(self.ingredients)
        weights[position] = 1.0
        detail = {"evaluator": evaluator.name, "members": [self.ingredients[position].label]}
        return self._journaled(
            self.key(weights, evaluator),
            detail,
            lambda: float(evaluator.score_logits(self.outputs(position, evaluator))),
            evaluator,
        )

    def score_soup(self, soup: Soup, evaluator: Evaluator | None = None) -> float:
        """Score any soup, including per-tensor ones, by applying it to the model."""
        evaluator = evaluator or self.held_out
        if not soup.tensor_coefficients and not soup.overrides:
            with self._merging_as(soup):
                return self.score(soup.coefficients, evaluator)

        def run() -> float:
            self._apply(soup)
            return self._evaluate(evaluator)

        detail = {"evaluator": evaluator.name, "recipe": soup.recipe}
        return self._journaled(self.soup_key(soup, evaluator), detail, run, evaluator)

    @contextlib.contextmanager
    def _merging_as(self, soup: Soup) -> Iterator[None]:
        # a soup of this pool is scored with its own rule, whatever the current one is
        if soup.base is not None and soup.base is not self.base:
            raise ConfigError("this soup's base is not the taster's: score it with its own taster")
        saved, self.merge = self.merge, soup.merge
        try:
            yield
        finally:
            self.merge = saved

    def _apply(self, soup: Soup) -> None:
        """Write any soup into the model: through the accumulator when it can."""
        if soup.tensor_coefficients or soup.overrides or not soup.merge.is_average:
            start = time.perf_counter()
            soup.apply(self.model)
            self._as_written()
            if self.recalibrate_candidates and not soup.overrides:
                # scored as every candidate is (a per-tensor soup too); a soup that keeps
                # recalibrated statistics already holds them
                self.recalibrate(self.model)
                self.recalibrations += 1
            self.mix_seconds += time.perf_counter() - start
        else:
            self.materialise(soup.coefficients)

    def soup(
        self,
        coefficients: Sequence[float],
        *,
        recipe: str,
        options: dict | None = None,
        trace: list[dict] | None = None,
        scores: dict[str, float] | None = None,
        tensor_coefficients: dict[str, list[float]] | None = None,
    ) -> Soup:
        """A recipe's answer as a :class:`Soup` of this pool, mixed as this taster mixes.

        Example:
            >>> import torch
            >>> from modelsoup.ingredients import open_ingredients
            >>> ings = open_ingredients([{"w": torch.ones(1, 1)}, {"w": torch.zeros(1, 1)}])
            >>> taster = Taster(ings, torch.nn.Linear(1, 1, bias=False), lambda m: 0.0)
            >>> taster.soup([1, 1], recipe="uniform").state_dict()["w"]
            tensor([[0.5000]])
        """
        return Soup(
            self.ingredients,
            list(coefficients),
            recipe=recipe,
            options=dict(options or {}),
            trace=list(trace or []),
            scores=dict(scores or {}),
            tensor_coefficients=tensor_coefficients,
            accum_dtype=self.accumulator.accum_dtype,
            int_policy=self.int_policy,
            merge=self.merge,
            base=self.base if self.merge.needs_base else None,
        )

    def recalibrate_soup(self, soup: Soup, recalibrate: Callable | None = None) -> None:
        """Materialise ``soup``, re-estimate its BatchNorm statistics, keep them as overrides.

        Unless candidates were already scored recalibrated, the held-out score is
        re-measured (the old one is kept as ``held_out_before_recalibration``).
        """
        recalibrate = as_recalibration(recalibrate) or self.recalibrate
        if recalibrate is None:
            raise ConfigError("no recalibration: give recalibrate= to the Taster or here")
        soup.apply(self.model)
        self._as_written()
        recalibrate(self.model)
        self.recalibrations += 1
        keep_bn_statistics(soup, self.model, recalibration_tag(recalibrate))
        if self.recalibrate_candidates:
            return  # the recipe already chose with recalibrated scores: keep its score
        soup.scores["held_out_before_recalibration"] = soup.scores.get("held_out")
        soup.scores["held_out"] = self.score_soup(soup)

    # -- outputs, for ensembles ---------------------------------------------------
    def outputs(self, position: int, evaluator: Evaluator) -> torch.Tensor:
        """Logits of one ingredient on an evaluator's data; computed once, kept in memory."""
        if not isinstance(evaluator, LogitsEvaluator):
            raise ConfigError(
                f"evaluator {evaluator.name} gives no logits; ensembles need a built-in "
                "classifier evaluator (Accuracy, MeanLoss, MetricEvaluator)"
            )
        key = (identity(evaluator), position)
        if key not in self._outputs:
            weights = [0.0] * len(self.ingredients)
            weights[position] = 1.0
            disk_key = "outputs-" + self.key(weights, evaluator)
            cached = self.journal.load_outputs(disk_key)
            if cached is not None:
                self.reused += 1
                self._outputs[key] = cached
                return cached
            self.materialise(weights)
            with self._reading_ahead():
                start = time.perf_counter()
                self._outputs[key] = evaluator.logits(self.model)
                self.eval_seconds += time.perf_counter() - start
            self.evaluations += 1
            self.journal.save_outputs(disk_key, self._outputs[key])
        return self._outputs[key]

    def soup_logits(self, soup: Soup, evaluator: Evaluator) -> torch.Tensor:
        """Logits of a soup on an evaluator's data (cached on disk like ingredient outputs)."""
        disk_key = "outputs-" + self.soup_key(soup, evaluator)
        cached = self.journal.load_outputs(disk_key)
        if cached is not None:
            self.reused += 1
            return cached
        self._apply(soup)
        start = time.perf_counter()
        logits = evaluator.logits(self.model)
        self.eval_seconds += time.perf_counter() - start
        self.evaluations += 1
        self.journal.save_outputs(disk_key, logits)
        return logits

    def stats(self) -> dict:
        """Counters for the report: evaluations run and reused, seconds spent."""
        return {
            "evaluations": self.evaluations,
            "reused": self.reused,
            "eval_seconds": round(self.eval_seconds, 3),
            "mix_seconds": round(self.mix_seconds, 3),
            "prefetched": self.prefetched,
            "prefetch_wait_seconds": round(self.prefetch_wait_seconds, 3),
            "bn_recalibrations": self.recalibrations,
            "races": self.races,
            "rejected_early": self.rejected_early,
            "race_examples": self.race_examples,
            "race_full_examples": self.race_full_examples,
            "statistical_races": self.statistical_races,
            "incumbent_passes": self.incumbent_passes,
            "racing_tests": list(self.racing_tests),
            "racing_fallbacks": dict(self.racing_fallbacks),
        }
