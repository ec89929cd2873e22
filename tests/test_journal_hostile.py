"""A journal read back is checked like a score being recorded: each bad line is named,
ignored alone, and only its evaluation runs again (counted, to prove the good lines are
reused)."""

from __future__ import annotations

import json
import math
import re
import warnings

import pytest
import safetensors.torch
import torch

from modelsoup.errors import EvaluationError, SoupWarning
from modelsoup.evaluators import Accuracy
from modelsoup.ingredients import open_ingredients
from modelsoup.journal import Journal
from modelsoup.tasting import Taster

COUNT = 5


@pytest.fixture
def pool_files(tmp_path):
    paths = []
    for seed in range(COUNT):
        torch.manual_seed(seed)
        net = torch.nn.Linear(4, 3)
        path = tmp_path / f"ing{seed}.safetensors"
        safetensors.torch.save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
        paths.append(path)
    return paths


def _data():
    torch.manual_seed(100)
    x = torch.randn(64, 4)
    return x, torch.randint(0, 3, (64,))


def _taste(paths, journal_path):
    """Each ingredient's held-out accuracy through a Taster on a journal file."""
    taster = Taster(
        open_ingredients([str(p) for p in paths]),
        torch.nn.Linear(4, 3),
        Accuracy(_data(), name="acc"),
        journal=Journal(journal_path),
    )
    return taster.individual_scores(), taster


@pytest.fixture
def journal(tmp_path, pool_files):
    path = tmp_path / "journal.jsonl"
    scores, taster = _taste(pool_files, path)
    assert taster.evaluations == COUNT
    assert len(path.read_bytes().splitlines()) == 1 + COUNT  # the header, one line each
    return path, scores


def _replace_line(path, number, make):
    """Rewrite line ``number`` (1-based) of the file with ``make(entry)`` (bytes)."""
    lines = path.read_bytes().splitlines()
    lines[number - 1] = make(json.loads(lines[number - 1]))
    path.write_bytes(b"\n".join(lines) + b"\n")


def _with_score(text):
    # JSON text for a score, as a hostile or broken writer would leave it
    def make(entry):
        return json.dumps({**entry, "score": "@@"}).replace('"@@"', text).encode()

    return make


