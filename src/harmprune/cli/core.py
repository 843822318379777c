"""``harmprune score | select | prune | mask``: the core engine's commands."""

from __future__ import annotations

import argparse
import json

from harmprune.cli.common import add_data_args, add_format_args, add_model_args, load_data, load_model_from_args
from harmprune.control_masks import CONTROLS
from harmprune.experiments.config import RECIPE_P, RECIPE_Q
from harmprune.scoring_methods import SCORING_METHODS


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="attribution scores of every weight on a data set")
    add_model_args(p)
    add_data_args(p)
    add_format_args(p, default_format="pretrained")
    p.add_argument("--method", required=True, choices=SCORING_METHODS.names(),
                   help="the study's pair: signed-snip for the harm set, snip for the utility set")
    p.add_argument("--modules", default=None, help="regex over parameter names (default: decoder-block Linears)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory (signed-snip)")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel over the ranks torchrun started: each scores its share of the examples")
    p.add_argument("--fsdp", action="store_true",
                   help="shard the model over the ranks with FSDP2 (implies --distributed); writes a sharded file")
    p.add_argument("--load-concurrency", type=int, default=1,
                   help="with --fsdp: ranks loading the checkpoint into host memory at once")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("select", help="harm set minus utility set, written as a mask file")
    p.add_argument("--harm", required=True, help="harm score file")
    p.add_argument("--utility", default=None, help="utility score file (omit for no utility filter)")
    p.add_argument("--q", type=float, nargs="+", default=[RECIPE_Q],
                   help=f"harm fraction (default {RECIPE_Q:g}, the study's); several values select a sweep in one "
                        "read of the files")
    p.add_argument("--p", type=float, nargs="+", default=None,
                   help=f"utility fraction (several: a sweep; default {RECIPE_P:g} with --utility, else 0)")
    p.add_argument("--granularity", default="matrix", choices=["matrix", "row", "global"])
    p.add_argument("--harm-method", default=None, choices=SCORING_METHODS.names(),
                   help="how to read the harm scores (default: the method in the file's metadata)")
    p.add_argument("--utility-method", default=None, choices=SCORING_METHODS.names(),
                   help="how to read the utility scores (default: the method in the file's metadata)")
    p.add_argument("--device", default=None, help="where to select, e.g. cpu or cuda (default: cuda if available)")
    p.add_argument("--out", required=True,
                   help="output mask .safetensors file; for several values, a name containing {q} and/or {p}")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("prune", help="save a copy of a model with a mask's weights zeroed")
    add_model_args(p)
    p.add_argument("--mask", required=True)
    p.add_argument("--alpha", type=float, default=0.0, help="scale instead of zeroing")
    p.add_argument("--out", required=True, help="output Hugging Face model directory")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("mask", help="inspect and combine masks")
    msub = p.add_subparsers(dest="mask_command", required=True)
    s = msub.add_parser("stats", help="counts per layer and module")
    s.add_argument("masks", nargs="+")
    s.set_defaults(func=cmd_mask_stats)
    s = msub.add_parser("control", help="a control mask with the same per-matrix counts")
    s.add_argument("mask")
    s.add_argument("--kind", default="random", choices=CONTROLS.names())
    s.add_argument("--model", default=None, help="model whose |W| the magnitude-matched control follows")
    s.add_argument("--scores", default=None, help="score file whose top weights the benign-task control takes")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_mask_control)


def cmd_score(args: argparse.Namespace) -> None:
    import torch

    from harmprune import distributed
    from harmprune.attribution import compute_scores, save_scores

    ctx = distributed.init_distributed(args.device) if args.distributed or args.fsdp else None
    try:
        records = load_data(args, require_response=SCORING_METHODS.get(args.method).needs_data)
        if args.fsdp:
            model, tokenizer = distributed.load_sharded_model(args.model, args.dtype, ctx, args.load_concurrency)
        elif ctx is not None:
            from harmprune.models import load_model

            model, tokenizer = load_model(args.model, dtype=args.dtype, device=str(ctx.device))
        else:
            model, tokenizer = load_model_from_args(args)
        scores = compute_scores(
            model, tokenizer, records, args.method, fmt=args.format, max_length=args.max_length,
            batch_size=args.batch_size, modules=args.modules, gradient_checkpointing=args.gradient_checkpointing,
            distributed=ctx is not None,
        )
        scores.metadata["data"] = args.data
        save_scores(scores, args.out, dtype=getattr(torch, args.save_dtype))
        distributed.barrier()
    finally:
        if ctx is not None:
            distributed.shutdown()
    if ctx is None or ctx.is_main:
        where = f" on {ctx.world} ranks{' (FSDP, sharded file)' if args.fsdp else ''}" if ctx else ""
        print(f"wrote {args.out} ({len(scores.owners or scores.tensors)} weights, {scores.metadata['examples']} "
              f"examples, {scores.metadata['tokens']} response tokens{where})")


