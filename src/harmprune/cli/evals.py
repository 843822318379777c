"""``harmprune eval harm | likelihood | utility | recognition``: each writes ``DIR/metrics.json`` (flat scalars).

Commands that generate also write ``DIR/generations.jsonl``. ``--mask`` applies a mask (weights zeroed) for the
duration of the evaluation; the loaded model is restored afterwards.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from harmprune.cli.common import add_data_args, add_format_args, add_model_args, load_data, load_model_from_args
from harmprune.judges import JUDGES
MEASURES = ("detection", "explanation", "refusal")
TEXT_SUFFIXES = ("", ".txt", ".text", ".md")


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


def add_judge_args(p: argparse.ArgumentParser, default: str | None, help_default: str = "refusal") -> None:
    p.add_argument("--judge", default=default, choices=JUDGES.names(), help=f"judge (default: {help_default})")
    p.add_argument("--judge-model", default=None,
                   help="strongreject: endpoint model name; hf-judge: local model spec; "
                        "strongreject-finetuned: base model; harm-classifier: trained classifier directory")
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


def add_generation_args(p: argparse.ArgumentParser, sampling: bool = True) -> None:
    p.add_argument("--format", default="chat", choices=["chat", "raw"], help="prompt format")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    if sampling:
        p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
        p.add_argument("--temperature", type=float, default=1.0)
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--n-samples", type=int, default=1, help="samples per prompt (with --do-sample)")


def judge_from_args(args: argparse.Namespace, name: str | None = None):
    """Build the judge named by ``--judge`` with the options that judge takes."""
    from harmprune.judges import get_judge

    name = name or args.judge
    options: dict[str, Any] = {}
    if name == "strongreject":
        options = {"base_url": args.judge_base_url, "model": args.judge_model, "api_key_env": args.judge_api_key_env,
                   "timeout": args.judge_timeout, "max_retries": args.judge_max_retries}
    elif name == "strongreject-finetuned":
        options = {"base_model": args.judge_model, "adapter": args.judge_adapter, "device": args.device,
                   "prompt_file": args.judge_prompt_file}
    elif name == "hf-judge":
        options = {"model": args.judge_model, "device": args.device}
    elif name == "harm-classifier":
        options = {"model": args.judge_model}
    return get_judge(name, **{k: v for k, v in options.items() if v is not None})


# ---------------------------------------------------------------------------------------------- helpers


def _load_mask(args: argparse.Namespace):
    """The mask (read and checked before the slow model load), or None."""
    if not args.mask:
        return None
    from harmprune.selection import load_mask

    return load_mask(args.mask)


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


def _finish(args: argparse.Namespace, metrics: dict[str, Any], rows: list[dict[str, Any]] | None, start: float,
            extra_files: dict[str, list[dict[str, Any]]] | None = None) -> None:
    """Write the per-item files first and ``metrics.json`` last: its presence marks a complete run."""
    from pathlib import Path

    from harmprune.evals import write_metrics
    from harmprune.generation import write_generations

    out = Path(args.out)
    if rows is not None:
        write_generations(out / "generations.jsonl", rows)
    for name, items in (extra_files or {}).items():
        write_generations(out / name, items)
    metrics["wall_s"] = round(time.time() - start, 3)
    path = write_metrics(out, metrics)
    shown = {k: v for k, v in metrics.items() if "/" not in k and isinstance(v, float)}
    print(f"wrote {path}: " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items() if k != "mask_fraction"))


# ---------------------------------------------------------------------------------------------- commands


def cmd_harm(args: argparse.Namespace) -> None:
    from harmprune.data import load_records
    from harmprune.evals.harm import evaluate_harm
    from harmprune.judges import get_judge
    from harmprune.pruning import pruned

    start = time.time()
    records = load_data(args, path=args.prompts)
    references = load_records(args.prefill_from, require_response=True) if args.prefill_from else None
    mask = _load_mask(args)
    judge = judge_from_args(args)
    model, tokenizer = load_model_from_args(args)
    extra = [get_judge("refusal")] if args.judge != "refusal" else []
    with pruned(model, mask):
        metrics, rows = evaluate_harm(
            model, tokenizer, records, judge, prefill_tokens=args.prefill_tokens, prefill_from=references,
            fmt=args.format, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
            do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p, n_samples=args.n_samples,
            seed=args.seed, extra_judges=extra, progress=True,
        )
    metrics.update(_provenance(args, mask, "harm", data=args.prompts, prefill_from=args.prefill_from,
                               judge=args.judge, judge_model=args.judge_model, format=args.format,
                               max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, seed=args.seed))
    _finish(args, metrics, rows, start)


def cmd_likelihood(args: argparse.Namespace) -> None:
    from harmprune.data import load_records
    from harmprune.evals.likelihood import harmful_likelihood, likelihood_gap
    from harmprune.pruning import pruned

    start = time.time()
    records = load_data(args, require_response=True)
    benign = None
    if args.benign:
        benign = load_records(args.benign, n_examples=args.n_examples, seed=args.seed, require_response=True,
                              skip_empty=args.skip_empty_responses)
    mask = _load_mask(args)
    model, tokenizer = load_model_from_args(args)
    with pruned(model, mask):
        harmful = harmful_likelihood(model, tokenizer, records, args.format, args.max_length, args.batch_size,
                                     args.max_batch_tokens)
        metrics: dict[str, Any] = dict(harmful)
        if benign is not None:
            gap = likelihood_gap(harmful, harmful_likelihood(model, tokenizer, benign, args.format, args.max_length,
                                                             args.batch_size, args.max_batch_tokens))
            metrics.update({k: v for k, v in gap.items() if not k.startswith("harmful_")})
    metrics.update(_provenance(args, mask, "likelihood", data=args.data, benign_data=args.benign, format=args.format,
                               max_length=args.max_length, seed=args.seed))
    _finish(args, metrics, None, start)


def cmd_utility(args: argparse.Namespace) -> None:
    from pathlib import Path

    from harmprune.data import load_records
    from harmprune.errors import HarmpruneError
    from harmprune.evals import utility
    from harmprune.pruning import pruned

    start = time.time()
    if not (args.mmlu or args.ppl_file or args.lm_eval_tasks):
        raise HarmpruneError("nothing to evaluate: give --mmlu DIR, --ppl-file FILE and/or --lm-eval-tasks")
    subjects = [s for arg in args.subjects or [] for s in arg.split(",") if s] or None
    if args.mmlu:  # check every file before the model loads
        utility.load_mmlu(args.mmlu, subjects, args.k_shot, args.limit)
    text = records = None
    if args.ppl_file:
        if Path(args.ppl_file).suffix.lower() in TEXT_SUFFIXES:
            text = utility.read_text(args.ppl_file)
        else:
            records = load_records(args.ppl_file, n_examples=args.ppl_n_examples, seed=args.seed,
                                   require_response=True)
    mask = _load_mask(args)
    model, tokenizer = load_model_from_args(args)
    metrics: dict[str, Any] = {}
    with pruned(model, mask):
        if args.mmlu:
            metrics.update(utility.mmlu_accuracy(model, tokenizer, args.mmlu, subjects, args.k_shot, args.limit,
                                                 args.batch_size))
        if text is not None:
            ppl = utility.perplexity_of_text(model, tokenizer, text, args.ppl_window, args.ppl_stride)
            metrics.update({"perplexity": ppl["perplexity"], "ppl_nll": ppl["nll"], "ppl_tokens": ppl["tokens"],
                            "ppl_windows": ppl["windows"], "ppl_n": ppl["tokens"]})
        if records is not None:
            ppl = utility.perplexity_of_responses(model, tokenizer, records, args.format, args.max_length,
                                                  args.batch_size)
            metrics.update({"perplexity": ppl["perplexity"], "ppl_nll": ppl["nll"], "ppl_tokens": ppl["tokens"],
                            "ppl_n": ppl["n"]})
        if args.lm_eval_tasks:
            tasks = [t for t in args.lm_eval_tasks.split(",") if t]
            metrics.update(utility.lm_eval_adapter(model, tokenizer, tasks, args.lm_eval_limit, args.batch_size))
            metrics["lmeval_tasks"] = ",".join(tasks)
    metrics["n"] = metrics.get("mmlu_n", metrics.get("ppl_n", len((args.lm_eval_tasks or "").split(","))))
    metrics.update(_provenance(args, mask, "utility", mmlu=args.mmlu, mmlu_limit=args.limit,
                               ppl_file=args.ppl_file, format=args.format))
    _finish(args, metrics, None, start)


def cmd_recognition(args: argparse.Namespace) -> None:
    from harmprune.data import load_records
    from harmprune.errors import HarmpruneError
    from harmprune.evals import recognition
    from harmprune.pruning import pruned

    start = time.time()
    measures = [m for m in args.measures.split(",") if m]
    unknown = sorted(set(measures) - set(MEASURES))
    if unknown or not measures:
        raise HarmpruneError(f"unknown --measures {unknown or measures}; choose from {', '.join(MEASURES)}")

    def load(path: str, category: str | None):
        return load_records(path, prompt_field=args.prompt_field, category_field=args.category_field,
                            category=category, n_examples=args.n_examples, seed=args.seed)

    harmful, benign = load(args.harmful, args.harmful_category), load(args.benign, args.benign_category)
    mask = _load_mask(args)
    judge = judge_from_args(args) if args.judge else None
    model, tokenizer = load_model_from_args(args)
    metrics: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    files: dict[str, list[dict[str, Any]]] = {}
    gen = dict(fmt=args.format, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=True)
    with pruned(model, mask):
        if "detection" in measures:
            m, files["detection.jsonl"] = recognition.detection(model, tokenizer, harmful, benign, args.format,
                                                                args.batch_size, args.max_batch_tokens)
            metrics.update(m)
        if "explanation" in measures:
            m, r = recognition.explanation(model, tokenizer, harmful, judge=judge, **gen)
            metrics.update(m)
            rows += r
        if "refusal" in measures:
            m, r = recognition.refusal_rate(model, tokenizer, harmful, **gen)
            metrics.update(m)
            rows += r
            m, r = recognition.refusal_rate(model, tokenizer, benign, **gen)
            metrics.update(benign_refusal_rate=m["refusal_rate"], benign_refusal_n=m["refusal_n"])
            rows += [dict(x, task="benign_refusal") for x in r]
    metrics.update(n=len(harmful) + len(benign), n_harmful=len(harmful), n_benign=len(benign))
    metrics.update(_provenance(args, mask, "recognition", harmful_data=args.harmful, benign_data=args.benign,
                               judge=args.judge or "heuristic", format=args.format, measures=",".join(measures),
                               seed=args.seed))
    _finish(args, metrics, rows or None, start, files)
