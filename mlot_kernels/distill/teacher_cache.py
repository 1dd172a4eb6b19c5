"""``--teacher-cache DIR``: the teacher's last hidden states at its answer rows, computed once
per example.

The losses read the teacher only through its logits at its answer rows, and those are its
output layer applied to its last hidden state there (:func:`mlot_kernels.distill.models.
output_layer` checks that it is so). The cache stores, per training example, those hidden states
(``[n_T, H]``, in the teacher's dtype) and later steps rebuild the teacher's outputs from them
(:class:`mlot_kernels.losses.outputs.Hidden`) with the teacher's output layer: every loss and every
option then runs on them as on the teacher's forward, including ``batch`` ranking (the
``official`` preset), whose column order depends on the whole batch, and ULD. A cached step costs
the projection of the answer rows, not the teacher's forward.

Each entry holds the rows of both answer rules (``labels`` and ``window``; for one contiguous
answer after the prompt they are the same rows), so one directory serves every preset. The
directory belongs to one teacher, tokenizer, data set, prompt and teacher dtype (``meta.json``),
and to the teacher's token ids of every example (:func:`token_digest`), so a
tokenizer or chat template changed under the same path is caught too; a run with other settings
stops with an error instead of reading stale states.
An entry that cannot be read stops the run with an error that names its file.
"""

import hashlib
import json
import os

import torch

from mlot_kernels.losses.answers import IGNORE_INDEX, SPAN_RULES, answer_positions
from mlot_kernels.distill.files import save_torch, write_json


class TeacherCache:
    """Per-example teacher hidden states under ``directory`` for one ``fingerprint`` (a JSON-able
    dict of everything they depend on), at the rows of both answer rules: one directory serves
    every preset. ``answer_span`` is the rule :meth:`get` serves."""

    def __init__(self, directory, fingerprint, answer_span):
        if answer_span not in SPAN_RULES:
            raise ValueError(f"answer_span must be one of {SPAN_RULES}, got {answer_span!r}")
        self.directory = directory
        self.answer_span = answer_span
        self.fingerprint = dict(fingerprint, stores="hidden states at the rows of both answer rules")
        os.makedirs(directory, exist_ok=True)
        meta = os.path.join(directory, "meta.json")
        if os.path.exists(meta):
            with open(meta) as f:
                stored = json.load(f)
            if stored != json.loads(json.dumps(self.fingerprint)):
                changed = sorted(key for key in set(stored) | set(self.fingerprint)
                                 if stored.get(key) != self.fingerprint.get(key))
                raise ValueError(f"--teacher-cache {directory!r} holds hidden states for other "
                                 f"settings (differing: {changed}); use another directory")
        else:
            write_json(self.fingerprint, meta)

    def _path(self, index):
        return os.path.join(self.directory, f"{index:09d}.pt")

    def get(self, indices, device):
        """The batch's compact teacher batch (:func:`compact`) for this cache's answer rule on
        ``device``, or None unless every example is stored."""
        paths = [self._path(i) for i in indices]
        if not all(os.path.exists(p) for p in paths):
            return None
        return compact([read_entry(p) for p in paths], device, self.answer_span)

    def put(self, indices, hidden, labels):
        """Store each sequence's hidden states [B, T, H] at the rows either answer rule finds in
        ``labels`` [B, T] under its example index. (The ``window`` rule's rows are stored where
        it applies: for one contiguous answer after the prompt; there it finds the rows the
        ``labels`` rule does.)"""
        for b, index in enumerate(indices):
            rows = {}
            for rule in SPAN_RULES:
                try:
                    positions, lengths = answer_positions(labels[b:b + 1], rule)
                except ValueError:  # not one contiguous answer: no 'window' rows
                    continue
                rows[rule] = positions[0, :int(lengths[0])].tolist()
            kept = sorted(set().union(*rows.values()))
            where = {position: i for i, position in enumerate(kept)}
            states = hidden[b, torch.tensor(kept, dtype=torch.long)].detach().cpu().clone()
            save_torch(dict(hidden=states, rules={rule: [where[p] for p in r]
                                                  for rule, r in rows.items()}),
                       self._path(index))


def token_digest(sequences):
    """A SHA-256 of encoded sequences' input ids and labels (:class:`mlot_kernels.distill.
    prompts.Encoded`), in order."""
    digest = hashlib.sha256()
    for sequence in sequences:
        digest.update(json.dumps([sequence.input_ids, sequence.labels]).encode())
    return digest.hexdigest()


def read_entry(path):
    """One stored entry, or a ValueError naming the file."""
    try:
        entry = torch.load(path, weights_only=True)
        rows = entry["hidden"].shape[0]
        if not all(0 <= i < rows for r in entry["rules"].values() for i in r):
            raise ValueError(f"row indices outside its {rows} rows")
        return entry
    except Exception as error:  # a truncated or foreign file: never a different loss
        raise ValueError(f"--teacher-cache: cannot read {path} ({error}); remove it (or the "
                         "directory) to recompute it") from error


def compact(entries, device, rule):
    """(hidden [B, A + 1, H], labels [B, A + 1]) of stored sequences for answer rule ``rule``:
    sequence b's answer rows at positions 0 .. n_b - 1 (zero rows after), and labels whose
    answer rule, either one, finds exactly those rows (labels 1 .. n_b are 0, the rest -100),
    A the longest n_b."""
    if any(rule not in e["rules"] for e in entries):
        raise ValueError(f"--teacher-cache: answer_span={rule!r} needs one contiguous answer "
                         "after the prompt in every teacher sequence, which these entries were "
                         "not; use answer_span='labels'")
    chosen = [e["hidden"][torch.tensor(e["rules"][rule], dtype=torch.long)] for e in entries]
    width = max(len(c) for c in chosen) + 1
    hidden = torch.stack([torch.nn.functional.pad(c, (0, 0, 0, width - len(c))) for c in chosen])
    labels = torch.full((len(entries), width), IGNORE_INDEX)
    for b, c in enumerate(chosen):
        labels[b, 1:len(c) + 1] = 0
    return hidden.to(device), labels.to(device)
