"""torch.ops.mlot.uld_forward, ULD's sorted L1 distance between paired rows and the student's
cross-entropy (CPU kernels, and the chunked torch kernels that CUDA runs, on CPU tensors): values
and both models' gradients against the float64 reference, gradcheck, opcheck, torch.compile, rows
never read, mixed dtypes, and argument errors."""

import pytest
import torch

from mlot_kernels.ops import reference, uld_distance as ops
from tests.conftest import assert_close_rel, make_logits

OPS = torch.ops.mlot
TOL = {torch.float64: 1e-9, torch.float32: 1e-5}


def uld_problem(gen, B, L_S, V_S, L_T, V_T, A, dtype=torch.float64):
    """Both models' logits, A distinct paired rows per sequence on each side (random order),
    pair counts with a 0, and student targets with -100 holes."""
    student = make_logits(gen, (B, L_S, V_S), dtype)
    teacher = make_logits(gen, (B, L_T, V_T), dtype)
    s_rows = torch.stack([torch.randperm(L_S, generator=gen)[:A] for _ in range(B)])
    t_rows = torch.stack([torch.randperm(L_T, generator=gen)[:A] for _ in range(B)])
    lengths = torch.randint(0, A + 1, (B,), generator=gen)
    lengths[0], lengths[-1] = A, 0
    targets = torch.randint(0, V_S, (B, L_S), generator=gen)
    targets[torch.rand(B, L_S, generator=gen) < 0.4] = -100
    return student, s_rows, targets, teacher, t_rows, lengths


def values_and_grads(fn, student, s_rows, targets, teacher, t_rows, lengths, temperature, gen,
                     teacher_grad=True):
    """fn's (distance, ce) and the gradients of a random positive combination of both with
    respect to both models' logits (the student's alone for a frozen teacher)."""
    student = student.detach().requires_grad_()
    teacher = teacher.detach().requires_grad_(teacher_grad)
    distance, ce = fn(student, s_rows, targets, teacher, t_rows, lengths, temperature)
    w = torch.rand(distance.shape, generator=gen, dtype=torch.float64) + 0.5
    w_ce = torch.rand(ce.shape, generator=gen, dtype=torch.float64) + 0.5
    objective = (distance * w.to(distance.dtype)).sum() + (ce * w_ce.to(ce.dtype)).sum()
    grads = torch.autograd.grad(objective, (student, teacher) if teacher_grad else (student,))
    return (distance.detach(), ce.detach()), grads


CASES = [  # (B, L_S, V_S, L_T, V_T, A, temperature)
    (3, 8, 60, 7, 90, 5, 1.0),   # V_S < V_T
    (3, 8, 90, 9, 40, 4, 2.0),   # V_S > V_T, temperature 2
    (2, 6, 3000, 6, 2048, 3, 1.0),  # several column blocks
]
CASE_IDS = ["B{}-LS{}-VS{}-LT{}-VT{}-A{}-T{}".format(*c) for c in CASES]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kernels", ["cpp", "chunked"])
@pytest.mark.parametrize("teacher_grad", [True, False], ids=["teacher-grad", "frozen-teacher"])
def test_matches_float64_reference(gen, case, dtype, kernels, teacher_grad):
    """distance, ce and the gradients equal a float64 evaluation (softmax, sort, pad, sum of
    |differences|); the C++ kernels and the chunked torch ones alike, with a teacher that takes
    a gradient and a frozen one (whose sort takes another path)."""
    *sizes, temperature = case
    problem = uld_problem(gen, *sizes, dtype=dtype)
    fn = ops.uld_distance if kernels == "cpp" else chunked_uld_distance
    g = torch.Generator().manual_seed(1)
    (values, grads) = values_and_grads(fn, *problem, temperature, g, teacher_grad)
    g = torch.Generator().manual_seed(1)
    (e_values, e_grads) = values_and_grads(reference.uld_distance,
                                           *[p.double() if p.is_floating_point() else p
                                             for p in problem], temperature, g, teacher_grad)
    for a, e in zip(values + grads, e_values + e_grads):
        assert_close_rel(a, e, TOL[dtype])
    assert grads[0].dtype == dtype and values[0].dtype == dtype


