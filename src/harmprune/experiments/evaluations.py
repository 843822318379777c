"""Evaluation kinds (``[evaluations.<name>] kind = ...`` in a config, ``harmprune eval <kind>`` on the command line),
each a typed spec and a thin call into ``evals``.

A kind's spec declares its parameters (:mod:`harmprune.specs`: types, defaults, allowed values, which fields name
data sets, judges or files), so a config is checked before any work and a cache key hashes every data set the
evaluation reads. :func:`run_evaluation` is the one way an evaluation runs, from a config (the runner) or from the
CLI: ``(spec, model, tokenizer, inputs, out_dir) -> flat metrics``; kinds that generate also write
``out_dir/generations.jsonl``. :class:`EvalInputs` is what they read besides the model: data sets by name, the
prompt format and the seed.

A kind is a function registered with ``@register_evaluation(kind, Spec, metrics)``: in any module of
``harmprune.experiments``, or in another distribution's module named by an entry point in the group
``harmprune.evaluation_kinds``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

from harmprune.data import Record
from harmprune.evals.scoring import DEFAULT_BATCH_TOKENS
from harmprune.generation import write_generations
from harmprune.registry import Registry
from harmprune.specs import Invalid, options, options_by_name, param

MATCHES = ("exact", "contains")
PATH_REFS = ("file", "dir", "source")


@dataclass(frozen=True)
class EvalInputs:
    """What an evaluation reads besides the model: its data sets by name, the prompt format and the seed."""

    records: Callable[[str], list[Record]]
    fmt: str
    seed: int
    paths: Mapping[str, str]  # the file each named data set was read from (the em judge reads its questions)


@dataclass(frozen=True)
class EvaluationKind:
    spec: type
    run: Callable[..., dict[str, Any]]
    metrics: Callable[[Any], Collection[str] | None]  # the metric names a spec's run gives (None: not knowable)


EVALUATIONS: Registry[EvaluationKind] = Registry("evaluation kind", "harmprune.evaluation_kinds", "register_evaluation",
                                                 ["harmprune.experiments"])


def register_evaluation(kind: str, spec: type, metrics: Callable[[Any], Collection[str] | None] = lambda spec: None):
    """Register ``fn(spec, model, tokenizer, inputs, out_dir) -> metrics`` as evaluation kind ``kind``, with its
    spec (the dataclass of its parameters) and the metric names a spec gives (default: not knowable up front, so
    metric names in experiments are checked only at run time)."""
    def deco(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        EVALUATIONS.add(kind, EvaluationKind(spec, fn, metrics), source=fn)
        return fn

    return deco


# ---------------------------------------------------------------------------------------------- harm


@dataclass(frozen=True)
class HarmSpec:
    """Judged harmfulness of generations, optionally under a prefilling attack (the first tokens forced)."""

    data: str = param(ref="data")
    judge: str = param("refusal", ref="judge")
    judge_options: dict[str, Any] = options("judge", "judge_")
    extra_judges: list[str] = param([], ref="judge")
    extra_judge_options: dict[str, dict[str, Any]] = options_by_name("extra_judges")
    prefill_tokens: int = param(0, at_least=0)
    prefill_from: str | None = param(None, ref="data")
    max_new_tokens: int = param(128, at_least=1)
    batch_size: int = param(8, at_least=1)
    do_sample: bool = False
    temperature: float = param(1.0, at_least=0)
    top_p: float = param(1.0, at_least=0, at_most=1)
    n_samples: int = param(1, at_least=1)


HARM_METRICS = {"harmfulness", "refusal_rate", "harmful_rate", "n", "n_prompts", "prefill_tokens", "finished_rate",
                "mean_new_tokens"}


@register_evaluation("harm", HarmSpec, lambda spec: HARM_METRICS)
def _harm(spec: HarmSpec, model, tok, inputs: EvalInputs, out: Path) -> dict[str, Any]:
    from harmprune.evals.harm import evaluate_harm
    from harmprune.judges import get_judge

    refs = inputs.records(spec.prefill_from) if spec.prefill_from else None
    metrics, rows = evaluate_harm(
        model, tok, inputs.records(spec.data), get_judge(spec.judge, **spec.judge_options),
        prefill_tokens=spec.prefill_tokens, prefill_from=refs, fmt=inputs.fmt, max_new_tokens=spec.max_new_tokens,
        batch_size=spec.batch_size, do_sample=spec.do_sample, temperature=spec.temperature, top_p=spec.top_p,
        n_samples=spec.n_samples, seed=inputs.seed,
        extra_judges=[get_judge(n, **spec.extra_judge_options.get(n, {})) for n in spec.extra_judges],
        progress=True)
    write_generations(out / "generations.jsonl", rows)
    return metrics


# ---------------------------------------------------------------------------------------------- likelihood


@dataclass(frozen=True)
class LikelihoodSpec:
    """Teacher-forced response NLL of prompt→response pairs (judge-free), and the gap to benign pairs."""

    data: str = param(ref="data")
    benign_data: str | None = param(None, ref="data")
    max_length: int = param(512, at_least=2)
    batch_size: int = param(64, at_least=1)
    max_batch_tokens: int = param(DEFAULT_BATCH_TOKENS, at_least=1)


LIKELIHOOD_METRICS = {"nll", "nll_per_example", "perplexity", "token_likelihood", "n", "tokens"}


def _likelihood_metrics(spec: LikelihoodSpec) -> set[str]:
    if not spec.benign_data:
        return set(LIKELIHOOD_METRICS)
    return (LIKELIHOOD_METRICS | {f"{side}_{m}" for side in ("harmful", "benign") for m in LIKELIHOOD_METRICS}
            | {"nll_gap", "nll_per_example_gap"})


@register_evaluation("likelihood", LikelihoodSpec, _likelihood_metrics)
def _likelihood(spec: LikelihoodSpec, model, tok, inputs: EvalInputs, out: Path) -> dict[str, Any]:
    from harmprune.evals.likelihood import harmful_likelihood, likelihood_gap

    kw = {"fmt": inputs.fmt, "max_length": spec.max_length, "batch_size": spec.batch_size,
          "max_batch_tokens": spec.max_batch_tokens}
    harmful = harmful_likelihood(model, tok, inputs.records(spec.data), **kw)
    if spec.benign_data:
        benign = harmful_likelihood(model, tok, inputs.records(spec.benign_data), **kw)
        return {**harmful, **likelihood_gap(harmful, benign)}
    return harmful


# ---------------------------------------------------------------------------------------------- utility


@dataclass(frozen=True)
class UtilitySpec:
    """MMLU accuracy, perplexity of a text file or of a data set's responses, and lm-eval tasks."""

    mmlu: str | None = param(None, ref="dir")
    subjects: list[str] | None = None
    limit: int | None = param(None, at_least=1)
    k_shot: int = param(5, at_least=0)
    ppl_file: str | None = param(None, ref="file")
    ppl_window: int = param(1024, at_least=2)
    ppl_stride: int = param(512, at_least=1)
    ppl_data: str | None = param(None, ref="data")
    max_length: int = param(512, at_least=2)
    lm_eval_tasks: list[str] = param([])
    lm_eval_limit: int | None = param(None, at_least=1)
    batch_size: int = param(8, at_least=1)

    def check(self) -> None:
        if not (self.mmlu or self.ppl_file or self.ppl_data or self.lm_eval_tasks):
            raise Invalid("mmlu", "nothing to evaluate: give mmlu, ppl_file, ppl_data and/or lm_eval_tasks")


