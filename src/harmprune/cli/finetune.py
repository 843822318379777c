"""``harmprune finetune``: a LoRA fine-tune on (prompt, response) pairs, optionally of a pruned model."""

from __future__ import annotations

import argparse
import json

from harmprune.cli.common import add_data_args, add_format_args, add_model_args, load_data, load_model_from_args


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="LoRA fine-tune on (prompt, response) pairs (the fine-tuning attack, recovery, narrow tunes)",
        description="Train a LoRA adapter on the response tokens of --data and save it in --out (with "
        "harmprune_finetune.json). With --mask the model is pruned first; --keep-pruned holds the pruned weights "
        "at zero (the adapter's delta is masked there, and the mask is saved with the adapter); without it the "
        "adapter may regrow them. --merge also writes the merged model to OUT/merged.",
    )
    add_model_args(p, mask=True)
    add_data_args(p)
    add_format_args(p, max_length=256, batch_size=8)
    p.add_argument("--out", required=True, metavar="DIR", help="adapter directory to write")
    p.add_argument("--keep-pruned", action="store_true", help="hold the --mask weights at zero while training")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--target-modules", default=None,
                   help="comma-separated module names (default: every Linear inside the decoder blocks)")
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--merge", action="store_true", help="also save the merged model in OUT/merged")
    p.set_defaults(func=_finetune)


def _finetune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from harmprune.errors import HarmpruneError
    from harmprune.finetune import lora_finetune, merge, save_adapter
    from harmprune.models import save_model
    from harmprune.pruning import apply_mask
    from harmprune.selection import load_mask

    if args.keep_pruned and not args.mask:
        raise HarmpruneError("--keep-pruned needs --mask")
    records = load_data(args, require_response=True)
    mask = load_mask(args.mask) if args.mask else None
    model, tokenizer = load_model_from_args(args)
    if mask is not None and not args.keep_pruned:
        apply_mask(model, mask)
    targets = [t.strip() for t in args.target_modules.split(",") if t.strip()] if args.target_modules else None
    peft_model = lora_finetune(
        model, tokenizer, records, rank=args.rank, alpha=args.alpha, dropout=args.dropout, target_modules=targets,
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length, fmt=args.format,
        seed=args.seed, max_steps=args.max_steps, keep_pruned=mask if args.keep_pruned else None,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    peft_model.finetune_info["mask"] = args.mask
    out = save_adapter(peft_model, args.out)
    info = peft_model.finetune_info
    summary = {"adapter": str(out), "steps": info["steps"], "examples": info["examples"],
               "first_loss": info["losses"][0], "last_loss": info["losses"][-1]}
    if args.merge:
        summary["merged"] = str(save_model(merge(peft_model), tokenizer, Path(args.out) / "merged"))
    print(json.dumps(summary, indent=2))
    return 0
