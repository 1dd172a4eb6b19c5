"""The MultiLevelOT loss and the ULD baseline: the paper preset against a float64 evaluation of
method.md's steps, the official preset against the released code's computation (to 1e-5 in
float32), gradcheck, fused ops against mlot_kernels.ops.reference, options, edges, and errors."""

import dataclasses

import pytest
import torch

import mlot_kernels
from mlot_kernels.losses.multi_level_ot import Options
from tests.conftest import assert_close_rel
from mlot_kernels.ops import row_chunks
from tests.loss_oracles import (make_batch, make_hidden_batch, official_oracle, paper_oracle,
                                uld_oracle)

KEYS = ("loss", "ce", "distill", "had", "sl", "sd")
TOL = {torch.float64: 1e-9, torch.float32: 1e-5}

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
    """The loss through the fused ops equals the loss through mlot_kernels.ops.reference."""
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


# ------------------------------------------------------------------ the hidden-state path

def hidden_loss(kernels, method, student, teacher, s_labels, t_labels, **options):
    """The loss dict of ``method`` ('paper', 'official' or 'uld') from hidden states."""
    s_hidden, s_weight, s_bias = student
    t_hidden, t_weight, t_bias = teacher
    if method == "uld":
        return mlot_kernels.uld_loss_from_hidden(s_hidden, s_weight, s_labels, t_hidden, t_weight,
                                                 t_labels, student_bias=s_bias,
                                                 teacher_bias=t_bias, kernels=kernels, **options)
    loss_fn = mlot_kernels.MultiLevelOTLoss(method, kernels, **options)
    return loss_fn.from_hidden(s_hidden, s_weight, s_labels, t_hidden, t_weight, t_labels,
                               student_bias=s_bias, teacher_bias=t_bias)


def hidden_values_and_grads(kernels, method, student, teacher, s_labels, t_labels, **options):
    """The loss dict and the gradients of its 'loss' with respect to every hidden state, weight
    and bias of both models."""
    student = tuple(None if x is None else x.detach().requires_grad_() for x in student)
    teacher = tuple(None if x is None else x.detach().requires_grad_() for x in teacher)
    out = hidden_loss(kernels, method, student, teacher, s_labels, t_labels, **options)
    inputs = [x for x in student + teacher if x is not None]
    grads = torch.autograd.grad(out["loss"], inputs)
    return {key: value.detach() for key, value in out.items()}, grads


METHOD_KEYS = {"paper": KEYS, "official": KEYS, "uld": ("loss", "ce", "distill", "uld")}


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few rows, so that the hidden-state path runs over many of them."""
    monkeypatch.setattr(row_chunks, "CHUNK_ROWS", 3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("method", ["paper", "official", "uld"])
@pytest.mark.parametrize("batch", BATCHES, ids=BATCH_IDS)
def test_hidden_path_equals_reference_on_logits(gen, batch, method, dtype, small_chunks):
    """from_hidden (and uld_loss_from_hidden) gives the values and the gradients (hidden states,
    weights and biases of both models) of the reference ops on the built logits
    hidden @ weight.T + bias: 1e-9 in float64, 1e-5 in float32."""
    student, teacher, s_labels, t_labels = make_hidden_batch(gen, *batch, dtype=dtype)
    fused = hidden_values_and_grads("fused", method, student, teacher, s_labels, t_labels)
    plain = hidden_values_and_grads("reference", method, student, teacher, s_labels, t_labels)
    assert_same(fused, plain, TOL[dtype], keys=METHOD_KEYS[method])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("method", ["paper", "official", "uld"])
@pytest.mark.parametrize("batch", BATCHES, ids=BATCH_IDS)
def test_logits_path_equals_reference(gen, batch, method, dtype):
    """The fused logits path gives the values and both models' gradients of the reference ops."""
    s_logits, t_logits, s_labels, t_labels = make_batch(gen, *batch, dtype=dtype)
    fn = mlot_kernels.uld_loss if method == "uld" else mlot_kernels.multi_level_ot_loss
    options = {} if method == "uld" else dict(preset=method)
    fused = values_and_grads(fn, s_logits, t_logits, s_labels, t_labels, **options)
    plain = values_and_grads(fn, s_logits, t_logits, s_labels, t_labels, kernels="reference",
                             **options)
    assert_same(fused, plain, TOL[dtype], keys=METHOD_KEYS[method])


