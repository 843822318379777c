"""``harmprune eval harm | likelihood | utility | recognition | accuracy | em``: each writes ``DIR/metrics.json``.

Each command turns its flags into the evaluation spec a config's ``[evaluations.X]`` table would give (files are
the data sets, ``--judge-X`` flags the ``judge_X`` keys), checks it the same way, and runs it with the same
function (:func:`harmprune.experiments.evaluations.run_evaluation`), so every kind and metric has one name in
both. Commands that generate also write ``DIR/generations.jsonl``. ``--mask`` applies a mask (weights zeroed) for
the duration of the evaluation; the loaded model is restored afterwards.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from harmprune.cli.common import add_data_args, add_format_args, add_model_args, load_data, load_model_from_args
from harmprune.judges import JUDGES

MEASURES = ("detection", "explanation", "refusal")
TEXT_SUFFIXES = ("", ".txt", ".text", ".md")
JUDGE_FLAGS = ("model", "base_model", "base_url", "api_key_env", "adapter", "timeout", "max_retries", "prompt_file")


def add_commands(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("eval", help="evaluate a model, optionally with a mask applied")
    esub = group.add_subparsers(dest="eval_command", metavar="EVAL", required=True)

    p = esub.add_parser("harm", help="judged harmfulness of generations, optionally under a prefilling attack")
    add_model_args(p, mask=True)
    add_data_args(p, flag="--prompts")
    p.add_argument("--prefill-tokens", type=int, default=0, help="force the first K tokens of a reference response")
    p.add_argument("--prefill-from", default=None,
                   help="reference responses, matched to prompts by prompt text (schema detected; default: the "
                        "prompts file's own responses)")
    add_judge_args(p, default="refusal")
    add_generation_args(p)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_harm)

    p = esub.add_parser("likelihood", help="teacher-forced response NLL of prompt→response pairs (judge-free)")
    add_model_args(p, mask=True)
    add_data_args(p)
    add_format_args(p, batch_size=64)
    add_batch_tokens_arg(p)
    p.add_argument("--benign", default=None,
                   help="benign pairs for the harmful−benign gap (schema detected; --n-examples/--seed apply)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_likelihood)

    p = esub.add_parser("utility", help="MMLU accuracy, perplexity and lm-eval tasks")
    add_model_args(p, mask=True)
    p.add_argument("--mmlu", default=None, help="MMLU directory with dev/ and test/ (headerless CSV files)")
    p.add_argument("--subjects", nargs="+", default=None, help="MMLU subjects (default: all in test/)")
    p.add_argument("--limit", type=int, default=None, help="first N questions of each subject")
    p.add_argument("--k-shot", type=int, default=5)
    p.add_argument("--ppl-file", default=None,
                   help="perplexity of a text file (.txt/.md: sliding window) or of the responses of a data file")
    p.add_argument("--ppl-window", type=int, default=1024, help="tokens per window (text files)")
    p.add_argument("--ppl-stride", type=int, default=512, help="tokens between window starts (text files)")
    p.add_argument("--ppl-n-examples", type=int, default=None, help="seeded sample of the data file's pairs")
    p.add_argument("--lm-eval-tasks", default=None, help="comma-separated lm-eval tasks (needs lm-eval + network)")
    p.add_argument("--lm-eval-limit", type=int, default=None)
    add_format_args(p, batch_size=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_utility)

    p = esub.add_parser("recognition", help="harm detection (yes/no), explanation and refusal rate")
    add_model_args(p, mask=True)
    p.add_argument("--harmful", required=True, help="harmful prompts")
    p.add_argument("--benign", required=True, help="benign prompts")
    p.add_argument("--prompt-field", default=None, help="field holding the prompt in both files")
    p.add_argument("--category-field", default=None, help="field holding the category/label in both files")
    p.add_argument("--harmful-category", default=None, help="keep these categories of --harmful (e.g. unsafe)")
    p.add_argument("--benign-category", default=None, help="keep these categories of --benign (e.g. safe)")
    p.add_argument("--n-examples", type=int, default=None, help="seeded sample of each set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--measures", default=",".join(MEASURES),
                   help=f"comma-separated subset of {','.join(MEASURES)} (explanation and refusal generate)")
    add_judge_args(p, default=None, help_default="offline heuristic for explanations")
    add_generation_args(p, sampling=False)
    add_batch_tokens_arg(p)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_recognition)

    p = esub.add_parser("accuracy", help="exact-answer accuracy of generations against the data's responses")
    add_model_args(p, mask=True)
    add_data_args(p)
    p.add_argument("--match", default="exact", choices=["exact", "contains"])
    add_generation_args(p, sampling=False, max_new_tokens=32, batch_size=16)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_accuracy)

    p = esub.add_parser("em", help="broad misalignment: sampled answers graded aligned/coherent by an EM judge")
    add_model_args(p, mask=True)
    add_data_args(p, flag="--prompts")
    add_judge_args(p, default="em")
    p.add_argument("--judge-prompts-file", default=None, help="em: the grading prompts (the EM question YAML)")
    p.add_argument("--judge-backend", default=None, choices=["openai", "hf"], help="em: endpoint or local model")
    add_generation_args(p, sample_default=True)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_em)


def add_judge_args(p: argparse.ArgumentParser, default: str | None, help_default: str = "refusal") -> None:
    p.add_argument("--judge", default=default, choices=JUDGES.names(), help=f"judge (default: {help_default})")
    p.add_argument("--judge-model", default=None,
                   help="strongreject, em: endpoint model name; hf-judge: local model spec; harm-classifier: trained "
                        "classifier directory; strongreject-finetuned: its base model (as --judge-base-model)")
    p.add_argument("--judge-base-model", default=None, help="strongreject-finetuned: base model")
    p.add_argument("--judge-base-url", default=None, help="strongreject: OpenAI-compatible base URL")
    p.add_argument("--judge-api-key-env", default=None, help="strongreject: environment variable with the API key")
    p.add_argument("--judge-adapter", default=None, help="strongreject-finetuned: LoRA adapter path or id")
    p.add_argument("--judge-timeout", type=float, default=None, help="strongreject: seconds per request (default 60)")
    p.add_argument("--judge-max-retries", type=int, default=None,
                   help="strongreject: retries of a failed or malformed request (default 4)")
    p.add_argument("--judge-prompt-file", default=None,
                   help="strongreject-finetuned: the classifier's grading prompt (StrongREJECT's judge_templates.json)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_batch_tokens_arg(p: argparse.ArgumentParser) -> None:
    from harmprune.evals.scoring import DEFAULT_BATCH_TOKENS

    p.add_argument("--max-batch-tokens", type=_positive_int, default=DEFAULT_BATCH_TOKENS,
                   help="padded tokens per teacher-forced batch (--batch-size caps the rows)")


def add_generation_args(p: argparse.ArgumentParser, sampling: bool = True, max_new_tokens: int = 128,
                        batch_size: int = 8, sample_default: bool = False) -> None:
    p.add_argument("--format", default="chat", choices=["chat", "raw"], help="prompt format")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--batch-size", type=int, default=batch_size)
    if sampling:
        p.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=sample_default,
                       help="sample instead of greedy decoding")
        p.add_argument("--temperature", type=float, default=1.0)
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--n-samples", type=int, default=1, help="samples per prompt (with --do-sample)")


def judge_from_args(args: argparse.Namespace, name: str | None = None, where: str | None = None):
    """Build the judge named by ``--judge`` from the ``--judge-*`` flags, checked as a config's judge options;
    ``where`` names the command in error messages (default: ``eval <command>``)."""
    from harmprune.judges import get_judge, judge_options
    from harmprune.specs import Context, parse

    name = name or args.judge
    given = judge_keys(args, name)
    checked = parse(judge_options(name), {k.removeprefix("judge_"): v for k, v in given.items()}, "judge_",
                    Context(where or f"eval {args.eval_command}"))
    return get_judge(name, **{k.removeprefix("judge_"): getattr(checked, k.removeprefix("judge_")) for k in given})


def judge_keys(args: argparse.Namespace, name: str | None) -> dict[str, object]:
    """The ``judge_*`` keys of the evaluation spec for the ``--judge-*`` flags given, as a config writes them."""
    import dataclasses

    from harmprune.judges import judge_options

    flags = (*JUDGE_FLAGS, "prompts_file", "backend")
    given = {f"judge_{k}": getattr(args, f"judge_{k}") for k in flags if getattr(args, f"judge_{k}", None) is not None}
    if name is None:
        return given
    takes = {f.name for f in dataclasses.fields(judge_options(name))}
    if "judge_model" in given and "model" not in takes and "base_model" in takes:  # strongreject-finetuned
        given["judge_base_model"] = given.pop("judge_model")
    if getattr(args, "device", None) and "device" in takes:
        given["judge_device"] = args.device
    return given


# ---------------------------------------------------------------------------------------------- helpers


def _load_mask(args: argparse.Namespace):
    """The mask (read and checked before the slow model load), or None."""
    if not args.mask:
        return None
    from harmprune.selection import load_mask

    return load_mask(args.mask)


def _evaluate(args: argparse.Namespace, kind: str, table: dict[str, Any], data: dict[str, list],
              paths: dict[str, str], provenance: dict[str, Any], fmt: str | None = None) -> None:
    """Check the spec the flags make as a config's would be, then load the model, run the evaluation and write
    ``metrics.json`` last: its presence marks a complete run."""
    from pathlib import Path

    from harmprune.evals import write_metrics
    from harmprune.experiments.evaluations import EVALUATIONS, EvalInputs, run_evaluation
    from harmprune.judges import available_judges, judge_options
    from harmprune.pruning import pruned
    from harmprune.specs import Context, parse

    start = time.time()
    ctx = Context(f"eval {kind}", names={"data": set(data), "judge": set(available_judges())},
                  options_spec=lambda ref, name: judge_options(name) if ref == "judge" else None)
    spec = parse(EVALUATIONS.get(kind).spec, {k: v for k, v in table.items() if v is not None}, "", ctx)
    mask = _load_mask(args)
    model, tokenizer = load_model_from_args(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    inputs = EvalInputs(lambda name: data[name], fmt or args.format, args.seed, paths)
    with pruned(model, mask):
        metrics = run_evaluation(spec, model, tokenizer, inputs, out)
    metrics.update(_provenance(args, mask, kind, **provenance))
    metrics["wall_s"] = round(time.time() - start, 3)
    path = write_metrics(out, metrics)
    shown = {k: v for k, v in metrics.items() if "/" not in k and isinstance(v, float)}
    print(f"wrote {path}: " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items() if k != "mask_fraction"))


def _provenance(args: argparse.Namespace, mask, command: str, **data: Any) -> dict[str, Any]:
    from harmprune import __version__

    out = {
        "command": f"eval {command}",
        "model": args.model,
        "mask": args.mask,
        "mask_count": mask.count() if mask is not None else 0,
        "mask_fraction": mask.fraction() if mask is not None else 0.0,
        "dtype": args.dtype,
        "harmprune_version": __version__,
    }
    out.update(data)
    return out


# ---------------------------------------------------------------------------------------------- commands


def _generation_keys(args: argparse.Namespace) -> dict[str, Any]:
    keys = {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size}
    if hasattr(args, "do_sample"):
        keys.update(do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p,
                    n_samples=args.n_samples)
    return keys


def cmd_harm(args: argparse.Namespace) -> None:
    from harmprune.data import load_records

    data = {"prompts": load_data(args, path=args.prompts)}
    if args.prefill_from:
        data["prefill_from"] = load_records(args.prefill_from, require_response=True)
    table = {"data": "prompts", "judge": args.judge, **judge_keys(args, args.judge),
             "extra_judges": ["refusal"] if args.judge != "refusal" else [], "prefill_tokens": args.prefill_tokens,
             "prefill_from": "prefill_from" if args.prefill_from else None, **_generation_keys(args)}
    _evaluate(args, "harm", table, data, {"prompts": args.prompts}, dict(
        data=args.prompts, prefill_from=args.prefill_from, judge=args.judge, judge_model=args.judge_model,
        format=args.format, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, seed=args.seed))


def cmd_likelihood(args: argparse.Namespace) -> None:
    from harmprune.data import load_records

    data = {"data": load_data(args, require_response=True)}
    if args.benign:
        data["benign"] = load_records(args.benign, n_examples=args.n_examples, seed=args.seed, require_response=True,
                                      skip_empty=args.skip_empty_responses)
    table = {"data": "data", "benign_data": "benign" if args.benign else None, "max_length": args.max_length,
             "batch_size": args.batch_size, "max_batch_tokens": args.max_batch_tokens}
    _evaluate(args, "likelihood", table, data, {"data": args.data}, dict(
        data=args.data, benign_data=args.benign, format=args.format, max_length=args.max_length, seed=args.seed))


def cmd_utility(args: argparse.Namespace) -> None:
    from pathlib import Path

    from harmprune.data import load_records
    from harmprune.errors import HarmpruneError
    from harmprune.evals import utility

    if not (args.mmlu or args.ppl_file or args.lm_eval_tasks):
        raise HarmpruneError("nothing to evaluate: give --mmlu DIR, --ppl-file FILE and/or --lm-eval-tasks")
    subjects = [s for arg in args.subjects or [] for s in arg.split(",") if s] or None
    if args.mmlu:  # check every file before the model loads
        utility.load_mmlu(args.mmlu, subjects, args.k_shot, args.limit)
    text_file = args.ppl_file and Path(args.ppl_file).suffix.lower() in TEXT_SUFFIXES
    data = {}
    if args.ppl_file and not text_file:
        data["ppl"] = load_records(args.ppl_file, n_examples=args.ppl_n_examples, seed=args.seed,
                                   require_response=True)
    tasks = [t for t in (args.lm_eval_tasks or "").split(",") if t]
    table = {"mmlu": args.mmlu, "subjects": subjects, "limit": args.limit, "k_shot": args.k_shot,
             "ppl_file": args.ppl_file if text_file else None, "ppl_window": args.ppl_window,
             "ppl_stride": args.ppl_stride, "ppl_data": "ppl" if data else None, "max_length": args.max_length,
             "lm_eval_tasks": tasks, "lm_eval_limit": args.lm_eval_limit, "batch_size": args.batch_size}
    _evaluate(args, "utility", table, data, {"ppl": args.ppl_file} if data else {}, dict(
        mmlu=args.mmlu, mmlu_limit=args.limit, ppl_file=args.ppl_file, lmeval_tasks=",".join(tasks),
        format=args.format))


def cmd_recognition(args: argparse.Namespace) -> None:
    from harmprune.data import load_records
    from harmprune.errors import HarmpruneError

    measures = [m for m in args.measures.split(",") if m]
    unknown = sorted(set(measures) - set(MEASURES))
    if unknown or not measures:
        raise HarmpruneError(f"unknown --measures {unknown or measures}; choose from {', '.join(MEASURES)}")

    def load(path: str, category: str | None):
        return load_records(path, prompt_field=args.prompt_field, category_field=args.category_field,
                            category=category, n_examples=args.n_examples, seed=args.seed)

    data = {"harmful": load(args.harmful, args.harmful_category), "benign": load(args.benign, args.benign_category)}
    table = {"harmful": "harmful", "benign": "benign", "detection": "detection" in measures,
             "explanation": "explanation" in measures, "refusal": "refusal" in measures,
             "benign_refusal": "refusal" in measures, "judge": args.judge, **judge_keys(args, args.judge),
             "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
             "max_batch_tokens": args.max_batch_tokens}
    _evaluate(args, "recognition", table, data, {"harmful": args.harmful, "benign": args.benign}, dict(
        harmful_data=args.harmful, benign_data=args.benign, judge=args.judge or "heuristic", format=args.format,
        measures=",".join(measures), seed=args.seed))


def cmd_accuracy(args: argparse.Namespace) -> None:
    data = {"data": load_data(args, require_response=True)}
    table = {"data": "data", "match": args.match, **_generation_keys(args)}
    _evaluate(args, "accuracy", table, data, {"data": args.data}, dict(data=args.data, format=args.format,
                                                                       seed=args.seed))


def cmd_em(args: argparse.Namespace) -> None:
    data = {"prompts": load_data(args, path=args.prompts)}
    table = {"data": "prompts", "judge": args.judge, **judge_keys(args, args.judge), **_generation_keys(args)}
    _evaluate(args, "em", table, data, {"prompts": args.prompts}, dict(
        data=args.prompts, judge=args.judge, format=args.format, seed=args.seed))
