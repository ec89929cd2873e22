"""The ``modelsoup`` command line: parse arguments, call the API, map errors to exit codes.

Any :class:`~modelsoup.errors.SoupError` ends the run with one line ``error: ...`` and
exit code 2; warnings print as ``warning: ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence

from modelsoup._util import format_bytes
from modelsoup.errors import ConfigError, IncompatibleIngredientsError, SoupError, SoupWarning


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other bad input
        sys.stderr.write(f"error: {message} (see '{self.prog} --help')\n")
        sys.exit(2)


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--weights '{text}' must be numbers separated by commas") from None


def cmd_average(args: argparse.Namespace) -> int:
    from modelsoup.recipes.uniform import average

    _check_recalibration_flags(args)
    weights = _floats(args.weights) if args.weights is not None else None
    sources, base, merge, normalize = args.sources, args.base, _merge_flags(args), True
    out_dtype, accum_dtype = args.out_dtype, args.accum_dtype
    if args.from_mergekit:
        sources, weights, base, merge, normalize, written, summed = _from_mergekit(args)
        out_dtype = out_dtype or written  # --out-dtype wins over the config's dtype
        accum_dtype = "float64" if "float64" in (summed, accum_dtype) else accum_dtype
    elif not sources:
        raise ConfigError("give the checkpoints to average, or --from-mergekit merge.yaml")
    soup = average(
        sources,
        weights,
        normalize=normalize and not args.no_normalize,
        accum_dtype=accum_dtype,
        int_policy=args.int_policy,
        key=args.checkpoint_key,
        base=base,
        merge=merge,
        strict=args.strict,
    )
    note = "" if soup.merge.is_average else f", merged with {soup.merge.describe()}"
    if args.recalibrate_bn:
        note += _recalibrate_average(soup, args)
    out = soup.save(
        args.output,
        out_dtype=out_dtype,
        max_shard_size=args.max_shard_size,
        progress=not args.quiet,
        adapter_rank=args.adapter_rank,
        merge_into_base=args.merge_into_base,
    )
    from modelsoup.soup import card_path

    if soup.adapter_base() is not None and not args.merge_into_base:
        import json

        adapter = json.loads(card_path(out).read_text())["adapter"]
        note += (
            f" as a LoRA adapter of rank {adapter['rank']}, relative reconstruction error "
            f"{adapter['relative_error']:.2%}"
        )

    print(
        f"wrote {out} ({soup.recipe} soup of {soup.size} ingredients{note}); card {card_path(out)}"
    )
    return 0


#: ``average`` flags that are options of a merge rule, by option name
MERGE_FLAGS = {
    "density": "density",
    "lambda": "lambda_",
    "t": "t",
    "alpha": "alpha",
    "seed": "seed",
    "mask": "mask",
}


def _merge_flags(args: argparse.Namespace) -> dict:
    merge = {"rule": args.merge or "linear"}
    for option, dest in MERGE_FLAGS.items():
        if getattr(args, dest) is not None:
            merge[option] = getattr(args, dest)
    return merge


def _from_mergekit(args: argparse.Namespace) -> tuple:
    from modelsoup.cook.config import read_yaml
    from modelsoup.merge.mergekit import mergekit_to_average

    given = [f"--{k}" for k, d in MERGE_FLAGS.items() if getattr(args, d) is not None]
    given += ["SRC"] * bool(args.sources) + ["--base"] * bool(args.base)
    given += ["--merge"] * bool(args.merge) + ["--weights"] * (args.weights is not None)
    given += ["--no-normalize"] * bool(args.no_normalize)
    if given:
        raise ConfigError(f"--from-mergekit reads the whole merge from its file; drop {given[0]}")
    try:
        with open(args.from_mergekit, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as err:
        raise ConfigError(f"{args.from_mergekit}: cannot be read ({err.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{args.from_mergekit}: not valid YAML text") from None
    config = read_yaml(text, args.from_mergekit)
    plan = mergekit_to_average(config, args.from_mergekit)
    return (plan.sources, plan.weights, plan.base, plan.merge, plan.normalize, plan.out_dtype,
            plan.accum_dtype)  # fmt: skip


def cmd_export_mergekit(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import yaml

    from modelsoup._util import atomic_file, check_output_path, refuse_overwrite
    from modelsoup.merge.mergekit import card_to_mergekit

    try:
        card = json.loads(open(args.card, encoding="utf-8").read())
    except OSError as err:
        raise ConfigError(f"{args.card}: cannot be read ({err.strerror})") from None
    except ValueError:
        raise ConfigError(f"{args.card}: not a soup card (not JSON)") from None
    from modelsoup.formats.hf_folder import CARD_FORMAT, FOLDER_CARD

    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise ConfigError(f"{args.card}: not a soup card (no format {CARD_FORMAT})")
    try:
        config = card_to_mergekit(card)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ConfigError(
            f"{args.card}: a damaged soup card ({type(err).__name__}: {err}); write it again "
            "with modelsoup average or cook"
        ) from None
    out = check_output_path(args.output)
    if out.is_dir():
        raise ConfigError(f"{out}: is a folder; give the path of the YAML file to write")
    # soup.safetensors.json describes soup.safetensors; soup/soup_card.json, the folder soup/
    card_path = Path(args.card)
    soup = card_path.parent if card_path.name == FOLDER_CARD else card_path.with_suffix("")
    named = [Path(p) for p in _card_paths(card)]
    for path in named:
        # cards written before they named inputs by absolute path: relative to where the
        # soup was made, which is unknown; from elsewhere they name other files
        if not path.is_absolute() and not path.exists():
            raise ConfigError(
                f"{args.card}: names input {path} by a path relative to the folder the soup "
                "was made in, and it is not there from here; run export-mergekit from that folder"
            )
    inputs = [Path(args.card), soup, *named]
    refuse_overwrite(out, inputs)
    with atomic_file(out) as tmp:
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"wrote {args.output} (mergekit {config['merge_method']} of {len(config['models'])})")
    if config["merge_method"] in ("dare_linear", "dare_ties"):
        warnings.warn(
            "mergekit draws its own DARE drop masks: its merge matches this soup "
            "statistically, not exactly (and --from-mergekit only if every member of the "
            "pool was chosen: each member's mask follows its place in the pool); modelsoup "
            f"redoes this soup exactly with: {_dare_command(card)}",
            SoupWarning,
            stacklevel=2,
        )
    return 0


def _dare_command(card: dict) -> str:
    # every member of the pool in its place (zero weights kept: each member's drop mask
    # follows its place), and the mask scheme (cards older than it used blocks-v0)
    import re
    import shlex

    from modelsoup.merge.mergekit import OUT_DTYPE_FLAGS

    merge = card.get("merge") or {}
    rows = card["ingredients"]
    words = ["modelsoup", "average", *(shlex.quote(str(r["path"])) for r in rows)]
    words += ["--weights", ",".join(repr(float(r["coefficient"])) for r in rows)]
    if not (card.get("options") or {}).get("normalize", True):
        words.append("--no-normalize")
    # a key given to the cook or average (a key found by looking is found again)
    given = {r["checkpoint_key"] for r in [*rows, card["base"]] if r.get("checkpoint_key_given")}
    if len(given) > 1:
        return "none: its inputs were read under different given checkpoint keys"
    if given:
        words += ["--checkpoint-key", shlex.quote(given.pop())]
    policy = card.get("dtype_policy") or {}
    if policy.get("accumulate", "float32") != "float32":
        words += ["--accum-dtype", policy["accumulate"]]
    written = OUT_DTYPE_FLAGS.get(policy.get("output", ""))
    if written is not None:
        words += ["--out-dtype", written]
    found = re.search(r"\((\w+)\)", policy.get("integers", ""))
    if found and found.group(1) != "strict":
        words += ["--int-policy", found.group(1)]
    words += ["--base", shlex.quote(str(card["base"]["path"])), "--merge", merge["rule"]]
    words += [
        "--density",
        repr(merge.get("density", 1.0)),
        "--lambda",
        repr(merge.get("lambda", 1.0)),
    ]
    words += ["--seed", str(merge.get("seed", 0)), "--mask", merge.get("mask", "blocks-v0")]
    return " ".join(words) + " -o OUT"


def _card_paths(card: dict) -> list[str]:
    # the soup, its ingredients and its base as a card names them: inputs, never outputs
    rows = [*card.get("ingredients", []), card.get("base") or {}]
    return [str(r["path"]) for r in rows if isinstance(r, dict) and r.get("path")]


def _check_recalibration_flags(args: argparse.Namespace) -> None:
    # before any checkpoint is read: a flag that would do nothing, or a device or model
    # the recalibration cannot use, is refused rather than found after the averaging
    from modelsoup._util import check_device

    if not args.recalibrate_bn:
        given = [flag for flag, on in (("--model", args.model),
                 ("--recalibrate-batches", args.recalibrate_batches is not None),
                 ("--device", args.device != "cpu")) if on]  # fmt: skip
        if given:
            raise ConfigError(
                f"{given[0]} is used only to re-estimate BatchNorm statistics: add "
                "--recalibrate-bn DATA, or leave it out"
            )
        return
    if not args.model:
        raise ConfigError(
            "--recalibrate-bn needs --model module:function returning the architecture"
        )
    if args.recalibrate_batches is not None and args.recalibrate_batches < 1:
        raise ConfigError(
            f"--recalibrate-batches must be at least 1; got {args.recalibrate_batches}"
        )
    check_device(args.device)


def _recalibrate_average(soup, args: argparse.Namespace) -> str:
    from pathlib import Path

    from modelsoup._util import build_model, check_device
    from modelsoup.cook.config import resolve, resolve_unlabeled
    from modelsoup.repair.batchnorm import recalibrate_soup

    device = check_device(args.device)
    module = build_model(resolve(args.model, Path.cwd()), f"--model {args.model}")
    module.to(device)
    data = resolve_unlabeled(args.recalibrate_bn, str(Path.cwd()))
    recalibrate_soup(soup, module, data, num_batches=args.recalibrate_batches, device=device)
    return ", BatchNorm statistics re-estimated"


def cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from modelsoup.ingredients import (
        adapters_base,
        check_compatible,
        describe_ingredients,
        open_ingredient,
        open_ingredients,
    )

    # opened and checked as `average` opens and checks them: same pool, same verdict
    ingredients = open_ingredients(
        args.sources, key=args.checkpoint_key, check=False, base=args.base
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # listed below as part of the answer
        info = describe_ingredients(ingredients, int_policy=args.int_policy, strict=args.strict)
    if args.base and info["compatible"] and adapters_base(ingredients) is None:
        # the base of a merge rule: checked against the ingredients as `average` checks it
        base = open_ingredient(args.base, key=args.checkpoint_key, label="base")
        try:
            check_compatible([ingredients[0], base], warn_duplicates=False)
        except IncompatibleIngredientsError as err:
            info["compatible"], info["problem"] = False, str(err)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for row in info["ingredients"]:
            dtypes = ", ".join(f"{k}x{v}" for k, v in sorted(row["dtypes"].items()))
            note = f"  [{row['note']}]" if row["note"] else ""
            where = f" ({row['path']})" if row["path"] and row["path"] != row["label"] else ""
            print(
                f"{row['label']}{where}: {row['tensors']} tensors, {row['parameters']:,} "
                f"parameters, {format_bytes(row['bytes'])} ({dtypes}){note}"
            )
        for line in info["warnings"]:
            print(f"warning: {line}")
        if len(ingredients) > 1:
            verdict = (
                "yes (names, shapes and kinds; NaN or Inf values are found when averaging)"
                if info["compatible"]
                else f"no: {info['problem']}"
            )
            print(f"soup-compatible: {verdict}")
    if not info["compatible"]:  # exit 2 and one error line, as `average` would end
        sys.stdout.flush()
        raise IncompatibleIngredientsError(f"not soup-compatible: {info['problem']}")
    return 0


def cmd_cook(args: argparse.Namespace) -> int:
    from modelsoup.cook.report import render_verdict, report_scale
    from modelsoup.cook.run import cook_config

    if args.dry_run:
        from modelsoup.cook.plan import plan_cook

        print(plan_cook(args.config).describe())
        return 0
    result = cook_config(args.config, progress=not args.quiet, device=args.device)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 alone prints the verdict
        return 0
    # The summary report.md was written from (the config's seed and bootstrap resamples),
    # so the printed verdict and the report's cannot differ.
    print("\nVerdict: " + render_verdict(result.summary, report_scale(result)))
    print(f"report: {result.output / 'report.md'}")
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from pathlib import Path

    from modelsoup.cook.config import load_config
    from modelsoup.cook.diagnose import diagnose
    from modelsoup.cook.run import resolve_parts

    config = load_config(args.config)
    parts = resolve_parts(config)
    out = Path(args.out) if args.out else parts.output / "diagnosis"
    journal = parts.output / "journal.jsonl" if config.journal else None  # cook's own
    found = diagnose(
        parts.ingredients,
        parts.model,
        parts.held_out,
        recalibrate=parts.recalibrate,
        output=out,
        checkpoint_key=config.checkpoint_key,
        base=config.options().base,
        journal=journal,
        progress=not args.quiet,
        device=args.device or config.device,
        labels=parts.labels,
    )
    for key, value in found.barriers.items():
        print(f"barrier {key}: {value:.4g}")
    print(f"verdict: {found.verdict}")
    for line in found.advice:
        print(f"advice: {line}")
    print(f"written: {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from modelsoup.demo import format_summary, run_demo

    result = run_demo(
        quick=args.quick,
        lm=args.lm,
        output=args.output,
        workdir=args.workdir,
        progress=not args.quiet,
    )
    print(format_summary(result))
    return 0


def cmd_align(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch

    from modelsoup._util import check_device
    from modelsoup.cook.config import resolve, resolve_unlabeled
    from modelsoup.repair.pool import align_pool

    device = check_device(args.device)  # before any model or data is built
    if not args.spec and not (args.model and args.input_shape):
        raise ConfigError("give --spec spec.json, or --model and --input-shape to trace the model")
    example = None
    if args.input_shape:
        try:
            shape = [int(x) for x in args.input_shape.split(",")]
        except ValueError:
            shape = []
        if not shape or min(shape) < 1:
            raise ConfigError(
                f"--input-shape '{args.input_shape}' must be positive sizes like 1,3,32,32"
            )
        try:
            example = torch.randn(*shape)
        except (RuntimeError, MemoryError):
            raise ConfigError(
                f"--input-shape '{args.input_shape}' is too large to build an example input; "
                "give the shape of one small batch, like 1,3,32,32"
            ) from None
    model = resolve(args.model, Path.cwd()) if args.model else None
    spec_out = Path(args.write_spec) if args.write_spec else None
    if spec_out is not None:  # checked before aligning: nothing is written for a bad one
        from modelsoup.ingredients import open_ingredients
        from modelsoup.soup import check_not_input

        if not spec_out.parent.is_dir() or spec_out.is_dir():
            raise ConfigError(f"--write-spec {spec_out}: give a file path in an existing folder")
        check_not_input(open_ingredients(args.sources, key=args.checkpoint_key), spec_out)
    data = None
    if args.method == "activations":
        if not (args.data and args.model):
            raise ConfigError("--method activations needs --model and --data (unlabeled inputs)")
        data = resolve_unlabeled(args.data, str(Path.cwd()))
    paths = align_pool(
        args.sources,
        model,
        args.output,
        example=example,
        spec=args.spec,
        reference=args.reference,
        method=args.method,
        data=data,
        num_batches=args.batches,
        checkpoint_key=args.checkpoint_key,
        progress=not args.quiet,
        device=device,
    )
    if spec_out is not None:  # the spec the copies were aligned by: given, or traced
        from modelsoup._util import atomic_file, build_model
        from modelsoup.repair import trace_permutation_spec
        from modelsoup.repair.pool import load_spec

        if args.spec:
            spec = load_spec(args.spec)
        else:
            spec = trace_permutation_spec(build_model(model, f"--model {args.model}"), example)
        with atomic_file(spec_out) as tmp:
            tmp.write_text(json.dumps(spec.to_dict(), indent=2))
    for p in paths:
        print(p)
    return 0


_STRICT_HELP = (
    "refuse ingredients whose checkpoints describe different architectures "
    "(config.json, timm args, Lightning hyper_parameters) instead of warning"
)


def _output_options(parser: argparse.ArgumentParser, top: bool) -> None:
    # A subcommand's options have no default of their own (SUPPRESS), so that one
    # given before the subcommand is not reset by the subparser.
    unset = argparse.SUPPRESS
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=False if top else unset,
        help="no progress output; warnings and errors only",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0 if top else unset,
        help="more log lines (-vv: debug)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand.

    Example:
        >>> build_parser().parse_args(["inspect", "a.safetensors"]).command
        'inspect'
    """
    parser = _Parser(
        prog="modelsoup",
        description="Model soups: average fine-tuned checkpoints of one model into one "
        "model, choose ingredients on held-out data and report on test data.",
        epilog="Bad input ends with one line 'error: ...' and exit code 2. Docs: README.md, docs/.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    _output_options(parser, top=True)
    # -q and -v are taken before the subcommand or after it, the same on every one.
    common = argparse.ArgumentParser(add_help=False)
    _output_options(common, top=False)
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    def command(name: str, help: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common], **kwargs)

    p = command("average", help="uniform or weighted soup of checkpoints")
    p.add_argument("sources", nargs="*", help="checkpoint files, HF folders, folders or globs")
    p.add_argument(
        "-o", "--output", required=True, help="output: .safetensors, .pt, or a folder (HF layout)"
    )
    p.add_argument(
        "--from-mergekit",
        metavar="YAML",
        help="redo a mergekit config (whole-model models: lists; see docs/merge-rules.md)",
    )
    p.add_argument("--weights", help="comma-separated weights, one per ingredient (e.g. 1,2,1)")
    p.add_argument(
        "--no-normalize",
        action="store_true",
        help="use the weights as given instead of dividing by their sum",
    )
    p.add_argument(
        "--out-dtype",
        choices=["fp32", "fp16", "bf16", "fp64"],
        help="dtype of floating outputs (default: as the ingredient)",
    )
    p.add_argument("--accum-dtype", default="float32", choices=["float32", "float64"])
    p.add_argument(
        "--int-policy",
        default="strict",
        choices=["strict", "first"],
        help="integer tensors: refuse if they differ, or take the first's",
    )
    p.add_argument(
        "--base",
        metavar="B",
        help="the pretrained start the sources were fine-tuned from: rules on task vectors "
        "take it, and LoRA adapter inputs are mixed over it (default for adapters: the local "
        "folder named by base_model_name_or_path in adapter_config.json; nothing is "
        "downloaded)",
    )
    p.add_argument(
        "--merge",
        metavar="RULE",
        help="merge rule: linear (default), task_arithmetic, ties, dare_linear, dare_ties, "
        "slerp, model_stock, wise_ft (docs/merge-rules.md)",
    )
    p.add_argument("--density", type=float, help="ties, dare_*: share of each task vector kept")
    p.add_argument("--lambda", dest="lambda_", type=float, help="scale of the merged task vector")
    p.add_argument("--t", type=float, help="slerp: where between the two members, in [0, 1]")
    p.add_argument(
        "--alpha", type=float, help="WiSE-FT on top: (1 - alpha) base + alpha soup, in [0, 1]"
    )
    p.add_argument("--seed", type=int, help="dare_*: seed of the drop masks (recorded)")
    p.add_argument(
        "--mask",
        help="dare_*: the drop masks' scheme, counter-v1 (default) or blocks-v0 (older soups)",
    )
    p.add_argument(
        "--max-shard-size", help="shard size for folder outputs (default 5GB); refused otherwise"
    )
    p.add_argument("--checkpoint-key", help="wrapper key holding the weights, e.g. state_dict_ema")
    p.add_argument("--strict", action="store_true", help=_STRICT_HELP)
    p.add_argument(
        "--recalibrate-bn",
        metavar="DATA",
        help="module:function returning unlabeled batches: re-estimate the soup's BatchNorm "
        "statistics on them before saving (needs --model)",
    )
    p.add_argument(
        "--adapter-rank",
        type=int,
        help="LoRA adapter inputs: rank of the output adapter, re-factored from the mixed "
        "weight change by truncated SVD (default: the adapters' rank)",
    )
    p.add_argument(
        "--merge-into-base",
        action="store_true",
        help="LoRA adapter inputs: write the merged full model instead of an adapter",
    )
    p.add_argument("--model", help="module:function returning the architecture")
    p.add_argument("--recalibrate-batches", type=int, help="use at most this many batches of DATA")
    p.add_argument(
        "--device",
        default="cpu",
        help="where the model runs: cpu, cuda, cuda:N or mps (default: cpu)",
    )
    p.set_defaults(run=cmd_average)

    p = command("export-mergekit", help="write a soup card as a mergekit config")
    p.add_argument("card", help="the soup card (<soup>.json, or soup_card.json in a folder)")
    p.add_argument("-o", "--output", required=True, help="the mergekit YAML to write")
    p.set_defaults(run=cmd_export_mergekit)

    p = command(
        "inspect",
        help="tensor counts, sizes, dtypes and soup-compatibility",
        description="Open the ingredients as `average` would and run its checks. Exit 0: "
        "they can be souped; 2: they cannot (the reason is the error line), or bad input.",
    )
    p.add_argument("sources", nargs="+")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--checkpoint-key")
    p.add_argument(
        "--int-policy",
        default="strict",
        choices=["strict", "first"],
        help="check as average would with this --int-policy",
    )
    p.add_argument("--strict", action="store_true", help=_STRICT_HELP)
    p.add_argument("--base", help="LoRA adapter inputs: the base model folder")
    p.set_defaults(run=cmd_inspect)

    p = command("cook", help="evaluation-guided soups from a YAML config, with a report")
    p.add_argument(
        "config",
        help="the cook config (YAML); see docs/cook.md (torchrun: docs/distributed-and-hf.md)",
    )
    p.add_argument(
        "--device",
        help="where the model runs: cpu, cuda, cuda:N or mps (default: the config's device)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config, list the ingredients, recipes and the most evaluations "
        "planned, then exit without evaluating or writing anything",
    )
    p.set_defaults(run=cmd_cook)

    p = command("diagnose", help="can these ingredients be souped? similarity and barriers")
    p.add_argument("config", help="a cook config (uses model, ingredients, held_out)")
    p.add_argument("--out", help="folder for diagnosis.json and figures (default OUTPUT/diagnosis)")
    p.add_argument(
        "--device",
        help="where the model runs: cpu, cuda, cuda:N or mps (default: the config's device)",
    )
    p.set_defaults(run=cmd_diagnose)

    p = command("align", help="permute hidden units of checkpoints to match a reference")
    p.add_argument("sources", nargs="+", help="checkpoints; the reference is --reference")
    p.add_argument("-o", "--output", required=True, help="folder; writes OUTPUT/aligned/*")
    p.add_argument("--model", help="module:function returning the architecture (for tracing)")
    p.add_argument("--input-shape", help="example input shape for tracing, e.g. 1,3,32,32")
    p.add_argument("--spec", help="a permutation spec JSON instead of tracing")
    p.add_argument("--write-spec", help="also save the traced spec as JSON here")
    p.add_argument("--reference", type=int, default=0, help="position of the reference")
    p.add_argument(
        "--method",
        choices=["reference", "activations", "merge_many"],
        default="reference",
        help="weight matching onto the reference (default); activation matching onto it "
        "(needs --data; better after short training); or each onto the mean of the others "
        "(MergeMany weight matching)",
    )
    p.add_argument("--data", help="module:function returning unlabeled inputs (activations)")
    p.add_argument("--batches", type=int, help="use at most this many batches of --data")
    p.add_argument("--checkpoint-key")
    p.add_argument(
        "--device",
        default="cpu",
        help="where --method activations runs the model: cpu, cuda, cuda:N or mps "
        "(default: cpu); weight matching runs on the CPU",
    )
    p.set_defaults(run=cmd_align)

    p = command("demo", help="fine-tune a grid, cook soups, report honestly (docs/demo.md)")
    p.add_argument("--quick", action="store_true", help="tiny digits variant (seconds)")
    p.add_argument(
        "--lm",
        action="store_true",
        help="SmolLM2-135M fine-tuned on BBC News, cooked by held-out loss (~5 min cold)",
    )
    p.add_argument("--output", default="demo-output", help="report folder (default demo-output)")
    p.add_argument(
        "--workdir",
        default=".modelsoup-work/demo",
        help="cache of ingredients and journal (default .modelsoup-work/demo)",
    )
    p.set_defaults(run=cmd_demo)
    return parser


def _log_level(args: argparse.Namespace) -> int:
    if getattr(args, "quiet", False):
        return logging.WARNING
    return {0: logging.INFO, 1: logging.INFO}.get(args.verbose, logging.DEBUG)


@contextlib.contextmanager
def _cli_output(level: int) -> Iterator[None]:
    """Warnings as ``warning: ...`` lines and library logs on stderr, for this run only."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("modelsoup")
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(level)

    def show(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(f"warning: {message}\n")

    saved = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = saved
        root.removeHandler(handler)
        root.setLevel(old_level)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code.

    Example:
        >>> main(["average", "missing.safetensors", "-o", "out.safetensors"])
        2
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from modelsoup.soup import library_version

        print(f"modelsoup {library_version()}")
        return 0
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    with _cli_output(_log_level(args)):
        try:
            return args.run(args)
        except SoupError as err:
            sys.stderr.write(f"error: {err}\n")
            return 2
        except KeyboardInterrupt:
            sys.stderr.write(
                "error: interrupted; nothing half-written was left behind. "
                "Run the same command again to resume: finished work is kept\n"
            )
            return 130


if __name__ == "__main__":
    sys.exit(main())
