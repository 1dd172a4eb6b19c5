"""Prompts, answer-only labels and batching of the distillation loop, on the demo's tokenizers."""

import pytest

from mlot_kernels.losses.answers import IGNORE_INDEX
from mlot_kernels.distill.data import demo_examples
from mlot_kernels.distill.models import load_tokenizer
from mlot_kernels.distill.prompts import collate, encode, left_pad, prompt, query


@pytest.fixture(scope="module", params=["teacher", "student"])
def tokenizer(request, tiny):
    return load_tokenizer(getattr(tiny, f"{request.param}_tokenizer"))


def test_student_prompt_is_zero_shot_context_question_answer():
    example = demo_examples(1, seed=3)[0]
    assert query(example) == f"Context: {example.context}\nQuestion: {example.question}\nAnswer:"


def test_teacher_prompt_has_worked_examples_then_the_query(tokenizer):
    shots, (example,) = demo_examples(2, seed=4), demo_examples(1, seed=5)
    text = prompt(tokenizer, example, shots)
    assert text.endswith(query(example))
    for shot in shots:
        assert f"{query(shot)} {shot.answer}\n\n" in text
    assert prompt(tokenizer, example) == query(example)


def test_chat_template_builds_user_and_assistant_turns(tiny):
    tokenizer = load_tokenizer(tiny.teacher_tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    shot, example = demo_examples(2, seed=6)
    assert prompt(tokenizer, example, [shot]) == (
        f"<user>{query(shot)}<assistant>{shot.answer}<user>{query(example)}<assistant>")
    assert prompt(tokenizer, example) == f"<user>{query(example)}<assistant>"
    with pytest.raises(ValueError, match="writes no token after an assistant turn"):
        encode(tokenizer, prompt(tokenizer, example), example.answer, 512)
    tokenizer.chat_template = "{% for m in messages %}{{ m.role }}{% endfor %}"
    with pytest.raises(ValueError, match="does not write an assistant turn's content"):
        prompt(tokenizer, example)


def test_labels_are_the_answer_and_eos_only(tokenizer):
    for example in demo_examples(5, seed=7):
        text = query(example)
        encoded = encode(tokenizer, text, example.answer, max_length=512)
        answer = [t for t in encoded.labels if t != IGNORE_INDEX]
        n_prompt = len(encoded.labels) - len(answer)
        assert encoded.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert encoded.input_ids[n_prompt:] == answer
        assert answer[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(answer[:-1]).strip() == example.answer
        assert tokenizer.decode(encoded.input_ids[:n_prompt]) == text


def test_truncation_cuts_the_prompt_from_its_start(tokenizer):
    example = demo_examples(1, seed=8)[0]
    full = encode(tokenizer, query(example), example.answer, max_length=512)
    n_answer = sum(t != IGNORE_INDEX for t in full.labels)
    cut = encode(tokenizer, query(example), example.answer, max_length=n_answer + 3)
    assert len(cut.input_ids) == n_answer + 3
    assert cut.input_ids == full.input_ids[-(n_answer + 3):]
    assert cut.labels == full.labels[-(n_answer + 3):]
    tiny_budget = encode(tokenizer, query(example), example.answer, max_length=2)
    assert len(tiny_budget.input_ids) == 2 and tiny_budget.labels[0] == IGNORE_INDEX


def test_collate_pads_right_and_left_pad_pads_left(tokenizer):
    sequences = [encode(tokenizer, query(e), e.answer, 512) for e in demo_examples(3, seed=9)]
    batch = collate(sequences, tokenizer.pad_token_id)
    width = max(len(s.input_ids) for s in sequences)
    assert batch["input_ids"].shape == (3, width)
    for row, s in enumerate(sequences):
        n = len(s.input_ids)
        assert batch["input_ids"][row, :n].tolist() == s.input_ids
        assert batch["labels"][row, :n].tolist() == s.labels
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
    left = left_pad([s.input_ids for s in sequences], tokenizer.pad_token_id)
    for row, s in enumerate(sequences):
        n = len(s.input_ids)
        assert left["input_ids"][row, width - n:].tolist() == s.input_ids
        assert left["attention_mask"][row].sum() == n and left["attention_mask"][row, -1] == 1


def test_tokenizer_without_eos_is_refused(tiny):
    tokenizer = load_tokenizer(tiny.student_tokenizer)
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="no eos token"):
        encode(tokenizer, "Context: x", "y", 16)


def test_demo_tokenizers_are_deterministic_and_differ(tiny, tmp_path):
    """The demo trains the same tokenizers on every run, and the two split an answer
    differently (different vocabularies and token sequences)."""
    from mlot_kernels.distill import demo
    from mlot_kernels.distill.data import load_examples

    again = demo.train_tokenizers(demo.corpus(load_examples(tiny.train, "jsonl")),
                                  demo.SIZES["quick"], str(tmp_path))
    for name in ("teacher", "student"):
        with open(f"{again[name]}/tokenizer.json") as a, \
                open(f"{getattr(tiny, name + '_tokenizer')}/tokenizer.json") as b:
            assert a.read() == b.read(), name
    teacher, student = load_tokenizer(tiny.teacher_tokenizer), load_tokenizer(tiny.student_tokenizer)
    assert len(teacher) != len(student)
    answer = " a baker in Oslo"
    assert teacher.tokenize(answer) != student.tokenize(answer)
