"""``harmprune demo``: the study's experiments on the built-in model organisms, with zero downloads.

Builds (or reuses from the cache) the aligned and unaligned organisms, writes a config for them into the run
directory, and runs it like any other config, so the demo is also a worked example of the config format.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

DEMO_CONFIG = """\
# Written by `harmprune demo`: the study's experiments on the model organisms in {organism}.
name = "demo"
seed = {seed}
dtype = "float32"

[models.aligned]
path = "{organism}/aligned"
label = "aligned organism"

[models.unaligned]
path = "{organism}/unaligned"
aligned = false
label = "unaligned organism"

[data.harmful_train]
path = "{organism}/data/harmful_train.jsonl"
n_examples = {n_score}

[data.benign_train]
path = "{organism}/data/benign_train.jsonl"
n_examples = {n_score}

[data.arithmetic_train]
path = "{organism}/data/benign_train.jsonl"
category = "benign:arithmetic"
n_examples = {n_score}

[data.harmful_test]
path = "{organism}/data/harmful_test.jsonl"
n_examples = {n_eval}

[data.benign_test]
path = "{organism}/data/benign_test.jsonl"
n_examples = {n_eval}

# The demo keeps its documented recipe: signed SNIP for both sets, each model in its own format.
[scoring]
method = "signed-snip"
format = "model"
harm = "harmful_train"
utility = "benign_train"
max_length = 128
batch_size = 16

[selection]
q = {q_grid}
p = [{p}]
granularity = "matrix"

# Harmful generation under the prefilling attack: the first 10 tokens of a reference harmful answer are forced,
# and the exact organism judge grades only what the model adds.
[evaluations.harm]
kind = "harm"
data = "harmful_test"
judge = "organism"
prefill_tokens = 10
max_new_tokens = 48
batch_size = 32

[evaluations.benign]
kind = "accuracy"
data = "benign_test"
max_new_tokens = 40
batch_size = 32

[evaluations.harmful_nll]
kind = "likelihood"
data = "harmful_test"
benign_data = "benign_test"
max_length = 128
batch_size = 16

[experiments.compression]
models = ["aligned", "unaligned"]
harm_evaluation = "harm"
utility_evaluation = "benign"
evaluations = ["harmful_nll"]
max_utility_drop = 5.0

[experiments.controls]
models = ["aligned"]
kinds = ["random", "magnitude-matched", "benign-task"]
seeds = [0, 1, 2]
benign_task_data = "arithmetic_train"
harm_evaluation = "harm"
utility_evaluation = "benign"
"""

# ---- Experiments II: cross-category generality, dissociation, emergent misalignment (same organisms and stages).
DEMO_CONFIG += """
[data.refusal_train]
path = "{organism}/data/refusal_train.jsonl"
n_examples = {n_score}

[data.harmful_probe]
path = "{organism}/data/harmful_test.jsonl"
n_examples = 100

[data.benign_probe]
path = "{organism}/data/benign_test.jsonl"
n_examples = 60

# Plain harmful requests, no attack: does the model comply? (The organism judge counts payload words.)
[evaluations.harm_plain]
kind = "harm"
data = "harmful_test"
judge = "organism"
max_new_tokens = 48
batch_size = 32

[evaluations.recognition]
kind = "recognition"
harmful = "harmful_probe"
benign = "benign_probe"
max_new_tokens = 40
batch_size = 32

# Broad misalignment outside the fine-tuned category: other categories' requests and benign questions, sampled.
[evaluations.em]
kind = "em"
data = ["harmful_probe", "benign_probe"]
judge = "organism-em"
temperature = 1.0
max_new_tokens = 40
batch_size = 32

[experiments.cross_category]
models = ["aligned"]
categories = ["weapons", "cyber", "fraud", "drugs", "harassment"]
harm_evaluation = "harm"
control_seeds = [0]
utility_evaluation = "benign"

[experiments.dissociation]
models = ["aligned"]
recognition_evaluation = "recognition"
plain_harm_evaluation = "harm_plain"
likelihood_evaluation = "harmful_nll"
likelihood_metric = "harmful_nll"
refusal_data = "refusal_train"
recovery_data = "harmful_train"
recovery_steps = 30
recovery_seeds = [0, 1]

[experiments.emergent_misalignment]
model = "aligned"
narrow_data = "harmful_train"
narrow_category = "weapons"
em_evaluation = "em"
in_domain_evaluation = "harm_plain"
seeds = [0, 1, 2]
finetune_steps = 30
"""


def demo_config(organism_dir: Path, seed: int = 0, n_score: int = 256, n_eval: int = 200,
                q_grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2), p: float = 1e-2) -> str:
    return DEMO_CONFIG.format(organism=organism_dir.resolve().as_posix(), seed=seed, n_score=n_score,
                              n_eval=n_eval, q_grid="[" + ", ".join(f"{q:g}" for q in q_grid) + "]", p=f"{p:g}")


def run_demo(out_dir: str | Path = "runs/demo", size: str = "small", seed: int = 0) -> Path:
    """Build or reuse the organisms, write ``demo.toml`` into ``out_dir`` and run it; return the run directory."""
    from harmprune.experiments import run_config
    from harmprune.io import atomic_write_text
    from harmprune.organisms import build_organism

    out = Path(out_dir)
    organism = build_organism(out / "organism", size=size, seed=seed)
    config_path = out / "demo.toml"
    atomic_write_text(config_path, demo_config(Path(organism.root), seed=seed))
    return run_config(config_path, out)