class _Chunked(torch.autograd.Function):
    """The chunked torch kernels (CUDA's) with autograd, on any device."""

    @staticmethod
    def forward(ctx, student, s_rows, targets, teacher, t_rows, lengths, temperature):
        out = ops.uld_forward_chunked(student, s_rows, targets, teacher, t_rows, lengths,
                                      temperature, True)
        ctx.save_for_backward(student, s_rows, targets, teacher, t_rows, lengths, *out[2:])
        ctx.temperature = temperature
        return out[0], out[1]

    @staticmethod
    def backward(ctx, grad_distance, grad_ce):
        saved = ctx.saved_tensors
        gs, gt = ops.uld_backward_chunked(grad_distance, grad_ce, *saved, ctx.temperature, True)
        return gs, None, None, gt, None, None, None


def chunked_uld_distance(*args):
    return _Chunked.apply(*args)


def test_chunked_kernels_equal_cpp_kernels(gen):
    """The chunked torch kernels give the C++ kernels' outputs, the signs and statistics
    included, in chunks of one row."""
    problem = uld_problem(gen, 3, 7, 50, 6, 70, 4, torch.float32)
    cpp = OPS.uld_forward(*problem, 1.5, True)
    chunk = ops.CHUNK_ELEMENTS
    try:
        ops.CHUNK_ELEMENTS = 1
        chunked = ops.uld_forward_chunked(*problem, 1.5, True)
    finally:
        ops.CHUNK_ELEMENTS = chunk
    for a, e in zip(chunked, cpp):
        assert a.dtype == e.dtype and a.shape == e.shape
        if a.dtype == torch.int8:
            assert torch.equal(a, e)
        else:
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)


def test_gradcheck(gen):
    """Both models' gradients in float64 (pairs, cross-entropy rows, temperature 1.3)."""
    student, s_rows, targets, teacher, t_rows, lengths = uld_problem(gen, 2, 5, 7, 4, 9, 3)
    weights = torch.rand(2, 5, generator=gen, dtype=torch.float64)

    def fn(s, t):
        distance, ce = ops.uld_distance(s, s_rows, targets, t, t_rows, lengths, 1.3)
        return distance, ce * weights

    assert torch.autograd.gradcheck(fn, (student.requires_grad_(), teacher.requires_grad_()))


@pytest.mark.parametrize("teacher_grad", [False, True])
def test_opcheck(gen, teacher_grad):
    """opcheck (schema, autograd registration, fake kernel, AOT dispatch) on both ops."""
    student, s_rows, targets, teacher, t_rows, lengths = uld_problem(gen, 3, 6, 20, 5, 30, 4,
                                                                     torch.float32)
    args = (student.requires_grad_(), s_rows, targets, teacher.requires_grad_(teacher_grad), t_rows,
            lengths, 1.0, teacher_grad)
    torch.library.opcheck(OPS.uld_forward.default, args)
    out = OPS.uld_forward(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    grad_distance = torch.rand(out[0].shape, generator=gen)
    grad_ce = torch.rand(out[1].shape, generator=gen)
    torch.library.opcheck(OPS.uld_backward.default,
                          (grad_distance, grad_ce, student.detach(), s_rows, targets,
                           teacher.detach(), t_rows, lengths, *out[2:], 1.0, teacher_grad))


def test_compile_matches_eager(gen):
    """Under torch.compile(fullgraph=True) the op gives the eager values and gradient."""
    student, s_rows, targets, teacher, t_rows, lengths = uld_problem(gen, 2, 6, 40, 5, 50, 4,
                                                                     torch.float32)

    def fn(s, s_rows, targets, t, t_rows, lengths, temperature):
        distance, ce = ops.uld_distance(s, s_rows, targets, t, t_rows, lengths, temperature)
        return distance * 2, ce

    args = (student, s_rows, targets, teacher, t_rows, lengths, 1.0)
    eager = values_and_grads(fn, *args, torch.Generator().manual_seed(2))
    compiled = values_and_grads(torch.compile(fn, fullgraph=True), *args,
                                torch.Generator().manual_seed(2))
    for a, e in zip(compiled[0] + compiled[1], eager[0] + eager[1]):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)


