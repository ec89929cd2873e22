"""Evaluators given what used to give a plausible wrong number: a one-logit head, token
logits, labels outside the classes, and two evaluators a journal could not tell apart."""

from __future__ import annotations

import functools
import sys

import pytest
import torch

from modelsoup.cli import main
from modelsoup.cook import cook
from modelsoup.errors import ConfigError
from modelsoup.evaluators import Accuracy, FunctionEvaluator, MeanLoss

WEIGHTS = [{"weight": torch.full((1, 1), v)} for v in (1.0, 2.0, 3.0)]


def closeness(model: torch.nn.Module, target: float) -> float:
    return 1 - abs(float(model.weight.detach()) - target) / 10


class _Target:
    def __init__(self, value: float):
        self.value = value


class _Hidden:
    __slots__ = ("value",)  # no __dict__: nothing the identity can read

    def __init__(self, value: float):
        self.value = value


def test_held_out_and_test_of_one_name_are_refused():
    # two lambdas of one code over objects the identity cannot see into
    make = lambda target: lambda m: closeness(m, target.value)  # noqa: E731
    held, test = make(_Hidden(2.0)), make(_Hidden(3.0))
    with pytest.raises(ConfigError, match="different evaluators that are both named"):
        cook(WEIGHTS, torch.nn.Linear(1, 1, bias=False), held, test=test, progress=False)


USER_MODULE = """
import functools

import torch

THRESHOLD = 0.5


def logged(fn):
    @functools.wraps(fn)
    def wrapper(model):
        return fn(model)

    return wrapper


@logged
def decorated(model):
    return 0.25


def plain_wrapper(fn):
    def call(model):
        return fn(model)

    return call


wrapped = plain_wrapper(lambda model: 0.75)


def _passes(x):
    return x > THRESHOLD


def metric(model):
    return float(_passes(0.7))


class Scorer:
    name = "scorer"
    higher_is_better = True

    def __init__(self, cutoff=0.5):
        self.cutoff = cutoff
        self._calls = 0

    def evaluate(self, model):
        self._calls += 1
        return float(_passes(self.cutoff))
"""