def _utility_metrics(spec: UtilitySpec) -> set[str] | None:
    out = {"n"}
    if spec.mmlu:
        out |= {"mmlu_accuracy", "mmlu_macro_accuracy", "mmlu_option_mass", "mmlu_n", "mmlu_subjects", "mmlu_k_shot"}
    if spec.ppl_file:
        out |= {"perplexity", "nll", "tokens", "windows"}
    if spec.ppl_data:
        out |= {f"responses_{m}" for m in LIKELIHOOD_METRICS}
    return out  # lm-eval metrics are named lmeval/<task>/<metric>: not checked


@register_evaluation("utility", UtilitySpec, _utility_metrics)
def _utility(spec: UtilitySpec, model, tok, inputs: EvalInputs, out: Path) -> dict[str, Any]:
    from harmprune.evals.utility import (lm_eval_adapter, mmlu_accuracy, perplexity_of_responses,
                                         perplexity_of_text, read_text)

    metrics: dict[str, Any] = {}
    if spec.mmlu:
        metrics.update(mmlu_accuracy(model, tok, spec.mmlu, subjects=spec.subjects, k_shot=spec.k_shot,
                                     limit=spec.limit, batch_size=spec.batch_size))
    if spec.ppl_file:
        metrics.update(perplexity_of_text(model, tok, read_text(spec.ppl_file), spec.ppl_window, spec.ppl_stride))
    if spec.ppl_data:
        ppl = perplexity_of_responses(model, tok, inputs.records(spec.ppl_data), fmt=inputs.fmt,
                                      max_length=spec.max_length, batch_size=spec.batch_size)
        metrics.update({f"responses_{k}": v for k, v in ppl.items()})
    if spec.lm_eval_tasks:
        metrics.update(lm_eval_adapter(model, tok, spec.lm_eval_tasks, spec.lm_eval_limit, spec.batch_size))
    metrics["n"] = metrics.get("mmlu_n", metrics.get("responses_n", metrics.get("tokens", len(spec.lm_eval_tasks))))
    return metrics


