"""Reports: figures (PNG), ``report.md`` and a self-contained ``report.html`` built from a run directory.

Everything is rebuilt from ``summary.json`` and the results store, so ``harmprune report DIR`` reproduces the
report of a finished (or half-finished) run without recomputing anything. Each experiment contributes a section
through :func:`register_section` (here for the built-in experiments; an outside experiment's section is an entry
point in the group ``harmprune.report_sections``).
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from harmprune.io import atomic_write_text
from harmprune.registry import Registry
from harmprune.store import Store, recipe_of


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)  # markdown paragraphs / tables
    figures: list[tuple[str, str]] = field(default_factory=list)  # (file name, caption)


SectionBuilder = Callable[[dict[str, Any], Path], Section]
SECTIONS: Registry[SectionBuilder] = Registry("report section", "harmprune.report_sections", "register_section",
                                              [__name__])


def register_section(experiment: str) -> Callable[[SectionBuilder], SectionBuilder]:
    """Decorator: ``fn(result, fig_dir) -> Section`` renders the summary of the experiment called ``experiment``."""
    return SECTIONS.register(experiment)


def build_report(run_dir: str | Path) -> Path:
    """Write figures, report.md and report.html for ``run_dir``; return the HTML path."""
    import matplotlib

    matplotlib.use("Agg")
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        from harmprune.errors import HarmpruneError

        raise HarmpruneError(f"{run_dir}: no summary.json (is this a harmprune run directory?)")
    summary = json.loads(summary_path.read_text())
    fig_dir = run_dir / "figures"
    fig_dir.mkdir(exist_ok=True)
    sections = []
    for name, result in summary.get("experiments", {}).items():
        if name in SECTIONS:
            sections.append(SECTIONS.get(name)(result, fig_dir))
    samples = _answer_samples(run_dir)
    if samples.text:
        sections.append(samples)
    sections.append(_runs_table(run_dir))
    headline = {k: v for k, v in summary.items() if k not in ("experiments", "stages", "name")}
    if summary.get("stages", {}).get("reused_other_code"):  # the run's numbers may mix two versions of the code
        headline["stages_reused_from_other_code"] = summary["stages"]["reused_other_code"]
    md = _markdown(summary.get("name", run_dir.name), headline, sections)
    atomic_write_text(run_dir / "report.md", md)
    out = run_dir / "report.html"
    atomic_write_text(out, _html(summary.get("name", run_dir.name), headline, sections, fig_dir))
    return out


# ---------------------------------------------------------------------------------------------- sections


@register_section("compression")
def _compression(result: dict[str, Any], fig_dir: Path) -> Section:
    import matplotlib.pyplot as plt

    sec = Section("Compression: harm and utility against the fraction of weights pruned")
    models = result["models"]
    has_util = any(pt.get("utility") is not None for m in models.values() for pt in m["points"])
    fig, axes = plt.subplots(1, 2 if has_util else 1, figsize=(11 if has_util else 6, 4), squeeze=False)
    for name, m in models.items():
        pts = sorted(m["points"], key=lambda pt: pt["fraction_pruned"])
        for p in sorted({pt["p"] for pt in pts}):
            sub = [pt for pt in pts if pt["p"] == p and pt["fraction_pruned"] > 0]
            label = f"{name} (p={p:g})" if len({pt['p'] for pt in pts}) > 1 else name
            xs = [pt["fraction_pruned"] * 100 for pt in sub]
            axes[0][0].plot(xs, [pt["harm"] for pt in sub], marker="o", label=label)
            if has_util:
                axes[0][1].plot(xs, [pt["utility"] for pt in sub], marker="o", label=label)
        axes[0][0].axhline(m["baseline"]["harm"], ls=":", lw=1, color=axes[0][0].lines[-1].get_color())
        if has_util and m["baseline"].get("utility") is not None:
            axes[0][1].axhline(m["baseline"]["utility"], ls=":", lw=1, color=axes[0][1].lines[-1].get_color())
    axes[0][0].set(xscale="log", xlabel="weights pruned (% of scored weights)", ylabel="harmful generation",
                   title="Harmful generation (dotted: unpruned)")
    axes[0][0].legend()
    if has_util:
        axes[0][1].set(xscale="log", xlabel="weights pruned (% of scored weights)", ylabel="utility (points)",
                       title="Utility")
        axes[0][1].legend()
    _save(fig, fig_dir / "compression.png")
    sec.figures.append(("compression.png", "Harmful generation and utility as more harm-specific weights are pruned."))
    rows = [["model", "q", "p", "fraction pruned", "harm", "harm reduction", "utility", "utility drop"]]
    for name, m in models.items():
        rows.append([name, "-", "-", "0", _f(m["baseline"]["harm"]), "-", _f(m["baseline"].get("utility")), "-"])
        for pt in m["points"]:
            rows.append([name, f"{pt['q']:g}", f"{pt['p']:g}", f"{pt['fraction_pruned']:.2e}", _f(pt["harm"]),
                         _pct(pt["harm_reduction"]), _f(pt.get("utility")), _f(pt.get("utility_drop"))])
    sec.text.append(_md_table(rows))
    lines = []
    for name, m in models.items():
        frac = m.get("harm_compression_fraction")
        sep = m.get("separability") or {}
        lines.append(f"- **{name}**: harm-compression fraction "
                     f"{'not reached in this grid' if frac is None else f'{frac:.2e} ({frac * 100:.4f}% of scored weights)'}"
                     + (f" (utility budget {m['utility_budget']:.3g})" if m.get("utility_budget") is not None else "")
                     + (f"; top-{sep['q']:g} harm vs utility sets: Jaccard {sep['jaccard']:.3f} "
                        f"(chance {sep['chance_jaccard']:.3f}), utility-support AUROC {sep['utility_support_auroc']:.3f}"
                        if sep else ""))
    sec.text.append("\n".join(lines))
    _mask_distribution(models, fig_dir, sec)
    return sec


def _mask_distribution(models: dict[str, Any], fig_dir: Path, sec: Section) -> None:
    import matplotlib.pyplot as plt

    from harmprune.selection import load_mask, mask_stats

    masks = {n: m["operating_point"]["mask"] for n, m in models.items()
             if m.get("operating_point") and Path(m["operating_point"]["mask"]).exists()}
    if not masks:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(masks)
    for i, (name, path) in enumerate(masks.items()):
        stats = mask_stats(load_mask(path))
        layers = sorted((int(k), v) for k, v in stats["per_layer"].items() if k != "None")
        axes[0].bar([l + i * width for l, _ in layers], [v for _, v in layers], width=width, label=name)
        mods = sorted(stats["per_module"].items())
        axes[1].bar([j + i * width for j in range(len(mods))], [v for _, v in mods], width=width, label=name)
        axes[1].set_xticks(range(len(mods)), [k for k, _ in mods], rotation=45, ha="right")
    axes[0].set(xlabel="layer", ylabel="selected weights", title="Selected weights per layer")
    axes[1].set(ylabel="selected weights", title="Selected weights per module")
    axes[0].legend()
    _save(fig, fig_dir / "mask_distribution.png")
    sec.figures.append(("mask_distribution.png", "Where the selected harm weights sit, at each model's operating point."))


@register_section("controls")
def _controls(result: dict[str, Any], fig_dir: Path) -> Section:
    import matplotlib.pyplot as plt

    sec = Section("Controls: the harm set against masks of equal per-matrix counts")
    models = result["models"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(models)
    for i, (name, m) in enumerate(models.items()):
        conds = list(m["conditions"])
        ax.bar([j + i * width for j in range(len(conds))],
               [100 * m["conditions"][c]["harm_reduction"] for c in conds], width=width, label=name)
        ax.set_xticks(range(len(conds)), conds)
    ax.axhline(0, color="black", lw=0.8)
    ax.set(ylabel="harmful generation reduction (%)", title="Harm reduction at equal counts")
    ax.legend()
    _save(fig, fig_dir / "controls.png")
    sec.figures.append(("controls.png", "Relative reduction of harmful generation by each mask (same counts per matrix)."))
    rows = [["model", "q", "p", "condition", "harm", "harm reduction", "utility", "utility drop"]]
    for name, m in models.items():
        rows.append([name, f"{m['q']:g}", f"{m['p']:g}", "unpruned", _f(m["baseline"]["harm"]), "-",
                     _f(m["baseline"].get("utility")), "-"])
        for c, v in m["conditions"].items():
            rows.append([name, f"{m['q']:g}", f"{m['p']:g}", c, _f(v["harm"]), _pct(v["harm_reduction"]),
                         _f(v.get("utility")), _f(v.get("utility_drop"))])
    sec.text.append(_md_table(rows))
    return sec


SAMPLE_ANSWERS = 3  # answers shown per generating evaluation and condition
SAMPLE_WORDS = 12  # words of each answer shown (after any prefilled prefix)


def first_words(text: str, n: int = SAMPLE_WORDS) -> str:
    """The first ``n`` whitespace-separated words on one line, with "…" when the text goes on."""
    words = text.split()
    return " ".join(words[:n]) + (" …" if len(words) > n else "")


def answer_samples(rows: list[dict[str, Any]], n: int = SAMPLE_ANSWERS, words: int = SAMPLE_WORDS) -> list[list[str]]:
    """Table rows (prompt, prefix, answer start, one verdict per judge) for the first ``n`` generations.

    Only the first ``words`` words of the request and of the model's continuation are shown, so harmful text is
    truncated; the prefilled prefix is shown separately because the model did not write it.
    """
    out = []
    for row in rows[:n]:
        verdicts = row.get("verdicts") or {}
        judged = ", ".join(f"{name} {_f(float(v['harmfulness']))}" for name, v in verdicts.items()
                           if isinstance(v, dict) and "harmfulness" in v)
        out.append([_cell(first_words(row.get("prompt", ""), 8)), _cell(row.get("prefix", "")),
                    _cell(first_words(row.get("response", ""), words)), judged or "-"])
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip() or "-"


def _used_stages(run_dir: Path, kind: str) -> list[Path]:
    """``stage.json`` of every ``kind`` stage this run used: those its results store lists (a ``stages/`` shared
    with other run directories holds theirs too); every one if the store lists none (no store, or nothing run)."""
    found = sorted((run_dir / "stages" / kind).glob("*/stage.json"))
    store_path = run_dir / "results.sqlite"
    used = {st["key"] for st in Store(store_path).stages()} if store_path.exists() else set()
    return [f for f in found if f.parent.name in used] if used else found


def _mask_labels(run_dir: Path) -> dict[str, str]:
    """sha256 of every mask a run made -> a short label ("harm set q=1e-05 p=5e-05", "random control seed 0")."""
    from harmprune.io import sha256_file

    labels = {}
    for kind in ("mask", "control"):
        for stage in _used_stages(run_dir, kind):
            mask = stage.parent / "mask.safetensors"
            if not mask.exists():
                continue
            p = json.loads(stage.read_text()).get("params", {})
            label = (f"harm set q={_f(p.get('q'))} p={_f(p.get('p'))}" if kind == "mask"
                     else f"{p.get('kind')} control seed {p.get('seed')}")
            labels[sha256_file(mask)] = label
    return labels


def _answer_samples(run_dir: Path) -> Section:
    """The first answers of every generating evaluation, per condition (unpruned or a named mask)."""
    from harmprune.generation import read_generations

    sec = Section(f"Sample answers (first {SAMPLE_WORDS} words after any prefilled prefix)")
    stages = _used_stages(run_dir, "evaluate")
    masks = _mask_labels(run_dir) if stages else {}
    groups: dict[str, list[list[str]]] = {}
    for stage in stages:
        gens = stage.parent / "generations.jsonl"
        if not gens.exists():
            continue
        params = json.loads(stage.read_text()).get("params", {})
        spec = params.get("evaluation", {})
        what = f"{spec.get('kind', '?')} on {spec.get('data', spec.get('harmful', '?'))}"
        if spec.get("prefill_tokens"):
            what += f" (prefill {spec['prefill_tokens']} tokens)"
        mask = params.get("mask")
        condition = "unpruned" if mask is None else masks.get(mask, f"mask {str(mask)[:8]}")
        groups.setdefault(what, []).extend([[condition] + r for r in answer_samples(read_generations(gens))])
    for what, rows in sorted(groups.items()):
        sec.text.append(f"**{what}**\n\n" + _md_table([["condition", "request", "prefix", "answer", "judges"]]
                                                        + sorted(rows, key=lambda r: r[0] != "unpruned")))
    return sec


def _runs_table(run_dir: Path) -> Section:
    sec = Section("Every measurement")
    store_path = run_dir / "results.sqlite"
    if not store_path.exists():
        return sec
    store = Store(store_path)
    scored = _score_files_table(store, run_dir)
    if scored:
        sec.text.append("Score files (which method and prompt format made each):\n\n" + scored)
    rows = [["experiment", "model", "condition", "q", "p", "seed", "evaluation", "metric", "value", "recipe"]]
    for r in store.metrics():
        rows.append([r["experiment"], r["model"], r["condition"], _f(r["q"]), _f(r["p"]), _f(r["seed"]),
                     r["evaluation"], r["metric"], _f(r["value"]), recipe_of(r) or "-"])
    sec.text.append(_md_table(rows))
    cfg = run_dir / "config.toml"
    if cfg.exists():
        sec.text.append("Configuration of this run:\n\n```toml\n" + cfg.read_text().strip() + "\n```")
    return sec


def _score_files_table(store: Store, run_dir: Path) -> str:
    """One row per score stage: its key, model, data set, method, prompt format and size, from the file itself."""
    from harmprune.tensorfile import TensorFile

    rows = [["stage", "model", "data", "method", "format", "examples", "response tokens"]]
    for st in store.stages():
        path = run_dir / "stages" / "scores" / st["key"] / "scores.safetensors"
        if st["kind"] != "scores" or not path.exists():
            continue
        meta = TensorFile(path).metadata
        rows.append([st["key"][:10], str(meta.get("model", "")), str(meta.get("data", "")),
                     str(meta.get("method", "")), str(meta.get("prompt_format", "-")), str(meta.get("examples", "")),
                     str(meta.get("tokens", ""))])
    return _md_table(rows) if len(rows) > 1 else ""


# ---------------------------------------------------------------------------------------------- rendering


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    import matplotlib.pyplot as plt

    plt.close(fig)


def _f(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _md_table(rows: list[list[str]]) -> str:
    head, *body = rows
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(out)


def _markdown(title: str, headline: dict[str, Any], sections: list[Section]) -> str:
    parts = [f"# harmprune report: {title}", ""]
    if headline:
        parts += ["## Headline", "", _md_table([["key", "value"]] + [[k, _f(v)] for k, v in headline.items()]), ""]
    for sec in sections:
        parts += [f"## {sec.title}", ""]
        for name, caption in sec.figures:
            parts += [f"![{caption}](figures/{name})", "", f"*{caption}*", ""]
        for t in sec.text:
            parts += [t, ""]
    return "\n".join(parts)


def _html(title: str, headline: dict[str, Any], sections: list[Section], fig_dir: Path) -> str:
    def table(md: str) -> str:
        lines = [l for l in md.splitlines() if l.startswith("|") and not l.startswith("|---")]
        cells = [[html.escape(c.strip()) for c in l.strip("|").split("|")] for l in lines]
        head, *body = cells
        return ("<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in body) + "</table>")

    def block(text: str) -> str:
        if text.startswith("|"):
            return table(text)
        if text.startswith("```") or "```" in text:
            body = text.split("```")[1].removeprefix("toml\n")
            pre = text.split("```")[0]
            return f"<p>{html.escape(pre)}</p><pre>{html.escape(body)}</pre>"
        items = [l[2:] for l in text.splitlines() if l.startswith("- ")]
        if items:
            return "<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>"
        return f"<p>{_inline(text)}</p>"

    body = [f"<h1>harmprune report: {html.escape(title)}</h1>"]
    if headline:
        body.append("<h2>Headline</h2>" + table(_md_table([["key", "value"]] + [[k, _f(v)] for k, v in headline.items()])))
    for sec in sections:
        body.append(f"<h2>{html.escape(sec.title)}</h2>")
        for name, caption in sec.figures:
            data = base64.b64encode((fig_dir / name).read_bytes()).decode()
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
                        f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        body += [block(t) for t in sec.text]
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;"
             "padding:3px 8px;text-align:right}th{background:#f3f3f3}img{max-width:100%}"
             "pre{background:#f6f6f6;padding:1em;overflow:auto}figcaption{color:#555;font-size:0.9em}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>harmprune: {html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def _inline(text: str) -> str:
    out = html.escape(text)
    while "**" in out:
        out = out.replace("**", "<b>", 1).replace("**", "</b>", 1)
    return out


# ---------------------------------------------------------------------------------------------- Experiments II sections


def _heatmap(ax, matrix: list[list[float]], labels: list[str], title: str, fmt: str, vmin=None, vmax=None,
             cmap: str = "viridis") -> None:
    im = ax.imshow(matrix, vmin=vmin, vmax=vmax, cmap=cmap)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=8, color="white" if v < (
                (vmax if vmax is not None else max(map(max, matrix))) * 0.6) else "black")
    ax.set_title(title)
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


@register_section("cross_category")
def _cross_category(result: dict[str, Any], fig_dir: Path) -> Section:
    import matplotlib.pyplot as plt

    sec = Section("Cross-category generality: select with one category, evaluate on every category")
    for name, m in result["models"].items():
        cats = m["categories"]
        transfer = [[100 * m["harm_reduction"][a][b] for b in cats] for a in cats]
        jac = [[m["jaccard"][a][b] for b in cats] for a in cats]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        _heatmap(axes[0], transfer, cats, "Harm reduction (%): row = selected with, column = evaluated on", ".0f",
                 vmin=min(0.0, min(map(min, transfer))), vmax=100)
        axes[0].set(xlabel="evaluated on", ylabel="selected with")
        _heatmap(axes[1], jac, cats, f"Jaccard overlap of the per-category sets (chance {m['chance_jaccard']:.3f})",
                 ".2f", vmin=0, vmax=1)
        file = f"cross_category_{_slug(name)}.png"
        _save(fig, fig_dir / file)
        sec.figures.append((file, f"{name}: transfer of harm reduction across categories, and overlap of the "
                                  f"selected weight sets (q={m['q']:g}, p={m['p']:g})."))
        rows = [["selected with \\ evaluated on"] + cats]
        rows += [[a] + [_pct(m["harm_reduction"][a][b]) for b in cats] for a in cats]
        rows.append(["unpruned harm"] + [_f(m["baseline"][b]) for b in cats])
        if m.get("random_control"):
            rows.append(["random control (mean over rows)"] + [
                _pct(sum(m["random_control"][a][b] for a in cats) / len(cats)) for b in cats])
        if m.get("shared_core"):
            rows.append([f"intersection of all sets ({m['shared_core']['selected']} weights)"] + [
                _pct(m["shared_core"]["harm_reduction"][b]) for b in cats])
        if m.get("utility"):
            rows[0].append(f"utility ({m.get('utility_metric', 'as configured')})")
            for row, a in zip(rows[1:], cats):
                row.append(_f(m["utility"][a]))
            rows[len(cats) + 1].append(_f(m["utility"]["unpruned"]))
            for row in rows[len(cats) + 2:]:
                row.append(_f(m["utility"].get("intersection")) if row[0].startswith("intersection") else "-")
        sec.text.append(f"**{name}**\n\n" + _md_table(rows))
        sec.text.append(f"- **{name}** — {m['reading']}. Mean Jaccard {m['mean_jaccard']:.3f} vs chance "
                        f"{m['chance_jaccard']:.3f}; {m['intersection_size']} weights are in every category's set "
                        f"({100 * m['intersection_fraction_of_mean_set']:.1f}% of the mean set size).")
    return sec


@register_section("dissociation")
def _dissociation(result: dict[str, Any], fig_dir: Path) -> Section:
    import matplotlib.pyplot as plt

    sec = Section("Dissociation: harmful generation against recognition and refusal")
    rates = ["harm", "plain_harm", "refusal_rate", "detection_accuracy", "detection_auroc", "explanation_rate"]
    for name, m in result["models"].items():
        conds = _ordered(m["conditions"], ("unpruned", "harm-set", "refusal-set"))
        shown = [k for k in rates if any(k in c for c in conds.values())]
        fig, ax = plt.subplots(figsize=(9, 4))
        width = 0.8 / len(conds)
        for i, (c, vals) in enumerate(conds.items()):
            ax.bar([j + i * width for j in range(len(shown))], [vals.get(k, float("nan")) for k in shown],
                   width=width, label=c)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shown))], shown, rotation=20)
        ax.set(ylim=(0, 1.05), title=f"{name}: what each pruned set removes")
        ax.legend()
        file = f"dissociation_{_slug(name)}.png"
        _save(fig, fig_dir / file)
        sec.figures.append((file, f"{name}: harmful generation (with and without the prefilling attack), refusal, "
                                  "detection and explanation, unpruned and with each set pruned."))
        keys = sorted({k for c in conds.values() for k in c})
        rows = [["condition"] + keys] + [[c] + [_f(v.get(k)) for k in keys] for c, v in conds.items()]
        rec = m.get("recovery")
        if rec:
            for c, v in rec["conditions"].items():
                rows.append([f"{c} (mean over seeds {rec['seeds']})"] + [_f(v.get(k)) for k in keys])
        sec.text.append(f"**{name}** (harm set q={m['q']:g}, p={m['p']:g}; refusal set q={m['refusal_q']:g}, "
                        f"p={m['refusal_p']:g})\n\n" + _md_table(rows))
        lines = []
        for c, ch in _ordered(m["changes"], ("harm-set", "refusal-set")).items():
            parts = [f"{k.removesuffix('_change')} {v:+.3f}" for k, v in ch.items() if k.endswith("_change")]
            lines.append(f"- **{c}** vs unpruned: " + ", ".join(parts))
        if rec:
            frac = rec["recovered_fraction"]
            hp = rec["hyperparameters"]
            before, after = conds["unpruned"]["harm"], conds["harm-set"]["harm"]
            lines.append(f"- **recovery**: a {hp['steps']}-step LoRA fine-tune (rank {hp['rank']}, lr {hp['lr']:g}, "
                         f"pruned weights {'held at zero' if hp['keep_pruned'] else 'free to regrow'}) of the pruned "
                         f"model brings harm from {after:.3g} to {rec['conditions']['ft-pruned']['harm']:.3g} "
                         f"(unpruned {before:.3g}): "
                         + ("pruning removed nothing to recover" if frac is None else
                            f"{100 * frac:.0f}% of what pruning removed"))
        sec.text.append("\n".join(lines))
    return sec


@register_section("emergent_misalignment")
def _emergent_misalignment(result: dict[str, Any], fig_dir: Path) -> Section:
    import matplotlib.pyplot as plt

    sec = Section("Emergent misalignment: narrow fine-tuning with and without pruning the harm set first")
    for name, m in result["models"].items():
        conds = _ordered(m["conditions"], ("base", "pruned", "ft-unpruned", "ft-pruned", "ft-random"))
        labels = list(conds)
        has_in = all("in_domain" in conds[c] for c in labels)
        fig, axes = plt.subplots(1, 2 if has_in else 1, figsize=(11 if has_in else 6, 4), squeeze=False)
        ax = axes[0][0]
        rate = [100 * conds[c]["misaligned_rate"] for c in labels]
        err = [[max(0.0, 100 * (conds[c]["misaligned_rate"] - conds[c]["ci_low"])) for c in labels],
               [max(0.0, 100 * (conds[c]["ci_high"] - conds[c]["misaligned_rate"])) for c in labels]]
        ax.bar(range(len(labels)), rate, yerr=err, capsize=4, color="tab:red", alpha=0.7)
        for i, c in enumerate(labels):
            seeds = conds[c]["per_seed_rate"]
            ax.scatter([i] * len(seeds), [100 * s for s in seeds], color="black", s=12, zorder=3)
        ax.set_xticks(range(len(labels)), labels, rotation=20)
        ax.set(ylabel="misaligned answers (%)", title="Broad misalignment outside the narrow domain")
        if has_in:
            axes[0][1].bar(range(len(labels)), [conds[c]["in_domain"] for c in labels], color="tab:blue", alpha=0.7)
            axes[0][1].set_xticks(range(len(labels)), labels, rotation=20)
            axes[0][1].set(title="In-domain learning (narrow-domain metric)")
        file = f"emergent_misalignment_{_slug(name)}.png"
        _save(fig, fig_dir / file)
        sec.figures.append((file, f"{name}: misaligned rate by condition (bars: pooled over seeds and samples with "
                                  "95% Wilson intervals; dots: each seed)."))
        broad = sorted(conds[labels[0]].get("broad", {})) if labels else []
        rows = [["condition", "misaligned", "95% interval", "per seed", "samples", "mean coherent", "in-domain",
                 *(f"{b} ({m.get('broad_metric')})" for b in broad)]]
        for c in labels:
            v = conds[c]
            rows.append([c, _pct(v["misaligned_rate"]), f"{_pct(v['ci_low'])} – {_pct(v['ci_high'])}",
                         ", ".join(_pct(s) for s in v["per_seed_rate"]), str(v["n"]), _f(v.get("mean_coherent")),
                         _f(v.get("in_domain")), *(_f(v.get("broad", {}).get(b)) for b in broad)])
        ft = m["finetune"]
        sec.text.append(f"**{name}** (narrow domain: {m.get('narrow_category') or 'the narrow data'}; harm set "
                        f"q={m['q']:g}, p={m['p']:g}; LoRA {ft['steps']} steps, rank {ft['rank']}, lr {ft['lr']:g}; "
                        f"seeds {m['seeds']})\n\n" + _md_table(rows))
    return sec


def _ordered(d: dict[str, Any], first: tuple[str, ...]) -> dict[str, Any]:
    """``d`` with the keys of ``first`` in that order, then the rest (summary.json stores keys sorted)."""
    return {**{k: d[k] for k in first if k in d}, **{k: v for k, v in d.items() if k not in first}}


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name)
