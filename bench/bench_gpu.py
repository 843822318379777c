"""Benchmark on one GPU, in one short call: scoring, selection, likelihood and generation at Llama-3.1-8B size.

No downloads: the model is randomly initialised from the Llama-3.1-8B configuration (bfloat16) and the data are
random token ids (a word-level tokenizer whose words are the vocabulary's ids), so throughput and memory are
those of the real model and nothing about its outputs means anything. Stages, in order:

1. likelihood: ``harmful_likelihood`` (what ``eval likelihood`` runs) against a plain forward of the same batches;
2. greedy generation, batch 64 × 256 new tokens (EOS can end a row early; tokens counted as generated);
3. the activations one scoring batch saves for the backward pass, per decoder layer, against the plan's
   per-layer formula (autograd's saved tensors, counted by storage, attributed to the layer that saved them);
4. signed-snip and snip scoring of 412 examples × 512 tokens: time, achieved TFLOP/s against the chip's peak
   (790 dense bf16 for an H200), peak GPU memory against ``harmprune plan``'s estimate for the same workload;
5. both score files written, read back, and selected on the GPU (matrix and global, and a sweep of 4 q);
6. generation again with the selected mask applied.

FLOPs counted: 6 per weight per token for the decoder's linear layers (forward, input and weight gradients),
6 per head weight per response token (the head runs at response positions only), and causal attention
6 · L · T² · q_dim per sequence; forward-only stages count a third of that.

    python bench/bench_gpu.py                  # on the GPU machine (one call, ≤ 8 minutes on one H200)
    python bench/bench_gpu.py --tiny           # the same code on the CPU with a tiny Llama config (seconds)
    python bench/bench_gpu.py --activations-only --widths llama-3.1-8b --layers 1 --dtype bfloat16 \
        --batch-size 2 --max-length 256           # stage 3 alone (the plan's per-layer check), CPU unless a GPU

Every stage prints one ``ROW {json}`` line as it finishes and a Markdown table at the end (``--json`` also
writes the rows to a file), so a run cut short still reports the stages it finished.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from harmprune.plan import _LLAMA_8B, DTYPE_BYTES, Workload, shape_from_config, single_gpu

SMOLLM2_135M = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True}
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": False}
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
PEAK_TFLOPS = {"H200": 790.0, "H100": 790.0}  # dense bf16 without sparsity (vendor figure, ~989 with SXM boost)
ROWS = ("activations saved for backward", "likelihood (harmprune)", "likelihood (plain forward)", "generation", "scoring signed-snip",
        "write signed-snip scores", "scoring snip", "write snip scores", "read score files", "select matrix", "select global",
        "select sweep (4 q, matrix)", "generation with mask")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU, tiny Llama config, small workload (a smoke test)")
    ap.add_argument("--examples", type=int, default=None, help="scored examples (default 412; tiny: 8)")
    ap.add_argument("--max-length", type=int, default=None, help="tokens per example (default 512; tiny: 48)")
    ap.add_argument("--batch-size", type=int, default=4, help="scoring batch size (the plan's default)")
    ap.add_argument("--gen-batch", type=int, default=None, help="generation batch (default 64; tiny: 4)")
    ap.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 256; tiny: 8)")
    ap.add_argument("--q", type=float, default=1e-5)
    ap.add_argument("--p", type=float, default=5e-5)
    ap.add_argument("--score-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--activations-only", action="store_true", help="only the saved-activation check")
    ap.add_argument("--widths", default="llama-3.1-8b", choices=["llama-3.1-8b", "smollm2-135m", "tiny"],
                    help="--activations-only: whose layer widths")
    ap.add_argument("--layers", type=int, default=None, help="--activations-only: decoder layers to build")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="--activations-only: dtype")
    args = ap.parse_args(argv)
    small = args.tiny
    args.examples = args.examples or (8 if small else 412)
    args.max_length = args.max_length or (48 if small else 512)
    args.gen_batch = args.gen_batch or (4 if small else 64)
    args.new_tokens = args.new_tokens or (8 if small else 256)
    if small:
        args.q, args.p = max(args.q, 0.01), max(args.p, 0.005)
    return args


class Bench:
    """Rows of results, each printed when its stage ends."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rows: list[dict] = []

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def start(self) -> float:
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return time.perf_counter()

    def peak(self) -> int:
        """Peak bytes since ``start``: allocated GPU memory, or on the CPU the process's peak RSS (lifetime)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def elapsed(self, began: float) -> float:
        self.sync()
        return time.perf_counter() - began

    def row(self, stage: str, began: float | None = None, seconds: float | None = None, **values) -> dict:
        """Record and print one finished stage (its time: since ``began``, or ``seconds``)."""
        seconds = self.elapsed(began) if seconds is None else seconds
        row = {"stage": stage, "seconds": round(seconds, 3), **values}
        self.rows.append(row)
        print("ROW " + json.dumps(row), flush=True)
        return row


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer whose words ``w<i>`` are token ids: random ids become text and back, exactly."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def random_records(n: int, length: int, vocab_size: int, seed: int = 0):
    """``n`` prompt→response pairs of random words: a quarter of ``length`` prompt, the rest response."""
    from harmprune.data import Record

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIALS), vocab_size, (n, length), generator=g).tolist()
    cut = length // 4
    text = lambda row: " ".join(f"w{i}" for i in row)  # noqa: E731
    return [Record(prompt=text(r[:cut]), response=text(r[cut:])) for r in ids]


def build_model(config: dict, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"})
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialised in its dtype, on its device: no float32 copy of 8B weights
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def flops(shape, tokens: int, response_tokens: int, sequences: int, length: int, backward: bool) -> float:
    """Model FLOPs of a pass (see the module docstring); forward-only is a third of forward+backward."""
    dense = 6 * shape.scored() * tokens + 6 * shape.vocab * shape.hidden * response_tokens
    attention = 6 * shape.layers * sequences * length**2 * shape.q_dim / 2
    return (dense + attention) / (1 if backward else 3)


def chip_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def activation_stage(bench: Bench, model, tok, records, shape, args, dtype: str) -> None:
    """Bytes autograd saves in one scoring batch (batch_size × max_length), per decoder layer, vs the plan."""
    from harmprune.formatting import collate_for_loss, encode_pair, pad_id_of, response_nll

    examples = [encode_pair(tok, r.prompt, r.response, "raw", args.max_length) for r in records[: args.batch_size]]
    batch = {k: v.to(bench.device) for k, v in collate_for_loss(examples, pad_id_of(tok)).items()}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, str]] = {}
    where = ["outside"]

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = (t.untyped_storage().nbytes(), where[0])
        return t

    def enter(i):
        return lambda *_: where.__setitem__(0, f"layer {i}")

    layers = model.model.layers
    hooks = [m.register_forward_pre_hook(enter(i)) for i, m in enumerate(layers)]
    hooks += [m.register_forward_hook(lambda *_: where.__setitem__(0, "outside")) for m in layers]
    began = bench.start()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = response_nll(model, batch).sum()
    finally:
        for h in hooks:
            h.remove()
    del loss
    per_layer = sum(b for b, w in seen.values() if w != "outside") / len(layers)
    t, a, h = int(batch["attention_mask"].numel()), DTYPE_BYTES[dtype], shape.hidden
    plan_layer = t * (a * (4 * h + 4 * shape.q_dim + 3 * shape.kv_dim + 4 * shape.intermediate) + 4 * h)
    bench.row("activations saved for backward", began, tokens=t, per_layer_bytes=int(per_layer),
              plan_per_layer_bytes=plan_layer, per_layer_vs_plan=round(per_layer / plan_layer, 3),
              outside_layers_bytes=sum(b for b, w in seen.values() if w == "outside"))


def likelihood_stage(bench: Bench, model, tok, records, max_length: int) -> None:
    from harmprune.evals.likelihood import harmful_likelihood
    from harmprune.evals.scoring import DEFAULT_BATCH_TOKENS, token_batches
    from harmprune.formatting import collate_for_loss, encode_pair, pad_id_of

    harmful_likelihood(model, tok, records[:2], "raw", max_length)  # warm-up, for both variants alike
    began = bench.start()
    out = harmful_likelihood(model, tok, records, "raw", max_length)
    ours, ours_peak = bench.elapsed(began), bench.peak()
    examples = [encode_pair(tok, r.prompt, r.response, "raw", max_length) for r in records]
    batches = token_batches([len(e.input_ids) for e in examples], 64, DEFAULT_BATCH_TOKENS)
    began = bench.start()
    with torch.no_grad():
        for b in batches:
            enc = collate_for_loss([examples[i] for i in b], pad_id_of(tok))
            model(input_ids=enc["input_ids"].to(bench.device), attention_mask=enc["attention_mask"].to(bench.device),
                  use_cache=False).logits.float().sum()
    plain = bench.elapsed(began)
    tokens = sum(len(e.input_ids) for e in examples)
    bench.row("likelihood (harmprune)", seconds=ours, examples=len(records), tokens=tokens,
              response_tokens=out["tokens"], tokens_per_s=round(tokens / ours, 1),
              vs_plain_forward=round(ours / plain, 3), peak_bytes=ours_peak)
    bench.row("likelihood (plain forward)", seconds=plain, examples=len(records), tokens=tokens, batches=len(batches),
              tokens_per_s=round(tokens / plain, 1), peak_bytes=bench.peak())


def generation_stage(bench: Bench, model, tok, prompts, args, mask=None, stage: str = "generation") -> None:
    from harmprune.generation import generate
    from harmprune.pruning import pruned

    began = bench.start()
    with pruned(model, mask):
        gens = generate(model, tok, prompts, fmt="raw", max_new_tokens=args.new_tokens, batch_size=args.gen_batch,
                        progress=False)
    seconds, new = bench.elapsed(began), sum(g.n_new_tokens for g in gens)
    bench.row(stage, seconds=seconds, batch=len(prompts), new_tokens=new, max_new_tokens=args.new_tokens,
              tokens_per_s=round(new / seconds, 1), peak_bytes=bench.peak())


def scoring_stage(bench: Bench, model, tok, records, method: str, shape, args, path: Path) -> None:
    from harmprune.attribution import compute_scores
    from harmprune.tensorfile import save_tensors

    dtype = "bfloat16" if bench.device.type == "cuda" else "float32"
    began = bench.start()
    scores = compute_scores(model, tok, records, method, fmt="raw", max_length=args.max_length,
                            batch_size=args.batch_size, progress=False)
    seconds, peak = bench.elapsed(began), bench.peak()
    row = {"examples": len(records), "response_tokens": scores.metadata["tokens"], "peak_bytes": peak}
    tokens = sum(min(args.max_length, len(tok(r.prompt)["input_ids"]) + len(tok(r.response)["input_ids"]))
                 for r in records)
    work = Workload(method=method, dtype=dtype, batch_size=args.batch_size, max_length=args.max_length)
    plan = sum(single_gpu(shape, work).values())
    row.update({"tokens": tokens, "plan_bytes": plan, "peak_vs_plan": round(peak / plan, 3),
                "tflops": round(flops(shape, tokens, row["response_tokens"], len(records), args.max_length, True)
                                / seconds / 1e12, 2)})
    if chip_peak(bench.device):
        row["of_chip_peak"] = round(row["tflops"] / chip_peak(bench.device), 3)
    bench.row(f"scoring {method}", seconds=seconds, **row)
    began = bench.start()
    save_tensors({n: t.to(getattr(torch, args.score_dtype)).cpu() for n, t in scores.tensors.items()}, path,
                 scores.metadata)
    bench.row(f"write {method} scores", began, file=path.name, bytes=path.stat().st_size)
    del scores
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()


def selection_stage(bench: Bench, harm_path: Path, util_path: Path, args):
    from harmprune.selection import select, select_grid
    from harmprune.tensorfile import TensorFile

    harm, util = TensorFile(harm_path), TensorFile(util_path)
    began = bench.start()
    for f in (harm, util):
        for n in f.names():
            f.get(n).to(bench.device).float().sum()
    read = bench.row("read score files", began, bytes=harm_path.stat().st_size + util_path.stat().st_size)["seconds"]
    mask = None
    for granularity in ("matrix", "global"):
        began = bench.start()
        m = select(harm, util, args.q, args.p, granularity, device=bench.device)
        seconds = bench.elapsed(began)
        bench.row(f"select {granularity}", seconds=seconds, q=args.q, p=args.p, selected=m.count(),
                  vs_read=round(seconds / read, 2), peak_bytes=bench.peak())
        mask = mask or m
    qs = [args.q * f for f in (1, 3, 10, 30)]
    began = bench.start()
    grid = select_grid(harm, util, qs, [args.p], "matrix", device=bench.device)
    seconds = bench.elapsed(began)
    bench.row("select sweep (4 q, matrix)", seconds=seconds, qs=qs, selected=[grid[(q, args.p)].count() for q in qs],
              vs_read=round(seconds / read, 2))
    return mask


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    config = TINY if args.tiny else _LLAMA_8B
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    bench = Bench(device)
    shape = shape_from_config(config, "tiny" if args.tiny else "llama-3.1-8b", "bench_gpu")
    began = time.perf_counter()
    model = build_model(config, dtype, device)
    tok = word_tokenizer(config["vocab_size"])
    records = random_records(args.examples, args.max_length, config["vocab_size"])
    print(f"model built in {time.perf_counter() - began:.1f} s: {shape.params() / 1e9:.3f} B parameters, "
          f"{dtype}, {device} {torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}", flush=True)
    activation_stage(bench, model, tok, records, shape, args, "float32" if dtype == torch.float32 else "bfloat16")
    likelihood_stage(bench, model, tok, records, args.max_length)
    prompts = [r.prompt for r in records[: args.gen_batch]]
    prompts += [records[i % len(records)].prompt for i in range(len(prompts), args.gen_batch)]
    generation_stage(bench, model, tok, prompts, args)
    with tempfile.TemporaryDirectory() as tmp:
        harm, util = Path(tmp) / "harm.safetensors", Path(tmp) / "utility.safetensors"
        scoring_stage(bench, model, tok, records, "signed-snip", shape, args, harm)
        scoring_stage(bench, model, tok, records, "snip", shape, args, util)
        mask = selection_stage(bench, harm, util, args)
    generation_stage(bench, model, tok, prompts, args, mask, "generation with mask")
    return bench.rows


def table(rows: list[dict], args: argparse.Namespace) -> str:
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    lines = ["| stage | seconds | throughput | memory (GiB) | other |", "|---|---|---|---|---|"]
    for r in rows:
        rate = f"{r['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in r else (
            f"{r['tflops']} TFLOP/s" + (f" ({100 * r['of_chip_peak']:.0f}% of peak)" if "of_chip_peak" in r else "")
            if "tflops" in r else "")
        mem = f"peak {gib(r['peak_bytes'])}" if "peak_bytes" in r else ""
        if "plan_bytes" in r:
            mem += f" vs plan {gib(r['plan_bytes'])} ({r['peak_vs_plan']:.2f}×)"
        if "per_layer_bytes" in r:
            mem = (f"per layer {gib(r['per_layer_bytes'])} vs plan {gib(r['plan_per_layer_bytes'])} "
                   f"({r['per_layer_vs_plan']:.2f}×)")
        other = {k: v for k, v in r.items() if k in ("examples", "response_tokens", "selected", "vs_read",
                                                      "vs_plain_forward", "new_tokens", "batch", "bytes", "tokens")}
        lines.append(f"| {r['stage']} | {r['seconds']:.2f} | {rate} | {mem} | "
                     + ", ".join(f"{k} {v}" for k, v in other.items()) + " |")
    return "\n".join(lines)


def activations_only(args: argparse.Namespace) -> None:
    config = {"llama-3.1-8b": _LLAMA_8B, "smollm2-135m": SMOLLM2_135M, "tiny": TINY}[args.widths]
    config = {**config, "num_hidden_layers": args.layers or config["num_hidden_layers"]}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    model = build_model(config, getattr(torch, dtype), device)
    tok = word_tokenizer(config["vocab_size"])
    records = random_records(args.batch_size, args.max_length, config["vocab_size"])
    shape = shape_from_config(config, args.widths, "bench_gpu")
    activation_stage(Bench(device), model, tok, records, shape, args, dtype)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.activations_only:
        activations_only(args)
        return
    if not args.tiny:
        torch.backends.cuda.matmul.allow_tf32 = True
    start = time.perf_counter()
    rows = run(args)
    print(f"\ntotal {time.perf_counter() - start:.1f} s; torch {torch.__version__}; "
          f"{'tiny CPU config' if args.tiny else 'Llama-3.1-8B config'}; {time.strftime('%Y-%m-%d %H:%M')}\n")
    print(table(rows, args), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    missing = [s for s in ROWS if s not in {r["stage"] for r in rows}]
    if missing:
        sys.exit(f"missing rows: {missing}")


if __name__ == "__main__":
    main()
