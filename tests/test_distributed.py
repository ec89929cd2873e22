"""Cooking under torchrun: two gloo ranks choose exactly what one process chooses, and a
rank that dies or hangs ends the run with a clear error instead of a hang."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modelsoup.cook import cook_config
from modelsoup.distributed import DistContext, init_distributed, launched_distributed

TESTS = Path(__file__).resolve().parent

# Evaluators with several uneven batches, so each rank gets a different number of them.
KIT = '''
import atexit, os, time
from pathlib import Path
import digits_kit
from digits_kit import DigitsMLP, splits
from modelsoup.evaluators import Accuracy, MeanLoss

# examples this process ran through the model (kept on a module imported only once)
SEEN = digits_kit.__dict__.setdefault("seen_rows", [0])


class Counting(DigitsMLP):
    def forward(self, x):
        SEEN[0] += x.shape[0]
        return super().forward(x)


def model():
    return Counting()


@atexit.register
def _dump():
    if os.environ.get("ROWS_FILE"):
        Path(os.environ["ROWS_FILE"] + os.environ["RANK"]).write_text(str(SEEN[0]))


def held_out():
    return Accuracy(splits()["held_out"], batch_size=64, name="digits-held-out")


def test_loss():
    return MeanLoss(splits()["test"], batch_size=96, name="digits-test-loss")


class Failing(Accuracy):
    """Rank 1 hangs (or raises) on its fourth evaluation; rank 0 is unaffected."""

    def __init__(self, how):
        super().__init__(splits()["held_out"], batch_size=64, name="digits-held-out")
        self.how, self.calls = how, 0

    def logits(self, model):
        self.calls += 1
        if os.environ["RANK"] == "1" and self.calls > 3:
            if self.how == "hang":
                time.sleep(300)
            raise RuntimeError("simulated failure on rank 1")
        return super().logits(model)


def hanging():
    return Failing("hang")


def sampled():
    """Each rank holds only its own share of the held-out data, as a DistributedSampler
    gives it: modelsoup shards the batches itself, so this is refused."""
    x, y = splits()["held_out"]
    rank = int(os.environ["RANK"])
    return Accuracy((x[rank::2], y[rank::2]), batch_size=64, name="digits-held-out")


def raising():
    return Failing("raise")
'''

CONFIG = """
model: kit.py:model
ingredients: ["{ckpts}/*.safetensors"]
held_out: kit.py:{held}
test: kit.py:test_loss
recipes:
  - {{name: greedy, order: sorted}}
  - {{name: greedy, order: random, runs: 2}}
  - {{name: pruned, passes: 2}}
  - {{name: greedy_ensemble}}
