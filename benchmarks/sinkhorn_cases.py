"""The Sinkhorn-loss benchmark cases, implementations and steps, shared by the pytest-benchmark
suite (benchmarks/test_sinkhorn.py), the report (benchmarks/report.py) and the memory probe
(benchmarks/memory.py).

A case is a dict: float32 random-normal logits x [B, M, K] (teacher side) and y [B, N, K] on
``device`` (a fixed ``seed`` per case), ``lengths`` 'full' (every position valid, no lengths
passed) or 'variable' (answer lengths from benchmarks/answer_lengths.py, the batch padded to its
longest answer), and the loss options: ``epsilon=0.1, n_iters=20, temperature=2.0, p=1`` and
unit marginals, the released code's Sinkhorn. The objective is ``loss.sum()``, differentiated
with respect to x and y.

Implementations (``IMPLS``) at an equal iteration count, all with the L1 cost and computing the
same values and gradients (tests/test_benchmark_peers.py): the op and the peers of
benchmarks/peers.py. GeomLoss cannot run a given number of iterations (epsilon-scaling), so it
is compared at a tolerance instead (``TOLERANCE_IMPLS``, benchmarks/tolerance.py), with
probability marginals, and its p=1 cost is the Euclidean norm.
"""

import torch

import mlot_kernels
from benchmarks import peers
from benchmarks.answer_lengths import answer_lengths
from benchmarks.steps import Impl, make_steps

OPTIONS = dict(epsilon=0.1, n_iters=20, temperature=2.0, unit_marginals=True)


def _options(case):
    return {key: case[key] for key in OPTIONS}


def _op(x, y, x_lengths, y_lengths, case):
    return mlot_kernels.sinkhorn_loss(x, y, x_lengths, y_lengths, p=1, **_options(case))


def _peer(fn):
    return lambda x, y, x_lengths, y_lengths, case: fn(x, y, x_lengths, y_lengths, **_options(case))


def _geomloss(backend):
    def run(x, y, x_lengths, y_lengths, case):
        return peers.geomloss_sinkhorn(x, y, x_lengths, y_lengths, epsilon=case["epsilon"],
                                       temperature=case["temperature"], scaling=case["scaling"],
                                       backend=backend)
    return run


L1 = "; L1 cost sum_i |a_i - c_i|"
IMPLS = {
    "mlot": Impl(_op, "torch.ops.mlot.sinkhorn_loss (fused C++ kernel on CPU, Triton on CUDA)" + L1),
    "released_loop": Impl(_peer(peers.released_loop), "the released code: one sequence at a time, "
                          "probability domain (cdist p=1, exp, row and column normalisation)" + L1),
    "batched_log_domain": Impl(_peer(peers.batched_log_domain), "the whole batch in eager "
                               "PyTorch, log-domain logsumexp updates, padding masked" + L1),
    "compiled_log_domain": Impl(_peer(peers.compiled_log_domain),
                                "batched_log_domain under torch.compile(dynamic=True)" + L1),
    "pot_batch": Impl(_peer(peers.pot_batch), "POT ot.batch.solve_batch(method='log_sinkhorn', "
                      "grad='autodiff') on ot.batch.dist_batch(metric='minkowski', p=1)" + L1, ("ot",)),
    "pot_sinkhorn_log": Impl(_peer(peers.pot_sinkhorn_log), "POT ot.bregman.sinkhorn_log, one "
                             "problem at a time (the transposed problem: rows first)" + L1, ("ot",)),
}
# time to tolerance: the op runs case["n_iters"] iterations, GeomLoss case["scaling"]
EUCLIDEAN = "; Euclidean cost |a - c|_2 (GeomLoss's p=1), probability marginals, value <α,f> + <β,g>"
TOLERANCE_IMPLS = {
    "mlot": Impl(_op, "torch.ops.mlot.sinkhorn_loss, probability marginals" + L1),
    "geomloss_tensorized": Impl(_geomloss("tensorized"), "GeomLoss SamplesLoss('sinkhorn', p=1, "
                                "blur=epsilon, debias=False, backend='tensorized')" + EUCLIDEAN,
                                ("geomloss",)),
    "geomloss_online": Impl(_geomloss("online"), "the same with backend='online' (KeOps)" + EUCLIDEAN,
                            ("geomloss", "pykeops")),
}