def _user_module(folder, text):
    # the user's evaluation module as a later run imports it: same name, maybe edited
    import importlib.util

    folder.mkdir()
    (folder / "user_eval.py").write_text(text)
    spec = importlib.util.spec_from_file_location("user_eval", folder / "user_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_edit_to_what_an_evaluator_reads_is_another_measure(tmp_path):
    import subprocess
    import sys

    from modelsoup.evaluators import as_evaluator, identity

    def ids(module, **settings):
        return identity(as_evaluator(module.metric)), identity(module.Scorer(**settings))

    first = ids(_user_module(tmp_path / "a", USER_MODULE))
    assert ids(_user_module(tmp_path / "b", USER_MODULE)) == first  # unedited: resumed
    edits = {
        "a global it reads": ("THRESHOLD = 0.5", "THRESHOLD = 0.6"),
        "a helper it calls": ("x > THRESHOLD", "x >= THRESHOLD"),
    }
    for n, (what, (old, new)) in enumerate(edits.items()):
        edited = ids(_user_module(tmp_path / f"e{n}", USER_MODULE.replace(old, new)))
        assert edited[0] != first[0] and edited[1] != first[1], what
    # what a decorator wraps (functools.wraps or not) is read through the wrapper
    for n, (name, old, new) in enumerate(
        [("decorated", "return 0.25", "return 0.5"), ("wrapped", "0.75)", "0.5)")]
    ):
        before = identity(
            as_evaluator(getattr(_user_module(tmp_path / f"w{n}", USER_MODULE), name))
        )
        edited = _user_module(tmp_path / f"v{n}", USER_MODULE.replace(old, new))
        assert identity(as_evaluator(getattr(edited, name))) != before, name
    method = _user_module(tmp_path / "m", USER_MODULE.replace("_passes(self.cutoff)", "1.0"))
    assert ids(method)[1] != first[1]  # an edited evaluate()
    module = _user_module(tmp_path / "s", USER_MODULE)
    assert identity(module.Scorer(cutoff=0.7)) != first[1]  # a public setting
    counted = module.Scorer()
    counted._calls = 5  # a private counter is not
    assert identity(counted) == first[1]
    # closed-over tensors by their contents
    make = lambda target: lambda m: float(target.sum())  # noqa: E731
    assert identity(as_evaluator(make(torch.zeros(2)))) != identity(
        as_evaluator(make(torch.ones(2)))
    )
    # and the same in another process, as a resumed run reads the journal
    path = str(tmp_path / "a" / "user_eval.py")
    code = (
        "import sys, importlib.util; from modelsoup.evaluators import identity, as_evaluator; "
        f"spec = importlib.util.spec_from_file_location('user_eval', {path!r}); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        "print(identity(as_evaluator(m.metric)), identity(m.Scorer()))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == list(first)


def test_helpers_of_another_module_of_yours_are_part_of_the_measure(tmp_path, monkeypatch):
    import importlib
    import sys

    from modelsoup.evaluators import as_evaluator, identity

    main_text = (
        "import user_helpers\nfrom user_helpers import passes\n\n"
        "def metric(model):\n    return float(passes(0.7))\n\n"
        "def by_module(model):\n    return float(user_helpers.passes(user_helpers.LEVEL))\n"
    )
    helper_text = "LEVEL = 0.7\n\ndef passes(x):\n    return x > 0.5\n"

    def ids(folder, helpers):
        folder.mkdir()
        (folder / "user_helpers.py").write_text(helpers)
        monkeypatch.syspath_prepend(str(folder))
        sys.modules.pop("user_helpers", None)  # a later run imports the edited file
        importlib.invalidate_caches()
        module = _user_module(folder / "main", main_text)
        return identity(as_evaluator(module.metric)), identity(as_evaluator(module.by_module))

    first = ids(tmp_path / "a", helper_text)
    assert ids(tmp_path / "b", helper_text) == first
    edited = ids(tmp_path / "c", helper_text.replace("x > 0.5", "x >= 0.5"))
    assert edited[0] != first[0] and edited[1] != first[1]  # an imported helper edited
    moved = ids(tmp_path / "d", helper_text.replace("LEVEL = 0.7", "LEVEL = 0.2"))
    assert moved[1] != first[1] and moved[0] == first[0]  # a setting read as module.NAME


SETTINGS = {"target": 2.0}


def _reads_a_global_dict(model) -> float:
    return -abs(float(model.weight.detach()) - SETTINGS["target"])


class _Options:
    def __init__(self, target: float) -> None:
        self.target = target


class _ByOptions:
    name, higher_is_better = "by-options", True

    def __init__(self, options: _Options, reference: torch.Tensor) -> None:
        self.options, self.reference = options, reference

    def evaluate(self, model) -> float:
        return -abs(float(model.weight.detach()) - self.options.target)


def test_dicts_config_objects_and_tensors_an_evaluator_reads_are_part_of_the_measure(
    monkeypatch,
):
    from modelsoup.evaluators import as_evaluator, identity

    first = identity(as_evaluator(_reads_a_global_dict))
    monkeypatch.setitem(SETTINGS, "target", 1.0)
    assert identity(as_evaluator(_reads_a_global_dict)) != first  # a global dict's value
    ref = torch.zeros(3)
    same = identity(_ByOptions(_Options(2.0), ref))
    assert identity(_ByOptions(_Options(2.0), ref.clone())) == same
    assert identity(_ByOptions(_Options(1.0), ref)) != same  # a config object's setting
    assert identity(_ByOptions(_Options(2.0), torch.ones(3))) != same  # a tensor setting
    looped = _Options(2.0)
    looped.again = looped  # a cycle is read a few levels deep, not forever
    assert identity(_ByOptions(looped, ref))


_CACHE: dict = {}
_SCALE = 2.0


def _reads_a_private_setting(model) -> float:
    return _SCALE


def _fills_a_private_cache(model) -> float:
    _CACHE.setdefault("x", 1.0)
    return _CACHE["x"] + SETTINGS["target"]


def test_a_private_cache_is_not_part_of_the_measure_and_large_tensors_are_sampled(monkeypatch):
    from modelsoup import evaluators
    from modelsoup.evaluators import as_evaluator, identity

    before = identity(as_evaluator(_fills_a_private_cache))
    _fills_a_private_cache(None)
    assert identity(as_evaluator(_fills_a_private_cache)) == before  # filled as it ran
    scaled = identity(as_evaluator(_reads_a_private_setting))
    monkeypatch.setattr(sys.modules[__name__], "_SCALE", 3.0)
    assert identity(as_evaluator(_reads_a_private_setting)) != scaled  # a private number is
    monkeypatch.setattr(evaluators, "TENSOR_HASH_ELEMENTS", 64)  # "large": past 64 entries
    data = torch.randn(10_000)
    edited = data.clone()
    edited[4321] += 1e-3  # one entry the sample skips: the sum of the bits still sees it
    same = identity(_ByOptions(_Options(2.0), data))
    assert identity(_ByOptions(_Options(2.0), data.clone())) == same
    assert identity(_ByOptions(_Options(2.0), edited)) != same


@pytest.mark.parametrize("how", ["lambda", "partial", "closure"])
def test_functions_of_one_name_that_measure_differently_keep_their_scores_apart(how):
    # their code, bound arguments or closed-over numbers tell them apart
    if how == "lambda":
        held, test = (lambda m: closeness(m, 2.0)), (lambda m: closeness(m, 3.0))
    elif how == "partial":
        held, test = (functools.partial(closeness, target=t) for t in (2.0, 3.0))
    else:
        make = lambda target: lambda m: closeness(m, target)  # noqa: E731
        held, test = make(2.0), make(3.0)
    result = cook(WEIGHTS, torch.nn.Linear(1, 1, bias=False), held, test=test,
                  recipes=[{"name": "greedy"}], progress=False, bootstrap_resamples=20)  # fmt: skip
    assert result.individual_held_out == pytest.approx([0.9, 1.0, 0.9])
    assert result.individual_test == pytest.approx([0.8, 0.9, 1.0])


def test_named_functions_keep_their_scores_apart():
    held = FunctionEvaluator(functools.partial(closeness, target=2.0), name="held")
    test = FunctionEvaluator(functools.partial(closeness, target=3.0), name="test")
    result = cook(WEIGHTS, torch.nn.Linear(1, 1, bias=False), held, test=test,
                  recipes=[{"name": "greedy"}], progress=False, bootstrap_resamples=20)  # fmt: skip
    assert result.individual_held_out == pytest.approx([0.9, 1.0, 0.9])
    assert result.individual_test == pytest.approx([0.8, 0.9, 1.0])


def test_one_evaluator_given_as_both_is_a_warning_not_an_error():
    score = functools.partial(closeness, target=2.0)
    with pytest.warns(UserWarning, match="not an honest test"):
        cook(WEIGHTS, torch.nn.Linear(1, 1, bias=False), score, test=score,
             recipes=[{"name": "greedy"}], progress=False, bootstrap_resamples=20)  # fmt: skip


class OneLogit(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1]


@pytest.mark.parametrize("evaluator", [Accuracy, MeanLoss])
@pytest.mark.parametrize(
    "model, x, y, needle",
    [
        (OneLogit(), torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 1, 0]), r"shape \(6, 1\)"),
        (torch.nn.Identity(), torch.randn(2, 4, 3), torch.zeros(8, dtype=torch.long), "shape"),
        (torch.nn.Identity(), torch.randn(3, 3), torch.tensor([0, 7, 1]), "label 7 is not one"),
        (torch.nn.Identity(), torch.randn(3, 3), torch.tensor([0, -100, 1]), "-100 marks"),
        (torch.nn.Identity(), torch.randn(3, 3), torch.tensor([0.0, 1.0, 2.0]), "not class"),
    ],
    ids=["one-logit", "token-logits", "label-out-of-range", "ignored-label", "float-labels"],
)
def test_logits_and_labels_a_classifier_score_would_misread_are_refused(
    evaluator, model, x, y, needle
):
    with pytest.raises(ConfigError, match=needle):
        evaluator((x, y)).evaluate(model)


