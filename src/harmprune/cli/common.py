"""Argument groups shared by several commands, so every command spells the same option the same way."""

from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser, mask: bool = False) -> None:
    p.add_argument("--model", required=True, help="model directory, hub id, .gguf file or alias (see `models list`)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    if mask:
        p.add_argument("--mask", default=None, help="mask file to apply (zeroed) while evaluating")


def add_data_args(p: argparse.ArgumentParser, flag: str = "--data", required: bool = True) -> None:
    p.add_argument(flag, required=required, help="CSV, JSON, JSONL or YAML file, or a hub data set id")
    p.add_argument("--prompt-field", default=None, help="field holding the prompt (overrides schema detection)")
    p.add_argument("--response-field", default=None, help="field holding the response")
    p.add_argument("--category-field", default=None, help="field holding the harm category")
    p.add_argument("--category", default=None, help="keep only these categories (comma-separated)")
    p.add_argument("--n-examples", type=int, default=None, help="seeded random sample of this many examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-empty-responses", action="store_true", help="drop rows whose response is empty")


def add_format_args(p: argparse.ArgumentParser, max_length: int = 512, batch_size: int = 4,
                    default_format: str = "chat") -> None:
    from harmprune.formatting import PROMPT_FORMATS

    p.add_argument("--format", default=default_format, choices=list(PROMPT_FORMATS),
                   help=f"prompt format (default: {default_format}; 'pretrained' = prompt, newline, response, "
                        "no template: the study's scoring format)")
    p.add_argument("--max-length", type=int, default=max_length, help="tokens per example (prompt + response)")
    p.add_argument("--batch-size", type=int, default=batch_size)


def load_data(args: argparse.Namespace, path: str | None = None, require_response: bool = False):
    from harmprune.data import load_records

    return load_records(
        path or args.data, prompt_field=args.prompt_field, response_field=args.response_field,
        category_field=args.category_field, category=args.category, n_examples=args.n_examples, seed=args.seed,
        require_response=require_response, skip_empty=args.skip_empty_responses,
    )


def load_model_from_args(args: argparse.Namespace):
    import torch

    from harmprune.models import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_model(args.model, dtype=args.dtype, device=device)