def cmd_select(args: argparse.Namespace) -> None:
    from harmprune.errors import HarmpruneError
    from harmprune.io import in_background
    from harmprune.selection import default_device, mask_stats, save_mask, select_grid
    from harmprune.tensorfile import TensorFile

    if args.p is None:
        args.p = [RECIPE_P if args.utility else 0.0]
    for key, values in (("q", args.q), ("p", args.p)):
        if len(set(values)) > 1 and "{" + key + "}" not in args.out:
            raise HarmpruneError(f"--out {args.out!r}: several --{key} values need {{{key}}} in the file name")
    harm = TensorFile(args.harm)
    utility = TensorFile(args.utility) if args.utility else None
    # the files' hashes (recorded in each mask) take longer than selecting: computed meanwhile
    harm_sha = in_background(harm.sha256)
    util_sha = in_background(utility.sha256) if utility else (lambda: "")
    masks = select_grid(harm, utility, args.q, args.p, args.granularity, harm_method=args.harm_method,
                        utility_method=args.utility_method, device=args.device or default_device())
    harm_sha, util_sha = harm_sha(), util_sha()
    formats = {"harm_format": str(harm.metadata.get("prompt_format", "")),
               "utility_format": str(utility.metadata.get("prompt_format", "")) if utility else ""}
    for (q, p), mask in masks.items():
        out = args.out.replace("{q}", f"{q:g}").replace("{p}", f"{p:g}")
        save_mask(mask, out, harm_file=args.harm, harm_sha256=harm_sha, utility_file=args.utility or "",
                  utility_sha256=util_sha, **formats)
        stats = mask_stats(mask)
        recipe = f"harm {mask.metadata['harm_method']}/{formats['harm_format'] or '?'}"
        if utility is not None:
            recipe += f", utility {mask.metadata['utility_method']}/{formats['utility_format'] or '?'}"
        print(f"wrote {out}: {stats['selected']} of {stats['total']} weights ({stats['fraction']:.3g}; {recipe})")


def cmd_prune(args: argparse.Namespace) -> None:
    import os
    import shutil
    from pathlib import Path

    from harmprune.models import resolve_model, save_model
    from harmprune.pruning import apply_mask, check_alpha
    from harmprune.selection import load_mask

    check_alpha(args.alpha)
    mask = load_mask(args.mask)  # read and checked before the (slow) model load
    out = _check_prune_out(Path(args.out), resolve_model(args.model))
    model, tokenizer = load_model_from_args(args)
    apply_mask(model, mask, alpha=args.alpha)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")  # a failed save leaves nothing at --out
    try:
        save_model(model, tokenizer, partial)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    print(f"wrote {args.out} ({mask.count()} weights {'zeroed' if args.alpha == 0 else f'scaled by {args.alpha}'})")


def _check_prune_out(out, source: str):
    """``--out`` as a directory that is neither the source model, nor inside it or holding it, nor a file."""
    from pathlib import Path

    from harmprune.errors import HarmpruneError

    out_r, src_r = out.resolve(), Path(source).resolve()
    if Path(source).exists() and (out_r == src_r or src_r in out_r.parents or out_r in src_r.parents):
        raise HarmpruneError(f"--out {out} would overwrite the source model {source}; choose another directory")
    if out.exists() and not out.is_dir():
        raise HarmpruneError(f"--out {out} is an existing file; prune writes a model directory there")
    return out


def cmd_mask_stats(args: argparse.Namespace) -> None:
    from harmprune.selection import expected_jaccard, jaccard, load_mask, mask_stats

    masks = [load_mask(m) for m in args.masks]
    out: dict[str, object] = {m: mask_stats(mask) for m, mask in zip(args.masks, masks)}
    if len(masks) > 1:
        out["jaccard"] = {f"{a} | {b}": {"observed": jaccard(masks[i], masks[j]),
                                         "chance": expected_jaccard(masks[i], masks[j])}
                          for i, a in enumerate(args.masks) for j, b in enumerate(args.masks) if i < j}
    print(json.dumps(out, indent=2))


def cmd_mask_control(args: argparse.Namespace) -> None:
    from harmprune.errors import HarmpruneError
    from harmprune.selection import load_mask, save_mask

    control = CONTROLS.get(args.kind)
    mask = load_mask(args.mask)
    inputs = {}
    if control.needs == "weights":
        if not args.model:
            raise HarmpruneError(f"--kind {args.kind} needs --model")
        from harmprune.models import load_model

        inputs["weights"] = dict(load_model(args.model)[0].named_parameters())
    if control.needs == "scores":
        if not args.scores:
            raise HarmpruneError(f"--kind {args.kind} needs --scores")
        from harmprune.tensorfile import TensorFile

        inputs["scores"] = TensorFile(args.scores)
    ctrl = control.make(mask, args.seed, **inputs)
    save_mask(ctrl, args.out, source_mask=args.mask)
    print(f"wrote {args.out} ({ctrl.count()} weights, {args.kind} control of {args.mask})")
