"""Benchmark: harmprune's one-pass signed-SNIP against a per-layer reference, side by side in one run.

The reference does what the original alignment-attribution code does: for each decoder layer, one forward and
one backward per example with only that layer's weights requiring gradients. Each variant runs in its own
subprocess so its peak resident memory is its own. The reference is O(layers × examples) passes, so by default
it runs on the first few examples only and both are compared per example (and checked equal on those examples).

    .venv/bin/python bench/bench_attribution.py [--n-examples 64 --reference-examples 8 --dtype float32]

``--parts likelihood`` measures forward-only throughput instead: ``harmful_likelihood`` (what ``eval likelihood``
runs: token-budget batches, the head at response positions only) against a plain forward (full logits) of the
same batches, each in its own subprocess, in tokens per second.

    .venv/bin/python bench/bench_attribution.py --parts likelihood [--n-examples 128 --max-length 256]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "harmful" / "harmful_completions_lat.jsonl"


def load(args):
    import torch

    from harmprune.data import load_records
    from harmprune.models import load_model

    torch.set_num_threads(args.threads)
    records = load_records(args.data, n_examples=args.n_examples, seed=0, require_response=True, skip_empty=True)
    model, tok = load_model(args.model, dtype=args.dtype)
    return model, tok, records


def worker(args) -> dict:
    import torch

    from harmprune.attribution import compute_scores, scored_parameters

    model, tok, records = load(args)
    records = records[: args.limit]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = scored_parameters(model)
    start = time.perf_counter()
    if args.worker in ("likelihood", "forward"):
        return forward_only(args, model, tok, records, rss_before)
    if args.worker == "batched":
        scores = compute_scores(model, tok, records, "signed-snip", max_length=args.max_length,
                                batch_size=args.batch_size, progress=False)
        tensors, tokens = scores.tensors, scores.metadata["tokens"]
    elif args.worker == "plain":
        tensors, tokens = {}, plain_backward(model, tok, records, params, args.max_length, args.batch_size)
    else:
        tensors, tokens = reference_per_layer(model, tok, records, params, args.max_length)
    elapsed = time.perf_counter() - start
    out = {"variant": args.worker, "examples": len(records), "tokens": tokens, "seconds": elapsed,
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "rss_before_bytes": rss_before * 1024,
           "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
           "params": sum(p.numel() for p in model.parameters()),
           "scored_params": sum(p.numel() for p in params.values()),
           "linear_params": sum(p.numel() for p in params.values()) + model.lm_head.weight.numel()}
    if args.save:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, args.save)
    return out


def forward_only(args, model, tok, records, rss_before: int) -> dict:
    """Tokens/s of ``harmful_likelihood`` or of a plain forward of the same token-budget batches."""
    import torch

    from harmprune.evals.likelihood import harmful_likelihood
    from harmprune.evals.scoring import token_batches
    from harmprune.formatting import collate_for_loss, encode_pair, pad_id_of

    examples = [encode_pair(tok, r.prompt, r.response, "chat", args.max_length) for r in records]
    start = time.perf_counter()
    if args.worker == "likelihood":
        harmful_likelihood(model, tok, records, "chat", args.max_length, args.eval_batch_size, args.max_batch_tokens)
    else:
        with torch.no_grad():
            for b in token_batches([len(e.input_ids) for e in examples], args.eval_batch_size, args.max_batch_tokens):
                enc = collate_for_loss([examples[i] for i in b], pad_id_of(tok))
                model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False).logits.sum()
    return {"variant": args.worker, "examples": len(records), "tokens": sum(len(e.input_ids) for e in examples),
            "seconds": time.perf_counter() - start, "rss_before_bytes": rss_before * 1024,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def reference_per_layer(model, tok, records, params, max_length):
    """One forward+backward per (layer, example), only that layer's weights requiring gradients."""
    import torch

    from harmprune.formatting import collate_for_loss, encode_pair, per_example_response_nll

    for p in model.parameters():
        p.requires_grad_(False)
    layers = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in params})
    acc = {n: torch.zeros(p.shape) for n, p in params.items()}
    tokens = 0
    encoded = [encode_pair(tok, r.prompt, r.response, "chat", max_length) for r in records]
    for layer in layers:
        names = [n for n in params if f".layers.{layer}." in n]
        for n in names:
            params[n].requires_grad_(True)
        for enc in encoded:
            batch = collate_for_loss([enc], pad_id=0)
            logits = model(input_ids=batch["input_ids"], use_cache=False).logits
            per_example_response_nll(logits, batch["labels"]).sum().backward()
            for n in names:
                acc[n] += params[n].grad.float()
                params[n].grad = None
            if layer == layers[0]:
                tokens += enc.n_response
        for n in names:
            params[n].requires_grad_(False)
    return {n: params[n].detach().float() * acc[n] for n in params}, tokens


