"""data_prep/: each source's conversion, the mix's deduplication, contamination filter,
determinism, bad lines and missing sources, on tiny files made here; and the real local mirror."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from data_prep import (
    arc,
    benchmarks,  # not its test_questions by name: pytest would collect it as a test
    build_mix,
    code_alpaca,
    gsm8k,
    orca,
)
from data_prep.common import Tally, normalize
from tests.conftest import SHARED_DATA


def write_jsonl(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def arc_row(row_id, stem, labels, key):
    choices = [{"text": f"option {label}", "label": label} for label in labels]
    return {"id": row_id, "question": {"stem": stem, "choices": choices}, "answerKey": key}


@pytest.fixture
def data_dir(tmp_path) -> Path:
    d = tmp_path / "data"
    write_jsonl(
        d / "gsm8k" / "train.jsonl",
        [
            {"question": "Tom has 3 apples and buys 2. How many?", "answer": "3+2=<<3+2=5>>5\n#### 5"},
            {"question": "What is 10 minus 4?", "answer": "10-4=<<10-4=6>>6\n#### 6"},
            {
                "question": "TOM has 3 apples, and buys 2.  How many",
                "answer": "3+2=<<3+2=5>>5\n#### 5",
            },  # normalised dup
        ],
    )
    write_jsonl(d / "gsm8k" / "test.jsonl", [{"question": "What is 10 minus 4?", "answer": "#### 6"}])
    write_jsonl(
        d / "arc" / "ARC-Easy" / "ARC-Easy-Train.jsonl",
        [
            arc_row("e1", "Which is a gas?", ["A", "B", "C", "D"], "C"),
            arc_row("e2", "Pick a number label.", ["1", "2", "3", "4"], "2"),
        ],
    )
    write_jsonl(
        d / "arc" / "ARC-Challenge" / "ARC-Challenge-Train.jsonl",
        [
            arc_row("c1", "Three options here?", ["A", "B", "C"], "A"),
            arc_row("c2", "Five options here?", ["A", "B", "C", "D", "E"], "E"),
            arc_row("c3", "Which is a gas?", ["A", "B", "C", "D"], "C"),  # exact duplicate of e1
        ],
    )
    write_jsonl(d / "arc" / "ARC-Easy" / "ARC-Easy-Test.jsonl", [arc_row("t1", "A test stem?", ["A", "B"], "A")])
    write_jsonl(
        d / "arc" / "ARC-Challenge" / "ARC-Challenge-Test.jsonl", [arc_row("t2", "Five options here?", ["A"], "A")]
    )
    mmlu = d / "mmlu" / "data" / "test" / "x_test.csv"
    mmlu.parent.mkdir(parents=True)
    with mmlu.open("w", newline="") as f:
        csv.writer(f).writerow(["Write a haiku.", "a", "b", "c", "d", "A"])
    write_jsonl(
        d / "orca" / "sample" / "o.jsonl",
        [
            {"id": "o1", "system_prompt": "You are careful.", "question": "Explain rain.", "response": "Water falls."},
            {"id": "o2", "system_prompt": "", "question": "Explain snow.", "response": "Frozen water falls."},
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi?"},
                    {"role": "assistant", "content": "Hello."},
                ]
            },
            {
                "input": {"messages": [{"role": "system", "content": "S."}, {"role": "user", "content": "Pick one."}]},
                "preferred_output": [{"role": "assistant", "content": "The first."}],
                "non_preferred_output": [],
            },
        ],
    )
    (d / "code_alpaca").mkdir()
    (d / "code_alpaca" / "c.json").write_text(
        json.dumps(
            [
                {"instruction": "Reverse a list in Python.", "input": "", "output": "xs[::-1]"},
                {"instruction": "Sum these.", "input": "[1, 2]", "output": "sum([1, 2])"},
                {"instruction": "Write a haiku.", "input": "", "output": "..."},  # an MMLU test question
            ]
        )
    )
    return d


def converted(module, data_dir, **kwargs):
    tally = Tally()
    return [ex.record for ex in module.examples(data_dir, tally, **kwargs)], tally


def turns(record):
    return [(t["from"], t["value"]) for t in record["conversations"]]


def test_gsm8k_keeps_the_worked_solution(data_dir):
    records, _ = converted(gsm8k, data_dir)
    assert turns(records[0]) == [("human", "Tom has 3 apples and buys 2. How many?"), ("gpt", "3+2=<<3+2=5>>5\n#### 5")]


def test_arc_maps_keys_through_each_rows_labels(data_dir):
    records, _ = converted(arc, data_dir)
    by_id = {r["id"]: turns(r) for r in records}
    assert by_id["arc_e2"][0][1] == "Pick a number label.\nA. option 1\nB. option 2\nC. option 3\nD. option 4"
    assert by_id["arc_e2"][1] == ("gpt", "B. option 2")  # key "2" is the second choice
    assert by_id["arc_c1"][0][1].count("\n") == 3 and by_id["arc_c1"][1] == ("gpt", "A. option A")
    assert by_id["arc_c2"][1] == ("gpt", "E. option E")


def test_arc_reads_the_hub_format():
    row = {
        "id": "h",
        "question": "Q?",
        "choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]},
        "answerKey": "3",
    }
    _, stem, choices, key = arc.parse_row(row)
    assert arc.render(stem, choices, key) == ("Q?\nA. x\nB. y\nC. z", "C. z")


def test_orca_formats_keep_system_prompts(data_dir):
    records, _ = converted(orca, data_dir)
    assert [turns(r) for r in records] == [
        [("system", "You are careful."), ("human", "Explain rain."), ("gpt", "Water falls.")],
        [("human", "Explain snow."), ("gpt", "Frozen water falls.")],  # an empty system prompt is no turn
        [("system", "Be brief."), ("human", "Hi?"), ("gpt", "Hello.")],
        [("system", "S."), ("human", "Pick one."), ("gpt", "The first.")],
    ]


def test_code_alpaca_with_and_without_input(data_dir):
    records, _ = converted(code_alpaca, data_dir)
    assert turns(records[0]) == [("human", "Reverse a list in Python."), ("gpt", "xs[::-1]")]
    assert turns(records[1]) == [("human", "Sum these.\n\n[1, 2]"), ("gpt", "sum([1, 2])")]


def test_tulu_rows_selected_by_source_field(tmp_path):
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    tulu = tmp_path / "tulu.jsonl"
    write_jsonl(
        tulu,
        [
            {"dataset": "open_orca", "id": "1", "messages": msgs},
            {"dataset": "code_alpaca", "id": "2", "messages": msgs},
            {"dataset": "flan_v2", "id": "3", "messages": msgs},
            {"dataset": "open_orca", "id": "4", "messages": [{"role": "user", "content": "no reply"}]},
        ],
    )
    records, tally = converted(orca, None, tulu_path=tulu)
    assert [r["id"] for r in records] == ["orca_1"] and tally.read == 2 and len(tally.malformed) == 1
    records, tally = converted(code_alpaca, None, tulu_path=tulu)
    assert [r["id"] for r in records] == ["code_alpaca_2"] and tally.read == 1


def build(data_dir, out, *extra) -> int:
    return build_mix.main(["--data_dir", str(data_dir), "--output_dir", str(out), *extra])


def test_mix_dedups_filters_and_accounts(data_dir, tmp_path):
    assert build(data_dir, tmp_path / "mix") == 0
    manifest = json.loads((tmp_path / "mix" / "manifest.json").read_text())
    s = manifest["sources"]
    assert s["gsm8k"]["dropped"] == {"duplicate (normalised)": 1, "contaminated (gsm8k test)": 1}
    assert s["arc"]["dropped"] == {"duplicate (exact)": 1, "contaminated (arc test)": 1}
    assert s["code_alpaca"]["dropped"] == {"contaminated (mmlu test)": 1}
    assert {k: v["kept"] for k, v in s.items()} == {"orca": 4, "code_alpaca": 2, "gsm8k": 1, "arc": 3}
    lines = (tmp_path / "mix" / "mix.jsonl").read_text().splitlines()
    assert len(lines) == manifest["output"]["conversations"] == 10
    assert all(len(v["inputs"][0]["sha256"]) == 64 for v in s.values())


def test_mix_is_deterministic_and_seeded(data_dir, tmp_path):
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert build(data_dir, tmp_path / name, "--seed", seed) == 0
    a, b, c = ((tmp_path / n / "mix.jsonl").read_bytes() for n in "abc")
    assert a == b and a != c


def test_bad_lines_are_counted_then_fail_over_threshold(data_dir, tmp_path, capsys):
    path = data_dir / "gsm8k" / "train.jsonl"
    path.write_text(path.read_text() + "{not json\n" + json.dumps({"question": "q"}) + "\n")
    assert build(data_dir, tmp_path / "strict") == 2
    assert "gsm8k: 2 of 5 rows malformed" in capsys.readouterr().err
    assert not (tmp_path / "strict").exists()
    assert build(data_dir, tmp_path / "lenient", "--max_bad_fraction", "0.5") == 0
    manifest = json.loads((tmp_path / "lenient" / "manifest.json").read_text())
    assert manifest["sources"]["gsm8k"]["malformed"] == 2
    assert manifest["sources"]["gsm8k"]["malformed_where"][0].endswith(
        "train.jsonl:4: not valid JSON (Expecting property name enclosed in double quotes)"
    )


def test_missing_source_names_it(data_dir, tmp_path, capsys):
    (data_dir / "arc" / "ARC-Easy" / "ARC-Easy-Train.jsonl").unlink()
    assert build(data_dir, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: arc:") and "ARC-Easy-Train.jsonl not found" in err


def test_existing_mix_survives_a_failed_build(data_dir, tmp_path):
    assert build(data_dir, tmp_path / "out") == 0
    before = (tmp_path / "out" / "mix.jsonl").read_bytes()
    (data_dir / "gsm8k" / "train.jsonl").write_text("{broken\n")
    assert build(data_dir, tmp_path / "out") == 2
    assert (tmp_path / "out" / "mix.jsonl").read_bytes() == before


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="the local mirror ../shared/data is not here")
def test_mix_from_the_local_mirror(tmp_path, capsys):
    assert build(SHARED_DATA, tmp_path / "mix") == 0
    manifest = json.loads((tmp_path / "mix" / "manifest.json").read_text())
    code_alpaca = manifest["sources"]["code_alpaca"]
    assert code_alpaca["malformed_where"] == ["code_alpaca_237: empty assistant reply",
                                              "code_alpaca_1859: empty assistant reply"]  # fmt: skip
    mix = [json.loads(line) for line in (tmp_path / "mix" / "mix.jsonl").read_text().split("\n") if line]
    assert all(t["value"].strip() for r in mix for t in r["conversations"] if t["from"] == "gpt")
    # an ARC train question holding an ARC test question whole, and train questions sharing 13 words with a test one
    dropped = {c["id"]: c for c in manifest["contaminated"]}
    assert dropped["arc_LEAP_2002_4_10246"]["shared"].startswith("mrs henderson s class has five small covered boxes")
    assert any(c["source"] == "gsm8k" for c in dropped.values())
    prompts = "\n".join(normalize(t["value"]) for r in mix for t in r["conversations"] if t["from"] == "human")
    arc_tests = benchmarks.test_questions(SHARED_DATA)["arc"]
    assert not [q for q in arc_tests if len(q.split()) >= 8 and q in prompts]  # no ARC test question inside a prompt
    s = json.loads((tmp_path / "mix" / "manifest.json").read_text())["sources"]
    assert s["gsm8k"]["converted"] == 7473 and s["arc"]["converted"] == 3370
    assert s["orca"]["stand_in"] and s["code_alpaca"]["stand_in"] and not s["gsm8k"]["stand_in"]
    capsys.readouterr()
    assert build(SHARED_DATA, tmp_path / "paper", "--expect_paper_counts") == 2
    out, err = capsys.readouterr()
    assert "gsm8k           7473           7473          7469" in out  # paper, before and after the filter
    assert "arc             3370           3370          3338" in out  # 32 dropped by the filter
    assert "orca: 284 conversations before the filter, the paper has 29683" in err
    assert not (tmp_path / "paper").exists()
