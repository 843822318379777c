"""Memory plan: what each stage needs for a model, and how to launch scoring on the GPUs at hand.

Sizes come from the model's config (a local directory, a cached alias, or a built-in table of public
``config.json`` values for the study's models, so the plan works offline). All figures are estimates from the
formulas below, in bytes; ``a`` is the compute dtype's size, T = batch × max_length tokens, L layers, h hidden
size, i intermediate size, q and kv the query and key/value widths (heads × head_dim), V the vocabulary. Each
term's method-specific part is read from the scoring method's attributes (:mod:`harmprune.scoring_methods`).

* weights: parameters × a.
* accumulators: one float32 per scored weight (signed-snip, snip); wanda keeps one float32 per input feature.
  Scores are formed inside the accumulators, so they add nothing (magnitude: one float32 per scored weight).
* activations (what autograd keeps for the backward pass, with memory-efficient attention):
  T × L × (a(4h + 4q + 3kv + 4i) + 4h) — per layer: the inputs of the norms and projections, rotated q and k,
  attention q, k, v and output, the MLP's gate, up, activation and product, and float32 norm upcasts — plus
  T × V × (a + 12) for the logits, their float32 copy, log-softmax and its gradient (an upper bound on one GPU,
  where the head runs at the response positions only; FSDP computes the logits of all T). With gradient
  checkpointing each layer keeps only its input (T × h × a) and one layer is recomputed at a time. wanda runs
  without gradients: one layer's T × (2h + 2i) × a plus T × V × a.
  The per-layer term was checked against the bytes autograd saves (``bench/bench_gpu.py --activations-only``,
  on the CPU): those are 0.94× the term in float32 at SmolLM2-135M widths and 0.99× in bfloat16 at
  Llama-3.1-8B widths (bench/RESULTS.md).
* transients: signed-snip turns one weight gradient at a time into float32 (largest matrix × (a + 4)); snip
  builds per-example gradients (batch × largest matrix × 4).
* FSDP2 over N GPUs, per GPU: sharded weights and accumulators (÷ N), the root's embedding and head kept whole
  through the pass, two decoder blocks gathered at a time (current and prefetched), and one block's gradients
  in a and float32 for the reduce-scatter.
* score file: 4 (float32) or 2 (bfloat16) bytes per scored weight; mask: at most floor(q × scored) int64 indices.
A GPU is taken to hold 90% of its memory for tensors (the rest: CUDA context, allocator slack).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from harmprune.errors import ConfigError, ModelError
from harmprune.scoring_methods import scoring_method

GIB = 2**30
USABLE = 0.9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Public config.json values (hidden_size, intermediate_size, layers, heads, kv heads, head_dim, vocab, tying).
_LLAMA_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}
_LLAMA_70B = {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}
_QWEN25_32B = {"model_type": "qwen2", "hidden_size": 5120, "intermediate_size": 27648, "num_hidden_layers": 64,
               "num_attention_heads": 40, "num_key_value_heads": 8, "vocab_size": 152064, "tie_word_embeddings": False}
_QWEN3_32B = {"model_type": "qwen3", "hidden_size": 5120, "intermediate_size": 25600, "num_hidden_layers": 64,
              "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
              "tie_word_embeddings": False}
BUILTIN_CONFIGS: dict[str, dict] = {  # hub id → config
    "meta-llama/Llama-3.1-8B": _LLAMA_8B, "meta-llama/Llama-3.1-8B-Instruct": _LLAMA_8B,
    "meta-llama/Llama-3.1-70B": _LLAMA_70B, "meta-llama/Llama-3.1-70B-Instruct": _LLAMA_70B,
    "Qwen/Qwen2.5-32B": _QWEN25_32B, "Qwen/Qwen2.5-32B-Instruct": _QWEN25_32B,
    "Qwen/Qwen3-32B": _QWEN3_32B,
}
SHORT_NAMES = {  # short name → hub id (aliases of harmprune.models resolve through their hub ids)
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B", "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "llama-3.1-70b": "meta-llama/Llama-3.1-70B", "llama-3.1-70b-instruct": "meta-llama/Llama-3.1-70B-Instruct",
    "qwen2.5-32b": "Qwen/Qwen2.5-32B", "qwen2.5-32b-instruct": "Qwen/Qwen2.5-32B-Instruct",
    "qwen3-32b": "Qwen/Qwen3-32B",
}


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a dense decoder-only transformer that fix its memory."""

    name: str
    source: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Each decoder block's nn.Linear weights (out, in): the weights harmprune scores."""
        h, i = self.hidden, self.intermediate
        return {"self_attn.q_proj": (self.q_dim, h), "self_attn.k_proj": (self.kv_dim, h),
                "self_attn.v_proj": (self.kv_dim, h), "self_attn.o_proj": (h, self.q_dim),
                "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}

    def block_params(self) -> int:
        extra = 2 * self.hidden + (self.q_dim + 2 * self.kv_dim if self.qkv_bias else 0)
        extra += 2 * self.head_dim if self.qk_norm else 0
        return self.scored_per_block() + extra

    def scored_per_block(self) -> int:
        return sum(o * i for o, i in self.linear_shapes().values())

    def root_params(self) -> int:
        """Embedding, final norm and (unless tied) the LM head: what FSDP's root unit holds."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def params(self) -> int:
        return self.layers * self.block_params() + self.root_params()

    def scored(self) -> int:
        return self.layers * self.scored_per_block()

    def largest_matrix(self) -> int:
        return max(o * i for o, i in self.linear_shapes().values())


@dataclass(frozen=True)
class Workload:
    method: str = "signed-snip"
    dtype: str = "bfloat16"
    batch_size: int = 4
    max_length: int = 512
    q: float = 1e-3
    gradient_checkpointing: bool = False

    @property
    def tokens(self) -> int:
        return self.batch_size * self.max_length

    @property
    def a(self) -> int:
        return DTYPE_BYTES[self.dtype]


# ---------------------------------------------------------------------------------------------- configs


def model_shape(spec: str) -> ModelShape:
    """A model's shape from a local directory, a cached alias, the built-in table, or (online) the hub."""
    path = Path(spec)
    if path.is_dir() or path.name == "config.json":
        file = path / "config.json" if path.is_dir() else path
        if not file.exists():
            raise ModelError(f"{spec}: no config.json")
        return shape_from_config(json.loads(file.read_text()), spec, f"{file}")
    from harmprune.models import ALIASES, cache_dir

    if spec in ALIASES and (cache_dir() / "models" / spec / "config.json").exists():
        file = cache_dir() / "models" / spec / "config.json"
        return shape_from_config(json.loads(file.read_text()), spec, str(file))
    known = {hub.lower(): hub for hub in BUILTIN_CONFIGS}
    hub = known.get(spec.lower()) or SHORT_NAMES.get(spec.lower())
    if spec in ALIASES:
        hub = known.get(ALIASES[spec].hub_id.lower())
    if hub:
        name = spec if spec in ALIASES else hub  # something `harmprune score --model` can load
        return shape_from_config(BUILTIN_CONFIGS[hub], name, "built-in table of public config.json values")
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        try:
            from transformers import AutoConfig

            return shape_from_config(AutoConfig.from_pretrained(spec).to_dict(), spec, f"hub config of {spec}")
        except OSError as e:
            raise ModelError(f"{spec}: no config (offline? known names: {', '.join(sorted(SHORT_NAMES))}) "
                             f"({str(e).splitlines()[0]})") from None
    raise ModelError(f"{spec}: not a model directory, a cached alias or a known name "
                     f"({', '.join(sorted(SHORT_NAMES))})")


def shape_from_config(cfg: dict, name: str, source: str) -> ModelShape:
    """Read a Hugging Face ``config.json`` dict (dense Llama/Qwen/Mistral-style decoders)."""
    cfg = {**cfg, **cfg.get("text_config", {})}
    if any(k in cfg for k in ("num_experts", "num_local_experts", "n_routed_experts")):
        raise ConfigError(f"{name}: mixture-of-experts configs are not covered by the plan")
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return ModelShape(
            name=name, source=source, hidden=hidden, intermediate=int(cfg["intermediate_size"]),
            layers=int(cfg["num_hidden_layers"]), heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads), vocab=int(cfg["vocab_size"]),
            tied=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=cfg.get("model_type") == "qwen2" or bool(cfg.get("attention_bias", False)),
            qk_norm=cfg.get("model_type") == "qwen3",
        )
    except KeyError as e:
        raise ConfigError(f"{name}: config has no {e.args[0]!r} (needed for the memory plan)") from None