def plain_backward(model, tok, records, params, max_length, batch_size) -> int:
    """The activation baseline: an ordinary forward+backward (gradients kept on the scored weights) over the same
    length-sorted batches harmprune scores, so its peak memory is weights + gradients + one batch's activations."""
    from harmprune.formatting import collate_for_loss, encode_pair, pad_id_of, per_example_response_nll

    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
    encoded = sorted((encode_pair(tok, r.prompt, r.response, "chat", max_length) for r in records),
                     key=lambda e: len(e.input_ids))
    tokens = 0
    for i in range(0, len(encoded), batch_size):
        batch = collate_for_loss(encoded[i : i + batch_size], pad_id_of(tok))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        per_example_response_nll(logits, batch["labels"]).sum().backward()
        tokens += int((batch["labels"] != -100).sum())
        del logits
        model.zero_grad(set_to_none=False)  # keep the gradient buffers, as a training step would
    return tokens


def matmul_rate(threads: int, dtype: str) -> float:
    """This machine's measured dense matmul rate (FLOP/s) at the benchmark's dtype and thread count."""
    import torch

    torch.set_num_threads(threads)
    dt = getattr(torch, dtype)
    a, b = torch.randn(2048, 2048, dtype=dt), torch.randn(2048, 2048, dtype=dt)
    a @ b
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    return 2 * 2048**3 * reps / (time.perf_counter() - start)


