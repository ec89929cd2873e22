"""Learned soup (Wortsman et al. 2022, Appendix, "learned soup"): mixing weights by gradient.

The soup's weights are a differentiable function of mixing logits ``alpha``::

    theta(alpha) = sum_i softmax(alpha)_i * theta_i

one row of logits for the whole model, or (``by_layer=True``) one row per tensor. The
softmax keeps every soup a convex combination (coefficients >= 0, summing to 1), and
zero logits are the uniform soup, where training starts. ``alpha`` is trained with
AdamW to minimise cross-entropy on part of the held-out data, through
:func:`torch.func.functional_call` on the taster's one module, so no module is built
per step. The rest of the held-out data (``val_fraction``) decides early stopping, and
the best-validation ``alpha`` is kept; the soup is finally scored on the whole held-out
set like every other recipe. With ``temperature=True`` a scale on the output logits is
learned too, as in the paper's official code; it only helps fit ``alpha`` and is not
part of the saved weights.

Memory: every ingredient's floating tensors are held at once (``k`` model copies). The
job is estimated from tensor headers and refused before anything is read when it would
exceed ``max_memory``; ``ingredients="greedy"`` learns only over the greedy soup's
ingredients, which is how most pools fit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, field_validator

from modelsoup.accumulator import saturating_cast
from modelsoup.errors import ConfigError
from modelsoup.evaluators import forward_logits, identity, model_device
from modelsoup.ingredients import Ingredient
from modelsoup.memory import (
    budget_option,
    check_budget,
    learned_soup_bytes,
    memory_budget,
    positions_per_example,
)
from modelsoup.recipes.greedy import greedy_soup
from modelsoup.recipes.registry import RecipeOptions, register
from modelsoup.soup import Soup
from modelsoup.tasting import Taster


class LearnedOptions(RecipeOptions):
    #: one set of coefficients per tensor instead of one for the whole model
    by_layer: bool = False
    #: also learn a scale on the output logits while fitting (not saved in the soup)
    temperature: bool = False
    #: learn over every ingredient, or only over those the greedy soup keeps
    ingredients: Literal["all", "greedy"] = "all"
    lr: PositiveFloat = 0.05
    epochs: NonNegativeInt = 20
    batch_size: PositiveInt = 64
    weight_decay: NonNegativeFloat = 0.0
    #: share of held-out examples kept aside for early stopping (0: no early stopping)
    val_fraction: float = 0.2
    #: epochs without a better validation loss before stopping
    patience: PositiveInt = 5
    seed: int = 0
    #: "8GB"-style size or bytes; default the taster's budget (the cook's max_memory,
    #: else half of the machine's RAM)
    max_memory: int | float | str | None = None

    @field_validator("val_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"val_fraction={v} must be in [0, 1)")
        return v

    _size = field_validator("max_memory")(budget_option)


class SoupMixture(torch.nn.Module):
    """A soup whose weights are a differentiable function of mixing logits ``alpha``.

    Each floating tensor's ingredient values are stacked once (``k`` model copies, in
    float32); the mixed weights are ``softmax(alpha) @ stack``, and the model is called
    on them through :func:`torch.func.functional_call`. ``alpha`` has one row
    (per-ingredient soup) or one row per learnable tensor (``by_layer``), and starts at
    zero: the uniform soup. Floating buffers (BatchNorm statistics) are mixed with the
    same coefficients, detached, so they are averaged but not learned through; integer
    buffers come from the first ingredient. Call it with the model in eval mode, so
    running statistics are not updated.

    Example:
        >>> import torch
        >>> from modelsoup.ingredients import open_ingredients
        >>> a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
        >>> mix = SoupMixture(torch.nn.Linear(2, 1), open_ingredients([a, b]))
        >>> mix.coefficients()
        tensor([[0.5000, 0.5000]], grad_fn=<SoftmaxBackward0>)
        >>> torch.allclose(mix.weights()["bias"], (a.bias + b.bias) / 2)
        True
    """

    def __init__(
        self,
        model: torch.nn.Module,
        ingredients: Sequence[Ingredient],
        *,
        by_layer: bool = False,
        temperature: bool = False,
    ):
        super().__init__()
        if not ingredients:
            raise ConfigError("a learned soup needs at least one ingredient")
        # Not registered as a submodule: the mixture's parameters are alpha (and the
        # temperature) only, never the model's own weights.
        object.__setattr__(self, "model", model)
        self.ingredients = list(ingredients)
        layout = self.ingredients[0].layout()
        device = model_device(model)
        self.dtypes = {n: t.dtype for n, t in model.state_dict().items()}
        # Tied parameters (one tensor under two names) are learned once, under the
        # first name; the alias follows it.
        canonical: dict[int, str] = {}
        self.aliases: dict[str, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self.aliases[name] = canonical.setdefault(id(p), name)
        learnable = set(canonical.values())
        self.learned_names = [n for n, m in layout.items() if m.is_floating and n in learnable]
        self.buffer_names = [
            n
            for n, m in layout.items()
            if m.is_floating and n not in learnable and n not in self.aliases
        ]
        self.int_names = [n for n, m in layout.items() if not m.is_floating]
        if not self.learned_names:
            raise ConfigError("the model has no floating parameters to learn a soup over")
        self.stacks: dict[str, torch.Tensor] = {}
        for name in self.learned_names + self.buffer_names:
            self.stacks[name] = torch.stack(
                [ing.tensor(name).to(device, torch.float32) for ing in self.ingredients]
            )
        self.ints = {n: self.ingredients[0].tensor(n).to(device) for n in self.int_names}
        k = len(self.ingredients)
        rows = len(self.learned_names) if by_layer else 1
        self.by_layer = by_layer
        self.alpha = torch.nn.Parameter(torch.zeros(rows, k, device=device))
        # A multiplicative scale on the logits, starting at 1 (no change).
        self.scale = torch.nn.Parameter(torch.ones((), device=device)) if temperature else None
        self._row = {n: (i if by_layer else 0) for i, n in enumerate(self.learned_names)}
        # A buffer takes the coefficients of its module's parameters (``bn.running_mean``
        # follows ``bn.weight``), or the mean over all rows when its module has none.
        self._buffer_rows: dict[str, list[int]] = {}
        for name in self.buffer_names:
            prefix = name.rsplit(".", 1)[0] + "." if "." in name else ""
            same = [self._row[n] for n in self.learned_names if prefix and n.startswith(prefix)]
            self._buffer_rows[name] = sorted(set(same)) or list(range(rows))

    def coefficients(self) -> torch.Tensor:
        """The mixing coefficients, ``rows x k``: each row >= 0 and summing to 1."""
        return torch.softmax(self.alpha, dim=1)

    def tensor_coefficients(self) -> dict[str, torch.Tensor]:
        """Per-ingredient coefficients (a length-``k`` tensor) for every floating tensor."""
        coefs = self.coefficients()
        out = {n: coefs[self._row[n]] for n in self.learned_names}
        for alias, owner in self.aliases.items():
            if alias != owner and owner in out:
                out[alias] = out[owner]
        for name, rows in self._buffer_rows.items():
            out[name] = coefs[rows].mean(0).detach()
        return out

    def weights(self) -> dict[str, torch.Tensor]:
        """The soup's tensors for ``functional_call``: mixed floats, copied integers."""
        coefs = self.tensor_coefficients()
        state: dict[str, torch.Tensor] = {}
        for name in self.learned_names + self.buffer_names:
            stack = self.stacks[name]
            # A (k,) @ (k, n) product: no k-sized temporary, forward or backward.
            mixed = (coefs[name] @ stack.reshape(stack.shape[0], -1)).reshape(stack.shape[1:])
            # to the model's dtype as every soup is written: fp8 saturated, never Inf
            state[name] = saturating_cast(mixed, self.dtypes.get(name, torch.float32))
        state.update(self.ints)
        return state

    def forward(self, inputs: Any) -> torch.Tensor:
        """Logits of the mixed soup on one batch (scaled, if a temperature is learned)."""
        state = self.weights()

        def call(*args: Any, **kwargs: Any) -> Any:
            return torch.func.functional_call(self.model, state, args, kwargs)

        logits = forward_logits(call, inputs)
        return logits * self.scale if self.scale is not None else logits


