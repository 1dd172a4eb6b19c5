"""The MultiLevelOT loss and the ULD baseline: the paper preset against a float64 evaluation of
method.md's steps, the official preset against the released code's computation (to 1e-5 in
float32), gradcheck, fused ops against mlot_kernels.reference, options, edges, and errors."""

import dataclasses

import pytest
import torch

import mlot_kernels
from mlot_kernels.multi_level_ot import Options
from tests.conftest import assert_close_rel
from tests.loss_oracles import make_batch, official_oracle, paper_oracle, uld_oracle

KEYS = ("loss", "ce", "distill", "had", "sl", "sd")

# (student answer lengths, teacher answer lengths, V_S, V_T)
BATCHES = [
    ([5, 3, 7], [4, 6, 7], 60, 90),
    ([4, 0, 6], [5, 3, 0], 70, 55),      # empty answers on either side
    ([6], [4], 40, 40),                   # batch size 1
    ([3, 5], [6, 2], 30, 12),             # teacher vocabulary smaller than k
    ([9, 2], [3, 8], 8, 5),               # both vocabularies smaller than k
]
BATCH_IDS = ["B{}-VS{}-VT{}".format(len(b[0]), b[2], b[3]) for b in BATCHES]


def values_and_grads(fn, s_logits, t_logits, s_labels, t_labels, **kwargs):
    """fn's dict and the gradients of its 'loss' with respect to both models' logits."""
    s_logits = s_logits.detach().requires_grad_()
    t_logits = t_logits.detach().requires_grad_()
    out = fn(s_logits, t_logits, s_labels, t_labels, **kwargs)
    grads = torch.autograd.grad(out["loss"], (s_logits, t_logits))
    return {key: value.detach() for key, value in out.items()}, grads


def assert_same(actual, expected, rtol, keys=KEYS):
    (a_out, a_grads), (e_out, e_grads) = actual, expected
    for key in keys:
        assert_close_rel(a_out[key], e_out[key].to(a_out[key].dtype), rtol)
    for a, e in zip(a_grads, e_grads):
        assert_close_rel(a, e.to(a.dtype), rtol)


@pytest.mark.parametrize("batch", BATCHES, ids=BATCH_IDS)
def test_paper_preset_matches_method_steps(gen, batch):
    """preset='paper' equals a float64 evaluation of method.md's steps: every term and both
    models' gradients."""
    s_logits, t_logits, s_labels, t_labels = make_batch(gen, *batch)
    expected = values_and_grads(paper_oracle, s_logits, t_logits, s_labels, t_labels)
    actual = values_and_grads(mlot_kernels.multi_level_ot_loss, s_logits, t_logits, s_labels,
                              t_labels)
    assert_same(actual, expected, 1e-9)


@pytest.mark.parametrize("batch", BATCHES, ids=BATCH_IDS)
def test_official_preset_reproduces_released_code(gen, batch):
    """preset='official' equals the released code's computation to 1e-5 relative in float32:
    every term and both models' gradients."""
    s_logits, t_logits, s_labels, t_labels = make_batch(gen, *batch, dtype=torch.float32)
    expected = values_and_grads(official_oracle, s_logits, t_logits, s_labels, t_labels)
    actual = values_and_grads(mlot_kernels.multi_level_ot_loss, s_logits, t_logits, s_labels,
                              t_labels, preset="official")
    assert_same(actual, expected, 1e-5)


def test_official_preset_in_float64(gen):
    """In float64 the official preset equals its oracle to rounding (the float32 test's 1e-5
    is rounding, not a difference of method)."""
    s_logits, t_logits, s_labels, t_labels = make_batch(gen, [5, 2, 6], [3, 7, 6], 80, 64)
    expected = values_and_grads(official_oracle, s_logits, t_logits, s_labels, t_labels)
    actual = values_and_grads(mlot_kernels.multi_level_ot_loss, s_logits, t_logits, s_labels,
                              t_labels, preset="official")
    assert_same(actual, expected, 1e-9)


@pytest.mark.parametrize("preset", ["paper", "official"])
def test_gradcheck(gen, preset):
    """The whole loss's gradient with respect to both models' logits, in float64 (fast mode:
    random directions, as the full Jacobian costs a forward per logit). Unit weights, so that
    no term's gradient hides under gradcheck's tolerance."""
    s_logits, t_logits, s_labels, t_labels = make_batch(gen, [3, 2], [2, 3], 9, 7)
    weights = dict(alpha=1.0, beta=1.0, gamma=1.0, sd_scale=1.0)

    def fn(s, t):
        return mlot_kernels.multi_level_ot_loss(s, t, s_labels, t_labels, preset=preset, k=5,
                                                n_iters=5, **weights)["loss"]

    assert torch.autograd.gradcheck(fn, (s_logits.requires_grad_(), t_logits.requires_grad_()),
                                    fast_mode=True)


