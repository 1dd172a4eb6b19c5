"""Answer lengths for the variable-length cases: a log-normal in tokens, as answers are.

Short-answer QA (QED, FairytaleQA) and dialogue summaries (DialogSum), the paper's tasks, have
answers of a few to a few dozen tokens with a long tail. The student's answer length is drawn as
``round(exp(log(MEDIAN) + SIGMA * z))`` with z standard normal (median 24 tokens, 90% below about
63), and the teacher's, whose tokenizer splits the same text differently, as the student's times
a factor uniform in [0.8, 1.25]; both are clipped to [1, limit]. A batch is padded to its
longest answer, as batched code does.
"""

import math

import torch

MEDIAN, SIGMA = 24, 0.75
RATIO = (0.8, 1.25)


def answer_lengths(gen, batch, limit):
    """(teacher, student) answer lengths, two [B] int64 tensors in [1, limit]."""
    z = torch.randn(batch, generator=gen, dtype=torch.float64)
    student = torch.exp(math.log(MEDIAN) + SIGMA * z).round()
    ratio = RATIO[0] + (RATIO[1] - RATIO[0]) * torch.rand(batch, generator=gen, dtype=torch.float64)
    teacher = (student * ratio).round()
    return teacher.clamp(1, limit).long(), student.clamp(1, limit).long()
