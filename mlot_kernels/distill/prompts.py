"""Prompts and answer-only labels (``../shared/docs/method.md``, "Reported results").

The student sees a zero-shot prompt ``Context: ...\nQuestion: ...\nAnswer:``; the teacher the
same query after ``shots`` worked examples (a few-shot prompt). A tokenizer with a chat template
gets every prompt through it, zero-shot too: one user turn per query, one assistant turn per
worked answer, then what the template writes before an assistant turn's content. Either model's sequence is its prompt followed by its
answer and the token that ends an answer (:func:`answer_end_id`): `` {answer}{eos}`` without a
chat template, ``{answer}{end of turn}`` with one (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for
Llama 3). The labels are the answer tokens and that end token, -100 on the prompt and padding
(the Hugging Face convention).

Any other prompt is a :class:`Conversation` (TRL's prompt/completion and messages rows,
:mod:`mlot_kernels.distill.data`), written the same way. :class:`DistillationCollator` pads a
batch of both models' sequences.
"""

import dataclasses

import torch

from mlot_kernels.losses.answers import IGNORE_INDEX


def query(example):
    """The zero-shot QA prompt of one example (without its ``Context:`` line when it has none:
    closed-book QA)."""
    context = f"Context: {example.context}\n" if example.context else ""
    return f"{context}Question: {example.question}\nAnswer:"


def templated(tokenizer):
    """Whether ``tokenizer`` renders prompts through a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def answer_text(tokenizer, answer):
    """An answer as it follows its prompt: after a space behind ``Answer:``, or as the whole
    content of an assistant turn."""
    return answer if templated(tokenizer) else f" {answer}"


def qa_messages(example, shots=()):
    """The conversation of a QA prompt: one user turn per worked example's query and one
    assistant turn per its answer, then the example's query."""
    turns = []
    for shot in shots:
        turns += [dict(role="user", content=query(shot)), dict(role="assistant", content=shot.answer)]
    return turns + [dict(role="user", content=query(example))]


def prompt(tokenizer, example, shots=()):
    """``example``'s prompt after the worked examples ``shots`` (zero-shot when empty):
    :func:`chat_prompt` of :func:`qa_messages`."""
    return chat_prompt(tokenizer, qa_messages(example, shots))


def chat_prompt(tokenizer, messages):
    """The text before the assistant's answer to ``messages`` (``{"role", "content"}`` dicts).

    With a chat template: the template's rendering of the conversation up to the answer's
    content, so that prompt and answer are exactly what the template writes (Qwen3's empty
    ``<think>`` block included). Without one: the contents in order, an assistant's content
    after a space behind the turn it answers and followed by a blank line, other turns apart by
    a blank line (the QA prompt ``Context: ...\nQuestion: ...\nAnswer: {answer}\n\n...``).
    """
    if templated(tokenizer):
        return _around_answer(tokenizer, list(messages))[0]
    text = ""
    for message in messages:
        if message["role"] == "assistant":
            text += f"{answer_text(tokenizer, message['content'])}\n\n"
        else:
            text += ("\n\n" if text and not text.endswith("\n\n") else "") + message["content"]
    return text


@dataclasses.dataclass(frozen=True)
class Conversation:
    """A prompt and its answer, tokenizer-free: ``messages`` before the answer ``completion``.
    ``text`` marks TRL's standard (text) format: without a chat template its one user message and
    its completion are written as they are, one after the other."""

    messages: tuple
    completion: str
    text: bool = False

    def render(self, tokenizer):
        """(prompt text, answer text) of this conversation for ``tokenizer``."""
        if self.text and not templated(tokenizer):
            return self.messages[0]["content"], self.completion
        return chat_prompt(tokenizer, self.messages), answer_text(tokenizer, self.completion)


_MARK = "Z9q7x"  # an answer that no template writes


def _around_answer(tokenizer, turns):
    """(before, after): the chat template's text of ``turns`` and an assistant turn, before and
    after that turn's content."""
    text = tokenizer.apply_chat_template(turns + [dict(role="assistant", content=_MARK)],
                                         tokenize=False)
    before, mark, after = text.partition(_MARK)
    if not mark:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r}: its chat "
                         "template does not write an assistant turn's content")
    return before, after