output: {out}
bootstrap_resamples: 100
dist_timeout_s: {timeout}
racing: {racing}
"""


def _config(
    tmp_path: Path, ckpts: Path, name: str, held: str = "held_out", timeout=20, racing="off"
) -> Path:
    # racing off: these tests count the examples each rank evaluates
    (tmp_path / "kit.py").write_text(KIT)
    cfg = tmp_path / f"{name}.yaml"
    out = tmp_path / name
    text = CONFIG.format(ckpts=ckpts, held=held, out=out, timeout=timeout, racing=racing)
    cfg.write_text(text)
    return cfg


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"  # as in conftest: tiny nets, two cores
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _torchrun(cfg: Path, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "modelsoup.cli", "cook", str(cfg), "-q"]
    env = _env() | env
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _summary(out: Path) -> dict:
    report = json.loads((out / "report.json").read_text())
    # test_ci and vs_best_individual come from per-example results: they also check order
    keys = ("held_out", "test", "chosen", "saved", "test_ci", "vs_best_individual")
    rows = {r["method"]: [r.get(k) for k in keys] for r in report["rows"]}
    chosen = {}
    for card in sorted((out / "soups").glob("*.json")):
        data = json.loads(card.read_text())
        chosen[card.name] = (data["chosen"], data["scores"])
    lines = (out / "journal.jsonl").read_text().splitlines()[1:]
    entries = [json.loads(line) for line in lines]
    journal = sorted((e["key"], e["score"]) for e in entries if "score" in e)
    return {"rows": rows, "chosen": chosen, "journal": journal}


def test_two_ranks_choose_exactly_what_one_process_chooses(tmp_path, digits_ckpts):
    import digits_kit

    digits_kit.__dict__.setdefault("seen_rows", [0])[0] = 0
    single = cook_config(_config(tmp_path, digits_ckpts, "single"), progress=False)
    single_rows = digits_kit.seen_rows[0]
    cfg = _config(tmp_path, digits_ckpts, "ranks")
    run = _torchrun(cfg, ROWS_FILE=str(tmp_path / "rows-"))
    assert run.returncode == 0, run.stderr[-3000:]
    # each rank ran only its share of the examples, and together all of them
    rows = [int((tmp_path / f"rows-{r}").read_text()) for r in (0, 1)]
    assert sum(rows) == single_rows and 0 < rows[1] < rows[0] < single_rows
    one, two = _summary(tmp_path / "single"), _summary(tmp_path / "ranks")
    assert two["rows"] == one["rows"]  # held-out and test scores equal, bit for bit
    assert two["chosen"] == one["chosen"] and one["chosen"]
    # Rank 0 alone wrote the journal: each evaluation appears once, with the same score.
    assert two["journal"] == one["journal"]
    assert [m.held_out for m in single.methods] == [
        json.loads((tmp_path / "ranks" / "report.json").read_text())["rows"][i]["held_out"]
        for i in range(len(single.methods))
    ]

    # Run again: rank 0 finds every score (and cached logits) in its journal and every
    # rank skips the same evaluations; a divergence would hang, then time out.
    again = _torchrun(cfg)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _summary(tmp_path / "ranks") == two
    lines = (tmp_path / "ranks" / "journal.jsonl").read_text().splitlines()
    assert len(lines) == 1 + len(one["journal"])  # nothing evaluated (or journalled) again


@pytest.mark.parametrize("racing", ["exact", "{confidence: 0.999}"])
def test_racing_ranks_stop_together_and_choose_what_one_process_chooses(
    tmp_path, digits_ckpts, racing
):
    single = cook_config(_config(tmp_path, digits_ckpts, "single", racing=racing), progress=False)
    assert single.taster_stats["races"] > 0
    if racing != "exact":  # the same seeded order of the examples on every rank
        assert single.taster_stats["statistical_races"] > 0
    run = _torchrun(_config(tmp_path, digits_ckpts, "ranks", racing=racing))
    # ranks that stopped at different batches would wait on each other and time out
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = _summary(tmp_path / "single"), _summary(tmp_path / "ranks")
    assert two["rows"] == one["rows"] and two["chosen"] == one["chosen"]


def test_a_hanging_rank_ends_the_run_with_a_clear_error(tmp_path, digits_ckpts):
    cfg = _config(tmp_path, digits_ckpts, "hang", held="hanging", timeout=5)
    run = _torchrun(cfg, timeout=90)
    assert run.returncode != 0
    err = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert err, run.stderr[-3000:]
    assert "rank 0 of 2: another rank stopped responding within 5 s" in err[0]
    assert "re-run: the journal resumes" in err[0]
    # what was scored before the hang is kept, so a re-run resumes
    assert len((tmp_path / "hang" / "journal.jsonl").read_text().splitlines()) > 1


def test_ranks_holding_different_data_are_refused(tmp_path, digits_ckpts):
    run = _torchrun(_config(tmp_path, digits_ckpts, "sampled", held="sampled"), timeout=90)
    assert run.returncode != 0
    err = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert err, run.stderr[-3000:]
    assert "the evaluation data differs between ranks" in err[0]
    assert not list((tmp_path / "sampled").glob("soups/*.safetensors"))


def test_a_crashing_rank_ends_the_run_on_the_others(tmp_path, digits_ckpts):
    # Launched by hand with the usual env (as a cluster scheduler would), not by torchrun.
    cfg = _config(tmp_path, digits_ckpts, "crash", held="raising", timeout=15)
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = _env() | {
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        cmd = [sys.executable, "-m", "modelsoup.cli", "cook", str(cfg), "-q"]
        procs.append(subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=90)[1] for p in procs]
    assert procs[1].returncode != 0 and "simulated failure on rank 1" in errs[1]
    assert procs[0].returncode == 2, errs[0][-3000:]
    last = errs[0].strip().splitlines()[-1]
    assert last.startswith("error: rank 0 of 2: another rank stopped responding"), last


def test_single_process_needs_no_group(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert not launched_distributed() and init_distributed() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert init_distributed() is None


def test_shards_cover_every_batch_once():
    for world in (1, 2, 3, 5):
        seen = sorted(i for r in range(world) for i in DistContext(r, world).positions(7))
        assert seen == list(range(7))


def test_gather_in_one_process_group_restores_order(tmp_path):
    # A one-rank gloo group exercises the gather path (padding, reshaping, ordering).
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        ctx = DistContext(0, 1)
        parts = {i: torch.full((i + 1, 3), float(i)) for i in range(4)}
        out = ctx.gather(parts, 4)
        assert torch.equal(out, torch.cat([parts[i] for i in range(4)]))
        assert ctx.broadcast({"a": 1}, "test") == {"a": 1}
    finally:
        dist.destroy_process_group()


def test_bad_timeout_is_a_config_error():
    from modelsoup.errors import ConfigError

    with pytest.raises(ConfigError, match="dist_timeout_s"):
        init_distributed(timeout_s=0)
