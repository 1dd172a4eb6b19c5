"""The topk_probs benchmark cases, implementations and steps, shared by the pytest-benchmark suite
(benchmarks/test_topk_probs.py), the report (benchmarks/report.py) and the memory probe
(benchmarks/memory.py).

A case is a dict: float32 logits [B, L, V] = 3 * standard normal on ``device`` (a fixed ``seed``
per case), no lengths, ``k=50, temperature=1``, ranking 'sequence', with or without std_scale.
The objective is ``(probs * w).sum()`` with a fixed random weight w [B, L, k] (so that every
kept probability gets its own gradient), differentiated with respect to the logits.
"""

import torch

import mlot_kernels
from benchmarks.peers import eager_topk_probs
from benchmarks.steps import Impl, make_steps

OPTIONS = ("k", "temperature", "std_scale", "ranking")  # the case keys passed to the op

IMPLS = {
    "mlot": Impl(mlot_kernels.topk_probs, "fused softmax + column mass + top k + gather"),
    "eager": Impl(eager_topk_probs, "softmax [B, L, V], p.sum(1).topk(k), gather"),
}


def make_case(batch, length, vocab=32000, k=50, seed=0, std_scale=False, device="cpu"):
    return dict(batch=batch, length=length, vocab=vocab, k=k, temperature=1.0,
                std_scale=std_scale, ranking="sequence", seed=seed, device=str(device))


def named_cases(device, quick=False):
    """The pytest-benchmark suite's cases: the paper's batch and a 32000-token vocabulary,
    without and with std scaling."""
    cases = {
        "paper-vocab": make_case(8, 256, seed=0, device=device),
        "paper-vocab-std": make_case(8, 256, seed=1, std_scale=True, device=device),
    }
    if quick:
        cases = {name: dict(case, batch=2, length=16, vocab=1000) for name, case in cases.items()}
    return cases


def logits_mib(case):
    """The size of the case's float32 logits [B, L, V] in MiB (that of their gradient too)."""
    return case["batch"] * case["length"] * case["vocab"] * 4 / 2**20


def make_inputs(case):
    """The case's logits [B, L, V] (float32, 3 * standard normal, requires_grad) and the
    weight w [B, L, k] (uniform in [0.5, 1.5)) of the objective ``(probs * w).sum()``."""
    gen = torch.Generator().manual_seed(case["seed"])
    logits = 3 * torch.randn(case["batch"], case["length"], case["vocab"], generator=gen)
    weight = torch.rand(case["batch"], case["length"], case["k"], generator=gen) + 0.5
    device = torch.device(case["device"])
    return logits.to(device).requires_grad_(), weight.to(device)


def make_case_steps(impl, case, impls=IMPLS):
    """:class:`benchmarks.steps.Steps` of ``impls[impl]`` on the case."""
    fn = impls[impl].run
    options = {key: case[key] for key in OPTIONS}
    logits, weight = make_inputs(case)

    def run():
        probs, _ = fn(logits, **options)
        return (probs * weight).sum()

    return make_steps(run, (logits,), case["device"])


def work(case):
    """The modelled work of one forward+backward of the op (benchmarks/ceilings.py): float32
    logits read by the forward and by the backward, and their gradient written."""
    return dict(flops=None, bytes=3 * 4 * case["batch"] * case["length"] * case["vocab"])


def shape(case):
    return f"{case['batch']}×{case['length']}×{case['vocab']}" + (" std" if case["std_scale"] else "")