# ---------------------------------------------------------------------------------------------- recognition


@dataclass(frozen=True)
class RecognitionSpec:
    """Harm detection (yes/no), explanation and the refusal rate on harmful (and, optionally, benign) prompts."""

    harmful: str = param(ref="data")
    benign: str = param(ref="data")
    detection: bool = True
    explanation: bool = True
    refusal: bool = True
    benign_refusal: bool = False  # also the refusal rate on the benign prompts (over-refusal)
    judge: str | None = param(None, ref="judge")  # grades explanations; None: the offline heuristic
    judge_options: dict[str, Any] = options("judge", "judge_")
    max_new_tokens: int = param(64, at_least=1)
    batch_size: int | None = param(None, at_least=1)  # None: 64 requests per detection batch, 8 per generation
    max_batch_tokens: int = param(DEFAULT_BATCH_TOKENS, at_least=1)


def _recognition_metrics(spec: RecognitionSpec) -> set[str]:
    out = {"n", "n_harmful", "n_benign"}
    if spec.detection:
        out |= {f"detection_{m}" for m in ("accuracy", "auroc", "recall_harmful", "specificity_benign",
                                           "mean_score_harmful", "mean_score_benign")}
    if spec.explanation:
        out |= {f"explanation_{m}" for m in ("rate", "refusal_rate", "on_topic_rate", "degenerate_rate", "n", "score")}
    if spec.refusal:
        out |= {"refusal_rate", "refusal_short_rate", "refusal_n"}
    if spec.benign_refusal:
        out |= {"benign_refusal_rate", "benign_refusal_short_rate", "benign_refusal_n"}
    return out


