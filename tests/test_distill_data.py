"""The distillation loop's data loaders (shipped samples of each public format, the generic
jsonl format, the synthetic demo set) and its answer metrics (SQuAD F1/EM, ROUGE-LSum)."""

import json
import pathlib
import re
import sys

import pytest

from mlot_kernels.distill.data import (DEMO_NAMES, FORMATS, METRIC, SUMMARY_QUESTION, Example,
                                       demo_examples, load_examples, write_jsonl)
from mlot_kernels.distill.metrics import (exact_match, f1, first_line, normalize_answer,
                                          rouge_lsum, score)

DATA = pathlib.Path(__file__).parent / "data"


def raw_records(name):
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


# --- the shipped samples of the public formats ------------------------------------------------

def test_qed_release_and_hub_shapes():
    raw = raw_records("qed.jsonl")
    examples = load_examples(DATA / "qed.jsonl", "qed")
    assert [e.context for e in examples] == [r["paragraph_text"] for r in raw]
    assert [e.id for e in examples] == [str(r["example_id"]) for r in raw]
    # release shape: question_text, a list of annotations (lists of spans), a repeated string
    assert examples[0].question == raw[0]["question_text"]
    assert examples[0].answer == "the engineer Ada Quill"
    assert examples[0].references == ("the engineer Ada Quill", "Ada Quill")
    # Hugging Face shape: question, one flat list of spans
    assert "question_text" not in raw[1]
    assert examples[1].question == raw[1]["question"]
    assert examples[1].references == ("About 600",)
    # one annotation of two spans: each span is a reference; no QED explanation needed
    assert examples[2].references == ("Elbury", "Mossford")
    for e in examples:  # QED is extractive
        assert all(r in e.context for r in e.references)


def test_fairytaleqa_answers():
    raw = raw_records("fairytaleqa.jsonl")
    examples = load_examples(DATA / "fairytaleqa.jsonl", "fairytaleqa")
    assert [(e.context, e.question, e.answer) for e in examples] == [
        (r["story_section"], r["question"], r["answer1"]) for r in raw]
    assert [e.id for e in examples] == ["0", "1", "2"]  # no id column: the position
    assert examples[0].references == (raw[0]["answer1"],)  # empty answer2 dropped
    assert examples[1].references == (raw[1]["answer1"], raw[1]["answer2"])
    assert examples[2].references == (raw[2]["answer1"],)  # answer2 repeats answer1


def test_dialogsum_hub_and_release_test_shapes():
    raw = raw_records("dialogsum.jsonl")
    examples = load_examples(DATA / "dialogsum.jsonl", "dialogsum")
    assert [e.context for e in examples] == [r["dialogue"] for r in raw]
    assert {e.question for e in examples} == {SUMMARY_QUESTION}
    assert [e.id for e in examples] == ["train_0", "train_1", "test_0"]  # id, else fname
    assert examples[0].references == (raw[0]["summary"],)
    assert examples[2].answer == raw[2]["summary1"]
    assert examples[2].references == (raw[2]["summary1"], raw[2]["summary2"], raw[2]["summary3"])


@pytest.mark.parametrize("format, metric", [("qed", "qa"), ("fairytaleqa", "rouge"),
                                            ("dialogsum", "rouge"), ("jsonl", "qa")])
def test_metric_per_format(format, metric):
    assert set(METRIC) == set(FORMATS)
    assert METRIC[format] == metric


