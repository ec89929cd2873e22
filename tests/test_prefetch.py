"""Reads overlapped with evaluation (prefetch): identical results, fewer reads waited on."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from modelsoup.cook import cook
from modelsoup.errors import MemoryBudgetError
from modelsoup.evaluators import Accuracy
from modelsoup.ingredients import open_ingredients
from modelsoup.journal import Journal
from modelsoup.recipes import forward_selection_soup, greedy_soup, pruned_soup
from modelsoup.tasting import Taster


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def _pool(folder, dtype=torch.float32, n: int = 7):
    """Fine-tunes of one start, some close to a good solution and some far from it."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 6, generator=gen)
    torch.manual_seed(0)  # the start, and so the labels, the same in every run
    start = _model()
    y = start(x).argmax(-1)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        noise = 0.05 if i % 3 else 0.8
        sd = {
            k: (v + noise * torch.randn(v.shape, generator=gen)).to(dtype)
            for k, v in start.state_dict().items()
        }
        path = folder / f"run{i}.safetensors"
        safetensors.torch.save_file(sd, str(path))
        paths.append(path)
    return paths, Accuracy((x, y), batch_size=64, name="held")


def _journal_entries(path):
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in e.items() if k != "time"} for e in entries]


RECIPES = [
    (greedy_soup, {}),
    (greedy_soup, {"order": "random", "seed": 2}),
    (pruned_soup, {"passes": 2}),
    (forward_selection_soup, {}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("recipe", "options"), RECIPES)
def test_prefetch_on_and_off_give_bitwise_identical_soups_scores_journals(
    tmp_path, recipe, options, dtype
):
    paths, evaluator = _pool(tmp_path / "pool", dtype)
    runs = {}
    for prefetch in (True, False):
        journal = tmp_path / f"journal-{prefetch}.jsonl"
        taster = Taster(
            open_ingredients(paths),
            _model(),
            evaluator,
            journal=Journal(journal),
            prefetch=prefetch,
        )
        soup = recipe(taster, **options)
        runs[prefetch] = (soup, taster, _journal_entries(journal))
    (on, t_on, j_on), (off, t_off, j_off) = runs[True], runs[False]
    assert t_on.prefetched > 0 and t_off.prefetched == 0
    assert on.chosen == off.chosen and on.coefficients == off.coefficients
    assert on.scores == off.scores and on.trace == off.trace
    assert j_on == j_off
    assert t_on.individual_scores() == t_off.individual_scores()
    a, b = on.state_dict(), off.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the module the taster evaluated holds the same bits too
    ma, mb = t_on.model.state_dict(), t_off.model.state_dict()
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_staged_ingredient_sums_like_a_read_one(tmp_path):
    paths, evaluator = _pool(tmp_path / "pool", n=3)
    taster = Taster(open_ingredients(paths), _model(), evaluator, prefetch=False)
    acc = taster.accumulator
    acc.add(0)
    acc.stage(2)
    staged = {n: acc.mean(n).clone() for n in acc.float_names}
    acc.add(2)
    with_stage = {n: acc.mean(n).clone() for n in acc.float_names}
    acc.remove(2)
    acc._staged_position = None  # read it from the file this time
    acc.add(2)
    assert all(torch.equal(with_stage[n], acc.mean(n)) for n in acc.float_names)
    assert not all(torch.equal(staged[n], with_stage[n]) for n in acc.float_names)


def test_prefetch_memory_is_model_sum_and_one_staging_buffer(tmp_path):
    paths, evaluator = _pool(tmp_path / "pool", torch.float16, n=2)
    taster = Taster(open_ingredients(paths), _model(), evaluator)
    numel = sum(p.numel() for p in _model().parameters())
    assert taster.memory_bytes() == {"model": 4 * numel, "sum": 4 * numel, "staging": 2 * numel}
    assert taster.prefetch_enabled
    small = Taster(open_ingredients(paths), _model(), evaluator, max_memory=10 * numel - 1)
    assert not small.prefetch_enabled
    with pytest.raises(MemoryBudgetError, match="prefetch"):
        Taster(open_ingredients(paths), _model(), evaluator, prefetch=True, max_memory=8 * numel)


def test_cook_prefetch_false_reads_nothing_ahead_and_cooks_the_same(tmp_path):
    paths, evaluator = _pool(tmp_path / "pool", n=4)
    results = {
        p: cook(
            paths,
            _model,
            evaluator,
            recipes=[{"name": "greedy"}, {"name": "pruned"}],
            prefetch=p,
            bootstrap_resamples=10,
            progress=False,
        )
        for p in (None, False)
    }
    assert results[False].taster_stats["prefetched"] == 0
    assert results[None].taster_stats["prefetched"] > 0
    picks = {p: [(m.label, m.held_out) for m in r.methods] for p, r in results.items()}
    assert picks[None] == picks[False]


def test_a_position_outside_the_pool_is_refused(tmp_path):
    paths, evaluator = _pool(tmp_path / "pool", n=2)
    taster = Taster(open_ingredients(paths), _model(), evaluator)
    with pytest.raises(Exception, match="outside the pool"):
        taster.prefetch(5)


def test_max_memory_is_a_cook_key_for_prefetch_and_the_learned_soup(tmp_path):
    from modelsoup.cook.config import load_config
    from modelsoup.errors import ConfigError

    paths, evaluator = _pool(tmp_path / "pool", n=3)
    numel = sum(p.numel() for p in _model().parameters())
    cfg = tmp_path / "soup.yaml"
    head = "model: m:f\ningredients: [a]\nheld_out: m:e\noutput: o\n"
    cfg.write_text(head + "max_memory: 2KB\n")
    assert load_config(cfg).options().max_memory == "2KB"
    for bad, why in (("lots", "is not understood"), ("0", "must be positive")):
        cfg.write_text(head + f"max_memory: {bad}\n")
        with pytest.raises(ConfigError, match=f"config key 'max_memory': size .*{why}"):
            load_config(cfg)
    small = 10 * numel - 1  # below model + sum + staging buffer, in bytes
    kwargs = {"recipes": [{"name": "greedy"}], "bootstrap_resamples": 10, "progress": False}
    tight = cook(paths, _model, evaluator, max_memory=small, **kwargs)
    assert tight.taster_stats["prefetched"] == 0
    assert cook(paths, _model, evaluator, max_memory="1GB", **kwargs).taster_stats["prefetched"]
    with pytest.raises(MemoryBudgetError, match="prefetch"):
        cook(paths, _model, evaluator, max_memory=small, prefetch=True, **kwargs)
    # the learned soup holds every ingredient: the cook's budget is its default
    learned = {**kwargs, "recipes": [{"name": "learned", "epochs": 1}], "baselines": False}
    with pytest.raises(MemoryBudgetError, match="the learned soup"):
        cook(paths, _model, evaluator, max_memory=small, prefetch=False, **learned)
    learned["recipes"] = [{"name": "learned", "epochs": 1, "max_memory": "1GB"}]
    cook(paths, _model, evaluator, max_memory=small, prefetch=False, **learned)


def test_pruned_reads_each_candidate_once_after_a_change_of_soup(tmp_path):
    # The recipe's hint names the ingredient each candidate removes: the taster settles
    # the sum on the current soup, so every candidate reads one ingredient (and an
    # accepted removal is read once more, by the next candidate), never "put the last one
    # back, take this one out".
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    start = _model().state_dict()
    pool = [  # every third one far from the start
        {k: v + (0.8 if i % 3 == 0 else 0.05) * torch.randn(v.shape, generator=gen)
         for k, v in start.items()}
        for i in range(7)
    ]  # fmt: skip
    target = start["0.weight"]

    def closeness(model):  # the closer the soup to the start, the better
        return -float((model[0].weight.detach() - target).norm())

    paths = pool
    taster = Taster(open_ingredients(pool), _model(), closeness, prefetch=False)
    acc = taster.accumulator
    reads, marks = [], []
    read, materialise = acc._read, taster.materialise

    def counted_read(position, name, buffer=None):
        reads.append(position)
        return read(position, name, buffer)

    def counted_materialise(weights):
        marks.append(len(reads))
        return materialise(weights)

    acc._read, taster.materialise = counted_read, counted_materialise
    soup = pruned_soup(taster, passes=2)
    n, names = len(paths), len(acc.float_names)
    accepted = n - len(soup.chosen)
    assert accepted >= 1  # the far fine-tunes go, so the soup changes along the way
    # after the full soup, the n individuals and the first candidate (rebuilt from the
    # last individual, and rejected): the reads of each candidate, in ingredients
    per = [(b - a) // names for a, b in zip(marks[n + 2 :], [*marks[n + 3 :], len(reads)])]
    assert len(per) == taster.evaluations - n - 2 >= 5
    # two reads: settling the sum after the rebuilt first candidate, and after each
    # accepted removal
    assert set(per) <= {1, 2} and per.count(2) <= accepted + 1
