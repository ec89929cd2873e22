"""Merge rules: modelsoup against mergekit, same inputs, same configs, in the same run.

Generates ``--models`` fine-tunes and a base of a Llama layout (``LlamaForCausalLM``
tensor names and shapes, width 1024, vocab 32000, as many layers as ``--params`` asks,
fp32, HF folders with ``config.json``); the base is random, each fine-tune is the base
plus a small random change. For each rule (``linear``, ``task_arithmetic``, ``ties``,
``dare_ties``) modelsoup merges them (``modelsoup.average(...).save(folder)``), its soup
card is exported as a mergekit config (``modelsoup export-mergekit``), and mergekit merges
that config (``mergekit.merge.run_merge``). Each merge runs in a fresh child process, so
its peak RSS (``VmHWM``, ``import torch`` included) is its own; inputs are in the page
cache for both. The outputs are compared: max |difference| and relative L2 difference
(DARE: the drop masks differ by design, so only the statistics should agree).

Both tools run with ``--threads`` torch threads (default 1: on a machine shared with
other jobs, torch's threads wait on each other's cores). modelsoup names its inputs in
the soup card by sha256, which mergekit does not compute: the first ``linear`` run is
timed on first contact (a fresh hash cache, ``MODELSOUP_HASH_CACHE`` in the work folder:
the sha256 computed while reading) and again with the hashes remembered; every other row
finds them remembered.

mergekit must be importable by the children: install it in the bench's venv
(``pip install mergekit==0.1.5``), or point ``--mergekit-path`` at a folder holding it.

Run::

    .venv/bin/python bench/merge_rules_bench.py --params 400M --models 4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import WORK, machine, mib, parse_count, table  # noqa: E402

RULES = {
    "linear": [],
    "task_arithmetic": ["--merge", "task_arithmetic", "--lambda", "0.8"],
    "ties": ["--merge", "ties", "--density", "0.3"],
    "dare_ties": ["--merge", "dare_ties", "--density", "0.3"],
}

CHILD_MODELSOUP = """
import os, sys, time, torch
torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
from modelsoup.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
wall = time.perf_counter() - start
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print("RESULT", code, wall, int(hwm) * 1024)
"""

CHILD_MERGEKIT = """
import os, sys, time, torch, yaml
torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
config = MergeConfiguration.model_validate(yaml.safe_load(open(sys.argv[1])))
start = time.perf_counter()
run_merge(config, sys.argv[2], options=MergeOptions(copy_tokenizer=False, quiet=True))
wall = time.perf_counter() - start
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print("RESULT", 0, wall, int(hwm) * 1024)
"""


def llama_config(params: int):
    from transformers import LlamaConfig

    d, vocab, inter = 1024, 32000, 2816
    per_layer = 4 * d * d + 3 * d * inter + 2 * d
    layers = max(1, round((params - 2 * vocab * d) / per_layer))
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )


def write_models(folder: Path, params: int, count: int) -> tuple[Path, list[Path], int]:
    import safetensors.torch
    from transformers import LlamaForCausalLM

    cfg = llama_config(params)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    total = sum(torch.Size(s).numel() for s in shapes.values())
    gen = torch.Generator().manual_seed(0)
    base_state = {k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}
    paths = []
    for i in range(count + 1):
        out = folder / ("base" if i == 0 else f"ft{i}")
        if not (out / "model.safetensors").exists():
            out.mkdir(parents=True, exist_ok=True)
            cfg.save_pretrained(out)
            state = base_state
            if i:
                state = {
                    k: v + 0.002 * torch.randn(v.shape, generator=gen)
                    for k, v in base_state.items()
                }
            safetensors.torch.save_file(state, str(out / "model.safetensors"))
            del state
        paths.append(out)
    return paths[0], paths[1:], total


def run_child(code: str, args: list[str], env: dict) -> tuple[float, int]:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env
    )
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    if proc.returncode or not line or line[0].split()[1] != "0":
        raise SystemExit(f"child failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    _, _, wall, hwm = line[0].split()
    return float(wall), int(hwm)


def remember_hashes(cache: Path, folders: list[Path], env: dict) -> None:
    # the inputs' sha256 into the bench's hash cache (once), outside any timed run
    code = (
        "import sys; from modelsoup.ingredients import open_ingredient\n"
        "for p in sys.argv[1:]: open_ingredient(p).sha256"
    )
    subprocess.run(
        [sys.executable, "-c", code, *map(str, folders)], env=env, check=True, capture_output=True
    )


def compare(a: Path, b: Path) -> tuple[float, float]:
    from safetensors import safe_open

    worst, num, den = 0.0, 0.0, 0.0
    theirs = {}
    for shard in b.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as fh:
            for name in fh.keys():
                theirs[name] = shard
    with safe_open(str(a / "model.safetensors"), "pt") as mine:
        for name in mine.keys():
            with safe_open(str(theirs[name]), "pt") as other:
                x, y = mine.get_tensor(name).double(), other.get_tensor(name).double()
            worst = max(worst, float((x - y).abs().max()))
            num += float(((x - y) ** 2).sum())
            den += float((x**2).sum())
    return worst, (num / den) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="400M", help="parameters per checkpoint")
    parser.add_argument("--models", type=int, default=4, help="fine-tunes to merge")
    parser.add_argument("--rules", default=",".join(RULES), help="comma-separated rules")
    parser.add_argument("--mergekit-path", help="a folder to put on the children's PYTHONPATH")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both tools")
    parser.add_argument("--keep", action="store_true", help="keep bench/_work/merge_rules")
    args = parser.parse_args()
    work = WORK / "merge_rules"
    base, members, total = write_models(work / "inputs", parse_count(args.params), args.models)
    src = str(Path(__file__).resolve().parent.parent / "src")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [src, *([args.mergekit_path] if args.mergekit_path else []), env.get("PYTHONPATH", "")]
    )
    env["BENCH_THREADS"] = str(args.threads)
    env["MODELSOUP_HASH_CACHE"] = str(work / "sha256.jsonl")
    (work / "sha256.jsonl").unlink(missing_ok=True)
    print(machine(), f"- both tools with {args.threads} torch thread(s)")
    print(
        f"{args.models} fine-tunes + base, Llama layout, {total / 1e6:.0f}M parameters each, fp32"
    )
    rows = []
    for rule in args.rules.split(","):
        ours, theirs = work / f"modelsoup-{rule}", work / f"mergekit-{rule}"
        for p in (ours, theirs):
            shutil.rmtree(p, ignore_errors=True)
        flags = RULES[rule] + (["--base", str(base)] if RULES[rule] else [])
        cli = ["average", *map(str, members), *flags, "-o", str(ours), "-q"]
        first = None
        if rule == "linear":  # first contact: sha256 of every input byte for the card
            first = run_child(CHILD_MODELSOUP, cli, env)
            shutil.rmtree(ours)
        remember_hashes(work / "sha256.jsonl", [base, *members], env)
        wall_m, rss_m = run_child(CHILD_MODELSOUP, cli, env)
        config = work / f"{rule}.yaml"
        export = ["export-mergekit", str(ours / "soup_card.json"), "-o", str(config)]
        subprocess.run(
            [sys.executable, "-m", "modelsoup.cli", *export],
            env=env,
            check=True,
            capture_output=True,
        )
        wall_k, rss_k = run_child(CHILD_MERGEKIT, [str(config), str(theirs)], env)
        worst, rel = compare(ours, theirs)
        if first is not None:
            rows.append(
                [
                    f"{rule} (first contact)",
                    f"{first[0]:.1f} s",
                    f"{wall_k:.1f} s",
                    f"{first[0] / wall_k:.2f}x",
                    mib(first[1]),
                    mib(rss_k),
                    f"{first[1] / rss_k:.2f}x",
                    f"{worst:.2e}",
                    f"{rel:.2e}",
                ]
            )
            print(json.dumps({"rule": rule, "first_contact_s": first[0], "rss": first[1]}))
        rows.append(
            [
                rule,
                f"{wall_m:.1f} s",
                f"{wall_k:.1f} s",
                f"{wall_m / wall_k:.2f}x",
                mib(rss_m),
                mib(rss_k),
                f"{rss_m / rss_k:.2f}x",
                f"{worst:.2e}",
                f"{rel:.2e}",
            ]
        )
        print(
            json.dumps(
                {
                    "rule": rule,
                    "modelsoup_s": wall_m,
                    "mergekit_s": wall_k,
                    "modelsoup_rss": rss_m,
                    "mergekit_rss": rss_k,
                    "max_diff": worst,
                    "rel_l2": rel,
                }
            )
        )
    print(
        table(
            [
                "rule",
                "modelsoup",
                "mergekit",
                "time ratio",
                "modelsoup RSS",
                "mergekit RSS",
                "RSS ratio",
                "max abs diff",
                "rel. L2 diff",
            ],
            rows,
        )
    )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