HOSTILE = {
    "NaN": (_with_score("NaN"), "not a finite number"),
    "Infinity": (_with_score("Infinity"), "not a finite number"),
    "-Infinity": (_with_score("-Infinity"), "not a finite number"),
    "1e999": (_with_score("1e999"), "not a finite number"),
    "huge integer": (_with_score("1" + "0" * 400), "out of range"),
    "string": (_with_score('"0.999"'), "is a str, not a number"),
    "boolean": (_with_score("true"), "is a bool, not a number"),
    "null": (_with_score("null"), "not a number"),
    "key not a string": (lambda e: json.dumps({**e, "key": 7}).encode(), "sha256"),
    "detail a list": (lambda e: json.dumps({**e, "detail": [1]}).encode(), "not an object"),
    "time a string": (lambda e: json.dumps({**e, "time": "now"}).encode(), "not a number"),
    "a list": (lambda e: json.dumps([e]).encode(), "not an object"),
    "non-UTF-8 byte": (lambda e: json.dumps(e).encode().replace(b'"key"', b'"k\xffy"'), "UTF-8"),
    "cut off": (lambda e: json.dumps(e).encode()[:20], "not JSON"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_each_hostile_line_is_reported_and_ignored_alone(journal, pool_files, case):
    path, scores = journal
    make, why = HOSTILE[case]
    _replace_line(path, 3, make)  # the second ingredient's score
    with pytest.warns(SoupWarning) as caught:
        again, taster = _taste(pool_files, path)
    messages = [str(w.message) for w in caught if "journal line" in str(w.message)]
    assert len(messages) == 1, messages
    assert "1 corrupt journal line(s) ignored" in messages[0]
    assert "line 3:" in messages[0] and why in messages[0]
    # only the bad line's evaluation runs again; the other four are reused
    assert taster.evaluations == 1 and taster.reused == COUNT - 1
    assert again == scores
    assert all(math.isfinite(s) and 0 <= s <= 1 for s in again)


@pytest.mark.parametrize("value", ["1e308", "-0.5", "1.0000001"])
def test_a_score_outside_the_evaluators_range_is_not_trusted(journal, pool_files, value):
    path, scores = journal
    _replace_line(path, 4, _with_score(value))  # finite, but no accuracy is 1e308
    with pytest.warns(SoupWarning, match=r"line 4 ignored: score .* outside .*range \[0.0, 1.0\]"):
        again, taster = _taste(pool_files, path)
    assert taster.evaluations == 1 and taster.reused == COUNT - 1
    assert again == scores


def test_many_bad_lines_make_one_warning_that_names_each(journal, pool_files):
    path, scores = journal
    _replace_line(path, 2, _with_score("NaN"))
    _replace_line(path, 4, _with_score("true"))
    lines = path.read_bytes().splitlines()
    lines[5] = lines[5][:-3] + b"\xfe\xff}"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again, taster = _taste(pool_files, path)
    messages = [str(w.message) for w in caught if issubclass(w.category, SoupWarning)]
    assert len(messages) == 1, messages
    text = messages[0]
    assert "3 corrupt journal line(s)" in text
    assert "line 2: score nan" in text and "line 4: score True is a bool" in text
    assert "line 6: not UTF-8" in text
    assert taster.evaluations == 3 and taster.reused == COUNT - 3
    assert again == scores
    # The journal was not set aside: the good lines stay, the new scores were appended.
    assert not list(path.parent.glob("journal.jsonl.ignored-*"))
    lines = path.read_bytes().splitlines()  # the same file, the bad lines named once
    noted = [json.loads(line)["ignored_lines"] for line in lines if b"ignored_lines" in line]
    assert len(noted) == 1 and len(noted[0]) == 3 and len(lines) == 1 + COUNT + 1 + 3


def test_a_journal_with_a_bad_header_byte_is_set_aside_whole(journal, pool_files):
    path, _ = journal
    path.write_bytes(b"\xff" + path.read_bytes())
    with pytest.warns(SoupWarning, match="not a modelsoup journal"):
        _, taster = _taste(pool_files, path)
    assert taster.evaluations == COUNT


def test_a_line_cut_off_by_a_crash_is_ended_before_the_next_entry(journal, pool_files):
    path, scores = journal
    whole = path.read_bytes()
    path.write_bytes(whole[:-40])  # the last entry cut off mid-line
    with pytest.warns(SoupWarning, match="line 6"):
        again, taster = _taste(pool_files, path)
    assert again == scores and taster.evaluations == 1
    # the entry measured again is on a line of its own, and found by the next run
    assert path.read_bytes().endswith(b"}\n") and b"}{" not in path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SoupWarning)
        third, taster = _taste(pool_files, path)
    assert third == scores and taster.evaluations == 0


def test_an_evaluator_name_never_lets_other_data_share_its_scores(journal, pool_files):
    # the same name on other examples: scores are measured again, not reused
    path, scores = journal
    x, y = _data()
    taster = Taster(
        open_ingredients([str(p) for p in pool_files]),
        torch.nn.Linear(4, 3),
        Accuracy((x[:32], y[:32]), name="acc"),
        journal=Journal(path),
    )
    assert taster.individual_scores() != scores or taster.reused == 0
    assert taster.evaluations == COUNT and taster.reused == 0


class _Shifted(torch.nn.Linear):
    """The same tensors as Linear(4, 3), another function of them."""

    def forward(self, x):
        return super().forward(x).roll(1, dims=-1)


def test_another_model_of_the_same_tensors_never_reuses_their_scores(journal, pool_files):
    path, scores = journal
    taster = Taster(
        open_ingredients([str(p) for p in pool_files]),
        _Shifted(4, 3),
        Accuracy(_data(), name="acc"),
        journal=Journal(path),
    )
    taster.individual_scores()
    assert taster.evaluations == COUNT and taster.reused == 0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "0.5", True, None])
def test_record_refuses_what_load_would_refuse(tmp_path, bad):
    book = Journal(tmp_path / "journal.jsonl")
    with pytest.raises(EvaluationError, match="evaluator acc returned"):
        book.record("a" * 64, bad, {"evaluator": "acc"})
    assert not (tmp_path / "journal.jsonl").exists()
    assert book.lookup("a" * 64) is None


@pytest.mark.parametrize("bad", ["numpy", "torch"])
def test_a_boolean_array_scalar_is_not_a_score(bad):
    import numpy as np

    from modelsoup.evaluators import check_score

    value = np.bool_(True) if bad == "numpy" else torch.tensor(True)
    with pytest.raises(EvaluationError, match="it must return a number"):
        check_score(value, "acc")
    assert check_score(np.float32(0.5), "acc") == 0.5


class _TokenPreference(torch.nn.Module):
    """A language model over 4 tokens that predicts the same distribution everywhere."""

    def __init__(self):
        super().__init__()
        self.logit = torch.nn.Parameter(torch.zeros(4))

    def forward(self, input_ids, attention_mask):
        return self.logit.expand(*input_ids.shape, 4)


def _language_evaluators():
    from modelsoup.hf.language import CausalLMLoss, MultipleChoice

    loss = CausalLMLoss([([0, 1, 2, 3], 1), ([3, 2, 1], 1)], name="nll")
    choice = MultipleChoice([[([0, 1], 1), ([0, 2], 1)], [([0, 2], 1), ([0, 3], 1)]], [1, 1])
    return {"loss": (loss, "[0.0, inf]"), "choice": (choice, "[0.0, 1.0]")}


