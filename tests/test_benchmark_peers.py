"""The benchmark peers (benchmarks/peers.py) compute what the op computes, so timings compare equal
work; benchmarks/tolerance.py measures the accuracy that GeomLoss is compared at; and TRL GOLD's
ULDLoss computes what uld_loss computes where the two compute the same thing."""

import math

import pytest
import torch

import mlot_kernels
from benchmarks import peers, tolerance
from tests.conftest import assert_close_rel, value_and_grads
from tests.loss_oracles import make_batch, official_oracle

EPSILON = 0.1
TEMPERATURE = 2.0
B, M, N, K = 3, 11, 8, 9
LADDER = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


def _problem(gen, lengths, scale=1.0, shortest=1, k=K):
    """Fresh float64 x [B, M, k], y [B, N, k] (``scale * randn``) and, with ``lengths``, valid
    lengths: one full, one random in [shortest, maximum), one ``shortest``."""
    x = scale * torch.randn(B, M, k, generator=gen, dtype=torch.float64)
    y = scale * torch.randn(B, N, k, generator=gen, dtype=torch.float64)
    if not lengths:
        return x, y, None, None
    x_lengths = torch.tensor([M, int(torch.randint(shortest, M, (), generator=gen)), shortest])
    y_lengths = torch.tensor([int(torch.randint(shortest, N, (), generator=gen)), shortest, N])
    return x, y, x_lengths, y_lengths


def _assert_same_as_op(peer, gen, n_iters, unit_marginals, lengths):
    """The peer's [B] values and the gradients of a random weighting of them (so that each
    problem's gradient is checked on its own) equal the op's with p=1, and are finite."""
    x, y, x_lengths, y_lengths = _problem(gen, lengths)
    weights = torch.rand(B, generator=gen, dtype=torch.float64)
    options = {"epsilon": EPSILON, "n_iters": n_iters, "temperature": TEMPERATURE,
               "unit_marginals": unit_marginals}
    got = value_and_grads(peer, x, y, weights, x_lengths, y_lengths, **options)
    want = value_and_grads(mlot_kernels.sinkhorn_loss, x, y, weights, x_lengths, y_lengths, p=1,
                           **options)
    for actual, expected in zip(got, want):
        assert torch.isfinite(actual).all()
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)


# every equal-iteration peer, n_iters, marginals and lengths that the peer supports:
# released_loop has unit marginals only, POT's batched solver fails with max_iter=0
PEER_CASES = [
    pytest.param(name, n_iters, unit, lengths,
                 id=f"{name}-{n_iters}-{'unit' if unit else 'prob'}-{'lengths' if lengths else 'full'}")
    for name in ("released_loop", "batched_log_domain", "pot_batch", "pot_sinkhorn_log")
    for n_iters in (0, 1, 20)
    for unit in (True, False)
    for lengths in (False, True)
    if (unit or name != "released_loop") and (n_iters > 0 or name != "pot_batch")
]


@pytest.mark.parametrize("name, n_iters, unit_marginals, lengths", PEER_CASES)
def test_sinkhorn_peer_matches_op(gen, name, n_iters, unit_marginals, lengths):
    """Each equal-iteration peer's values and gradients equal the op's (p=1, the same
    iterations, marginals and lengths) to rounding in float64."""
    if name.startswith("pot_"):
        pytest.importorskip("ot")
    _assert_same_as_op(getattr(peers, name), gen, n_iters, unit_marginals, lengths)


@pytest.mark.slow
def test_compiled_log_domain_matches_op(gen):
    """torch.compile of batched_log_domain (a cold compile: ~35 s on 2 cores, hence 2
    iterations and one case) computes the op's values and gradients."""
    _assert_same_as_op(peers.compiled_log_domain, gen, n_iters=2, unit_marginals=False,
                       lengths=True)


def test_peers_reject_what_they_cannot_compute():
    """released_loop has unit marginals only; POT's batched solver needs n_iters >= 1."""
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="unit_marginals"):
        peers.released_loop(x, x, unit_marginals=False)
    pytest.importorskip("ot")
    with pytest.raises(ValueError, match="n_iters"):
        peers.pot_batch(x, x, n_iters=0)


@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
def test_iterations_to_tolerance_is_the_first_n_within_tol(gen, lengths):
    """iterations_to_tolerance returns the n with err(n) <= tol < err(n - 1) for the worst
    problem (op_marginal_error), and raises when max_iters is below it; the error measures the
    probability marginals (it vanishes once converged)."""
    x, y, x_lengths, y_lengths = _problem(gen, lengths, scale=3.0, shortest=2)
    options = {"epsilon": EPSILON, "temperature": 1.0}
    tol = 1e-3
    n = tolerance.iterations_to_tolerance(x, y, x_lengths, y_lengths, tol=tol, **options)

    def worst(n_iters):
        errors = tolerance.op_marginal_error(x, y, x_lengths, y_lengths, n_iters=n_iters, **options)
        assert errors.shape == (B,) and errors.dtype == torch.float64
        return errors.max().item()

    assert n >= 2
    assert worst(n) <= tol < worst(n - 1)
    assert worst(500) < 1e-12
    with pytest.raises(ValueError, match="max_iters"):
        tolerance.iterations_to_tolerance(x, y, x_lengths, y_lengths, tol=tol, max_iters=n - 1,
                                          **options)