@pytest.mark.parametrize("method", ["paper", "official", "uld"])
def test_hidden_path_bfloat16(gen, method, small_chunks):
    """bfloat16 hidden states and weights: the loss of the reference ops on the bfloat16 logits
    F.linear computes (arithmetic in float32), gradients in bfloat16."""
    student, teacher, s_labels, t_labels = make_hidden_batch(gen, [5, 4], [4, 6], 90, 70,
                                                             dtype=torch.bfloat16)
    fused = hidden_values_and_grads("fused", method, student, teacher, s_labels, t_labels)
    plain = hidden_values_and_grads("reference", method, student, teacher, s_labels, t_labels)
    for key in METHOD_KEYS[method]:
        assert fused[0][key].dtype == torch.float32
        assert_close_rel(fused[0][key], plain[0][key], 1e-5)
    for a, e in zip(fused[1], plain[1]):
        assert a.dtype == torch.bfloat16
        assert_close_rel(a.float(), e.float(), 2e-2)  # one bfloat16 rounding of each


@pytest.mark.parametrize("method", ["paper", "official", "uld"])
def test_hidden_path_gradcheck(gen, method, small_chunks):
    """The hidden-state path's gradients with respect to both models' hidden states, weights
    and biases, in float64 (fast mode), unit weights."""
    student, teacher, s_labels, t_labels = make_hidden_batch(gen, [3, 2], [2, 3], 9, 7, size=4)
    options = {} if method == "uld" else dict(k=5, n_iters=5, alpha=1.0, beta=1.0, gamma=1.0,
                                               sd_scale=1.0)
    if method == "uld":
        options = dict(weight=1.0)

    def fn(*tensors):
        return hidden_loss("fused", method, tensors[:3], tensors[3:], s_labels, t_labels,
                           **options)["loss"]

    tensors = [x.requires_grad_() for x in student + teacher]
    assert torch.autograd.gradcheck(fn, tensors, fast_mode=True)


def test_hidden_targets_equal_logits_targets(gen, small_chunks):
    """teacher_targets_from_hidden and from_hidden_targets compose to from_hidden, and equal the
    logits path's on the built logits; a student whose weight is frozen gets no weight gradient."""
    student, teacher, s_labels, t_labels = make_hidden_batch(gen, [5, 3], [4, 6], 80, 60,
                                                             dtype=torch.float32)
    loss_fn = mlot_kernels.MultiLevelOTLoss()
    targets = loss_fn.teacher_targets_from_hidden(teacher[0], teacher[1], t_labels, teacher[2])
    logits_targets = loss_fn.teacher_targets(torch.nn.functional.linear(*teacher), t_labels)
    for a, e in zip(targets, logits_targets):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)
    hidden = student[0].detach().requires_grad_()
    out = loss_fn.from_hidden_targets(hidden, student[1], s_labels, targets, student_bias=student[2])
    full = loss_fn.from_hidden(student[0], student[1], s_labels, *teacher[:2], t_labels,
                               student_bias=student[2], teacher_bias=teacher[2])
    for key in KEYS:
        torch.testing.assert_close(out[key], full[key], rtol=0, atol=0)
    out["loss"].backward()
    assert hidden.grad is not None and student[1].grad is None


# ------------------------------------------------------------------ options

def test_every_option_is_an_override_and_presets_differ():
    """Each preset is Options with method.md's constants; every field can be overridden."""
    from mlot_kernels.losses.multi_level_ot import PRESETS, resolve_options
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


@pytest.mark.parametrize("method", ["paper", "official", "uld"])
def test_half_precision_logits(gen, method):
    """bfloat16 logits give the float32 loss of the same values (arithmetic in float32), and
    the gradient of those values in bfloat16."""
    batch = make_batch(gen, [5, 4], [4, 6], 100, 120, dtype=torch.bfloat16)
    fn = mlot_kernels.uld_loss if method == "uld" else mlot_kernels.multi_level_ot_loss
    options = {} if method == "uld" else dict(preset=method)
    half = values_and_grads(fn, *batch, **options)
    full = values_and_grads(fn, batch[0].float(), batch[1].float(), *batch[2:], **options)
    for key in METHOD_KEYS[method]:
        assert half[0][key].dtype == torch.float32
        torch.testing.assert_close(half[0][key], full[0][key], rtol=1e-6, atol=1e-7)
    for a, e in zip(half[1], full[1]):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, e.to(torch.bfloat16))