def test_rows_not_read(gen):
    """Rows neither paired nor labelled are never read (NaN there changes nothing) and get a
    gradient of exactly 0; the teacher gets no gradient unless its logits require one."""
    student, s_rows, targets, teacher, t_rows, lengths = uld_problem(gen, 3, 8, 30, 7, 40, 4,
                                                                     torch.float32)
    read_s = targets != -100
    read_t = torch.zeros(3, 7, dtype=torch.bool)
    for b in range(3):
        read_s[b, s_rows[b, :lengths[b]]] = True
        read_t[b, t_rows[b, :lengths[b]]] = True
    clean = values_and_grads(ops.uld_distance, student, s_rows, targets, teacher, t_rows, lengths,
                             1.0, torch.Generator().manual_seed(3))
    student[~read_s], teacher[~read_t] = float("nan"), float("nan")
    dirty = values_and_grads(ops.uld_distance, student, s_rows, targets, teacher, t_rows, lengths,
                             1.0, torch.Generator().manual_seed(3))
    for a, e in zip(dirty[0] + dirty[1], clean[0] + clean[1]):
        assert torch.equal(a, e)
    assert (clean[1][0][~read_s] == 0).all() and (clean[1][1][~read_t] == 0).all()
    frozen = student.detach().nan_to_num(0.0).requires_grad_()
    distance, ce = ops.uld_distance(frozen, s_rows, targets, teacher, t_rows, lengths)
    (distance.sum() + ce.sum()).backward()
    assert frozen.grad is not None and teacher.grad is None


def test_mixed_dtypes(gen):
    """A bfloat16 student with a float32 teacher: float32 arithmetic, the result of the same
    values in float32, the gradient in each model's dtype."""
    student, s_rows, targets, teacher, t_rows, lengths = uld_problem(gen, 2, 6, 50, 5, 70, 4,
                                                                     torch.bfloat16)
    teacher = teacher.float()
    args = (s_rows, targets, teacher, t_rows, lengths, 1.0)
    mixed = values_and_grads(lambda s, *a: ops.uld_distance(s, *a), student, *args[:2],
                             teacher, *args[3:], torch.Generator().manual_seed(4))
    full = values_and_grads(lambda s, *a: ops.uld_distance(s, *a), student.float(), *args[:2],
                            teacher, *args[3:], torch.Generator().manual_seed(4))
    assert mixed[0][0].dtype == torch.float32 and mixed[1][0].dtype == torch.bfloat16
    for a, e in zip(mixed[0] + mixed[1][1:], full[0] + full[1][1:]):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mixed[1][0], full[1][0].to(torch.bfloat16))


def good_args(**overrides):
    args = dict(student_logits=torch.rand(2, 5, 8), student_rows=torch.tensor([[1, 3], [0, 2]]),
                student_targets=torch.full((2, 5), -100), teacher_logits=torch.rand(2, 4, 6),
                teacher_rows=torch.tensor([[0, 2], [1, 3]]), lengths=torch.tensor([2, 1]),
                temperature=1.0)
    return args | overrides


BAD = [
    ("student-2d", dict(student_logits=torch.rand(2, 5)),
     r"student_logits must be a 3-D tensor \[B, L, V\] with V >= 1, got shape \[2, 5\]"),
    ("batch", dict(teacher_logits=torch.rand(3, 4, 6)),
     r"student_logits and teacher_logits must have the same batch size"),
    ("teacher-rows-shape", dict(teacher_rows=torch.tensor([[0, 2, 3], [1, 3, 0]])),
     r"teacher_rows must have shape \[B, A\] = \[2, 2\], got shape \[2, 3\]"),
    ("rows-range", dict(teacher_rows=torch.tensor([[0, 4], [1, 3]])),
     r"teacher_rows must lie in \[0, L\) = \[0, 4\), got teacher_rows\[0, 1\] = 4"),
    ("rows-duplicate", dict(student_rows=torch.tensor([[3, 3], [0, 2]])),
     r"the answer rows of a sequence must be distinct"),
    ("lengths", dict(lengths=torch.tensor([3, 1])), r"lengths must lie in \[0, A\] = \[0, 2\]"),
    ("targets", dict(student_targets=torch.full((2, 5), 8)),
     r"student_targets must be -100 or lie in \[0, V\) = \[0, 8\)"),
    ("temperature", dict(temperature=0.0), r"temperature must be a finite number > 0, got 0"),
]


@pytest.mark.parametrize("overrides,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_arguments_name_the_argument(overrides, message):
    with pytest.raises(RuntimeError, match=message) as error:
        ops.uld_distance(**good_args(**overrides))
    assert str(error.value).startswith("uld_distance: ")