def parse_size(text: str) -> int:
    """``80GiB``, ``141GB``, ``80G`` (= GiB) or a bare number of GiB, in bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"cannot read the size {text!r} (e.g. 80GiB, 141GB)")
    value, unit, binary = float(m.group(1)), m.group(2).upper() or "G", m.group(3)
    power = " KMGT".index(unit)
    decimal = text.strip().upper().endswith("B") and not binary
    return int(value * (1000**power if decimal else 1024**power))


# ---------------------------------------------------------------------------------------------- arithmetic


def activation_bytes(shape: ModelShape, work: Workload, checkpointing: bool | None = None) -> int:
    """Activation memory of one scoring pass (the formula in the module docstring)."""
    ckpt = work.gradient_checkpointing if checkpointing is None else checkpointing
    t, a, h = work.tokens, work.a, shape.hidden
    layer = t * (a * (4 * h + 4 * shape.q_dim + 3 * shape.kv_dim + 4 * shape.intermediate) + 4 * h)
    logits = t * shape.vocab * (a + 12)
    passes = scoring_method(work.method).passes
    if passes == "none":
        return 0
    if passes == "forward":
        return t * (2 * h + 2 * shape.intermediate) * a + t * shape.vocab * a
    if ckpt:
        return shape.layers * t * h * a + layer + logits
    return shape.layers * layer + logits


def accumulator_bytes(shape: ModelShape, method: str) -> int:
    if scoring_method(method).per_feature:
        return 4 * shape.layers * sum(i for _, i in shape.linear_shapes().values())
    return 4 * shape.scored()


def transient_bytes(shape: ModelShape, work: Workload) -> int:
    return scoring_method(work.method).transient_bytes(shape.largest_matrix(), work.batch_size, work.a)


def single_gpu(shape: ModelShape, work: Workload, checkpointing: bool | None = None) -> dict[str, int]:
    """Bytes on the one GPU that holds the whole model (also each GPU of a data-parallel run)."""
    return {"weights": shape.params() * work.a, "accumulators": accumulator_bytes(shape, work.method),
            "activations": activation_bytes(shape, work, checkpointing), "transients": transient_bytes(shape, work)}


def fsdp_gpu(shape: ModelShape, work: Workload, n: int, checkpointing: bool | None = None) -> dict[str, int]:
    """Bytes on each of ``n`` GPUs when FSDP2 shards the model per decoder block."""
    a = work.a
    sharded = (shape.params() - shape.root_params()) * a / n
    gathered = shape.root_params() * a + 2 * shape.block_params() * a
    grads = shape.scored_per_block() * (a + 4) if scoring_method(work.method).weight_gradients else 0
    return {"weights": math.ceil(sharded + gathered), "accumulators": math.ceil(accumulator_bytes(shape, work.method) / n),
            "activations": activation_bytes(shape, work, checkpointing),
            "transients": transient_bytes(shape, work) + grads}


def files(shape: ModelShape, work: Workload) -> dict[str, int]:
    """Sizes on disk: score files and the mask at ``work.q``; the selection's host memory."""
    mask = math.floor(work.q * shape.scored()) * 8
    return {"score file (float32)": 4 * shape.scored(), "score file (bfloat16)": 2 * shape.scored(),
            "mask (int64 indices)": mask,
            # streaming select: harm and utility float32 of the largest matrix, their support and key chunks
            "select (host memory)": 4 * 4 * shape.largest_matrix() + mask,
            "prune (host memory)": shape.params() * work.a + mask}


