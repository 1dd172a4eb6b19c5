"""The whole-loss benchmark cases, implementations and steps, shared by the pytest-benchmark suite
(benchmarks/test_loss.py), the report (benchmarks/report.py) and the memory probe
(benchmarks/memory.py).

A case is a dict: float32 student logits [B, T, V_S] and teacher logits [B, T, V_T] =
3 * standard normal on ``device`` (a fixed ``seed``), the paper's vocabularies by default (an
OPT student, 50272 tokens; a LLaMA-2 teacher, 32000), and HF labels: per sequence a prompt of
-100, an answer (lengths from benchmarks/answer_lengths.py, limit T/2), then -100 padding. The
objective is the total loss (cross-entropy + distillation), differentiated with respect to the
student's logits (the teacher is frozen).

Implementations: the op-based loss with the ``official`` preset and the released code's loss
(benchmarks/peers.py ``released_loss``), which compute the same value and gradient
(tests/test_benchmark_peers.py).
"""

import torch

from benchmarks import peers
from benchmarks.answer_lengths import answer_lengths
from benchmarks.steps import Impl, make_steps
from mlot_kernels import MultiLevelOTLoss

IGNORE = -100


def _mlot(student_logits, teacher_logits, student_labels, teacher_labels):
    loss_fn = MultiLevelOTLoss("official")
    return loss_fn(student_logits, teacher_logits, student_labels, teacher_labels)["loss"]


IMPLS = {
    "mlot": Impl(_mlot, "MultiLevelOTLoss('official'): topk_probs + sinkhorn_loss ops"),
    "released": Impl(peers.released_loss, "the released code's loss, eager"),
}


def make_case(batch, length, v_student=50272, v_teacher=32000, seed=0, device="cpu"):
    return dict(batch=batch, length=length, v_student=v_student, v_teacher=v_teacher, seed=seed,
                device=str(device))


def named_cases(device, quick=False):
    """The pytest-benchmark suite's case: the paper's batch of 8, sequences of 256 tokens."""
    cases = {"paper": make_case(8, 256, device=device)}
    if quick:
        cases = {name: dict(case, batch=2, length=16, v_student=300, v_teacher=200)
                 for name, case in cases.items()}
    return cases


def _labels(gen, answers, length, vocab):
    """[B, T] labels: a prompt of random length, the answer, then padding (all -100 but the answer)."""
    labels = torch.full((len(answers), length), IGNORE)
    for b, size in enumerate(answers.tolist()):
        start = int(torch.randint(1, length - size + 1, (1,), generator=gen))
        labels[b, start:start + size] = torch.randint(0, vocab, (size,), generator=gen)
    return labels


def make_inputs(case):
    """(student_logits (requires_grad), teacher_logits, student_labels, teacher_labels)."""
    gen = torch.Generator().manual_seed(case["seed"])
    batch, length = case["batch"], case["length"]
    teacher_answers, student_answers = answer_lengths(gen, batch, length // 2)
    device = torch.device(case["device"])
    student = 3 * torch.randn(batch, length, case["v_student"], generator=gen)
    teacher = 3 * torch.randn(batch, length, case["v_teacher"], generator=gen)
    student_labels = _labels(gen, student_answers, length, case["v_student"])
    teacher_labels = _labels(gen, teacher_answers, length, case["v_teacher"])
    return (student.to(device).requires_grad_(), teacher.to(device), student_labels.to(device),
            teacher_labels.to(device))


def make_case_steps(impl, case, impls=IMPLS):
    """:class:`benchmarks.steps.Steps` of ``impls[impl]`` on the case."""
    inputs = make_inputs(case)
    fn = impls[impl].run
    return make_steps(lambda: fn(*inputs), inputs[:1], case["device"])


def work(case):
    """No work model for the whole loss: no fractions of the ceilings."""
    return dict(flops=None, bytes=None)


def shape(case):
    return f"{case['batch']}×{case['length']}, V {case['v_student']}/{case['v_teacher']}"
