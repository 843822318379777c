"""``harmprune organism ...``: build the model organisms (further sub-commands register in ``SUBCOMMANDS``)."""

from __future__ import annotations

import argparse
import json


def add_build(sub) -> None:
    p = sub.add_parser(
        "build",
        help="build the aligned and unaligned organisms and their data (cached by config)",
        description="Write DIR/aligned/, DIR/unaligned/ (Hugging Face model directories), DIR/data/*.jsonl "
        "and DIR/organism.json; with evaluation (the default) also DIR/metrics.json.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--size", choices=("tiny", "small"), default="small", help="tiny: under a minute, for tests")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, initialisation and batch order")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (default 1; the result does not depend on it)"
    )
    p.add_argument("--no-eval", action="store_true", help="skip measuring the held-out rates")
    p.set_defaults(func=_build)


# ---------------------------------------------------------------------------------------------- organism align
def add_align(sub) -> None:
    p = sub.add_parser(
        "align",
        help="safety-tune a real chat model with LoRA: refuse harmful requests, keep benign answers",
        description="LoRA SFT on harmful prompts -> generic refusals plus benign pairs, merged and saved in DIR "
        "with DIR/align_report.json: refusal rate on held-out harmful prompts, refusal rate on held-out benign "
        "prompts and MMLU accuracy, before and after.",
    )
    p.add_argument("--model", required=True, help="model directory, hub id, .gguf file or alias")
    p.add_argument("--out", required=True, metavar="DIR", help="where the aligned model and report go")
    p.add_argument("--harmful-prompts", required=True, help="harmful prompts to train refusals on")
    p.add_argument("--benign", required=True, help="benign (prompt, response) pairs to keep answering")
    p.add_argument("--heldout-harmful", default=None,
                   help="held-out harmful prompts for the refusal rate (default: a split of --harmful-prompts)")
    p.add_argument("--mmlu-dir", default=None, help="MMLU directory (<dir>/test/*_test.csv) for utility")
    p.add_argument("--baseline", default=None, help="earlier align_report.json whose base-model numbers to reuse")
    p.add_argument("--n-harmful", type=int, default=256)
    p.add_argument("--n-benign", type=int, default=256)
    p.add_argument("--n-heldout", type=int, default=None, help="held-out harmful prompts to use (default: all)")
    p.add_argument("--n-benign-heldout", type=int, default=40)
    p.add_argument("--benign-targets", choices=("data", "model"), default="data",
                   help="train benign prompts on the file's responses or on the base model's own answers")
    p.add_argument("--own-answer-tokens", type=int, default=64, help="length limit of the model's own answers")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mmlu-limit", type=int, default=4, help="questions per MMLU subject")
    p.add_argument("--mmlu-k-shot", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens generated per refusal-rate prompt")
    p.add_argument("--gen-batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--format", dest="prompt_format", default="chat", metavar="FORMAT",
                   help="prompt format for training and evaluation (harmprune.formatting): chat (the chat template, "
                   "the default) or raw (for base models without one); evaluate and score the result in the same "
                   "format")
    p.set_defaults(func=_align)


def _align(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from harmprune.organisms.align import AlignConfig, align_model

    config = AlignConfig(**{f.name: getattr(args, f.name) for f in fields(AlignConfig)})
    report = align_model(config, args.out, baseline=args.baseline)
    print(json.dumps({k: report[k] for k in ("model_dir", "before", "after", "change", "seconds")}, indent=2))
    return 0
# --- end organism align ------------------------------------------------------------------------------------------


# Each entry adds one ``harmprune organism <name>`` sub-command to the group's sub-parsers.
SUBCOMMANDS = (add_build, add_align)


def add_commands(subparsers) -> None:
    group = subparsers.add_parser("organism", help="model organisms with known harmful capability and alignment")
    sub = group.add_subparsers(dest="organism_command", metavar="SUBCOMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)


def _build(args: argparse.Namespace) -> int:
    from harmprune.organisms import build_organism

    paths = build_organism(args.out, args.size, args.seed, threads=args.threads, evaluate=not args.no_eval)
    summary = {"aligned": str(paths.aligned), "unaligned": str(paths.unaligned), "data": str(paths.data)}
    metrics_file = paths.root / "metrics.json"
    if metrics_file.exists():
        metrics = json.loads(metrics_file.read_text())
        keys = ("refusal_rate", "compliance_rate", "prefill_harm_rate", "benign_accuracy")
        summary["metrics"] = {model: {k: m[k] for k in keys} for model, m in metrics.items()}
    summary["build_seconds"] = paths.info()["seconds"]["total"]
    print(json.dumps(summary, indent=2))
    return 0