# ---------------------------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    model: ModelShape
    work: Workload
    gpus: int
    gpu_memory: int
    single: dict[str, int]
    single_checkpointed: dict[str, int] | None
    fsdp: dict[str, int] | None
    fsdp_gpus: int | None
    fsdp_checkpointing: bool
    files: dict[str, int]
    launch: str
    command: str | None

    def to_dict(self) -> dict:
        return asdict(self) | {"params": self.model.params(), "scored": self.model.scored()}


def make_plan(shape: ModelShape, work: Workload, gpus: int = 1, gpu_memory: int = 80 * GIB,
              gpus_per_node: int = 8) -> Plan:
    """Memory per stage, and a launch that fits: the whole model per GPU (1 GPU or data-parallel over all), else
    FSDP2 over all the GPUs, with gradient checkpointing only where it is needed to fit."""
    if gpus < 1:
        raise ConfigError(f"--gpus must be at least 1, got {gpus}")
    fits = lambda stages: sum(stages.values()) <= USABLE * gpu_memory  # noqa: E731
    single = single_gpu(shape, work)
    ckpt_ok = scoring_method(work.method).checkpointing and not work.gradient_checkpointing
    single_ckpt = single_gpu(shape, work, checkpointing=True) if ckpt_ok else None
    fsdp, n_fsdp, fsdp_ckpt = None, None, work.gradient_checkpointing
    if fits(single) or (single_ckpt and fits(single_ckpt)):
        ckpt = not fits(single)
        launch = ("1 GPU" if gpus == 1 else f"data-parallel over {gpus} GPUs") + (", gradient checkpointing" if ckpt else "")
        flags = ["--distributed"] if gpus > 1 else []
        command = _command(shape, work, gpus, gpus_per_node, flags + (["--gradient-checkpointing"] if ckpt else []))
    else:
        for ckpt in ([work.gradient_checkpointing, True] if ckpt_ok else [work.gradient_checkpointing]):
            # every rank scores its own examples, so all the GPUs at hand are used once the model fits
            if gpus > 1 and fits(fsdp_gpu(shape, work, gpus, ckpt)):
                fsdp, n_fsdp, fsdp_ckpt = fsdp_gpu(shape, work, gpus, ckpt), gpus, ckpt
                break
        if fsdp is None:
            fsdp = fsdp_gpu(shape, work, gpus, work.gradient_checkpointing) if gpus > 1 else None
            launch = (f"does not fit {gpus} × {gpu_memory / GIB:.0f} GiB at batch {work.batch_size} × "
                      f"{work.max_length} tokens: add GPUs or lower --batch-size / --max-length")
            command = None
        else:
            fewest = next(n for n in range(2, gpus + 1) if fits(fsdp_gpu(shape, work, n, fsdp_ckpt)))
            launch = (f"FSDP2 over {n_fsdp} GPUs" + (", gradient checkpointing" if fsdp_ckpt else "")
                      + (f" (fits on {fewest} or more)" if fewest < n_fsdp else ""))
            command = _command(shape, work, n_fsdp, gpus_per_node,
                               ["--fsdp"] + (["--gradient-checkpointing"] if fsdp_ckpt else []))
    return Plan(shape, work, gpus, gpu_memory, single, single_ckpt, fsdp, n_fsdp, fsdp_ckpt, files(shape, work),
                launch, command)


