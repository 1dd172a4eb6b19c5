"""Question-answering and summarisation examples for the distillation loop.

Every dataset becomes a list of :class:`Example` (context, question, training answer, all
reference answers). Five formats are read, from a local file (``.jsonl``, ``.json``,
``.parquet``) or from the Hugging Face hub (needs the ``datasets`` package):

- ``qed``: Google's QED (``google-research-datasets/qed``), extractive QA;
- ``fairytaleqa``: FairytaleQA (``WorkInTheDark/FairytaleQA``), generative QA;
- ``dialogsum``: DialogSum (``knkarthick/dialogsum``), dialogue summarisation;
- ``jsonl``: this project's generic format, ``{"context", "question", "answer", "id"?}``
  with ``answer`` a string or a list of strings (the first is trained on, all are references);
- ``fanoutqa``: FanOutQA's questions over Wikipedia (a ``fanout-final-*.json`` file; the
  source ``fanoutqa`` is the dev set that PyPI's ``fanoutqa`` package ships), read as
  closed-book QA: every single-hop sub-question with a string or number answer, no context.

:data:`METRIC` gives the metric each format is scored with, as in the MultiLevelOT paper:
SQuAD F1 for QED, ROUGE-LSum for FairytaleQA and DialogSum.

:func:`demo_examples` makes a synthetic extractive-QA set for an offline demo.

:func:`conversations` reads training rows in TRL's formats (``prompt``/``completion`` and
``messages``) as well as these QA rows, for :mod:`mlot_kernels.integrations.transformers`.
"""

import dataclasses
import itertools
import json
import os
import random

from mlot_kernels.distill.prompts import Conversation, qa_messages

FORMATS = ("qed", "fairytaleqa", "dialogsum", "jsonl", "fanoutqa")
METRIC = {"qed": "qa", "fairytaleqa": "rouge", "dialogsum": "rouge", "jsonl": "qa",
          "fanoutqa": "qa"}
HUB_NAMES = {
    "qed": "google-research-datasets/qed",
    "fairytaleqa": "WorkInTheDark/FairytaleQA",
    "dialogsum": "knkarthick/dialogsum",
}
SUFFIXES = (".jsonl", ".json", ".parquet")
SUMMARY_QUESTION = "What is a summary of this dialogue?"


@dataclasses.dataclass(frozen=True)
class Example:
    """One example: the model reads ``context`` and ``question`` and is trained to produce
    ``answer``; generations are scored against every string in ``references``
    (``references[0] == answer``)."""

    context: str
    question: str
    answer: str
    references: tuple[str, ...]
    id: str = ""

    def __post_init__(self):
        if not self.references or self.references[0] != self.answer:
            raise ValueError(f"Example.references must start with the answer {self.answer!r}, "
                             f"got {self.references!r}")


class _BadRecord(Exception):
    """A record lacks a field or holds it in an unusable shape; load_examples says where."""


def _text(record, *names, empty=False):
    """The value of the first of ``names`` present in ``record``: a string, non-blank unless
    ``empty``."""
    for name in names:
        if name in record and record[name] is not None:
            value = record[name]
            if not isinstance(value, str) or not (empty or value.strip()):
                kind = "a string" if empty else "a non-empty string"
                raise _BadRecord(f"field {name!r} must be {kind}, got {value!r:.80}")
            return value
    raise _BadRecord(f"missing field {' or '.join(map(repr, names))}")


def _distinct(strings):
    """The non-empty strings in order, without repeats."""
    return tuple(dict.fromkeys(s for s in strings if isinstance(s, str) and s.strip()))


def _record_id(record, index, *names):
    """The record's own id (the first of ``names`` present) or its 0-based position."""
    for name in names:
        if record.get(name) is not None:
            return str(record[name])
    return str(index)


