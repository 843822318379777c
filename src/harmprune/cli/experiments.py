"""``harmprune run | results | report | demo``: whole experiments from a config, and their outputs."""

from __future__ import annotations

import argparse
import json

from harmprune.experiments.executors import EXECUTORS


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the experiments of a TOML config (cached, resumable)")
    p.add_argument("config", help="experiment config (.toml)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument("--executor", default="local", choices=EXECUTORS.names(),
                   help="where independent stages (scores, sweep evaluations) run: this process, or Ray tasks")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray instance)")
    p.add_argument("--cpus-per-task", type=float, default=1.0, help="CPUs each Ray stage task asks for")
    p.add_argument("--gpus-per-task", type=float, default=None,
                   help="GPUs each Ray stage task asks for (default: 1 if this machine has a GPU, else 0)")
    p.add_argument("--task-retries", type=int, default=0, help="Ray retries of a stage task whose worker died")
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, a TOML value or a bare string (repeatable), e.g. "
                        "--set scoring.harm=harmful_lat --set 'selection.q=[1e-5]'")
    p.add_argument("--only", default=None, metavar="NAME[,NAME]",
                   help="run only these experiments of the config (e.g. --only cross_category,dissociation)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("results", help="query the results store of a run directory")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p.add_argument("--experiment", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--metric", default=None)
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("report", help="rebuild report.html / report.md / figures from a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="the whole study on the built-in model organisms, no downloads")
    p.add_argument("--out", default="runs/demo", help="run directory")
    p.add_argument("--size", default="small", choices=["tiny", "small"], help="organism size")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)


def cmd_run(args: argparse.Namespace) -> None:
    from harmprune.experiments import load_checked_config, run_config

    if args.check:
        cfg = load_checked_config(args.config, args.overrides)
        print(f"{args.config}: OK ({len(cfg.models)} models, {len(cfg.data)} data sets, "
              f"{len(cfg.evaluations)} evaluations, experiments: {', '.join(cfg.experiments)})")
        return
    options = {}
    if args.executor == "ray":
        gpus = args.gpus_per_task
        if gpus is None:
            import torch

            gpus = 1.0 if torch.cuda.is_available() else 0.0
        options = {"address": args.ray_address, "num_cpus": args.cpus_per_task, "num_gpus": gpus,
                   "max_retries": args.task_retries}
    only = [name.strip() for name in args.only.split(",") if name.strip()] if args.only else None
    out = run_config(args.config, args.out, executor=args.executor, only=only, overrides=args.overrides,
                     **options)
    print(f"report: {out / 'report.html'}")


def cmd_results(args: argparse.Namespace) -> None:
    from pathlib import Path

    from harmprune.errors import HarmpruneError
    from harmprune.store import Store, format_table, recipe_of

    path = Path(args.run_dir) / "results.sqlite"
    if not path.exists():
        raise HarmpruneError(f"{args.run_dir}: no results.sqlite (is this a harmprune run directory?)")
    where = {k: v for k, v in (("experiment", args.experiment), ("model", args.model), ("metric", args.metric)) if v}
    rows = [{**r, "recipe": recipe_of(r)} for r in Store(path).metrics(**where)]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows, ["experiment", "model", "condition", "q", "p", "seed", "evaluation", "metric",
                                  "value", "recipe"]))


def cmd_report(args: argparse.Namespace) -> None:
    from harmprune.report import build_report

    print(build_report(args.run_dir))


def cmd_demo(args: argparse.Namespace) -> None:
    from harmprune.experiments.demo import run_demo

    out = run_demo(args.out, size=args.size, seed=args.seed)
    print(f"report: {out / 'report.html'}")