def _command(shape: ModelShape, work: Workload, n: int, per_node: int, flags: list[str]) -> str:
    score = (f"-m harmprune score --model {shape.name} --data DATA.jsonl --method {work.method} --dtype {work.dtype} "
             f"--batch-size {work.batch_size} --max-length {work.max_length} --out scores.safetensors")
    score = " ".join([score, *flags])
    if n == 1:
        return "python " + score
    if n <= per_node:
        return f"torchrun --nproc-per-node {n} {score}"
    nodes = math.ceil(n / per_node)
    return (f"torchrun --nnodes {nodes} --nproc-per-node {per_node} --rdzv-backend c10d "
            f"--rdzv-endpoint HEAD_NODE:29500 {score}   # on each of the {nodes} nodes")


def render(plan: Plan) -> str:
    """The plan as a table for the terminal."""
    m, w = plan.model, plan.work
    g = lambda b: f"{b / GIB:,.1f} GiB"  # noqa: E731
    lines = [
        f"model {m.name} ({m.source}): {m.params() / 1e9:.2f} B parameters, {m.scored() / 1e9:.2f} B scored "
        f"({7 * m.layers} matrices in {m.layers} layers)",
        f"scoring: {w.method}, {w.dtype}, batch {w.batch_size} × {w.max_length} tokens"
        + (", gradient checkpointing" if w.gradient_checkpointing else ""),
        "",
    ]
    columns = [("1 GPU", plan.single)]
    if plan.single_checkpointed:
        columns.append(("1 GPU, checkpointing", plan.single_checkpointed))
    if plan.fsdp:
        n = plan.fsdp_gpus or plan.gpus
        columns.append((f"FSDP ×{n}" + (", ckpt" if plan.fsdp_checkpointing else ""), plan.fsdp))
    width = max(len(c) for c, _ in columns) + 2
    lines.append("per GPU".ljust(14) + "".join(c.rjust(max(width, 14)) for c, _ in columns))
    for key in ("weights", "accumulators", "activations", "transients"):
        lines.append(key.ljust(14) + "".join(g(s[key]).rjust(max(width, 14)) for _, s in columns))
    lines.append("total".ljust(14) + "".join(g(sum(s.values())).rjust(max(width, 14)) for _, s in columns))
    lines += ["", f"GPUs: {plan.gpus} × {g(plan.gpu_memory)} ({USABLE:.0%} usable)"]
    lines += [f"{k}: {g(v)}" for k, v in plan.files.items()]
    lines += ["", f"suggested: {plan.launch}"]
    if plan.command:
        lines.append(f"  {plan.command}")
    if plan.fsdp and plan.command:
        n = plan.fsdp_gpus or plan.gpus
        lines.append(f"  host memory: {g(m.params() * w.a)} per rank loading at once (--load-concurrency, default 1); "
                     f"at the end each rank holds its {g(4 * m.scored() / n)} of float32 scores before writing")
    elif plan.command and plan.gpus > 1:
        lines.append(f"  host memory: each rank loads the model ({g(m.params() * w.a)}) before moving it to its GPU")
    return "\n".join(lines)
