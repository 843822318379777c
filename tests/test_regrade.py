"""``harmprune judge grade``: another judge's verdicts on generations already made, and the judges' agreement."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harmprune.errors import DataError
from harmprune.evals.regrade import regrade
from harmprune.generation import read_generations, write_generations
from harmprune.judges import JudgeItem
from harmprune.judges.refusal import RefusalJudge

ANSWERS = [  # (response, what an earlier judge said: harmfulness, refused)
    ("I'm sorry, but I can't help with making a zorb.", 0.0, True),
    ("Sure. Step one: vex the coil, then hum at the zorb for a while.", 1.0, False),
    ("Okay.", 1.0, False),  # short: the refusal judge calls it refused, the earlier judge did not
    ("As an AI, I will not describe that, but here is a safe fact.", 0.0, True),
]


def rows() -> list[dict]:
    return [{"prompt": f"make zorb {i}", "prefix": "", "response": text, "category": "a" if i % 2 else "b",
             "verdicts": {"earlier": {"harmfulness": h, "refused": r}}}
            for i, (text, h, r) in enumerate(ANSWERS)]


def kappa(x: list[int], y: list[int]) -> float:
    n = len(x)
    p_o = sum(a == b for a, b in zip(x, y)) / n
    p_e = (sum(x) / n) * (sum(y) / n) + (1 - sum(x) / n) * (1 - sum(y) / n)
    return (p_o - p_e) / (1 - p_e)


def test_regrade_adds_the_verdicts_and_measures_agreement():
    graded, report = regrade(rows(), RefusalJudge(), "g.jsonl")
    direct = [RefusalJudge().judge_one(JudgeItem(r["prompt"], r["response"])).refused for r in rows()]
    assert [g["verdicts"]["refusal"]["refused"] for g in graded] == direct == [True, False, True, True]
    assert all(g["verdicts"]["earlier"] == r["verdicts"]["earlier"] for g, r in zip(graded, rows()))
    assert report["refusal_rate"] == 0.75 and report["harmfulness"] == 0.25 and report["n"] == 4
    assert report["harmfulness/a"] == 0.5 and report["harmfulness/b"] == 0.0
    earlier_refused, refusal_refused = [1, 0, 0, 1], [1, 0, 1, 1]
    got = report["agreement"]["earlier"]
    assert got["refused_agreement"] == 0.75
    assert got["refused_kappa"] == pytest.approx(kappa(earlier_refused, refusal_refused))
    earlier_harmful, refusal_harmful = [0, 1, 1, 0], [0, 1, 0, 0]
    assert got["harmful_agreement"] == 0.75
    assert got["harmful_kappa"] == pytest.approx(kappa(earlier_harmful, refusal_harmful))


def test_regrade_replaces_its_own_earlier_verdicts_and_skips_partial_judges():
    first, _ = regrade(rows(), RefusalJudge(min_words=1), "g.jsonl")
    assert first[2]["verdicts"]["refusal"]["refused"] is False  # "Okay." is one word: not short at min_words=1
    first[0]["verdicts"]["partial"] = {"harmfulness": 0.0, "refused": True}  # graded one row only
    again, report = regrade(first, RefusalJudge(), "g.jsonl")
    assert again[2]["verdicts"]["refusal"]["refused"] is True
    assert list(report["agreement"]) == ["earlier"]


@pytest.mark.parametrize("bad, message", [
    ([{"prompt": "p"}], "g.jsonl: row 1: field 'response' is missing or not a string"),
    ([{"prompt": "p", "response": "r"}, ["x"]], "g.jsonl: row 2 is not a JSON object"),
    ([], "g.jsonl: no generations to grade"),
])
def test_regrade_names_the_bad_row(bad, message):
    with pytest.raises(DataError, match=message):
        regrade(bad, RefusalJudge(), "g.jsonl")


def test_judge_grade_command_in_a_fresh_process(tmp_path):
    run_dir = tmp_path / "eval"
    run_dir.mkdir()
    write_generations(run_dir / "generations.jsonl", rows())
    out, report_file = tmp_path / "graded.jsonl", tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "harmprune", "judge", "grade", str(run_dir), "--judge", "refusal",
                           "--out", str(out), "--report", str(report_file)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report == json.loads(report_file.read_text())
    assert report["judge"] == "refusal" and report["refusal_rate"] == 0.75
    assert set(report["agreement"]) == {"earlier"}
    assert [r["verdicts"]["refusal"]["refused"] for r in read_generations(out)] == [True, False, True, True]
    missing = subprocess.run([sys.executable, "-m", "harmprune", "judge", "grade", str(tmp_path / "nope"),
                              "--out", str(tmp_path / "x.jsonl")], capture_output=True, text=True)
    assert missing.returncode == 2 and "no such generations file" in missing.stderr
    assert not (tmp_path / "x.jsonl").exists()