def _examples(batches: list[tuple[Any, torch.Tensor]]) -> tuple[Any, torch.Tensor]:
    """Concatenate cached batches into one set of examples (tensors or dicts of tensors)."""
    labels = torch.cat([y for _, y in batches])
    first = batches[0][0]
    try:
        if isinstance(first, dict):
            inputs = {k: torch.cat([x[k] for x, _ in batches]) for k in first}
        else:
            inputs = torch.cat([x for x, _ in batches])
    except (RuntimeError, TypeError, KeyError):
        raise ConfigError(
            f"the learned soup splits the held-out examples, but its {len(batches)} batches "
            "cannot be joined (inputs padded to different lengths); give the held-out "
            f"evaluator one batch (batch_size of at least {len(labels)}), or pad every batch "
            "to one length"
        ) from None
    return inputs, labels


def _take(inputs: Any, idx: torch.Tensor) -> Any:
    if isinstance(inputs, dict):
        return {k: v[idx] for k, v in inputs.items()}
    return inputs[idx]


def _mean_loss(
    mix: SoupMixture, inputs: Any, labels: torch.Tensor, batch_size: int
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of the mixture on a set of examples (no grad)."""
    total, correct, n = 0.0, 0, len(labels)
    with torch.no_grad():
        for s in range(0, n, batch_size):
            idx = torch.arange(s, min(s + batch_size, n), device=labels.device)
            logits = mix(_take(inputs, idx))
            total += float(F.cross_entropy(logits.float(), labels[idx], reduction="sum"))
            correct += int((logits.argmax(-1) == labels[idx]).sum())
    return total / n, correct / n


def fit_mixture(
    mix: SoupMixture,
    batches: list[tuple[Any, torch.Tensor]],
    options: LearnedOptions | None = None,
) -> list[dict]:
    """Train ``mix``'s logits on held-out batches; keep the best-validation ones.

    ``options`` gives the fit's settings (``lr``, ``epochs``, ``batch_size``,
    ``weight_decay``, ``val_fraction``, ``patience``, ``seed``; the defaults of
    :class:`LearnedOptions` when None). A seeded ``val_fraction`` of the examples is
    held back; after every epoch the validation cross-entropy decides whether this is
    the best ``alpha`` so far, and training stops after ``patience`` epochs without
    improvement. Epoch 0 is the starting point (the uniform soup), so training never
    returns anything the validation split likes less. Returns the trace, one entry per epoch.

    Example:
        >>> import torch
        >>> from modelsoup.ingredients import open_ingredients
        >>> good = {"weight": torch.eye(2), "bias": torch.zeros(2)}
        >>> bad = {"weight": -torch.eye(2), "bias": torch.zeros(2)}
        >>> mix = SoupMixture(torch.nn.Linear(2, 2), open_ingredients([good, bad]))
        >>> x = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
        >>> trace = fit_mixture(mix, [(x, x.argmax(1))], LearnedOptions(lr=0.5, epochs=5))
        >>> float(mix.coefficients().detach()[0, 0]) > 0.9
        True
    """
    fit = options if options is not None else LearnedOptions()
    lr, epochs, batch_size = fit.lr, fit.epochs, fit.batch_size
    val_fraction, patience = fit.val_fraction, fit.patience
    inputs, labels = _examples(batches)
    n = len(labels)
    gen = torch.Generator().manual_seed(fit.seed)
    perm = torch.randperm(n, generator=gen).to(labels.device)
    n_val = int(round(n * val_fraction))
    if n_val >= n:
        n_val = n - 1
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    val_x, val_y = _take(inputs, val_idx), labels[val_idx]
    params = list(mix.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=fit.weight_decay)

    def checkpoint() -> list[torch.Tensor]:
        return [p.detach().clone() for p in params]

    def validate() -> tuple[float, float]:
        if n_val == 0:
            return math.nan, math.nan
        return _mean_loss(mix, val_x, val_y, batch_size)

    val_loss, val_acc = validate()
    best_loss, best_state, since = val_loss, checkpoint(), 0
    trace = [{"epoch": 0, "val_loss": val_loss, "val_accuracy": val_acc, "best": True}]
    for epoch in range(1, epochs + 1):
        order = train_idx[torch.randperm(len(train_idx), generator=gen).to(labels.device)]
        total = 0.0
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]  # positions in the whole held-out set
            opt.zero_grad()
            loss = F.cross_entropy(mix(_take(inputs, idx)).float(), labels[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        val_loss, val_acc = validate()
        entry = {"epoch": epoch, "train_loss": total / max(len(order), 1)}
        entry.update({"val_loss": val_loss, "val_accuracy": val_acc})
        if mix.scale is not None:
            entry["temperature_scale"] = float(mix.scale.detach())
        improved = n_val == 0 or val_loss < best_loss
        entry["best"] = improved
        trace.append(entry)
        if improved:
            best_loss, best_state, since = val_loss, checkpoint(), 0
        else:
            since += 1
            if since >= patience:
                trace[-1]["stopped"] = "early"
                break
    with torch.no_grad():
        for p, v in zip(params, best_state):
            p.copy_(v)
    return trace


def _held_out_batches(taster: Taster) -> list[tuple[Any, torch.Tensor]]:
    held = taster.held_out
    if not hasattr(held, "batches"):
        raise ConfigError(
            f"the learned soup trains on held-out batches, but evaluator {held.name} has none; "
            "use a built-in classifier evaluator (Accuracy, MeanLoss, MetricEvaluator)"
        )
    batches = held.batches(model_device(taster.model))
    if any(labels.dim() > 1 and labels[0].numel() > 1 for _, labels in batches):
        raise ConfigError(
            f"the learned soup fits its coefficients to one class label per example, but "
            f"evaluator {held.name} scores tokens (a language-model evaluator); use greedy "
            "or search for language models"
        )
    return batches


# the learned soup's one score (its training passes over held-out batches are not
# evaluations), after a greedy soup's with ingredients: greedy
@register(
    "learned",
    LearnedOptions,
    bound=lambda pool, o: 1 + (len(pool) - 1 if o.ingredients == "greedy" else 0),
)
def learned_soup(
    taster: Taster,
    *,
    by_layer: bool = False,
    temperature: bool = False,
    ingredients: str = "all",
    lr: float = 0.05,
    epochs: int = 20,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    val_fraction: float = 0.2,
    patience: int = 5,
    seed: int = 0,
    max_memory: int | float | str | None = None,
) -> Soup:
    """Learned soup: mixing coefficients trained by gradient on held-out data.

    Example:
        >>> import torch
        >>> from modelsoup.evaluators import Accuracy
        >>> from modelsoup.ingredients import open_ingredients
        >>> good = {"weight": torch.eye(2), "bias": torch.zeros(2)}
        >>> bad = {"weight": -torch.eye(2), "bias": torch.zeros(2)}
        >>> x = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
        >>> taster = Taster(open_ingredients([good, bad]), torch.nn.Linear(2, 2),
        ...                 Accuracy((x, x.argmax(1))))
        >>> soup = learned_soup(taster, lr=0.5, epochs=5)
        >>> soup.coefficients[0] > 0.9, soup.scores["held_out"]
        (True, 1.0)
    """
    options = {
        "by_layer": by_layer,
        "temperature": temperature,
        "ingredients": ingredients,
        "lr": lr,
        "epochs": epochs,
        "batch_size": batch_size,
        "weight_decay": weight_decay,
        "val_fraction": val_fraction,
        "patience": patience,
        "seed": seed,
        "max_memory": max_memory,
    }
    if ingredients not in ("all", "greedy"):
        raise ConfigError(f"ingredients='{ingredients}' is unknown; use 'all' or 'greedy'")
    # Fail on the evaluator and the budget before reading any tensor.
    batches = _held_out_batches(taster)
    n = len(taster.ingredients)
    trace: list[dict] = []
    if ingredients == "greedy":
        chosen = greedy_soup(taster)
        members = chosen.chosen
        trace.append({"greedy": [taster.ingredients[i].label for i in members]})
    else:
        members = list(range(n))
    layout = taster.ingredients[0].layout()
    rows = sum(1 for m in layout.values() if m.is_floating) if by_layer else 1
    positions = max(positions_per_example(x) for x, _ in batches)
    # on top of what tasting already holds (the model, the running sum, its staging)
    needed = learned_soup_bytes(
        layout, len(members), batch_size=batch_size, rows=rows, positions=positions
    ) + sum(taster.memory_bytes().values())
    advice = (
        "use ingredients: greedy or raise max_memory"
        if ingredients == "all"
        else "raise max_memory or use fewer ingredients"
    )
    budget = memory_budget(max_memory if max_memory is not None else taster.max_memory)
    check_budget(
        needed,
        budget,
        "the learned soup",
        advice,
        detail=f"for {len(members)} ingredient{'' if len(members) == 1 else 's'}",
    )

    # The fit is the costly part: keep its result beside the journal, so a re-run of the
    # same cook (same ingredients, held-out data and options) does not fit again. By
    # layer, row r of the cached table is the coefficients of tensor names[r]: the names
    # are part of the key, so a table is only ever read back onto the tensors it was
    # written for (a tied alias the ingredients do not store has no row).
    names = sorted(n for n, m in layout.items() if m.is_floating) if by_layer else []
    # what every score key names too (the model's architecture, recalibration, the base):
    # coefficients fitted in another architecture are not this one's
    extra = {**taster.key_context(members), **{k: repr(v) for k, v in options.items()}}
    if by_layer:
        extra["rows"] = names
    cache_key = "learned-" + taster.journal.key(
        f"learned:{identity(taster.held_out)}",
        [(taster.ident(i), float(k + 1)) for k, i in enumerate(members)],
        extra,
    )
    cached = taster.journal.load_outputs(cache_key)
    shape = (len(names) if by_layer else 1, len(members) + 1)
    if cached is not None and tuple(cached.shape) == shape:
        coefs, scales = cached[:, :-1], cached[:, -1]
        per_tensor = {n: coefs[r].tolist() for r, n in enumerate(names)} if by_layer else {}
        mean = coefs.mean(0).tolist()
        scale = float(scales[0]) if temperature else None
        trace.append({"reused": "coefficients fitted by an earlier run (journal)"})
        return _finish(taster, members, mean, per_tensor, scale, options, trace, by_layer)

    model = taster.model
    was_training = model.training
    # Eval mode throughout: BatchNorm uses the mixed running statistics and does not
    # update them, and dropout does not make the objective noisy.
    model.eval()
    try:
        mix = SoupMixture(
            model,
            [taster.ingredients[i] for i in members],
            by_layer=by_layer,
            temperature=temperature,
        )
        if len(members) > 1:
            # The options as given, unvalidated, as a direct call has always taken them.
            trace += fit_mixture(mix, batches, LearnedOptions.model_construct(**options))
        with torch.no_grad():
            per_tensor = {n: c.tolist() for n, c in mix.tensor_coefficients().items()}
            mean = mix.coefficients().mean(0).tolist()
            scale = float(mix.scale.detach()) if mix.scale is not None else None
        del mix  # free the k stacked copies before scoring
    finally:
        model.train(was_training)
    if by_layer:
        # The soup's tensors, as a re-run reads them back: an alias the ingredients do
        # not store follows its tensor in the model, and needs no coefficients of its own.
        per_tensor = {n: per_tensor[n] for n in names if n in per_tensor}
    rows_out = list(per_tensor.values()) if by_layer else [mean]
    table = torch.tensor([[*r, scale if scale is not None else 1.0] for r in rows_out])
    if len(rows_out) == shape[0]:  # else a name has no coefficients: fit again next time
        taster.journal.save_outputs(cache_key, table)
    mean = table[:, :-1].mean(0).tolist()  # as a re-run computes it from the cache
    return _finish(taster, members, mean, per_tensor, scale, options, trace, by_layer)


def _finish(
    taster: Taster,
    members: list[int],
    mean: Sequence[float],
    per_tensor: dict[str, list[float]],
    scale: float | None,
    options: dict,
    trace: list[dict],
    by_layer: bool,
) -> Soup:
    n = len(taster.ingredients)

    def spread(values: Sequence[float]) -> list[float]:
        # Back to pool positions; ingredients left out by greedy get exactly 0.
        out = [0.0] * n
        for i, v in zip(members, values):
            out[i] = float(v)
        return out

    if scale is not None:
        options["learned_temperature_scale"] = scale
    soup = taster.soup(
        spread(mean),
        recipe="learned",
        options=options,
        trace=trace,
        tensor_coefficients={k: spread(v) for k, v in per_tensor.items()} if by_layer else None,
    )
    # Scored on the whole held-out set, as the other recipes are, so rows compare.
    score = taster.score_soup(soup) if by_layer else taster.score(soup.coefficients)
    return soup.with_scores({"held_out": score})