@pytest.mark.parametrize("preset", ["paper", "official"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_fused_ops_equal_reference_ops(gen, preset, dtype):
    """The loss through the fused ops equals the loss through mlot_kernels.reference."""
    s_logits, t_logits, s_labels, t_labels = make_batch(gen, [6, 4, 0], [5, 7, 3], 300, 200,
                                                        dtype=dtype)
    fused = values_and_grads(mlot_kernels.multi_level_ot_loss, s_logits, t_logits, s_labels,
                             t_labels, preset=preset)
    plain = values_and_grads(mlot_kernels.multi_level_ot_loss, s_logits, t_logits, s_labels,
                             t_labels, preset=preset, kernels="reference")
    assert_same(fused, plain, 1e-9 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("batch", BATCHES[:3], ids=BATCH_IDS[:3])
def test_uld_matches_oracle(gen, batch):
    """uld_loss equals the float64 ULD of sorted, zero-padded full probability vectors."""
    s_logits, t_logits, s_labels, t_labels = make_batch(gen, *batch)
    expected = values_and_grads(uld_oracle, s_logits, t_logits, s_labels, t_labels)
    actual = values_and_grads(mlot_kernels.uld_loss, s_logits, t_logits, s_labels, t_labels)
    assert_same(actual, expected, 1e-9, keys=("loss", "ce", "distill", "uld"))


# ------------------------------------------------------------------ options

def test_every_option_is_an_override_and_presets_differ():
    """Each preset is Options with method.md's constants; every field can be overridden."""
    from mlot_kernels.multi_level_ot import PRESETS, resolve_options
    paper, official = PRESETS["paper"], PRESETS["official"]
    assert (paper.k, paper.temperature, paper.epsilon, paper.n_iters, paper.alpha, paper.beta,
            paper.gamma, paper.sd_temperature) == (50, 1.0, 0.1, 20, 0.15, 0.1, 0.1, 2.0)
    assert (official.n_iters, official.alpha, official.sd_scale, official.ranking,
            official.std_scale, official.skip_student_eos) == (10, 1.5, 0.001, "batch", True, True)
    for field in dataclasses.fields(Options):
        value = getattr(official, field.name)
        assert getattr(resolve_options("paper", **{field.name: value}), field.name) == value


def test_terms_switch_off(gen):
    """A term switched off is absent from the dict and from distill; the rest is unchanged."""
    batch = make_batch(gen, [4, 5], [6, 3], 60, 80)
    full = mlot_kernels.multi_level_ot_loss(*batch)
    only_sd = mlot_kernels.multi_level_ot_loss(*batch, had=False, sl=False)
    assert "had" not in only_sd and "sl" not in only_sd
    torch.testing.assert_close(only_sd["sd"], full["sd"], rtol=0, atol=0)
    torch.testing.assert_close(only_sd["distill"], 0.15 * 0.1 * full["sd"])
    none = mlot_kernels.multi_level_ot_loss(*batch, had=False, sl=False, sd=False)
    assert none["distill"] == 0 and torch.equal(none["loss"], full["ce"])


def test_overrides_change_the_result(gen):
    """Overrides reach the computation: k, temperatures, ranking, iterations, weights."""
    batch = make_batch(gen, [5, 4], [4, 6], 100, 120)
    base = mlot_kernels.multi_level_ot_loss(*batch)
    for override in (dict(k=10), dict(temperature=0.5), dict(sd_temperature=1.0),
                     dict(ranking="token"), dict(n_iters=3), dict(std_scale=True)):
        changed = mlot_kernels.multi_level_ot_loss(*batch, **override)
        assert not torch.equal(changed["distill"], base["distill"]), override
    doubled = mlot_kernels.multi_level_ot_loss(*batch, alpha=0.3)
    torch.testing.assert_close(doubled["distill"], 2 * base["distill"])


def test_module_equals_function(gen):
    """MultiLevelOTLoss(preset, **overrides) computes multi_level_ot_loss with the same options."""
    batch = make_batch(gen, [4, 5], [6, 3], 60, 80, dtype=torch.float32)
    module = mlot_kernels.MultiLevelOTLoss(preset="official", k=20)
    expected = mlot_kernels.multi_level_ot_loss(*batch, preset="official", k=20)
    got = module(*batch)
    assert got.keys() == expected.keys()
    for key in got:
        assert torch.equal(got[key], expected[key])
    assert "k=20" in repr(module)


def test_window_and_labels_rules_agree_on_contiguous_answers(gen):
    """For one contiguous answer after the prompt, answer_span 'window' and 'labels' coincide."""
    batch = make_batch(gen, [4, 6], [5, 2], 50, 70)
    a = mlot_kernels.multi_level_ot_loss(*batch, answer_span="labels")
    b = mlot_kernels.multi_level_ot_loss(*batch, answer_span="window")
    for key in KEYS:
        assert torch.equal(a[key], b[key])


# ------------------------------------------------------------------ edges

@pytest.mark.parametrize("preset", ["paper", "official"])
def test_no_answer_tokens_give_zero_distill(gen, preset):
    """A batch whose sequences have no answer tokens: distill 0, ce 0, finite zero gradients."""
    s_logits, t_logits, s_labels, t_labels = make_batch(gen, [3, 2], [2, 4], 30, 40)
    s_labels.fill_(-100)
    t_labels.fill_(-100)
    out, grads = values_and_grads(mlot_kernels.multi_level_ot_loss, s_logits, t_logits, s_labels,
                                  t_labels, preset=preset)
    for key in KEYS:
        assert out[key] == 0, key
    assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize("preset", ["paper", "official"])
def test_student_vocabulary_below_k_stays_finite(gen, preset):
    """A student vocabulary smaller than k (and than the teacher's) gives finite terms and
    gradients."""
    batch = make_batch(gen, [4, 3], [5, 4], 20, 90, dtype=torch.float32)
    out, grads = values_and_grads(mlot_kernels.multi_level_ot_loss, *batch, preset=preset)
    assert all(torch.isfinite(out[key]) for key in KEYS)
    assert all(torch.isfinite(g).all() for g in grads)


def test_half_precision_logits(gen):
    """bfloat16 logits give the float32 loss of the same values (arithmetic in float32)."""
    batch = make_batch(gen, [5, 4], [4, 6], 100, 120, dtype=torch.bfloat16)
    half = mlot_kernels.multi_level_ot_loss(*batch)
    full = mlot_kernels.multi_level_ot_loss(batch[0].float(), batch[1].float(), *batch[2:])
    for key in KEYS:
        assert half[key].dtype == torch.float32
        torch.testing.assert_close(half[key], full[key], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ errors

def good_batch():
    return dict(student_logits=torch.rand(2, 6, 10), teacher_logits=torch.rand(2, 7, 12),
                student_labels=torch.full((2, 6), 1), teacher_labels=torch.full((2, 7), 1))


BAD = [
    ("labels-shape", dict(student_labels=torch.full((2, 5), 1)), {}, ValueError,
     r"student_labels must have shape \[B, T\] = \(2, 6\) like student_logits, got shape \(2, 5\)"),
    ("logits-2d", dict(teacher_logits=torch.rand(2, 7)), {}, ValueError,
     r"teacher_logits must be a 3-D tensor \[B, T, V\], got shape \(2, 7\)"),
    ("label-dtype", dict(teacher_labels=torch.rand(2, 7)), {}, ValueError,
     r"teacher_labels must have an integer dtype, got torch.float32"),
    ("batch", dict(teacher_logits=torch.rand(3, 7, 12), teacher_labels=torch.full((3, 7), 1)), {},
     ValueError, r"batch sizes differ: student_logits \(2, 6, 10\), teacher_logits \(3, 7, 12\)"),
    ("preset", {}, dict(preset="released"), ValueError,
     r"preset must be one of \('paper', 'official'\), got 'released'"),
    ("unknown-override", {}, dict(kk=5), TypeError, r"unknown option\(s\) \['kk'\]; the options are"),
    ("bad-choice", {}, dict(ranking="vocab"), ValueError,
     r"ranking must be one of \('token', 'sequence', 'batch'\), got 'vocab'"),
    ("kernels", {}, dict(kernels="cuda"), ValueError, r"kernels must be one of \('fused', 'reference'\)"),
    ("window", dict(student_labels=torch.full((2, 6), 1)), dict(answer_span="window"), ValueError,
     r"answer_span='window' needs every answer to start after position 0"),
]


@pytest.mark.parametrize("tensors,options,error,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_named(tensors, options, error, message):
    """Bad input raises an error that names the argument, what was expected and what was given."""
    with pytest.raises(error, match=message):
        mlot_kernels.multi_level_ot_loss(**(good_batch() | tensors), **options)
