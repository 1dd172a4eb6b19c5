"""The shared-prefix cache (:mod:`mlot_kernels.distill.prefix_cache`): the prefix it finds, the
states after it against the full forward (Llama and GPT-2, float32 and bfloat16, right-padded
batches), greedy generation with and without it, the loop's loss terms with and without it, and
a model whose cached states differ getting no prefix."""

import json
import os

import pytest
import torch

from mlot_kernels.distill import evaluate as evaluate_module
from mlot_kernels.distill import prefix_cache
from mlot_kernels.distill.data import load_examples
from mlot_kernels.distill.models import HiddenStates, load_model, load_tokenizer
from mlot_kernels.distill.prefix_cache import PrefixCache, shared_prefix
from mlot_kernels.distill.prompts import collate, encode, prompt
from mlot_kernels.distill.trainer import TrainConfig, train


def test_shared_prefix_is_the_longest_common_start_below_every_prompt(gen):
    common = torch.randint(5, 50, (7,), generator=gen).tolist()
    lists = [common + torch.randint(5, 50, (int(n),), generator=gen).tolist()
             for n in torch.randint(3, 9, (5,), generator=gen)]
    lists[1][len(common)] = lists[0][len(common)] + 1  # no longer common beyond `common`
    assert shared_prefix(lists, [len(x) for x in lists]) == common
    # each remainder keeps its prompt's last token
    assert shared_prefix(lists, [5] + [len(x) for x in lists[1:]]) == common[:4]
    assert shared_prefix([lists[0]], [len(lists[0])]) == lists[0][:-1]
    assert shared_prefix([[1, 2], [3, 2]], [2, 2]) == []
    assert shared_prefix([], []) == []


def _teacher_batch(tiny, dtype="float32", model="teacher"):
    path, tokenizer = ((tiny.teacher, tiny.teacher_tokenizer) if model == "teacher" else
                       (tiny.student, tiny.student_tokenizer))
    net = load_model(path, dtype, trainable=False)
    tok = load_tokenizer(tokenizer)
    examples = load_examples(tiny.train, "jsonl")
    seqs = [encode(tok, prompt(tok, e, examples[:1]), e.answer, 512) for e in examples[1:7]]
    return net, seqs, collate(seqs, tok.pad_token_id)


@pytest.mark.parametrize("model,dtype,tolerance", [("teacher", "float32", 1e-5),
                                                    ("student", "float32", 1e-5),
                                                    ("teacher", "bfloat16", 3e-2)])
def test_the_states_after_the_prefix_equal_the_full_forward(tiny, model, dtype, tolerance):
    """A right-padded batch of one-shot prompts and answers (a Llama, and a GPT-2 with learned
    positions): the states of every sequence's real tokens after the shared prefix equal the
    full forward's."""
    net, seqs, batch = _teacher_batch(tiny, dtype, model)
    cache = prefix_cache.build(net, [s.input_ids for s in seqs], [s.prompt_length for s in seqs])
    assert cache is not None and cache.length >= 10
    shared = cache.length
    with torch.no_grad():
        full = HiddenStates(net)(batch["input_ids"], batch["attention_mask"])
        rest = HiddenStates(net)(batch["input_ids"][:, shared:], batch["attention_mask"],
                                 **cache.expand(len(seqs)))
    real = batch["attention_mask"][:, shared:].bool()
    expected = full[:, shared:][real].float()
    error = (rest[real].float() - expected).abs().max() / expected.abs().max()
    assert error <= tolerance


def test_generation_with_the_prefix_equals_generation_without(tiny, monkeypatch):
    """Greedy answers of the teacher and of the GPT-2 student, prompts of several lengths in a
    batch (remainders left-padded after the prefix): the same with and without the cache."""
    examples = load_examples(tiny.train, "jsonl")
    for path, tokenizer in ((tiny.teacher, tiny.teacher_tokenizer),
                            (tiny.student, tiny.student_tokenizer)):
        net, tok = load_model(path, trainable=False), load_tokenizer(tokenizer)
        texts = [prompt(tok, e, examples[:1]) for e in examples[1:13]]
        assert len({len(tok(t).input_ids) for t in texts}) > 1
        with_prefix = evaluate_module.generate(net, tok, texts, 6, 5, 512)
        with monkeypatch.context() as m:
            m.setattr(prefix_cache, "build", lambda *args: None)
            without = evaluate_module.generate(net, tok, texts, 6, 5, 512)
        assert with_prefix == without
        assert any(with_prefix)


def test_a_model_whose_cached_states_differ_gets_no_prefix(tiny):
    net, seqs, _ = _teacher_batch(tiny)
    base = net.base_model
    forward = base.forward

    def perturbed(*args, **kwargs):  # as if the model read its prefix otherwise
        out = forward(*args, **kwargs)
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            out.last_hidden_state = out.last_hidden_state + 1e-2
        return out
    base.forward = perturbed
    with pytest.warns(UserWarning, match="differ from its full forward"):
        assert prefix_cache.build(net, [s.input_ids for s in seqs],
                                  [s.prompt_length for s in seqs]) is None


@pytest.mark.parametrize("method,preset", [("mlot", "paper"), ("mlot", "official"),
                                           ("uld", "paper")])
@pytest.mark.parametrize("loss_from", ["hidden", "logits"])
def test_the_loop_reads_the_prefix_once_and_its_terms_do_not_change(tiny, tmp_path, monkeypatch,
                                                                    method, preset, loss_from):
    """The same run with and without the prefix cache: every logged term equal to 1e-5."""
    logs = {}
    for name in ("prefix", "full"):
        with monkeypatch.context() as m:
            if name == "full":
                m.setattr(prefix_cache, "build", lambda *args: None)
            summary = train(TrainConfig(**tiny.config(tmp_path / name, method=method,
                                                      preset=preset, loss_from=loss_from,
                                                      max_steps=2)))
        with open(os.path.join(tmp_path / name, "metrics.jsonl")) as f:
            logs[name] = [json.loads(line) for line in f]
        assert (summary["teacher_prefix_tokens"] > 0) == (name == "prefix")
    for cached, full in zip(logs["prefix"], logs["full"]):
        for key in ("loss", "ce", "distill"):
            assert cached[key] == pytest.approx(full[key], rel=1e-5, abs=1e-7), key


def test_the_real_teacher_shares_its_system_turn_and_worked_examples():
    """SmolLM2's two-shot chat prompts: the prefix is the system turn and both worked examples
    (up to the last user turn's content), and the states after it match the full forward."""
    from mlot_kernels.distill import assets
    from mlot_kernels.distill.data import demo_examples

    tok = load_tokenizer(assets.teacher_folder())
    net = load_model(assets.teacher_folder(), trainable=False)
    examples = demo_examples(6, seed=31)
    shots = demo_examples(2, seed=32)
    seqs = [encode(tok, prompt(tok, e, shots), e.answer, 512) for e in examples]
    cache = prefix_cache.build(net, [s.input_ids for s in seqs], [s.prompt_length for s in seqs])
    assert isinstance(cache, PrefixCache)
    text = tok.decode(seqs[0].input_ids[:cache.length])
    assert text.startswith("<|im_start|>system") and text.count("<|im_start|>assistant") == 2
    assert text.endswith("<|im_end|>\n<|im_start|>user\nContext:")  # every query has a context