def run_worker(args, variant: str, limit: int, save: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--limit", str(limit), "--model", args.model,
           "--data", str(args.data), "--n-examples", str(args.n_examples), "--max-length", str(args.max_length),
           "--batch-size", str(args.batch_size), "--dtype", args.dtype, "--threads", str(args.threads),
           "--eval-batch-size", str(args.eval_batch_size), "--max-batch-tokens", str(args.max_batch_tokens)]
    if save:
        cmd += ["--save", str(save)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def max_relative_error(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return max(float((x[n] - y[n]).abs().max() / y[n].abs().max().clamp(min=1e-30)) for n in y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--n-examples", type=int, default=64)
    ap.add_argument("--reference-examples", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", nargs="+", default=["attribution"], choices=["attribution", "likelihood"])
    ap.add_argument("--eval-batch-size", type=int, default=64, help="likelihood: rows per batch at most")
    ap.add_argument("--repeats", type=int, default=2, help="likelihood: runs of each variant, alternating")
    ap.add_argument("--max-batch-tokens", type=int, default=4096, help="likelihood: padded tokens per batch")
    ap.add_argument("--worker", choices=["batched", "reference", "plain", "likelihood", "forward"], default=None)
    ap.add_argument("--limit", type=int, default=None, help="(worker) score only the first N sampled examples")
    ap.add_argument("--save", default=None)
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    if "likelihood" in args.parts:
        # alternate the two so that a change in the machine's load falls on both alike
        runs = [run_worker(args, v, args.n_examples) for _ in range(args.repeats) for v in ("likelihood", "forward")]
        write_likelihood_report(args, runs)
    if "attribution" not in args.parts:
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ours = Path(tmp) / "ours.safetensors"
        ref_file = Path(tmp) / "ref.safetensors"
        full = run_worker(args, "batched", args.n_examples)
        subset = run_worker(args, "batched", args.reference_examples, ours)
        ref = run_worker(args, "reference", args.reference_examples, ref_file)
        plain = run_worker(args, "plain", args.n_examples)
        err = max_relative_error(ours, ref_file)
    rate = matmul_rate(args.threads, args.dtype)
    write_report(args, full, subset, ref, plain, err, rate)


def write_report(args, full: dict, subset: dict, ref: dict, plain: dict, err: float, rate: float) -> None:
    per_ex = lambda r: r["seconds"] / r["examples"]
    # Forward+backward of a dense layer costs 6 FLOPs per weight per token (2 forward, 2 input grad, 2 weight grad).
    flops = 6 * full["linear_params"] * full["tokens"]
    gib = lambda b: b / 2**30
    lines = [
        "## Attribution (signed-snip)",
        "",
        f"Command: `.venv/bin/python bench/bench_attribution.py --n-examples {args.n_examples} "
        f"--reference-examples {args.reference_examples} --max-length {args.max_length} "
        f"--batch-size {args.batch_size} --dtype {args.dtype}`",
        f"Model `{args.model}` ({full['params'] / 1e6:.1f}M parameters, {gib(full['weight_bytes']):.2f} GiB of "
        f"weights), data `{args.data.name}`, {args.threads} threads, {args.dtype}; {machine()}; load average at "
        f"the end {open('/proc/loadavg').read().split()[0]}; {code_version()}; run on {time.strftime('%Y-%m-%d')}. "
        f"Each variant ran once, in its own subprocess, one after the other.",
        "",
        "| variant | examples | response tokens | time (s) | s / example | response tokens / s | peak RSS (GiB) | "
        "RSS before scoring (GiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in (("harmprune, one pass per batch", full), ("harmprune, reference's examples", subset),
                    ("per-layer reference", ref), ("plain forward+backward (activation baseline)", plain)):
        lines.append(f"| {name} | {r['examples']} | {r['tokens']} | {r['seconds']:.1f} | {per_ex(r):.2f} | "
                     f"{r['tokens'] / r['seconds']:.0f} | {gib(r['peak_rss_bytes']):.2f} | "
                     f"{gib(r['rss_before_bytes']):.2f} |")
    extra = full["peak_rss_bytes"] - full["rss_before_bytes"]
    grads = 4 * full["scored_params"] if args.dtype == "float32" else 2 * full["scored_params"]
    activations = plain["peak_rss_bytes"] - plain["rss_before_bytes"] - grads
    budget = 2.5 * full["weight_bytes"] + activations
    lines += [
        "",
        f"- Speed-up per example: **{per_ex(ref) / per_ex(full):.1f}×** (full run of {full['examples']}) and "
        f"{per_ex(ref) / per_ex(subset):.1f}× on the reference's own {subset['examples']} examples; target ≥ 10×.",
        f"- `score` against a plain forward+backward of the same batches (no score accumulation; its head runs at "
        f"every position, scoring's at response positions only): "
        f"**{full['seconds'] / plain['seconds']:.2f}×** the time ({full['tokens'] / full['seconds']:.0f} vs "
        f"{plain['tokens'] / plain['seconds']:.0f} response tokens/s).",
        f"- Same result: max relative difference between the two score files on the shared examples "
        f"{err:.1e} (float32 rounding).",
        f"- Memory: scoring added {gib(extra):.2f} GiB over the loaded model (weights {gib(full['weight_bytes']):.2f}"
        f" GiB; the float32 accumulators for the {full['scored_params'] / 1e6:.0f}M scored weights take "
        f"{gib(4 * full['scored_params']):.2f} GiB); peak RSS / weight bytes = {full['peak_rss_bytes'] / full['weight_bytes']:.2f}.",
        f"- Activations of the largest batch ({args.batch_size} × ≤{args.max_length} tokens), measured as the plain "
        f"forward+backward's peak minus its loaded model and gradient buffers: {gib(activations):.2f} GiB (the "
        f"B × T × vocabulary logits, their log-softmax and their gradient are a large part). Target: peak ≤ 2.5 × weights + activations = {gib(budget):.2f} GiB; measured "
        f"{gib(full['peak_rss_bytes']):.2f} GiB: **{'met' if full['peak_rss_bytes'] <= budget else 'NOT met'}** "
        f"({gib(full['peak_rss_bytes'] - plain['peak_rss_bytes']):+.2f} GiB against the plain step).",
        f"- Achieved {flops / full['seconds'] / 1e9:.1f} GFLOP/s (6 × {full['linear_params'] / 1e6:.0f}M linear "
        f"weights × tokens, attention scores not counted) against a measured {rate / 1e9:.1f} GFLOP/s for a "
        f"2048² {args.dtype} matmul on the same threads: {100 * flops / full['seconds'] / rate:.0f}% of peak.",
        "",
    ]
    print("\n".join(lines))
    update_section(args.results, "## Attribution (signed-snip)", "\n".join(lines), keep_history=True)


def write_likelihood_report(args, runs: list[dict]) -> None:
    best = {v: min((r for r in runs if r["variant"] == v), key=lambda r: r["seconds"]) for v in ("likelihood", "forward")}
    ours, plain = best["likelihood"], best["forward"]
    heading = "## Likelihood throughput (eval likelihood vs a plain forward)"
    lines = [
        heading,
        "",
        f"Command: `.venv/bin/python bench/bench_attribution.py --parts likelihood --n-examples {args.n_examples} "
        f"--max-length {args.max_length} --eval-batch-size {args.eval_batch_size} --max-batch-tokens "
        f"{args.max_batch_tokens} --repeats {args.repeats} --dtype {args.dtype} --threads {args.threads}`",
        f"Model `{args.model}`, data `{args.data.name}`, {args.threads} threads, {args.dtype}; {machine()}; load "
        f"average at the end {open('/proc/loadavg').read().split()[0]}; run on {time.strftime('%Y-%m-%d')}. Each "
        f"variant ran {args.repeats} times in its own subprocess, alternating; the best time of each is shown (all: "
        + ", ".join(f"{r['variant']} {r['seconds']:.1f} s" for r in runs) + ").",
        "",
        "| variant | examples | tokens (prompt + response) | time (s) | tokens/s |",
        "|---|---|---|---|---|",
    ]
    for name, r in (("`harmful_likelihood` (eval likelihood)", ours), ("plain forward, same batches", plain)):
        lines.append(f"| {name} | {r['examples']} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens'] / r['seconds']:.0f} |")
    ratio = ours["seconds"] / plain["seconds"]
    lines += ["", f"- eval likelihood / plain forward time: **{ratio:.2f}×** (target ≤ 1.3×; below 1 the likelihood "
                  f"is faster: its head runs at response positions only, the plain forward's at every position).", ""]
    print("\n".join(lines))
    update_section(args.results, heading, "\n".join(lines))


EARLIER = "### Earlier measurements"


def update_section(path: Path, heading: str, body: str, keep_history: bool = False) -> None:
    """Replace (or append) one ``## `` section of RESULTS.md, keeping the others.

    ``keep_history``: the replaced section's own text (its heading made a ``#### `` one dated today) goes first
    under the section's ``### Earlier measurements``, so a new run never erases the figures it is compared with.
    """
    text = path.read_text() if path.exists() else (
        f"# Benchmark results\n\nMachine: {machine()}. Numbers are from the commands shown; other processes "
        f"may have shared the CPU.\n\n")
    if heading not in text:
        path.write_text(text.rstrip("\n") + "\n\n" + body)
        return
    start = text.index(heading)
    nxt = text.find("\n## ", start + len(heading))
    old = text[start:nxt + 1] if nxt != -1 else text[start:]
    rest = "\n" + text[nxt + 1:] if nxt != -1 else ""
    if keep_history:
        current, _, earlier = old.partition(EARLIER)
        entry = current.replace(heading, f"#### Replaced on {time.strftime('%Y-%m-%d')}", 1).strip("\n")
        body = f"{body.rstrip()}\n\n{EARLIER}\n\n{entry}\n\n{earlier.strip(chr(10))}\n".rstrip() + "\n"
    path.write_text(text[:start] + body + rest)


def code_version() -> str:
    """The commit the benchmark ran (short hash), marked when the working tree had changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "commit unknown"
    return f"commit {head}{' with uncommitted changes' if dirty else ''}"


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{os.cpu_count()} CPU cores ({model}), no GPU, Python {platform.python_version()}"


if __name__ == "__main__":
    main()
