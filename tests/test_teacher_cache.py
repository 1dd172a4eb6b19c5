"""The teacher cache: stored hidden states give the loss and gradients of the teacher's own
hidden states for every preset and ULD (batch ranking included), in any batch; what cannot be
read or must not be reused is refused by name."""

import pytest
import torch

from mlot_kernels import MultiLevelOTLoss, uld_loss
from mlot_kernels.losses.answers import answer_positions
from mlot_kernels.distill.teacher_cache import TeacherCache, compact
from mlot_kernels.losses.outputs import Hidden
from tests.loss_oracles import make_hidden_batch

SETTINGS = [dict(preset="paper"), dict(preset="paper", ranking="token"),
            dict(preset="official"), "uld"]
IDS = ["paper", "paper-token", "official", "uld"]


def loss(settings, student, teacher, s_labels, t_labels):
    if settings == "uld":
        return uld_loss(student, teacher, s_labels, t_labels)
    return MultiLevelOTLoss(**settings)(student, teacher, s_labels, t_labels)


@pytest.mark.parametrize("settings", SETTINGS, ids=IDS)
def test_stored_states_give_the_same_loss_and_gradient(gen, tmp_path, settings):
    """put -> files -> get, batched in another order with other companions: the loss and the
    student's gradients of the teacher's own hidden states (batch ranking sees the same rows)."""
    student, teacher, s_labels, t_labels = make_hidden_batch(gen, [5, 3, 7, 2], [4, 6, 0, 8], 70,
                                                             90, dtype=torch.float32)
    answer_span = "window" if settings != "uld" and settings["preset"] == "official" else "labels"
    cache = TeacherCache(str(tmp_path), dict(teacher="t"), answer_span)
    cache.put([10, 11, 12, 13], teacher[0], t_labels)
    for rows in ([1, 3], [2, 0, 1]):  # sub-batches whose longest teacher answer differs
        pick = torch.tensor(rows)
        expected_hidden = student[0][pick].clone().requires_grad_()
        expected = loss(settings, Hidden(expected_hidden, *student[1:]),
                        Hidden(teacher[0][pick], *teacher[1:]), s_labels[pick], t_labels[pick])
        actual_hidden = student[0][pick].clone().requires_grad_()
        hidden, labels = cache.get([10 + r for r in rows], "cpu")
        actual = loss(settings, Hidden(actual_hidden, *student[1:]), Hidden(hidden, *teacher[1:]),
                      s_labels[pick], labels)
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=1e-6, atol=1e-7)
        expected["loss"].backward()
        actual["loss"].backward()
        torch.testing.assert_close(actual_hidden.grad, expected_hidden.grad, rtol=1e-6, atol=1e-8)


def test_compact_batches_hold_exactly_the_answer_rows(gen):
    """Each rule's rows, left-aligned and zero-padded; a rule an entry lacks is named."""
    entries = [dict(hidden=torch.randn(n + 1, 4, generator=gen),
                    rules=dict(labels=list(range(n)), window=list(range(1, n + 1))))
               for n in (3, 0, 5)]
    for rule, first in (("labels", 0), ("window", 1)):
        hidden, labels = compact(entries, "cpu", rule)
        assert hidden.shape == (3, 6, 4) and labels.shape == (3, 6)
        for b, e in enumerate(entries):
            n = len(e["rules"][rule])
            assert torch.equal(hidden[b, :n], e["hidden"][first:first + n])
            assert (hidden[b, n:] == 0).all()
            assert (labels[b] != -100).sum() == n and labels[b, 0] == -100
    del entries[1]["rules"]["window"]
    with pytest.raises(ValueError, match=r"answer_span='window' needs one contiguous answer"):
        compact(entries, "cpu", "window")


def test_one_directory_serves_both_answer_rules(gen, tmp_path):
    """Filled for the paper preset ('labels' rows), the same directory serves the official
    preset ('window' rows) with the loss of the teacher's own states; where the rules find other
    rows, each gets its own; labels without a window store the 'labels' rows only, and 'window'
    is then refused by name."""
    student, teacher, s_labels, t_labels = make_hidden_batch(gen, [5, 3, 7], [4, 6, 8], 70, 90,
                                                             dtype=torch.float32)
    TeacherCache(str(tmp_path), dict(teacher="t"), "labels").put([0, 1, 2], teacher[0], t_labels)
    window = TeacherCache(str(tmp_path), dict(teacher="t"), "window")
    hidden, labels = window.get([0, 1, 2], "cpu")
    settings = dict(preset="official")
    expected = loss(settings, Hidden(*student), Hidden(*teacher), s_labels, t_labels)
    actual = loss(settings, Hidden(*student), Hidden(hidden, *teacher[1:]), s_labels, labels)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-6, atol=1e-7)
    holes = t_labels[:2].clone()
    first = int((holes[0] != -100).nonzero()[0, 0])
    holes[0, first + 1] = -100  # two pieces of answer: the rules find other rows
    holes[1, 0] = 7  # a label at position 0: no window
    window.put([5, 6], teacher[0][:2], holes)
    rows, n = answer_positions(holes[:1], "window")
    assert torch.equal(window.get([5], "cpu")[0][0, :int(n[0])], teacher[0][0, rows[0, :int(n[0])]])
    labels_rule = TeacherCache(str(tmp_path), dict(teacher="t"), "labels")
    rows, n = answer_positions(holes[1:], "labels")
    assert torch.equal(labels_rule.get([6], "cpu")[0][0, :int(n[0])],
                       teacher[0][1, rows[0, :int(n[0])]])
    with pytest.raises(ValueError, match=r"answer_span='window' needs one contiguous answer"):
        window.get([6], "cpu")


def test_missing_entries_give_none_and_corrupt_ones_are_named(tmp_path, gen):
    _, teacher, _, t_labels = make_hidden_batch(gen, [3, 4], [5, 2], 30, 40, dtype=torch.float32)
    cache = TeacherCache(str(tmp_path), {}, "labels")
    cache.put([0, 1], teacher[0], t_labels)
    assert cache.get([0, 1], "cpu") is not None
    assert cache.get([0, 2], "cpu") is None
    path = tmp_path / "000000001.pt"
    path.write_bytes(path.read_bytes()[:100])  # a truncated write
    with pytest.raises(ValueError, match=r"cannot read .*000000001.pt.*remove it"):
        cache.get([0, 1], "cpu")


def test_other_settings_are_refused(tmp_path):
    TeacherCache(str(tmp_path), dict(teacher="a"), "labels")
    with pytest.raises(ValueError, match=r"other settings \(differing: \['teacher'\]\)"):
        TeacherCache(str(tmp_path), dict(teacher="b"), "labels")
    TeacherCache(str(tmp_path), dict(teacher="a"), "window")  # one directory, both rules
    with pytest.raises(ValueError, match=r"answer_span must be one of"):
        TeacherCache(str(tmp_path), dict(teacher="a"), "rows")