def test_geomloss_marginal_error_falls_with_the_scaling(gen):
    """GeomLoss's marginal error falls as the scaling approaches 1 (checked at 0.5, 0.9 and
    0.99: in between, where the annealing schedule lands on epsilon makes it wobble), and
    scaling_to_tolerance returns the first scaling of the ladder within tol, or None."""
    pytest.importorskip("geomloss")
    x, y, x_lengths, y_lengths = _problem(gen, lengths=True, scale=3.0, shortest=2)
    options = {"epsilon": EPSILON, "temperature": 1.0}
    errors = {scaling: tolerance.geomloss_marginal_error(x, y, x_lengths, y_lengths,
                                                         scaling=scaling, **options)
              for scaling in LADDER}
    assert all(e.shape == (B,) and e.dtype == torch.float64 for e in errors.values())
    worst = [errors[scaling].max().item() for scaling in LADDER]
    assert worst[LADDER.index(0.5)] > worst[LADDER.index(0.9)] > worst[LADDER.index(0.99)]
    tol = worst[LADDER.index(0.9)]
    first = next(s for s, w in zip(LADDER, worst) if w <= tol)
    assert tolerance.scaling_to_tolerance(x, y, x_lengths, y_lengths, tol=tol, **options) == first
    assert tolerance.scaling_to_tolerance(x, y, x_lengths, y_lengths, tol=min(worst) / 2,
                                          **options) is None


@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
def test_geomloss_marginal_error_is_tiny_at_fine_scaling(gen, lengths):
    """At scaling 0.99 the plan rebuilt from GeomLoss's potentials, with the Euclidean cost and
    no rescaling, has its marginals (on the benchmarks' kind of input, randn logits over 50
    columns at temperature 2): the formula of geomloss_marginal_error is GeomLoss's plan."""
    pytest.importorskip("geomloss")
    x, y, x_lengths, y_lengths = _problem(gen, lengths, k=50)
    errors = tolerance.geomloss_marginal_error(x, y, x_lengths, y_lengths, epsilon=EPSILON,
                                               temperature=TEMPERATURE, scaling=0.99)
    assert errors.max() < 1e-4


def _converged_ot_eps(x, y, x_lengths, y_lengths, epsilon, temperature):
    """[B]: OT_eps = <α, f> + <β, g> of each problem on its valid prefix, uniform weights, cost
    |a_i - c_j|_2 of the softmax rows, from log-domain Sinkhorn run to float64 convergence."""
    values = []
    for b in range(x.shape[0]):
        m = x.shape[1] if x_lengths is None else int(x_lengths[b])
        n = y.shape[1] if y_lengths is None else int(y_lengths[b])
        a = torch.softmax(x[b, :m] / temperature, -1)
        c = torch.softmax(y[b, :n] / temperature, -1)
        cost = (a[:, None, :] - c[None, :, :]).square().sum(-1).sqrt()
        f, g = cost.new_zeros(m), cost.new_zeros(n)
        for _ in range(20000):
            f = -epsilon * torch.logsumexp((g[None, :] - cost) / epsilon - math.log(n), dim=1)
            g = -epsilon * torch.logsumexp((f[:, None] - cost) / epsilon - math.log(m), dim=0)
            plan = torch.exp((f[:, None] + g[None, :] - cost) / epsilon) / (m * n)
            if (plan.sum(1) - 1 / m).abs().sum() < 1e-14:
                break
        else:
            raise AssertionError("the reference Sinkhorn did not converge")
        values.append(f.mean() + g.mean())
    return torch.stack(values)


@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
def test_geomloss_sinkhorn_is_entropic_ot(gen, lengths):
    """geomloss_sinkhorn at a fine scaling is the converged entropic OT value of the
    probability measures with the Euclidean cost, OT_eps = <α, f> + <β, g> (1e-4 relative)."""
    pytest.importorskip("geomloss")
    x, y, x_lengths, y_lengths = _problem(gen, lengths, scale=3.0, shortest=2)
    value = peers.geomloss_sinkhorn(x, y, x_lengths, y_lengths, epsilon=EPSILON, temperature=1.0,
                                    scaling=0.999)
    expected = _converged_ot_eps(x, y, x_lengths, y_lengths, EPSILON, 1.0)
    torch.testing.assert_close(value, expected, rtol=1e-4, atol=0)


