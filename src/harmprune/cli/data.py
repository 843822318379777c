"""``harmprune data self-generate``: the model's own answers to harmful prompts, as calibration data."""

from __future__ import annotations

import argparse

from harmprune.cli.common import add_data_args, add_model_args, load_data, load_model_from_args


def add_commands(sub: argparse._SubParsersAction) -> None:
    from harmprune.formatting import PROMPT_FORMATS

    group = sub.add_parser("data", help="make data sets")
    dsub = group.add_subparsers(dest="data_command", metavar="DATA", required=True)
    p = dsub.add_parser("self-generate",
                        help="the model answers prompts under a prefilling attack; refusals dropped (JSONL for score)")
    add_model_args(p)
    add_data_args(p, flag="--prompts")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--prefix", default="", help="force every answer to open with this text (e.g. 'Sure, here is')")
    start.add_argument("--prefill-tokens", type=int, default=0,
                       help="force the first K tokens of each prompt's reference answer")
    p.add_argument("--prefill-from", default=None,
                   help="reference answers, matched to prompts by prompt text (default: the prompts file's own "
                        "responses, e.g. AdvBench's target)")
    p.add_argument("--judge", default="refusal",
                   help="judge whose refusals are dropped (a registered judge; 'none' keeps every answer)")
    p.add_argument("--score-prefix", action="store_true",
                   help="score the forced prefix too (default: it is unscored context, as in the study)")
    p.add_argument("--format", default="chat", choices=list(PROMPT_FORMATS), help="prompt format for generation")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", required=True, help="output .jsonl (a sidecar <name>.meta.json gets the counts)")
    p.set_defaults(func=cmd_self_generate)


def cmd_self_generate(args: argparse.Namespace) -> None:
    import time

    from harmprune import __version__
    from harmprune.calibration import forced_prefixes, self_generate, sidecar_path, write_answers
    from harmprune.data import load_records
    from harmprune.errors import HarmpruneError
    from harmprune.judges import available_judges, get_judge

    start = time.time()
    if not args.out.endswith(".jsonl"):
        raise HarmpruneError(f"--out {args.out!r} must be a .jsonl file")
    if args.prefill_from and not args.prefill_tokens:
        raise HarmpruneError("--prefill-from needs --prefill-tokens K > 0")
    if args.judge != "none" and args.judge not in available_judges():
        raise HarmpruneError(f"--judge {args.judge!r} is not a judge (known: {', '.join(available_judges())}; "
                             "'none' keeps every answer)")
    judge = None if args.judge == "none" else get_judge(args.judge)
    records = load_data(args, path=args.prompts)
    refs = load_records(args.prefill_from, require_response=True) if args.prefill_from else None
    model, tokenizer = load_model_from_args(args)
    prefixes = forced_prefixes(tokenizer, records, prefix=args.prefix, prefill_tokens=args.prefill_tokens,
                               references=refs)
    result = self_generate(model, tokenizer, records, prefixes, judge=judge, fmt=args.format,
                           max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                           score_prefix=args.score_prefix, progress=True)
    provenance = {"command": "data self-generate", "model": args.model, "prompts": args.prompts,
                  "n_examples": args.n_examples, "seed": args.seed, "prefix": args.prefix,
                  "prefill_tokens": args.prefill_tokens, "prefill_from": args.prefill_from, "judge": args.judge,
                  "score_prefix": args.score_prefix, "format": args.format, "max_new_tokens": args.max_new_tokens,
                  "dtype": args.dtype, "harmprune_version": __version__, "wall_s": round(time.time() - start, 3)}
    out = write_answers(result, args.out, provenance)
    c = result.counts
    print(f"wrote {out} ({sidecar_path(out).name}): kept {c['kept']} of {c['total']}, dropped {c['dropped']} "
          f"({c['refused']} refusals, {c['empty']} empty)")