def _qed(record, index):
    """QED: the official release (``question_text``; ``original_nq_answers`` a list of NQ
    annotations, each a list of ``{start, end, string}`` spans) or the Hugging Face version
    (``question``; ``original_nq_answers`` the first annotation's list of spans).

    context = ``paragraph_text``; answer = the first span's string; references = every
    distinct span string, in order (each span of a multi-span annotation counts on its own).
    ``annotation`` (QED's explanation) is not read; id = ``example_id``.
    """
    answers = record.get("original_nq_answers")
    spans = []
    for item in answers if isinstance(answers, list) else []:
        spans.extend(item if isinstance(item, list) else [item])
    strings = _distinct(span.get("string") for span in spans if isinstance(span, dict))
    if not strings:
        raise _BadRecord("missing field 'original_nq_answers' (a non-empty list of "
                         f"{{start, end, string}} spans, or of lists of them), got {answers!r:.80}")
    return Example(context=_text(record, "paragraph_text"),
                   question=_text(record, "question_text", "question"),
                   answer=strings[0], references=strings,
                   id=_record_id(record, index, "example_id"))


def _fairytaleqa(record, index):
    """FairytaleQA (Hugging Face columns ``story_name``, ``story_section``, ``question``,
    ``answer1``, ``answer2``, ...): context = ``story_section``, answer = ``answer1``,
    references = ``answer1`` and ``answer2`` when it is non-empty and different; id = the
    position (the dataset has no id column)."""
    answer = _text(record, "answer1")
    return Example(context=_text(record, "story_section"), question=_text(record, "question"),
                   answer=answer, references=_distinct([answer, record.get("answer2")]),
                   id=str(index))


def _dialogsum(record, index):
    """DialogSum: ``dialogue`` and ``summary`` (Hugging Face ``knkarthick/dialogsum``: ``id``,
    ``dialogue``, ``summary``, ``topic``), or ``summary1``..``summary3`` (the original
    release's test split, with ``fname`` for the id). context = ``dialogue``, question =
    :data:`SUMMARY_QUESTION`, answer = ``summary`` (else ``summary1``), references = every
    summary present."""
    answer = _text(record, "summary", "summary1")
    summaries = [record.get(name) for name in ("summary", "summary1", "summary2", "summary3")]
    return Example(context=_text(record, "dialogue"), question=SUMMARY_QUESTION,
                   answer=answer, references=_distinct(summaries),
                   id=_record_id(record, index, "id", "fname"))


def _generic(record, index):
    """The generic format: ``context``, ``question``, ``answer`` (a string, or a non-empty list
    of strings: the first is the answer, all are references, kept as given) and optional
    ``id``. Empty strings are kept (a teacher's generated answer may be empty), so that any
    :class:`Example` survives :func:`write_jsonl` and reading back."""
    answer = record.get("answer")
    if isinstance(answer, list):
        if not answer or not all(isinstance(a, str) for a in answer):
            raise _BadRecord(f"field 'answer' must be a string or a non-empty list of strings, "
                             f"got {answer!r:.80}")
        references = tuple(answer)
    else:
        references = (_text(record, "answer", empty=True),)
    return Example(context=_text(record, "context", empty=True),
                   question=_text(record, "question", empty=True),
                   answer=references[0], references=references,
                   id=_record_id(record, index, "id"))


def _scalar(answer):
    """Whether a FanOutQA answer is a non-empty string or a number (not a boolean)."""
    return not isinstance(answer, bool) and isinstance(answer, (str, int, float)) and \
        bool(str(answer).strip())


def _fanoutqa(record, index):
    """A FanOutQA single-hop sub-question (:func:`_fanoutqa_questions`): ``question``, a string
    or number ``answer``; context = "", id = ``id``."""
    answer = record.get("answer")
    if not _scalar(answer):
        raise _BadRecord(f"field 'answer' must be a non-empty string or a number, got "
                         f"{answer!r:.80}")
    answer = str(answer).strip()
    return Example(context="", question=_text(record, "question"), answer=answer,
                   references=(answer,), id=_record_id(record, index, "id"))


def _fanoutqa_questions(source, records):
    """(where, sub-question) for the sub-questions of each FanOutQA question in ``source``'s
    ``records``, at any depth, that have no decomposition of their own and a non-empty string or
    number answer (a list or mapping of answers is its parent's business; yes/no booleans and
    empty answers are left out)."""
    for where, record in records:
        if not isinstance(record, dict) or not isinstance(record.get("decomposition"), list):
            raise ValueError(f"{source}: {where} (fanoutqa format): expected a FanOutQA "
                             f"question with a 'decomposition' list, got {record!r:.80}")
        pending = list(record["decomposition"])
        while pending:
            sub = pending.pop(0)
            if isinstance(sub, dict) and sub.get("decomposition"):
                pending[:0] = sub["decomposition"]
            elif not isinstance(sub, dict) or "answer" not in sub or _scalar(sub["answer"]):
                name = sub.get("id", "without an id") if isinstance(sub, dict) else repr(sub)[:40]
                yield f"{where}, sub-question {name}", sub