def test_released_loss_matches_official_preset(gen):
    """released_loss equals MultiLevelOTLoss('official')'s total and its gradients with respect
    to both models' logits in float64 (and the official oracle), with different answer lengths."""
    batch = make_batch(gen, [5, 3, 7], [4, 6, 2], 80, 64)
    official = mlot_kernels.MultiLevelOTLoss("official")
    results = []
    for fn in (peers.released_loss, lambda *args: official(*args)["loss"],
               lambda *args: official_oracle(*args)["loss"]):
        s_logits, t_logits = (z.detach().requires_grad_() for z in batch[:2])
        loss = fn(s_logits, t_logits, *batch[2:])
        results.append((loss.detach(), *torch.autograd.grad(loss, (s_logits, t_logits))))
    released, *expected = results
    assert released[0].dim() == 0
    for other in expected:
        for actual, want in zip(released, other):
            torch.testing.assert_close(actual, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("std_scale", [False, True])
@pytest.mark.parametrize("ranking", ["sequence", "token", "batch"])
def test_eager_topk_probs_matches_op(gen, ranking, std_scale):
    """eager_topk_probs' probabilities, indices and logits' gradient equal the op's (no lengths,
    V > k, float64 logits without ties)."""
    k, temperature = 50, 0.7
    logits = 3 * torch.randn(3, 7, 300, generator=gen, dtype=torch.float64)
    weights = torch.rand(3, 7, k, generator=gen, dtype=torch.float64) + 0.5
    results = []
    for fn in (peers.eager_topk_probs, mlot_kernels.topk_probs):
        z = logits.clone().requires_grad_()
        probs, indices = fn(z, k=k, temperature=temperature, std_scale=std_scale, ranking=ranking)
        (grad,) = torch.autograd.grad((probs * weights).sum(), z)
        results.append((probs.detach(), indices, grad))
    (probs, indices, grad), (e_probs, e_indices, e_grad) = results
    assert torch.equal(indices, e_indices)
    torch.testing.assert_close(probs, e_probs, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, e_grad, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- TRL GOLD's ULDLoss
#
# GOLD's ULDLoss (trl.experimental.gold, TRL 1.16) and mlot_kernels.uld_loss compute the same
# value and gradients when every answer is one contiguous span after position 0 and GOLD has
# peers.GOLD_AS_ULD (positional alignment, 'bayesian' rows, no hybrid part, CE weight 1, the
# teacher's EOS kept), uld_loss's weight as its distillation weight and one temperature on both
# sides (test_gold_uld_matches_uld_loss). In general they differ in:
# - the rows: GOLD's default 'observed' strategy reads the logits AT the answer tokens
#   [start, start + size), each of which predicts the token after it, not the logits that
#   predict them [start - 1, start + size - 1) (uld_loss's, and GOLD's 'bayesian');
# - the EOS: GOLD skips the last answer token of both sides by default, uld_loss of neither
#   (of the student's with skip_student_eos);
# - the alignment: GOLD's default (use_extended_uld) walks both answers' byte offsets into
#   groups and merges each multi-token group's rows into one (the first row's distribution
#   times the later tokens' probabilities); uld_loss pairs the first min(n_S, n_T) rows. With
#   one tokenizer on both sides the groups are single tokens and both pair the same rows
#   (test_gold_default_alignment_with_one_tokenizer);
# - the weights: GOLD's defaults are CE 0 and distillation 1, uld_loss's CE 1 and ULD 1.5;
# - the labels: GOLD takes the span from the first answer label to first + count (it assumes
#   one contiguous answer), uld_loss the positions of the labels themselves; GOLD's CE is NaN
#   without labels, uld_loss's 0; GOLD computes in the logits' dtype, uld_loss in float32 at least.
# uld_loss's hybrid counterpart does not exist: GOLD's uld_use_hybrid_loss (a JSD over the tokens
# both vocabularies share) is off here.


def _gold():
    pytest.importorskip("trl", minversion="1.16", reason="TRL (GOLD's ULDLoss) is not installed")


def _loss_and_grads(fn, s_logits, t_logits, *args):
    """fn's scalar and its gradients with respect to both models' logits."""
    s_logits, t_logits = (z.detach().requires_grad_() for z in (s_logits, t_logits))
    loss = fn(s_logits, t_logits, *args)
    return (loss.detach(), *torch.autograd.grad(loss, (s_logits, t_logits)))


@pytest.mark.parametrize("skip_student_eos", [False, True], ids=["eos", "no-eos"])
def test_gold_uld_matches_uld_loss(gen, skip_student_eos):
    """GOLD's ULDLoss configured as uld_loss (peers.gold_uld_as_uld_loss) computes uld_loss's
    total and its gradients with respect to both models' logits, in float64 to rounding (1e-9
    relative): two vocabularies, different answer lengths on the two sides, a one-token answer
    (no student row without its EOS), temperature 0.7 and weight 0.8."""
    _gold()
    batch = make_batch(gen, [5, 1, 7], [4, 6, 2], 80, 64)
    options = dict(weight=0.8, temperature=0.7, skip_student_eos=skip_student_eos)
    gold = _loss_and_grads(lambda *a: peers.gold_uld_as_uld_loss(*a, **options), *batch)
    ours = _loss_and_grads(lambda *a: mlot_kernels.uld_loss(*a, **options)["loss"], *batch)
    assert gold[0].dtype == torch.float64 and gold[0].dim() == 0
    for actual, expected in zip(gold, ours):
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)


def test_gold_uld_matches_uld_loss_in_the_report(gen):
    """The report's rows 'gold_uld' and 'uld' (benchmarks/loss_cost_cases.py) compute the same
    total and student gradient on its batch (the --quick case: float32 logits, the teacher
    frozen), to float32 rounding: 1e-5 relative (the difference is about 1e-7)."""
    _gold()
    from benchmarks import loss_cost_cases

    case = loss_cost_cases.named_cases("cpu", quick=True)["quick"]
    results = []
    for impl in ("gold_uld", "uld"):
        s_logits, t_logits, *labels = loss_cost_cases.make_inputs(case, hidden=False)
        loss = loss_cost_cases.IMPLS[impl].run(s_logits, t_logits, *labels)
        results.append((loss.detach(), *torch.autograd.grad(loss, s_logits)))
    assert results[0][0].dtype == torch.float32
    for actual, expected in zip(*results):
        assert_close_rel(actual, expected, 1e-5)


def _drop_first_answer_label(labels):
    """labels with each sequence's first answer label set to -100."""
    first = (labels != peers.IGNORE_INDEX).int().argmax(1)
    return labels.scatter(1, first[:, None], peers.IGNORE_INDEX)


def test_gold_default_alignment_with_one_tokenizer(gen):
    """GOLD's ULDLoss with all its defaults (byte-offset alignment, 'observed' rows, both EOS
    skipped, CE weight 0, distillation weight 1, temperature 1) and one tokenizer on both sides
    (the same answer lengths and byte offsets, so every alignment group is one token) computes
    uld_loss's ULD term (weight 1) on the labels without their first answer token, and its
    gradients, in float64 (1e-9 relative): 'observed' reads the rows at answer tokens 0 to
    n - 2 (the last, EOS, skipped), which are the rows that predict answer tokens 1 to n - 1."""
    _gold()
    answers = [5, 1, 7]
    s_logits, t_logits, labels, _ = make_batch(gen, answers, answers, 80, 80, prompt=(3, 3))
    widths = torch.randint(1, 5, labels.shape, generator=gen)  # 1 to 4 bytes a token
    answer = labels != peers.IGNORE_INDEX
    ends = torch.where(answer, widths, 0).cumsum(1)
    offsets = torch.where(answer[..., None], torch.stack([ends - widths, ends], -1), 0)
    gold = _loss_and_grads(lambda *a: peers.gold_uld_loss(*a, student_byte_offsets=offsets,
                                                          teacher_byte_offsets=offsets),
                           s_logits, t_logits, labels, labels)
    shifted = _drop_first_answer_label(labels)
    ours = _loss_and_grads(lambda *a: mlot_kernels.uld_loss(*a)["uld"], s_logits, t_logits,
                           shifted, shifted)
    for actual, expected in zip(gold, ours):
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)


def test_report_byte_offsets_align_as_stated():
    """The report's synthetic byte offsets (loss_cost_cases.byte_offsets), walked by GOLD's
    alignment as GOLD slices them with both EOS skipped: answer - extra one-to-one pairs and
    extra pairs of one student token with two teacher tokens, extra = teacher_answer - answer."""
    _gold()
    from trl.experimental.gold.gold_trainer import ULDLoss

    from benchmarks import loss_cost_cases

    case = loss_cost_cases.make_case(2, 64, 300, 200, 16, 20, 26, 10)
    student, teacher = loss_cost_cases.byte_offsets(case)
    start = case["prompt"]
    for b in range(case["batch"]):
        s_groups, t_groups = ULDLoss._align_by_byte_offsets(
            student[b, start:start + case["answer"] - 1].tolist(),
            teacher[b, start:start + case["teacher_answer"] - 1].tolist())
        sizes = [(len(s), len(t)) for s, t in zip(s_groups, t_groups)]
        assert len(sizes) == case["answer"] - 1
        assert sizes.count((1, 2)) == 6 and sizes.count((1, 1)) == case["answer"] - 7