def answer_end_id(tokenizer):
    """The token that ends an answer: ``eos`` without a chat template; with one, the first token
    the template writes after an assistant turn's content (its end of turn)."""
    name = getattr(tokenizer, "name_or_path", "")
    if not templated(tokenizer):
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {name!r} has no eos token; the answers end with one")
        return tokenizer.eos_token_id
    after = _around_answer(tokenizer, [dict(role="user", content="Q")])[1]
    ids = tokenizer(after, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"tokenizer {name!r}: its chat template writes no token after an "
                         "assistant turn, so an answer's end can't be labelled")
    return ids[0]


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One tokenised sequence: the prompt's ids then the answer's, and labels (-100 on the
    prompt)."""

    input_ids: list
    labels: list

    @property
    def prompt_length(self):
        """The tokens before the first label."""
        return next((i for i, label in enumerate(self.labels) if label != IGNORE_INDEX),
                    len(self.labels))


def encode(tokenizer, prompt_text, answer, max_length, end=None):
    """``prompt_text`` then ``answer`` (:func:`answer_text`) and its end token
    (:func:`encode_text`)."""
    return encode_text(tokenizer, prompt_text, answer_text(tokenizer, answer), max_length, end)


def encode_conversation(tokenizer, conversation, max_length, end=None):
    """A :class:`Conversation` as ``tokenizer`` writes it (:func:`encode_text`)."""
    return encode_text(tokenizer, *conversation.render(tokenizer), max_length, end)


def encode_text(tokenizer, prompt_text, answer, max_length, end=None):
    """``prompt_text`` then the text ``answer`` and its end token ``end`` (default
    :func:`answer_end_id`; a caller encoding many sequences passes it once found), tokenised
    separately (no merge across the boundary), at most ``max_length`` tokens: the prompt loses
    tokens from its start first (the query is at its end), then the answer from its end."""
    end = answer_end_id(tokenizer) if end is None else end
    prompt_ids = prompt_token_ids(tokenizer, prompt_text)
    answer_ids = tokenizer(answer, add_special_tokens=False).input_ids + [end]
    answer_ids = answer_ids[:max_length - 1]
    prompt_ids = prompt_ids[max(len(prompt_ids) - (max_length - len(answer_ids)), 0):]
    return Encoded(prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids)


def prompt_token_ids(tokenizer, prompt_text):
    """The ids of a prompt: with the tokenizer's special tokens (its BOS, if it adds one), or as
    a chat template wrote them (the template writes its own)."""
    return tokenizer(prompt_text, add_special_tokens=not templated(tokenizer)).input_ids


def encode_prompt(tokenizer, prompt_text, max_length):
    """The prompt's ids alone (for generation), cut from the start to ``max_length``."""
    return prompt_token_ids(tokenizer, prompt_text)[-max_length:]


def collate(sequences, pad_id):
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` [B, T] of Encoded sequences."""
    width = max(len(s.input_ids) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        n = len(sequence.input_ids)
        ids[row, :n] = torch.tensor(sequence.input_ids)
        labels[row, :n] = torch.tensor(sequence.labels)
        mask[row, :n] = 1
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def features(index, student, teacher=None):
    """One example as :class:`DistillationCollator` reads it: its ``index`` (the teacher cache's
    key) and the student's and teacher's :class:`Encoded` sequences."""
    row = dict(index=index, input_ids=student.input_ids, labels=student.labels)
    if teacher is not None:
        row |= dict(teacher_input_ids=teacher.input_ids, teacher_labels=teacher.labels)
    return row


class DistillationCollator:
    """A batch of :func:`features` rows: the student's right-padded ``input_ids``,
    ``attention_mask`` and ``labels`` [B, T] (:func:`collate`), the teacher's as
    ``teacher_input_ids``, ``teacher_attention_mask`` and ``teacher_labels`` [B, T'] (where the
    rows have them), and ``index`` [B]."""

    def __init__(self, pad_token_id, teacher_pad_token_id=None):
        self.pad_token_id, self.teacher_pad_token_id = pad_token_id, teacher_pad_token_id

    def __call__(self, rows):
        batch = collate([Encoded(r["input_ids"], r["labels"]) for r in rows], self.pad_token_id)
        batch["index"] = torch.tensor([r["index"] for r in rows], dtype=torch.long)
        if rows and "teacher_input_ids" in rows[0]:
            teacher = collate([Encoded(r["teacher_input_ids"], r["teacher_labels"]) for r in rows],
                              self.teacher_pad_token_id)
            batch |= {f"teacher_{key}": value for key, value in teacher.items()}
        return batch


def teacher_inputs(batch):
    """The teacher's ``input_ids``, ``attention_mask`` and ``labels`` of a
    :class:`DistillationCollator` batch (None without them)."""
    inputs = {key[len("teacher_"):]: value for key, value in batch.items()
              if key.startswith("teacher_")}
    return inputs or None


def left_pad(prompts, pad_id):
    """Left-padded ``input_ids`` and ``attention_mask`` [B, T] of prompt id lists (for
    batched generation)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return dict(input_ids=ids, attention_mask=mask)
