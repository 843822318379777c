"""Data loading: every known schema, overrides, filters, sampling and the error paths."""

from __future__ import annotations

import json

import pytest

from harmprune.data import DataError, Record, load_records, records_digest, sample, write_jsonl


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("chat.jsonl",
         json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                     "category": "c"}) + "\n",
         Record("q", "a", "c")),
        ("pr.json", json.dumps([{"prompt": "q", "response": "a"}]), Record("q", "a", None)),
        ("io.jsonl", json.dumps({"instruction": "q", "output": "a", "generator": "g"}) + "\n", Record("q", "a")),
        ("adv.csv", "goal,target\nq,a\n", Record("q", "a")),
        ("sr.csv", "category,source,forbidden_prompt\nfraud,x,q\n", Record("q", None, "fraud")),
        ("sst.csv", "id,harm_area,counter,category,prompts_final\n1,Scams,1,c,q\n", Record("q", None, "Scams")),
        ("xs.csv", "id,prompt,type,label,focus,note\n1,q,homonyms,safe,f,n\n", Record("q", None, "homonyms")),
        ("em.yaml", "- id: q1\n  paraphrases: [q, q2]\n  type: free_form\n", Record("q", None, "q1")),
    ],
)
def test_known_schemas(tmp_path, name, text, expected):
    recs = load_records(write(tmp_path / name, text))
    assert recs == [expected]
    assert recs[0].source["file"].endswith(name)


def test_field_overrides_and_category_filter(tmp_path):
    path = write(tmp_path / "d.csv", "q,a,kind\nq1,a1,x\nq2,a2,y\nq3,a3,x\n")
    with pytest.raises(DataError, match="unknown schema"):
        load_records(path)
    recs = load_records(path, prompt_field="q", response_field="a", category_field="kind", category="x")
    assert [r.prompt for r in recs] == ["q1", "q3"] and all(r.category == "x" for r in recs)
    assert len(load_records(path, prompt_field="q", category_field="kind", category="x,y")) == 3


def test_errors_name_the_file_and_field(tmp_path):
    path = write(tmp_path / "d.csv", "goal,target,cat\nq1,a1,x\nq2,,y\n")
    with pytest.raises(DataError, match=r"d\.csv.*'nope'"):
        load_records(path, prompt_field="nope")
    with pytest.raises(DataError, match=r"d\.csv.*response field 'resp'"):
        load_records(path, response_field="resp")
    with pytest.raises(DataError, match=r"d\.csv: row 1 has an empty response"):
        load_records(path, require_response=True)
    assert len(load_records(path, require_response=True, skip_empty=True)) == 1
    with pytest.raises(DataError, match=r"no rows left.*present: \['x', 'y'\]"):
        load_records(path, category_field="cat", category="z")
    with pytest.raises(DataError, match="no category field"):
        load_records(path, category="x")
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "missing.csv")
    with pytest.raises(DataError, match="unknown file type"):
        load_records(write(tmp_path / "d.txt", "x"))
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_records(write(tmp_path / "bad.jsonl", '{"prompt": "q"}\n{oops\n'))
    with pytest.raises(DataError, match="no user turn"):
        load_records(write(tmp_path / "m.jsonl", json.dumps({"messages": [{"role": "assistant", "content": "a"}]})))
    with pytest.raises(DataError, match="no rows"):
        load_records(write(tmp_path / "empty.csv", "goal,target\n"))


def test_seeded_sampling_keeps_order_and_is_deterministic():
    recs = [Record(str(i)) for i in range(100)]
    a, b, c = sample(recs, 10, seed=1), sample(recs, 10, seed=1), sample(recs, 10, seed=2)
    assert a == b and a != c and len(a) == 10
    assert [int(r.prompt) for r in a] == sorted(int(r.prompt) for r in a)
    assert sample(recs, 500) == recs
    with pytest.raises(DataError):
        sample(recs, 0)


def test_write_jsonl_round_trip_and_digest(tmp_path):
    recs = [Record("q", "a", "c"), Record("q2", None, None)]
    write_jsonl(recs, tmp_path / "out.jsonl")
    back = load_records(tmp_path / "out.jsonl")
    assert back == recs
    assert records_digest(back) == records_digest(recs) != records_digest(recs[:1])