_CONVERT = {"qed": _qed, "fairytaleqa": _fairytaleqa, "dialogsum": _dialogsum, "jsonl": _generic,
            "fanoutqa": _fanoutqa}


def _read_jsonl(path):
    """(where, record) for each non-blank line of a JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield f"line {number}", json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}: line {number} is not valid JSON ({error})") from None


def _read_json(path):
    """(where, record) for each object of a JSON list, or of the ``"data"`` list of a JSON
    object."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records or an object with a 'data' "
                         f"list, got {type(data).__name__}")
    return ((f"record {i}", record) for i, record in enumerate(data))


def _read_parquet(path):
    """(where, record) for each row of a Parquet file (needs pyarrow)."""
    try:
        import pyarrow.parquet
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    rows = pyarrow.parquet.read_table(path).to_pylist()
    return ((f"record {i}", row) for i, row in enumerate(rows))


def _read_hub(source, format, split):
    """(where, record) for each row of a Hugging Face hub dataset's split."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{source!r} is not a local file, and loading it from the Hugging Face "
                          "hub needs the datasets package: pip install datasets (or give a local "
                          f"{'/'.join(SUFFIXES)} file)") from None
    name = HUB_NAMES[format] if source == format and format in HUB_NAMES else source
    rows = datasets.load_dataset(name, split=split)
    return ((f"record {i}", row) for i, row in enumerate(rows))


def _records(source, format, split):
    """(where, record) pairs of a local file or a hub dataset (FanOutQA's sub-questions for
    format ``fanoutqa``)."""
    if format == "fanoutqa":
        if source == format and not os.path.exists(source):
            from mlot_kernels.distill import assets
            source = assets.path("fanoutqa")
        return _fanoutqa_questions(source, _records(source, "jsonl", split))
    if os.path.isfile(source):
        suffix = os.path.splitext(source)[1].lower()
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
        if suffix not in readers:
            raise ValueError(f"source {source!r} has suffix {suffix!r}; local files must end "
                             f"in one of {SUFFIXES}")
        return readers[suffix](source)
    if os.path.splitext(source)[1].lower() in SUFFIXES:
        raise FileNotFoundError(f"source {source!r} looks like a local file but does not exist")
    return _read_hub(source, format, split)


def load_examples(source, format, split="train", limit=None):
    """The first ``limit`` (all when None) examples of ``source`` read as ``format``.

    ``source`` is a local ``.jsonl`` / ``.json`` / ``.parquet`` file (``split`` is then
    ignored) or else a Hugging Face hub dataset name (``source == format`` picks the dataset
    of :data:`HUB_NAMES`), whose ``split`` is read.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or an integer >= 0, got {limit!r}")
    source = os.fspath(source)
    convert = _CONVERT[format]
    examples = []
    records = itertools.islice(_records(source, format, split), limit)
    for index, (where, record) in enumerate(records):
        try:
            if not isinstance(record, dict):
                raise _BadRecord(f"expected a JSON object, got {type(record).__name__}")
            examples.append(convert(record, index))
        except _BadRecord as error:
            raise ValueError(f"{source}: {where} ({format} format): {error}") from None
    return examples


def _messages(record, name):
    """``record[name]``: a non-empty list of ``{"role": str, "content": str}`` messages."""
    messages = record.get(name)
    if not isinstance(messages, list) or not messages:
        raise _BadRecord(f"field {name!r} must be a non-empty list of messages, got "
                         f"{messages!r:.80}")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise _BadRecord(f"field {name!r}: message {i} must be an object with string 'role' "
                             f"and 'content', got {message!r:.80}")
    return [dict(role=m["role"], content=m["content"]) for m in messages]