def test_a_list_of_single_examples_is_refused():
    pairs = [(torch.randn(3), torch.tensor(i % 3)) for i in range(6)]
    with pytest.raises(ConfigError, match="one row of at least two class logits per label"):
        Accuracy(pairs).evaluate(torch.nn.Identity())


def test_the_cli_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    import safetensors.torch

    (tmp_path / "kit.py").write_text(
        "import torch\nfrom modelsoup.evaluators import Accuracy\n"
        "def model():\n    return torch.nn.Linear(3, 1)\n"
        "def held():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    return Accuracy((torch.randn(20, 3, generator=g), torch.arange(20) % 2))\n"
    )
    for i in range(2):
        torch.manual_seed(i)
        safetensors.torch.save_file(
            torch.nn.Linear(3, 1).state_dict(), tmp_path / f"m{i}.safetensors"
        )
    (tmp_path / "cook.yaml").write_text(
        f"model: kit.py:model\ningredients: ['{tmp_path}/m*.safetensors']\n"
        f"held_out: kit.py:held\noutput: {tmp_path / 'out'}\n"
    )
    monkeypatch.chdir(tmp_path)
    assert main(["cook", str(tmp_path / "cook.yaml"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "shape (20, 1)" in err[0]


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32, torch.int8, torch.uint8])
def test_integer_and_boolean_labels_are_class_numbers(dtype):
    x = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([1, 0, 1]).to(dtype)
    assert Accuracy((x, y)).evaluate(torch.nn.Identity()) == 1.0
    expected = MeanLoss((x, torch.tensor([1, 0, 1]))).evaluate(torch.nn.Identity())
    assert MeanLoss((x, y)).evaluate(torch.nn.Identity()) == pytest.approx(expected)


def test_evaluators_on_other_nested_inputs_are_other_measures():
    from modelsoup.evaluators import identity

    y = torch.zeros(4, dtype=torch.long)
    a = Accuracy([((torch.ones(4, 2), torch.ones(4, 2)), y)])
    b = Accuracy([((torch.ones(4, 2), torch.zeros(4, 2)), y)])  # a tuple input differs
    assert identity(a) != identity(b)
    c = Accuracy([({"x": torch.ones(4, 2), "scale": 1.0}, y)])
    d = Accuracy([({"x": torch.ones(4, 2), "scale": -1.0}, y)])  # a plain value differs
    assert identity(c) != identity(d)
