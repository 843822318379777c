"""``harmprune plan``: the memory each stage needs and the launch command for the GPUs at hand."""

from __future__ import annotations

import argparse
import json

from harmprune.scoring_methods import SCORING_METHODS


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="memory per stage and a suggested launch (1 GPU, data-parallel or FSDP2)")
    p.add_argument("--model", required=True, help="model directory, alias, hub id, or a known name (e.g. llama-3.1-70b)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs available")
    p.add_argument("--gpu-memory", default="80GiB", help="memory of one GPU (e.g. 80GiB, 141GB)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--method", default="signed-snip", choices=SCORING_METHODS.names())
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--q", type=float, default=1e-3, help="harm fraction, for the mask size")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> None:
    from harmprune.plan import Workload, make_plan, model_shape, parse_size, render

    work = Workload(method=args.method, dtype=args.dtype, batch_size=args.batch_size, max_length=args.max_length,
                    q=args.q, gradient_checkpointing=args.gradient_checkpointing)
    plan = make_plan(model_shape(args.model), work, gpus=args.gpus, gpu_memory=parse_size(args.gpu_memory),
                     gpus_per_node=args.gpus_per_node)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else render(plan))
