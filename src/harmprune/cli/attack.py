"""``harmprune attack ...``: attacks that undo refusals (the fine-tuning attack is ``harmprune finetune``)."""

from __future__ import annotations

import argparse
import json

from harmprune.cli.common import add_format_args, add_model_args, load_model_from_args
from harmprune.scoring_methods import SCORING_METHODS


def add_commands(subparsers) -> None:
    group = subparsers.add_parser("attack", help="attacks on refusal: refusal ablation")
    sub = group.add_subparsers(dest="attack_command", metavar="SUBCOMMAND", required=True)
    p = sub.add_parser(
        "refusal-ablation",
        help="a mask of the weights that support refusing (refusal set minus utility set)",
        description="Score --method on harmful prompt -> refusal pairs and on the --utility pairs, then write the "
        "top-q refusal-support weights minus the top-p utility-support weights as a mask. Refusals are generic "
        "refusal sentences, or with --own-refusals the model's own greedy answers that the refusal judge counts "
        "as refusals. Prune with the mask (e.g. `harmprune prune`) to make the model stop refusing.",
    )
    add_model_args(p)
    p.add_argument("--harmful", required=True, help="file of harmful prompts (responses, if any, are ignored)")
    p.add_argument("--utility", required=True, help="file of utility (prompt, response) pairs")
    p.add_argument("--n-examples", type=int, default=None, help="seeded sample of this many from each file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--own-refusals", action="store_true", help="use the model's own refusals as the targets")
    p.add_argument("--method", default="signed-snip", choices=SCORING_METHODS.names(),
                   help="a method that scores data (not magnitude)")
    p.add_argument("--q", type=float, required=True, help="refusal fraction")
    p.add_argument("--p", type=float, default=0.0, help="utility fraction")
    p.add_argument("--granularity", default="matrix", choices=["matrix", "row", "global"])
    p.add_argument("--modules", default=None, help="regex over parameter names (default: decoder-block Linears)")
    add_format_args(p)
    p.add_argument("--out", required=True, help="output mask .safetensors file")
    p.set_defaults(func=_refusal_ablation)


def _refusal_ablation(args: argparse.Namespace) -> int:
    from harmprune.attacks import model_refusal_pairs, refusal_ablation_mask
    from harmprune.data import load_records
    from harmprune.selection import mask_stats, save_mask

    harmful = load_records(args.harmful, n_examples=args.n_examples, seed=args.seed)
    utility = load_records(args.utility, n_examples=args.n_examples, seed=args.seed, require_response=True)
    model, tokenizer = load_model_from_args(args)
    refusals = (model_refusal_pairs(model, tokenizer, harmful, fmt=args.format, batch_size=args.batch_size)
                if args.own_refusals else None)
    mask = refusal_ablation_mask(
        model, tokenizer, harmful, utility, args.q, args.p, refusals=refusals, method=args.method,
        granularity=args.granularity, fmt=args.format, max_length=args.max_length, batch_size=args.batch_size,
        modules=args.modules, seed=args.seed,
    )
    save_mask(mask, args.out, model=args.model, harmful=args.harmful, utility=args.utility)
    stats = mask_stats(mask)
    print(json.dumps({"mask": args.out, "selected": stats["selected"], "fraction": stats["fraction"],
                      "refusal_examples": mask.metadata["refusal_examples"]}, indent=2))
    return 0