def _conversation(record):
    """The :class:`Conversation` of one training row in one of TRL's formats or this project's
    QA format (:func:`conversations`)."""
    if "messages" in record:
        messages = _messages(record, "messages")
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise _BadRecord("field 'messages' must end with an 'assistant' message (the "
                             f"completion) after at least one other, got roles "
                             f"{[m['role'] for m in messages]}")
        return Conversation(tuple(messages[:-1]), messages[-1]["content"])
    if "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        for name, value in (("prompt", prompt), ("completion", completion)):
            if value is None:
                raise _BadRecord(f"missing field {name!r} (TRL's prompt/completion format)")
        if isinstance(prompt, str) and isinstance(completion, str):
            return Conversation((dict(role="user", content=prompt),), completion, text=True)
        if isinstance(prompt, list) and isinstance(completion, list):
            answer = _messages(record, "completion")
            if len(answer) != 1 or answer[0]["role"] != "assistant":
                raise _BadRecord("field 'completion' must hold one 'assistant' message, got "
                                 f"roles {[m['role'] for m in answer]}")
            return Conversation(tuple(_messages(record, "prompt")), answer[0]["content"])
        raise _BadRecord("fields 'prompt' and 'completion' must both be strings (standard) or "
                         f"both lists of messages (conversational), got "
                         f"{type(prompt).__name__} and {type(completion).__name__}")
    if "question" in record or "answer" in record:
        example = _generic(record, 0)
        return Conversation(tuple(qa_messages(example)), example.answer)
    raise _BadRecord("expected TRL's 'prompt' and 'completion' or 'messages' fields, or this "
                     f"project's 'question' and 'answer'; got fields {sorted(record)}")


def conversations(rows, name="dataset"):
    """The :class:`Conversation` of every row of ``rows`` (a list, a ``datasets.Dataset`` or
    any iterable of dicts), or a ValueError naming the row and the field.

    Rows are read as TRL's formats: standard ``{"prompt": str, "completion": str}``;
    conversational ``{"messages": [...]}`` (the last message, the assistant's, is the
    completion) or ``{"prompt": [messages], "completion": [one assistant message]}``; or this
    project's QA rows (``context``, ``question``, ``answer``, as ``jsonl``) and
    :class:`Example`. Extra fields are ignored.
    """
    out = []
    for index, record in enumerate(rows):
        if isinstance(record, Example):
            out.append(Conversation(tuple(qa_messages(record)), record.answer))
            continue
        try:
            if not isinstance(record, dict):
                raise _BadRecord(f"expected a dict, got {type(record).__name__}")
            out.append(_conversation(record))
        except _BadRecord as error:
            raise ValueError(f"{name}: row {index}: {error}") from None
    return out


def write_jsonl(examples, path):
    """Write ``examples`` in the generic ``jsonl`` format, one object per line; ``answer`` is
    the list of references when there are several, so ``load_examples(path, "jsonl")`` gives
    the same examples back."""
    with open(path, "w", encoding="utf-8") as f:
        for example in examples:
            answer = list(example.references) if len(example.references) > 1 else example.answer
            record = {"id": example.id, "context": example.context,
                      "question": example.question, "answer": answer}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