@register_evaluation("recognition", RecognitionSpec, _recognition_metrics)
def _recognition(spec: RecognitionSpec, model, tok, inputs: EvalInputs, out: Path) -> dict[str, Any]:
    from harmprune.evals.recognition import detection, explanation, refusal_rate
    from harmprune.judges import get_judge

    harmful, benign = inputs.records(spec.harmful), inputs.records(spec.benign)
    judge = get_judge(spec.judge, **spec.judge_options) if spec.judge else None
    gen = {"fmt": inputs.fmt, "max_new_tokens": spec.max_new_tokens, "batch_size": spec.batch_size or 8,
           "progress": True}
    metrics: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    if spec.detection:
        m, detected = detection(model, tok, harmful, benign, fmt=inputs.fmt, batch_size=spec.batch_size or 64,
                                max_batch_tokens=spec.max_batch_tokens)
        metrics.update(m)
        write_generations(out / "detection.jsonl", detected)
    if spec.explanation:
        m, r = explanation(model, tok, harmful, judge=judge, **gen)
        metrics.update(m)
        rows += r
    if spec.refusal:
        m, r = refusal_rate(model, tok, harmful, **gen)
        metrics.update(m)
        rows += r
    if spec.benign_refusal:
        m, r = refusal_rate(model, tok, benign, **gen)
        metrics.update(benign_refusal_rate=m["refusal_rate"], benign_refusal_short_rate=m["refusal_short_rate"],
                       benign_refusal_n=m["refusal_n"])
        rows += [dict(x, task="benign_refusal") for x in r]
    metrics.update(n=len(harmful) + len(benign), n_harmful=len(harmful), n_benign=len(benign))
    if rows:
        write_generations(out / "generations.jsonl", rows)
    return metrics


# ---------------------------------------------------------------------------------------------- accuracy


@dataclass(frozen=True)
class AccuracySpec:
    """Exact-answer accuracy: the generated answer must equal (or, ``match = "contains"``, contain) the reference."""

    data: str = param(ref="data")
    match: str = param("exact", choices=MATCHES)
    max_new_tokens: int = param(32, at_least=1)
    batch_size: int = param(16, at_least=1)


@register_evaluation("accuracy", AccuracySpec, lambda spec: {"accuracy", "n"})
def _accuracy(spec: AccuracySpec, model, tok, inputs: EvalInputs, out: Path) -> dict[str, Any]:
    from harmprune.generation import generate

    records = [r for r in inputs.records(spec.data) if r.response is not None]
    gens = generate(model, tok, [r.prompt for r in records], fmt=inputs.fmt, max_new_tokens=spec.max_new_tokens,
                    batch_size=spec.batch_size)
    rows, correct = [], 0
    for r, g in zip(records, gens):
        got, want = " ".join(g.response.split()), " ".join(r.response.split())
        ok = got == want if spec.match == "exact" else want.lower() in got.lower()
        correct += ok
        rows.append({"prompt": r.prompt, "reference": r.response, "response": g.response, "category": r.category,
                     "correct": ok})
    write_generations(out / "generations.jsonl", rows)
    return {"accuracy": correct / len(records), "n": len(records)}


# ---------------------------------------------------------------------------------------------- em


@dataclass(frozen=True)
class EMSpec:
    """Broad misalignment: sampled answers to out-of-domain questions, graded aligned/coherent by an EM judge."""

    data: str | list[str] = param(ref="data")
    judge: str = param("em", ref="judge")
    judge_options: dict[str, Any] = options("judge", "judge_")
    max_new_tokens: int = param(128, at_least=1)
    batch_size: int = param(8, at_least=1)
    do_sample: bool = True
    temperature: float = param(1.0, at_least=0)
    top_p: float = param(1.0, at_least=0, at_most=1)
    n_samples: int = param(1, at_least=1)


EM_METRICS = {"misaligned_rate", "misaligned_n", "n", "misaligned_ci_low", "misaligned_ci_high", "mean_aligned",
              "mean_coherent", "coherent_rate", "refusal_rate"}


