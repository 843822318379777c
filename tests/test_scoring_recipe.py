"""Per-role scoring recipes in configs: each set names its method and prompt format; defaults are the study's."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from harmprune.errors import ConfigError
from harmprune.experiments import load_checked_config
from harmprune.experiments.inputs import Inputs
from harmprune.experiments.runner import Runner
from harmprune.experiments.stage_cache import StageCache

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

BASE = """
name = "r"
[models.chatty]
path = "chatty"
[models.plain]
path = "plain"
format = "raw"
aligned = false
[data.harmful]
path = "harm.jsonl"
[data.benign]
path = "benign.jsonl"
[scoring]
harm = "harmful"
utility = "benign"
{scoring}
"""


def _config(tmp_path: Path, scoring: str, name: str = "c.toml"):
    (tmp_path / "harm.jsonl").write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    (tmp_path / "benign.jsonl").write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    for model in ("chatty", "plain"):  # model paths are checked: directories with a config.json
        (tmp_path / model).mkdir(exist_ok=True)
        (tmp_path / model / "config.json").write_text("{}")
    path = tmp_path / name
    path.write_text(BASE.format(scoring=scoring))
    return load_checked_config(path)


def _roles(cfg) -> dict[str, str]:
    return {k: cfg.scoring[k] for k in ("harm_method", "utility_method", "harm_format", "utility_format")}


@pytest.mark.parametrize("scoring, expected", [
    ("", ("signed-snip", "snip", "pretrained", "pretrained")),  # the study's B-TAP pair
    ('method = "snip"', ("snip", "snip", "pretrained", "pretrained")),  # one method means both roles
    ('method = "signed-snip"\nformat = "chat"', ("signed-snip", "signed-snip", "chat", "chat")),
    ('harm_method = "wanda"\nutility_format = "raw"', ("wanda", "snip", "pretrained", "raw")),
    ('method = "snip"\nharm_method = "snip"', ("snip", "snip", "pretrained", "pretrained")),  # agreeing is fine
    ('format = "model"\nharm_format = "model"', ("signed-snip", "snip", "model", "model")),
])
def test_per_role_methods_and_formats_resolve(tmp_path, scoring, expected):
    cfg = _config(tmp_path, scoring)
    assert tuple(_roles(cfg).values()) == expected


@pytest.mark.parametrize("scoring, message", [
    ('method = "snip"\nharm_method = "signed-snip"',
     "scoring.method = 'snip' and scoring.harm_method = 'signed-snip' disagree"),
    ('format = "chat"\nutility_format = "pretrained"',
     "scoring.format = 'chat' and scoring.utility_format = 'pretrained' disagree"),
    ('utility_method = "snap"', "scoring.utility_method 'snap' is not one of"),
    ('harm_format = "xml"', "scoring.harm_format 'xml' is not one of"),
    ('method = ["snip", "wanda"]', "scoring.method ['snip', 'wanda'] is not one of"),
])
def test_bad_or_conflicting_recipe_is_a_config_error(tmp_path, scoring, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        _config(tmp_path, scoring)


def test_model_format_resolves_per_model_and_labels_the_recipe(tmp_path):
    cfg = _config(tmp_path, 'format = "model"\nutility_method = "snip"\nharm_method = "signed-snip"')
    runner = Runner(cfg, tmp_path / "run")
    assert runner.inputs.recipe("chatty", "harm") == ("signed-snip", "chat")
    assert runner.inputs.recipe("plain", "utility") == ("snip", "raw")
    assert runner.inputs.recipe_label("plain") == "harm=signed-snip/raw utility=snip/raw"
    default = Runner(_config(tmp_path, "", "d.toml"), tmp_path / "run2")
    assert default.inputs.recipe_label("chatty") == "harm=signed-snip/pretrained utility=snip/pretrained"


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data is not present")
@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_keep_their_score_cache_keys(config, monkeypatch, built_artefacts):
    """A config written before per-role scoring (one ``method``, each model in its own format) gets the same
    ``scores`` stage parameters, hence the same cache key, as the code before this change computed:
    ``{model, data, method = scoring.method, format = the model's format, max_length, modules}``."""
    cfg = load_checked_config(config)
    if "method" not in cfg.raw.get("scoring", {}):
        pytest.skip("a per-role (btap) or default-recipe config: no earlier key to keep")
    captured = []
    monkeypatch.setattr(Inputs, "model_hash", lambda self, m: f"hash-of-{m}")
    monkeypatch.setattr(Inputs, "data_hash", lambda self, d: f"hash-of-{d}")
    monkeypatch.setattr(StageCache, "stage", lambda self, kind, params, build, done: captured.append(params) or Path("x"))
    with tempfile.TemporaryDirectory() as tmp:
        runner = Runner(cfg, tmp)
        sc = cfg.scoring
        for model, spec in cfg.models.items():
            for role, data in (("harm", sc["harm"]), ("utility", sc["utility"])):
                captured.clear()
                runner.scores(model, data, role)
                old = {"model": f"hash-of-{model}", "data": f"hash-of-{data}", "method": cfg.raw["scoring"]["method"],
                       "format": spec.format, "max_length": sc["max_length"], "modules": sc["modules"]}
                assert captured == [old]


def test_select_reads_each_files_method_and_a_flag_overrides_it(tmp_path, capsys):
    import torch

    from harmprune.cli import main
    from harmprune.selection import load_mask
    from harmprune.tensorfile import save_tensors

    harm = torch.tensor([[-5.0, 4.0, -1.0, 3.0], [0.5, -3.0, 2.0, -0.1]])  # most negative: 0, 5, 2
    util = torch.tensor([[0.1, 0.2, 9.0, 0.3], [0.4, 0.5, 0.6, 0.7]])  # largest: 2
    save_tensors({"w": harm}, tmp_path / "h.safetensors", {"method": "signed-snip", "prompt_format": "pretrained"})
    save_tensors({"w": util}, tmp_path / "u.safetensors", {"method": "snip", "prompt_format": "chat"})

    def select(*extra):
        out = tmp_path / f"m{len(extra)}.safetensors"
        assert main(["select", "--harm", str(tmp_path / "h.safetensors"), "--utility", str(tmp_path / "u.safetensors"),
                     "--q", "0.375", "--p", "0.125", "--out", str(out), *extra]) == 0
        return load_mask(out), capsys.readouterr().out

    mask, printed = select()
    assert mask.indices["w"].tolist() == [0, 5]  # {0, 5, 2} minus {2}
    assert (mask.metadata["harm_method"], mask.metadata["utility_method"]) == ("signed-snip", "snip")
    assert (mask.metadata["harm_format"], mask.metadata["utility_format"]) == ("pretrained", "chat")
    assert "harm signed-snip/pretrained, utility snip/chat" in printed
    mask, _ = select("--harm-method", "snip")  # read as an absolute score: largest first: 1, 3, 6
    assert mask.indices["w"].tolist() == [1, 3, 6] and mask.metadata["harm_method"] == "snip"


def test_pretrained_format_is_prompt_newline_response_without_bos():
    from harmprune.formatting import collate_for_loss, encode_pair
    from tiny import make_tokenizer

    tok = make_tokenizer()  # character-level; adds BOS to raw text
    enc = encode_pair(tok, "hi there", "ok.", "pretrained")
    chars = [tok.convert_tokens_to_ids(c) for c in "hi there\nok."]
    assert enc.input_ids == chars and enc.n_prompt == len("hi there\n")  # no BOS, the newline ends the prompt
    assert encode_pair(tok, "hi there", "ok.", "raw").input_ids[0] == tok.bos_token_id  # raw keeps BOS
    labels = collate_for_loss([enc], pad_id=0)["labels"][0]
    assert tok.decode(labels[labels != -100]) == "ok."  # the loss covers exactly the response's own tokens


def test_selection_defaults_to_the_studys_operating_point(tmp_path, capsys):
    """Without [selection] q/p, a config selects at q = 1e-5 and p = 5e-5 (p = 0 without a utility set); so does
    `select` without --q/--p (p = 0 without --utility)."""
    import torch

    from harmprune.cli import main
    from harmprune.selection import load_mask
    from harmprune.tensorfile import save_tensors

    assert {k: _config(tmp_path, "").selection[k] for k in ("q", "p")} == {"q": [1e-5], "p": [5e-5]}
    no_utility = tmp_path / "n.toml"
    no_utility.write_text(BASE.format(scoring="").replace('utility = "benign"\n', ""))
    assert load_checked_config(no_utility).selection["p"] == [0.0]

    g = torch.Generator().manual_seed(0)
    save_tensors({"w": torch.randn(400, 1000, generator=g)}, tmp_path / "h.safetensors", {"method": "signed-snip"})
    save_tensors({"w": torch.randn(400, 1000, generator=g)}, tmp_path / "u.safetensors", {"method": "snip"})
    for extra, p in (([], 5e-5), (["--p", "0"], 0.0)):
        out = tmp_path / f"m{len(extra)}.safetensors"
        assert main(["select", "--harm", str(tmp_path / "h.safetensors"), "--utility", str(tmp_path / "u.safetensors"),
                     "--out", str(out), *extra]) == 0
        assert (load_mask(out).metadata["q"], load_mask(out).metadata["p"]) == (1e-5, p)
    assert main(["select", "--harm", str(tmp_path / "h.safetensors"), "--out", str(tmp_path / "h.mask")]) == 0
    assert load_mask(tmp_path / "h.mask").metadata["p"] == 0.0 and load_mask(tmp_path / "h.mask").count() == 4
