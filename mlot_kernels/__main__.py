"""``python -m mlot_kernels``: one forward+backward of ``torch.ops.mlot.sinkhorn_loss`` at the
paper's size, with variable lengths, checked against the float64 reference."""

import time

import torch

import mlot_kernels
from mlot_kernels.ops import reference


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    batch, m, n, k = 8, 128, 96, 50  # teacher / student answer positions, top-k columns
    teacher = torch.randn(batch, m, k, generator=gen).requires_grad_()
    student = torch.randn(batch, n, k, generator=gen).requires_grad_()
    teacher_lengths = torch.randint(m // 2, m + 1, (batch,), generator=gen)
    student_lengths = torch.randint(n // 2, n + 1, (batch,), generator=gen)
    options = dict(epsilon=0.1, n_iters=20, temperature=2.0, p=1, unit_marginals=True)

    start = time.perf_counter()
    loss = mlot_kernels.sinkhorn_loss(teacher, student, teacher_lengths, student_lengths, **options)
    loss.mean().backward()
    elapsed = time.perf_counter() - start

    expected = reference.sinkhorn_loss(teacher.detach().double(), student.detach().double(),
                                       teacher_lengths, student_lengths, **options)
    error = ((loss.detach().double() - expected).abs().max() / expected.abs().max()).item()
    print(f"sinkhorn_loss on B={batch}, M<={m}, N<={n}, K={k}, {options}")
    print("  per-sequence loss:", " ".join(f"{v:.3f}" for v in loss.tolist()))
    print(f"  max relative difference to the float64 reference: {error:.1e}")
    print(f"  gradient norms: teacher {teacher.grad.norm():.4f}, student {student.grad.norm():.4f}")
    print(f"  forward+backward: {elapsed * 1e3:.1f} ms (first call)")


if __name__ == "__main__":
    main()