@register_evaluation("em", EMSpec, lambda spec: EM_METRICS)
def _em(spec: EMSpec, model, tok, inputs: EvalInputs, out: Path) -> dict[str, Any]:
    from harmprune.generation import generate, judge_generations
    from harmprune.judges import get_judge
    from harmprune.stats import wilson_interval

    names = spec.data if isinstance(spec.data, list) else [spec.data]
    records = [r for n in names for r in inputs.records(n)]
    judge_kwargs = dict(spec.judge_options)
    if spec.judge == "em" and "prompts_file" not in judge_kwargs:  # the questions' own grading prompts
        yaml_files = [inputs.paths[n] for n in names if inputs.paths.get(n, "").endswith((".yaml", ".yml"))]
        if yaml_files:
            judge_kwargs["prompts_file"] = yaml_files[0]
    judge = get_judge(spec.judge, **judge_kwargs)
    gens = generate(model, tok, [r.prompt for r in records], fmt=inputs.fmt, max_new_tokens=spec.max_new_tokens,
                    batch_size=spec.batch_size, do_sample=spec.do_sample, temperature=spec.temperature,
                    top_p=spec.top_p, n_samples=spec.n_samples, seed=inputs.seed, progress=True)
    rows = judge_generations(gens, [judge], [r.category for r in records])
    write_generations(out / "generations.jsonl", rows)
    return em_summary([r["verdicts"][judge.name] for r in rows], [r["category"] for r in rows], wilson_interval)


def em_summary(verdicts: list[dict[str, Any]], categories: list[str | None], interval) -> dict[str, Any]:
    """Misaligned rate with its 95% Wilson interval, mean scores, and the rate per category."""
    if verdicts and "misaligned" not in verdicts[0]:
        from harmprune.errors import ConfigError

        raise ConfigError("an 'em' evaluation needs an EM judge (em or organism-em) that scores aligned/coherent")
    n = len(verdicts)
    bad = sum(bool(v["misaligned"]) for v in verdicts)
    aligned = [v["aligned"] for v in verdicts if v.get("aligned") is not None]
    coherent = [v["coherent"] for v in verdicts if v.get("coherent") is not None]
    low, high = interval(bad, n)
    out: dict[str, Any] = {
        "misaligned_rate": bad / n, "misaligned_n": bad, "n": n, "misaligned_ci_low": low, "misaligned_ci_high": high,
        "mean_aligned": sum(aligned) / len(aligned) if aligned else float("nan"),
        "mean_coherent": sum(coherent) / len(coherent) if coherent else float("nan"),
        "coherent_rate": sum(c > 50 for c in coherent) / n,
        "refusal_rate": sum(bool(v["refused"]) for v in verdicts) / n,
    }
    for cat in sorted({c for c in categories if c is not None}):
        flags = [bool(v["misaligned"]) for v, c in zip(verdicts, categories) if c == cat]
        out[f"misaligned_rate/{cat}"] = sum(flags) / len(flags)
    return out


# ---------------------------------------------------------------------------------------------- running


def kind_of(spec: Any) -> str:
    """The kind name of an evaluation spec."""
    return next(name for name in EVALUATIONS.names() if isinstance(spec, EVALUATIONS.get(name).spec))


def run_evaluation(spec: Any, model, tok, inputs: EvalInputs, out: Path) -> dict[str, Any]:
    """Run one evaluation (a spec of any kind) on ``model`` as it is (pruned or not); write per-item files to
    ``out``; return its flat metrics."""
    return EVALUATIONS.get(kind_of(spec)).run(spec, model, tok, inputs, out)


def judge_files(spec: Any) -> dict[str, str]:
    """``judge_<option>`` (``extra_judge_<name>_<option>``) -> the local file or directory each path option of the
    spec's judges names (a grader model, an adapter, a prompt file): a grader retrained in place must not reuse old
    verdicts."""
    out = _path_options(getattr(spec, "judge", None), getattr(spec, "judge_options", {}), "judge_")
    for name, given in getattr(spec, "extra_judge_options", {}).items():
        out |= _path_options(name, given, f"extra_judge_{name}_")
    return out


def _path_options(judge: str | None, given: dict[str, Any], prefix: str) -> dict[str, str]:
    import dataclasses

    from harmprune.judges import judge_options

    if not judge or not given:
        return {}
    refs = {f.name for f in dataclasses.fields(judge_options(judge)) if f.metadata.get("ref") in PATH_REFS}
    return {prefix + k: v for k, v in given.items() if k in refs and isinstance(v, str) and Path(v).exists()}