@pytest.mark.parametrize("method", ["paper", "official", "uld"])
def test_empty_batch_gives_zeros(method):
    """A batch of size 0: every term 0 (not NaN), and a gradient of the inputs' shape."""
    s_logits = torch.rand(0, 6, 20, requires_grad=True)
    t_logits = torch.rand(0, 5, 30, requires_grad=True)
    labels = torch.zeros(0, 6, dtype=torch.long), torch.zeros(0, 5, dtype=torch.long)
    if method == "uld":
        out = mlot_kernels.uld_loss(s_logits, t_logits, *labels)
    else:
        out = mlot_kernels.multi_level_ot_loss(s_logits, t_logits, *labels, preset=method)
    for key, value in out.items():
        assert value == 0, key
    grads = torch.autograd.grad(out["loss"], (s_logits, t_logits))
    assert grads[0].shape == s_logits.shape and grads[1].shape == t_logits.shape


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
    ("option-type-float", {}, dict(alpha="x"), TypeError,
     r"alpha must be a finite float, got 'x' \(str\)"),
    ("option-type-int", {}, dict(k=2.5), TypeError, r"k must be an int, got 2.5 \(float\)"),
    ("option-type-bool", {}, dict(std_scale=1), TypeError, r"std_scale must be a bool, got 1 \(int\)"),
    ("option-bool-as-int", {}, dict(n_iters=True), TypeError, r"n_iters must be an int, got True \(bool\)"),
    ("option-range", {}, dict(k=0), ValueError, r"k must be >= 1, got 0"),
    ("option-nan", {}, dict(epsilon=float("nan")), TypeError, r"epsilon must be a finite float, got nan"),
]


@pytest.mark.parametrize("tensors,options,error,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_named(tensors, options, error, message):
    """Bad input raises an error that names the argument, what was expected and what was given."""
    with pytest.raises(error, match=message):
        mlot_kernels.multi_level_ot_loss(**(good_batch() | tensors), **options)


def good_hidden():
    return dict(student_hidden=torch.rand(2, 6, 4), student_weight=torch.rand(10, 4),
                student_labels=torch.full((2, 6), 1), teacher_hidden=torch.rand(2, 7, 3),
                teacher_weight=torch.rand(12, 3), teacher_labels=torch.full((2, 7), 1))


BAD_HIDDEN = [
    ("hidden-2d", dict(student_hidden=torch.rand(2, 6)),
     r"student_hidden must be a 3-D tensor \[B, T, H\], got shape \(2, 6\)"),
    ("weight-size", dict(teacher_weight=torch.rand(12, 4)),
     r"teacher_weight must have shape \[V, H\] with H = 3 like teacher_hidden, got shape \(12, 4\)"),
    ("bias-shape", dict(student_bias=torch.rand(9)),
     r"student_bias must have shape \[V\] = \(10,\) like student_weight, got shape \(9,\)"),
    ("weight-dtype", dict(student_weight=torch.rand(10, 4, dtype=torch.float64)),
     r"student_weight must have the dtype and device of student_hidden"),
    ("labels", dict(teacher_labels=torch.full((2, 6), 1)),
     r"teacher_labels must have shape \[B, T\] = \(2, 7\) like teacher_hidden"),
    ("batch", dict(teacher_hidden=torch.rand(3, 7, 3), teacher_labels=torch.full((3, 7), 1)),
     r"batch sizes differ: student_hidden \(2, 6, 4\), teacher_hidden \(3, 7, 3\)"),
]


@pytest.mark.parametrize("method", ["mlot", "uld"])
@pytest.mark.parametrize("tensors,message", [b[1:] for b in BAD_HIDDEN], ids=[b[0] for b in BAD_HIDDEN])
def test_bad_hidden_input_is_named(tensors, message, method):
    """Bad hidden states, weights or biases raise an error naming the argument."""
    args = good_hidden() | tensors
    biases = {key: args.pop(key) for key in ("student_bias", "teacher_bias") if key in args}
    with pytest.raises(ValueError, match=message):
        if method == "uld":
            mlot_kernels.uld_loss_from_hidden(**args, **biases)
        else:
            mlot_kernels.MultiLevelOTLoss().from_hidden(**args, **biases)
