"""Where a Sinkhorn step's time goes: ``python -m benchmarks.sinkhorn_phases [CASE] [--device D]``.

On one of the suite's cases (benchmarks/sinkhorn_cases.py; default ``paper``), the medians
(benchmarks/timing.py, about 2 s each) of the internal ops called directly and of the autograd
step the suite times:

- ``torch.ops.mlot.sinkhorn_forward`` with 0 iterations (the softmax, the cost, the Gibbs
  kernel and the loss) and with the case's;
- ``torch.ops.mlot.sinkhorn_backward`` with the plan detached (it rebuilds the softmaxed rows
  and the cost, then the loss term and the cost's gradient) and exact (the reverse sweep too);
- the autograd step through ``mlot_kernels.sinkhorn_loss`` (forward, ``sum``, backward), and
  the same step minus the two ops on a 8 x 4 x 4 problem with one iteration, where the
  kernels take almost nothing: what the step costs beyond the ops (the Python autograd
  wrapper, the ``sum`` and its backward).
"""

import argparse

import torch

import mlot_kernels
from benchmarks import sinkhorn_cases
from benchmarks.steps import synchronizer
from benchmarks.timing import median_seconds


def phases(case, target_s=2.0):
    """{phase: median ms} on ``case`` (a benchmarks.sinkhorn_cases case dict), each timed for
    about ``target_s`` seconds (at least 20 rounds)."""
    sync = synchronizer(case["device"])

    def ms(fn):
        def timed():
            fn()
            sync()
        return median_seconds(timed, target_s, 20, 2000)[0] * 1e3

    x, y, xl, yl = sinkhorn_cases.make_inputs(case)
    eps, temperature, p, unit = case["epsilon"], case["temperature"], 1, case["unit_marginals"]

    def forward(x, y, xl, yl, n_iters):
        return torch.ops.mlot.sinkhorn_forward(x, y, xl, yl, eps, n_iters, temperature, p, unit,
                                               False)

    def backward(x, y, xl, yl, saved, detach):
        loss, f_hist, g_hist = saved
        return torch.ops.mlot.sinkhorn_backward(torch.ones_like(loss), x, y, xl, yl, f_hist,
                                                g_hist, eps, temperature, p, unit, detach)

    def step(x, y, xl, yl, n_iters):
        loss = mlot_kernels.sinkhorn_loss(x, y, xl, yl, eps, n_iters, temperature, p, unit)
        return torch.autograd.grad(loss.sum(), (x, y))

    xd, yd = x.detach(), y.detach()
    saved = forward(xd, yd, xl, yl, case["n_iters"])
    out = {
        "forward, 0 iterations": ms(lambda: forward(xd, yd, xl, yl, 0)),
        f"forward, {case['n_iters']} iterations": ms(
            lambda: forward(xd, yd, xl, yl, case["n_iters"])),
        "backward, plan detached": ms(lambda: backward(xd, yd, xl, yl, saved, True)),
        "backward, exact": ms(lambda: backward(xd, yd, xl, yl, saved, False)),
        "autograd step": ms(lambda: step(x, y, xl, yl, case["n_iters"])),
    }
    tiny = [t.to(case["device"]) for t in torch.randn(2, 8, 4, 4, generator=torch.Generator()
                                                      .manual_seed(0))]
    tx, ty = (t.clone().requires_grad_() for t in tiny)
    tiny_saved = forward(*tiny, None, None, 1)
    out["beyond the ops, 8×4×4"] = (
        ms(lambda: step(tx, ty, None, None, 1))
        - ms(lambda: forward(*tiny, None, None, 1))
        - ms(lambda: backward(*tiny, None, None, tiny_saved, False)))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("case", nargs="?", default="paper", help="paper, variable or long")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    cases = sinkhorn_cases.named_cases(args.device)
    if args.case not in cases:
        parser.error(f"case must be one of {', '.join(cases)}, got {args.case!r}")
    case = cases[args.case]
    print(f"{args.case} {sinkhorn_cases.shape(case)} on {args.device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for name, value in phases(case).items():
        print(f"{name:28s} {value:8.3f} ms")


if __name__ == "__main__":
    main()