def test_fanoutqa_sub_questions_closed_book(tmp_path):
    """The shipped dev set gives its single-hop sub-questions with string or number answers and
    no context (the query then has no Context line); a local file with a sub-question without
    an answer names the record and the field."""
    from mlot_kernels.distill.prompts import query

    examples = load_examples("fanoutqa", "fanoutqa")
    assert len(examples) > 1000
    assert all(e.context == "" and e.answer.strip() and e.references == (e.answer,)
               for e in examples)
    assert query(examples[0]) == f"Question: {examples[0].question}\nAnswer:"
    assert load_examples("fanoutqa", "fanoutqa", limit=7) == examples[:7]
    record = dict(id="q", question="Which?", answer={"a": "1"}, decomposition=[
        dict(id="s1", question="A?", answer="x", decomposition=[]),
        dict(id="s2", question="B?", answer=["x", "y"], decomposition=[]),
        dict(id="s3", question="C?", answer=None, decomposition=[
            dict(id="s4", question="D?", answer=3, decomposition=[])]),
        dict(id="s5", question="E?", answer=True, decomposition=[])])
    path = tmp_path / "fanout.json"
    path.write_text(json.dumps([record]))
    assert [(e.id, e.question, e.answer) for e in load_examples(str(path), "fanoutqa")] == [
        ("s1", "A?", "x"), ("s4", "D?", "3")]
    del record["decomposition"][0]["answer"]
    path.write_text(json.dumps([record]))
    with pytest.raises(ValueError, match=r"record 0, sub-question s1 \(fanoutqa format\): "
                                         r"field 'answer' must be"):
        load_examples(str(path), "fanoutqa")
    path.write_text(json.dumps([dict(id="q", question="Which?", answer="x")]))
    with pytest.raises(ValueError, match=rf"{path}: record 0 \(fanoutqa format\): expected a "
                                         "FanOutQA question with a 'decomposition' list"):
        load_examples(str(path), "fanoutqa")


def test_limit_keeps_the_first_examples():
    every = load_examples(DATA / "qed.jsonl", "qed")
    assert load_examples(DATA / "qed.jsonl", "qed", limit=2) == every[:2]
    assert load_examples(DATA / "qed.jsonl", "qed", limit=0) == []
    with pytest.raises(ValueError, match="limit must be None or an integer >= 0, got -1"):
        load_examples(DATA / "qed.jsonl", "qed", limit=-1)


# --- the generic format -----------------------------------------------------------------------

def test_jsonl_round_trip(tmp_path):
    examples = demo_examples(20, seed=3) + [
        Example("Ann lives in Oslo.", "Where?", "Oslo", ("Oslo", "in Oslo"), id="two"),
        Example("c", "q", "a", ("a",)),
        Example("c", "q", "", ("",), id="empty answer")]  # e.g. a teacher's empty generation
    write_jsonl(examples, tmp_path / "out.jsonl")
    assert load_examples(tmp_path / "out.jsonl", "jsonl") == examples
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert json.loads(lines[20])["answer"] == ["Oslo", "in Oslo"]
    assert json.loads(lines[21])["answer"] == "a"


def test_json_list_and_data_object(tmp_path):
    records = [{"context": "c1", "question": "q1", "answer": "a1"},
               {"context": "c2", "question": "q2", "answer": ["a2", "b2"], "id": "x"}]
    expected = [Example("c1", "q1", "a1", ("a1",), id="0"),
                Example("c2", "q2", "a2", ("a2", "b2"), id="x")]
    (tmp_path / "list.json").write_text(json.dumps(records))
    (tmp_path / "object.json").write_text(json.dumps({"version": 1, "data": records}))
    assert load_examples(tmp_path / "list.json", "jsonl") == expected
    assert load_examples(str(tmp_path / "object.json"), "jsonl") == expected
    (tmp_path / "bad.json").write_text(json.dumps({"rows": records}))
    with pytest.raises(ValueError, match="expected a JSON list of records"):
        load_examples(tmp_path / "bad.json", "jsonl")


# --- errors -----------------------------------------------------------------------------------

def test_missing_field_names_source_line_and_field(tmp_path):
    path = write_lines(tmp_path / "gaps.jsonl", [
        json.dumps({"context": "c", "question": "q", "answer": "a"}),
        "",  # blank lines are skipped but counted
        json.dumps({"context": "c", "answer": "a"})])
    with pytest.raises(ValueError, match=r"gaps\.jsonl: line 3 .*missing field 'question'"):
        load_examples(path, "jsonl")


@pytest.mark.parametrize("answers", [None, [], [[]]])
def test_qed_without_nq_answers(tmp_path, answers):
    record = {"paragraph_text": "p", "question_text": "q", "example_id": 1}
    if answers is not None:
        record["original_nq_answers"] = answers
    path = write_lines(tmp_path / "qed.jsonl", [json.dumps(record)])
    with pytest.raises(ValueError, match=r"line 1 .*'original_nq_answers'"):
        load_examples(path, "qed")