def make_case(batch, m, n=None, k=50, seed=0, lengths="full", device="cpu", **options):
    """A case dict; ``n`` defaults to ``m``; ``options`` override :data:`OPTIONS`."""
    return dict(batch=batch, m=m, n=m if n is None else n, k=k, seed=seed, lengths=lengths,
                device=str(device), **dict(OPTIONS, **options))


def named_cases(device, quick=False):
    """The pytest-benchmark suite's cases: the paper's QA size, 16 variable answer lengths, long."""
    long = 4096 if torch.device(device).type == "cuda" else 1024
    cases = {
        "paper": make_case(8, 128, seed=0, device=device),
        "variable": make_case(16, 256, seed=2, lengths="variable", device=device),
        "long": make_case(4, long, seed=1, device=device),
    }
    if quick:
        cases = {name: dict(case, batch=2, m=16, n=16, n_iters=3) for name, case in cases.items()}
    return cases


def make_inputs(case):
    """(x, y, x_lengths, y_lengths) of the case: x and y requires_grad on the case's device.
    'variable' draws the lengths (limit M) first and pads the batch to its longest answers."""
    gen = torch.Generator().manual_seed(case["seed"])
    m, n, x_lengths, y_lengths = case["m"], case["n"], None, None
    if case["lengths"] == "variable":
        x_lengths, y_lengths = answer_lengths(gen, case["batch"], min(m, n))
        m, n = int(x_lengths.max()), int(y_lengths.max())
    elif case["lengths"] != "full":
        raise ValueError(f"case lengths must be 'full' or 'variable', got {case['lengths']!r}")
    device = torch.device(case["device"])
    x = torch.randn(case["batch"], m, case["k"], generator=gen).to(device).requires_grad_()
    y = torch.randn(case["batch"], n, case["k"], generator=gen).to(device).requires_grad_()
    if x_lengths is not None:
        x_lengths, y_lengths = x_lengths.to(device), y_lengths.to(device)
    return x, y, x_lengths, y_lengths


def make_case_steps(impl, case, impls=IMPLS):
    """:class:`benchmarks.steps.Steps` of ``impls[impl]`` on the case."""
    x, y, x_lengths, y_lengths = make_inputs(case)
    run = impls[impl].run
    return make_steps(lambda: run(x, y, x_lengths, y_lengths, case).sum(), (x, y), case["device"])


def work(case):
    """The floor model of one forward+backward of the op (benchmarks/ceilings.py), over the
    valid positions, in vector lane operations (an FMA, add, subtract, bitwise and or compare:
    one each), stated as flops at two per lane operation, the rate a matrix product reaches: so
    the fraction of the matmul rate is the floor's time over the measured time. Per pair of
    positions: the cost 3K (subtract, absolute value, add) in the forward and again in the
    backward (only the potentials are saved), its gradient 5K (subtract, compare, apply the
    sign, add to each side), the Gibbs kernel and the loss 37 (two exponentials at 15, the loss
    terms 7), and 10 per iteration (the scaling form: one matrix-vector product per half-step
    forward, four in the backward and two rank-1 plan terms). Bytes: the float32 inputs read and
    their gradients written."""
    x, y, x_lengths, y_lengths = make_inputs(dict(case, device="cpu"))
    m = x_lengths if x_lengths is not None else torch.full((case["batch"],), x.shape[1])
    n = y_lengths if y_lengths is not None else torch.full((case["batch"],), y.shape[1])
    pairs, rows = int((m * n).sum()), int((m + n).sum())
    lane_ops = (11 * case["k"] + 37 + 10 * case["n_iters"]) * pairs
    return dict(flops=2 * lane_ops, bytes=2 * 4 * rows * case["k"])


def shape(case):
    """"B×M×N×K" of the inputs (a variable case's padded M and N)."""
    x, y, _, _ = make_inputs(dict(case, device="cpu"))
    return f"{x.shape[0]}×{x.shape[1]}×{y.shape[1]}×{x.shape[2]}"