# The demo's vocabulary: each list is small enough for a tiny BPE tokenizer to cover.
DEMO_NAMES = (
    "Mara", "Tomas", "Lena", "Omar", "Ines", "Pavel", "Nora", "Kofi", "Elin", "Ravi",
    "Sofia", "Bruno", "Yara", "Felix", "Hana", "Diego", "Ida", "Marco", "Leila", "Jonas",
    "Aiko", "Emil", "Zara", "Luca", "Vera", "Samir", "Greta", "Hugo", "Nadia", "Oscar",
    "Rosa", "Timo", "Alma", "Karim", "Petra", "Viktor", "Maya", "Anton", "Selma", "Ivan",
)
DEMO_CITIES = (
    "Oslo", "Lima", "Cairo", "Dublin", "Quito", "Porto", "Riga", "Turin", "Bergen", "Lyon",
    "Krakow", "Seville", "Hanoi", "Nairobi", "Osaka", "Perth", "Tunis", "Malmo", "Ghent",
    "Basel", "Leeds", "Zagreb", "Graz", "Tallinn", "Vilnius", "Bilbao", "Accra", "Dakar",
    "Delhi", "Kyoto", "Denver", "Austin", "Boston", "Toronto", "Halifax", "Auckland", "Cusco",
    "Havana", "Madrid", "Vienna",
)
DEMO_JOBS = (
    "a baker", "a nurse", "a teacher", "a pilot", "a farmer", "a painter", "a doctor", "a chef",
    "a plumber", "a dentist", "a writer", "a tailor", "a gardener", "a lawyer", "a driver",
    "a singer", "a builder", "a potter", "an actor", "an editor", "an engineer", "an architect",
    "a librarian", "a banker", "a florist", "a mechanic", "a judge", "a carpenter", "a poet",
    "a barber",
)
DEMO_PETS = (
    "cat", "dog", "rabbit", "parrot", "hamster", "turtle", "goldfish", "pony", "goat", "ferret",
    "lizard", "canary", "snake", "mouse", "frog", "duck", "hen", "pig", "owl", "donkey",
    "llama", "sheep", "crab", "gecko", "puppy",
)
DEMO_FOODS = (
    "rice", "soup", "bread", "cheese", "apples", "pasta", "noodles", "salad", "beans", "fish",
    "pancakes", "olives", "grapes", "carrots", "eggs", "honey", "plums", "dumplings", "lentils",
    "pizza", "pears", "oranges", "waffles", "tomatoes", "mangoes", "potatoes", "berries", "figs",
    "melons", "peaches",
)
DEMO_COLOURS = (
    "red", "blue", "green", "yellow", "black", "white", "purple", "pink", "brown", "grey",
    "silver", "golden",  # no vowel-initial colour: the sentence reads "has a {colour} ..."
)
DEMO_OBJECTS = (
    "bicycle", "car", "hat", "coat", "boat", "kite", "umbrella", "scarf", "bag", "house", "door",
    "lamp", "chair", "jacket", "tent",
)
DEMO_MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)
DEMO_INSTRUMENTS = (
    "the piano", "the violin", "the guitar", "the drums", "the flute", "the cello", "the harp",
    "the trumpet", "the banjo", "the clarinet", "the organ", "the accordion",
)

# kind: (sentence, question, answer slot, {slot: word list})
_DEMO_FACTS = {
    "city": ("{name} lives in {city}.", "Where does {name} live?", "city",
             {"city": DEMO_CITIES}),
    "job": ("{name} works as {job}.", "What does {name} work as?", "job", {"job": DEMO_JOBS}),
    "pet": ("{name} has a pet {pet}.", "What pet does {name} have?", "pet", {"pet": DEMO_PETS}),
    "food": ("{name} likes to eat {food}.", "What does {name} like to eat?", "food",
             {"food": DEMO_FOODS}),
    "colour": ("{name} has a {colour} {object}.", "What colour is {name}'s {object}?", "colour",
               {"colour": DEMO_COLOURS, "object": DEMO_OBJECTS}),
    "month": ("{name} was born in {month}.", "When was {name} born?", "month",
              {"month": DEMO_MONTHS}),
    "music": ("{name} plays {music}.", "What instrument does {name} play?", "music",
              {"music": DEMO_INSTRUMENTS}),
}


def _demo_example(rng, id):
    """One demo example: 2-4 facts about 1-2 people, a question on one of them."""
    people = rng.sample(DEMO_NAMES, rng.randint(1, 2))
    pairs = [(name, kind) for name in people for kind in _DEMO_FACTS]
    facts = []
    for name, kind in rng.sample(pairs, rng.randint(2, 4)):  # distinct (person, kind) pairs
        sentence, question, slot, words = _DEMO_FACTS[kind]
        values = {key: rng.choice(options) for key, options in words.items()}
        facts.append((sentence.format(name=name, **values), question.format(name=name, **values),
                      values[slot]))
    _, question, answer = rng.choice(facts)
    context = " ".join(sentence for sentence, _, _ in facts)
    return Example(context=context, question=question, answer=answer, references=(answer,), id=id)


def demo_examples(n, seed):
    """``n`` synthetic extractive-QA examples, the same for the same ``(n, seed)``.

    Each context states 2-4 short facts (where someone lives, their job, pet, favourite food,
    the colour of a thing they own, birth month, instrument) about one or two people drawn
    from the ``DEMO_*`` word lists, e.g. "Mara lives in Oslo. Tomas works as a baker."; the
    question asks one fact of one person ("What does Tomas work as?") and the answer is its
    span in the context ("a baker"). A person holds each kind of fact at most once, so the
    answer is unambiguous. ids are ``f"demo-{seed}-{i}"``.
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    rng = random.Random(seed)
    return [_demo_example(rng, f"demo-{seed}-{i}") for i in range(n)]