@pytest.mark.parametrize(
    ("which", "value"),
    [("loss", "-0.5"), ("choice", "1e308"), ("choice", "-0.5"), ("choice", "1.5")],
)
def test_language_model_scores_outside_their_range_are_not_trusted(tmp_path, which, value):
    # the built-in language-model evaluators declare their range as Accuracy and MeanLoss
    # do; a loss has no upper end, so a finite 1e308 loss is a legitimate score
    evaluator, shown = _language_evaluators()[which]
    ings = [{"logit": torch.tensor([0.0, 2.0, 1.0, 0.5])}, {"logit": torch.zeros(4)}]
    path = tmp_path / "journal.jsonl"

    def taste():
        taster = Taster(
            open_ingredients(ings), _TokenPreference(), evaluator, journal=Journal(path)
        )
        return taster.individual_scores(), taster

    scores, _ = taste()
    _replace_line(path, 2, _with_score(value))
    match = "line 2 ignored: score .* outside the evaluator's range " + re.escape(shown)
    with pytest.warns(SoupWarning, match=match):
        again, taster = taste()
    assert taster.evaluations == 1 and again == scores


def test_a_bad_line_is_warned_about_once_and_kept(journal, pool_files):
    path, scores = journal
    _replace_line(path, 3, _with_score("NaN"))
    bad = path.read_bytes().splitlines()[2]
    with pytest.warns(SoupWarning, match="1 corrupt journal line"):
        _taste(pool_files, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the next run: nothing to warn about, nothing to redo
        again, taster = _taste(pool_files, path)
    assert taster.evaluations == 0 and again == scores
    assert bad in path.read_bytes().splitlines()  # append-only: the bad line stays
    # a line noted as bad is not a score, and a new bad line is still warned about
    _replace_line(path, 4, _with_score("true"))
    with pytest.warns(SoupWarning, match=r"1 corrupt journal line\(s\) ignored \(line 4:"):
        _, taster = _taste(pool_files, path)
    assert taster.evaluations == 1


@pytest.mark.parametrize("change", ["accumulator", "model"])
def test_candidates_in_another_precision_are_not_float32_ones(tmp_path, change):
    ings = open_ingredients([{"weight": torch.full((1, 1), v)} for v in (1.0, 2.0)])

    def taster(dtype):
        model = torch.nn.Linear(1, 1, bias=False)
        if change == "model":  # the model computes in bfloat16
            return Taster(ings, model.to(dtype), lambda m: 0.0,
                          journal=Journal(tmp_path / "j.jsonl"))  # fmt: skip
        return Taster(ings, model, lambda m: 0.0,  # mixed in float64
                      journal=Journal(tmp_path / "j.jsonl"), accum_dtype=dtype)  # fmt: skip

    other = torch.bfloat16 if change == "model" else torch.float64
    first = taster(torch.float32)
    first.score([1.0, 1.0])
    again = taster(torch.float32)
    again.score([1.0, 1.0])
    assert again.evaluations == 0  # the same candidate: reused
    changed = taster(other)
    changed.score([1.0, 1.0])
    assert changed.evaluations == 1  # in another precision: scored anew


def test_cached_outputs_of_another_key_or_edited_are_computed_again(tmp_path):
    from modelsoup.journal import Journal

    journal = Journal(tmp_path / "journal.jsonl")
    journal.save_outputs("k1", torch.ones(3, 2))
    journal.save_outputs("k2", torch.zeros(3, 2))
    assert torch.equal(journal.load_outputs("k1"), torch.ones(3, 2))
    folder = journal.outputs_dir
    (folder / "k1.safetensors").write_bytes((folder / "k2.safetensors").read_bytes())
    with pytest.warns(SoupWarning, match="cached outputs not written for this key"):
        assert journal.load_outputs("k1") is None
    safetensors.torch.save_file({"outputs": torch.ones(3, 2)}, str(folder / "k2.safetensors"))
    assert journal.load_outputs("k2") is None  # no key and hash (older caches): recomputed
    journal.save_outputs("k3", torch.full((3, 2), float("nan")))  # a diverged model's
    assert not (folder / "k3.safetensors").exists()


def test_journal_keys_of_weights_whose_sum_overflows_keep_their_proportions():
    from modelsoup.journal import Journal

    even = Journal.key("acc", [("a", 1e308), ("b", 1e308)])
    assert even == Journal.key("acc", [("a", 1.0), ("b", 1.0)])
    assert even != Journal.key("acc", [("a", 1e308), ("b", 1.5e308)])


class _CallableScorer:
    """A ``model -> float`` object whose held-out data is its own state."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __call__(self, model):
        with torch.no_grad():
            return (model(self.x).argmax(-1) == self.y).float().mean().item()

    def score(self, model):
        return self(model)


@pytest.mark.parametrize("bound", [False, True], ids=["callable object", "bound method"])
def test_a_callable_objects_data_is_part_of_its_scores_key(tmp_path, pool_files, bound):
    # Scorer(new data) in the same journal: measured again, not the old data's scores
    path = tmp_path / "callable.jsonl"
    x, y = _data()

    def taste(scorer):
        taster = Taster(
            open_ingredients([str(p) for p in pool_files]),
            torch.nn.Linear(4, 3),
            scorer.score if bound else scorer,
            journal=Journal(path),
        )
        return taster.individual_scores(), taster

    first, _ = taste(_CallableScorer(x, y))
    again, taster = taste(_CallableScorer(x, y))
    assert again == first and taster.reused == COUNT  # the same data: reused
    _, taster = taste(_CallableScorer(x[:32], y[:32]))
    assert taster.evaluations == COUNT and taster.reused == 0