@pytest.mark.parametrize("record, match", [
    ({"context": "c", "question": "q", "answer": []}, "field 'answer' must be"),
    ({"context": "c", "question": "q", "answer": 3}, "field 'answer' must be a string"),
    ({"context": ["c"], "question": "q", "answer": "a"}, "field 'context' must be a string"),
    (["not", "an", "object"], "expected a JSON object, got list"),
])
def test_unusable_records(tmp_path, record, match):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(record)])
    with pytest.raises(ValueError, match=match):
        load_examples(path, "jsonl")


def test_blank_answer_in_a_public_format(tmp_path):
    record = {"story_section": "s", "question": "q", "answer1": " ", "answer2": "a"}
    path = write_lines(tmp_path / "ftqa.jsonl", [json.dumps(record)])
    with pytest.raises(ValueError, match="line 1 .*field 'answer1' must be a non-empty string"):
        load_examples(path, "fairytaleqa")


def test_invalid_json_line(tmp_path):
    path = write_lines(tmp_path / "broken.jsonl", ["{\"context\": "])
    with pytest.raises(ValueError, match="line 1 is not valid JSON"):
        load_examples(path, "jsonl")


def test_unknown_format_and_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"format must be one of \('qed', .*got 'squad'"):
        load_examples(DATA / "qed.jsonl", "squad")
    path = write_lines(tmp_path / "data.csv", ["context,question,answer"])
    suffixes = r"\('\.jsonl', '\.json', '\.parquet'\)"
    with pytest.raises(ValueError, match=rf"data\.csv.*'\.csv'.*{suffixes}"):
        load_examples(path, "jsonl")
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        load_examples(tmp_path / "missing.jsonl", "jsonl")


def test_missing_optional_packages(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now fails
    with pytest.raises(ImportError, match="pip install datasets"):
        load_examples("qed", "qed", split="validation")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = write_lines(tmp_path / "rows.parquet", ["not read"])
    with pytest.raises(ImportError, match="pip install pyarrow"):
        load_examples(path, "jsonl")


def test_example_references_start_with_the_answer():
    with pytest.raises(ValueError, match="must start with the answer 'a'"):
        Example("c", "q", "a", ("b", "a"))
    with pytest.raises(ValueError, match="must start with the answer"):
        Example("c", "q", "a", ())


# --- the synthetic demo set -------------------------------------------------------------------

def test_demo_is_deterministic_per_seed():
    assert demo_examples(50, seed=7) == demo_examples(50, seed=7)
    assert demo_examples(50, seed=7) != demo_examples(50, seed=8)
    assert demo_examples(10, seed=7) == demo_examples(50, seed=7)[:10]
    assert [e.id for e in demo_examples(3, seed=7)] == ["demo-7-0", "demo-7-1", "demo-7-2"]
    assert demo_examples(0, seed=7) == []


def test_demo_answers_are_spans_about_the_person_asked():
    examples = demo_examples(300, seed=0)
    templates = set()
    for e in examples:
        asked = [n for n in DEMO_NAMES if re.search(rf"\b{n}\b", e.question)]
        assert len(asked) == 1, e
        name = asked[0]
        sentences = [s + "." for s in e.context.rstrip(".").split(". ")]
        assert 2 <= len(sentences) <= 4
        answer = re.compile(rf"\b{re.escape(e.answer)}\b")
        assert any(s.startswith(name + " ") and answer.search(s) for s in sentences), e
        assert e.references == (e.answer,)
        assert 1 <= len(e.answer.split()) <= 3
        assert len(e.context.split()) < 40
        templates.add(" ".join(w for w in e.question.split()[:-1] if name not in w))
    assert len(templates) >= 5, templates
    assert len({e.context for e in examples}) > 250  # varied, not a few repeated contexts


def test_demo_rejects_negative_sizes():
    with pytest.raises(ValueError, match="n must be an integer >= 0, got -1"):
        demo_examples(-1, seed=0)


# --- metrics ----------------------------------------------------------------------------------

def test_first_line():
    assert first_line("  Oslo \nMara lives in Oslo.") == "Oslo"
    assert first_line("\nsecond") == ""
    assert first_line("") == ""


def test_squad_normalisation():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("Eiffel-Tower") == "eiffeltower"  # punctuation removed, not spaced
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_exact_match():
    assert exact_match("the Eiffel Tower.", ["Eiffel Tower"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    assert exact_match("Paris", ["London", "paris!"]) == 1.0  # best over references


def test_f1():
    assert f1("the Eiffel tower", ["Eiffel Tower"]) == 1.0
    # 2 of the prediction's 5 tokens (tall eiffel tower in paris) match both reference tokens
    precision, recall = 2 / 5, 2 / 2
    assert f1("the tall Eiffel tower in Paris", ["Eiffel Tower"]) == pytest.approx(
        2 * precision * recall / (precision + recall))
    # tokens count as a multiset: "tower tower" shares one token with "tower"
    precision, recall = 1 / 2, 1 / 1
    assert f1("tower tower", ["tower"]) == pytest.approx(
        2 * precision * recall / (precision + recall))
    assert f1("Paris", ["London", "Paris France"]) == pytest.approx(f1("Paris", ["Paris France"]))
    assert f1("Paris", ["London", "Paris France"]) > 0
    assert f1("Rome", ["Paris"]) == 0.0
    assert f1("", ["Paris"]) == 0.0
    assert f1("the", ["a"]) == 0.0  # both normalise to empty: no common token (SQuAD v1.1)


def test_reference_arguments():
    with pytest.raises(ValueError, match="sequence of strings, got the string 'Paris'"):
        f1("Paris", "Paris")
    with pytest.raises(ValueError, match="at least one reference"):
        exact_match("Paris", [])


def test_rouge_lsum():
    assert rouge_lsum("the cat sat on the mat", ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert rouge_lsum("the cat sat", ["a dog ran away"]) == 0.0
    # LCS "the cat": precision 2/3, recall 2/4
    precision, recall = 2 / 3, 2 / 4
    partial = rouge_lsum("the cat sat", ["the cat ran away"])
    assert 0 < partial < 1
    assert partial == pytest.approx(2 * precision * recall / (precision + recall))
    assert rouge_lsum("the cat sat", ["a dog ran away", "the cat sat"]) == pytest.approx(1.0)
    assert rouge_lsum("The cats run", ["the cat running"]) == pytest.approx(1.0)  # stemmed


def test_rouge_lsum_splits_sentences_on_newlines():
    prediction, reference = "the dog ran\nthe cat sat", "the cat sat\nthe dog ran"
    # one sentence per line: each reference sentence is matched in full
    assert rouge_lsum(prediction, [reference]) == pytest.approx(1.0)
    # one sentence: the longest common subsequence is 3 of 6 tokens
    assert rouge_lsum(prediction.replace("\n", " "), [reference.replace("\n", " ")]) == \
        pytest.approx(0.5)


def test_score_averages_in_percent():
    predictions = ["the Eiffel Tower", "Paris", "tower tower"]
    references = [("Eiffel Tower",), ("London", "paris"), ("tower",)]
    result = score(predictions, references, "qa")
    assert result.keys() == {"f1", "em"}
    assert result["em"] == pytest.approx(100 * 2 / 3)
    assert result["f1"] == pytest.approx(100 * (1 + 1 + f1("tower tower", ["tower"])) / 3)
    result = score(["the cat sat", "a dog"], [("the cat sat",), ("the cat",)], "rouge")
    assert result == {"rougeLsum": pytest.approx(50.0)}


def test_score_errors():
    with pytest.raises(ValueError, match="one entry per prediction: expected 2, got 1"):
        score(["a", "b"], [("a",)], "qa")
    with pytest.raises(ValueError, match=r"metric must be one of \('qa', 'rouge'\), got 'bleu'"):
        score(["a"], [("a",)], "bleu")
    with pytest.raises(ValueError, match="at least one prediction"):
        score([], [], "rouge")
