"""The frozen teacher's forward over the tokens its prompts share, run once.

A few-shot prompt starts with the same tokens for every example (a chat template's system turn,
the worked examples): 377 of SmolLM2's 416 prompt tokens on average in the real-teacher demo.
In a causal LM the states at positions ``t >= P`` depend on the first ``P`` tokens only through
their keys and values, so a forward over each sequence's remainder, given the prefix's key/value
cache (Hugging Face's ``cache``, ``past_key_values`` in older versions) and the whole attention
mask, computes the same states, to float rounding, at ``T - P`` positions instead of ``T``.

:class:`PrefixCache` holds that cache for one model and prefix; :func:`shared_prefix` finds the
prefix of token id lists. Before it is used, the cache is checked on a sample sequence against
the model's full forward (the same check as :func:`mlot_kernels.distill.models.output_layer`'s):
a model whose states would differ (a prefix-LM mask, a custom attention) gets no prefix cache,
with a warning, so its results never change, only its speed.
"""

import copy
import inspect
import warnings

import torch


def shared_prefix(id_lists, prompt_lengths):
    """The token ids every list in ``id_lists`` starts with, at most ``min(prompt_lengths) - 1``
    of them: each remainder keeps its prompt's last token, which predicts the answer's first."""
    if not id_lists:
        return []
    first = id_lists[0]
    length = min(prompt_lengths) - 1
    for ids in id_lists[1:]:
        length = min(length, len(ids))
        mismatch = next((i for i in range(length) if ids[i] != first[i]), length)
        length = mismatch
    return list(first[:max(length, 0)])


class PrefixCache:
    """``model``'s key/value cache of ``prefix`` [P] token ids, computed once (no gradients).

    ``length`` is P. :meth:`expand` gives a fresh cache for a batch of sequences that start
    with the prefix; the model's forward on their remainders (``input_ids[:, P:]``) with it and
    the whole ``attention_mask`` gives their states from position P on.
    """

    def __init__(self, model, prefix):
        self.length = len(prefix)
        self.ids = torch.tensor(prefix, dtype=torch.long)
        # the forward's name for it: `cache` (transformers 5.24 here), or `past_key_values`
        self.name = "cache" if "cache" in inspect.signature(model.forward).parameters \
            else "past_key_values"
        device = next(model.parameters()).device
        ids = torch.tensor([prefix], dtype=torch.long, device=device)
        with torch.no_grad():
            out = model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   use_cache=True)
        self.cache = getattr(out, self.name)

    def starts(self, input_ids):
        """Whether every row of ``input_ids`` [B, T] starts with the prefix."""
        head = input_ids[:, :self.length]
        return head.shape[1] == self.length and bool((head == self.ids.to(head.device)).all())

    def expand(self, batch):
        """``{name: cache}``, the keyword argument of a forward (or ``generate``) on ``batch``
        sequences: a copy of the cache repeated over them (a forward appends to it)."""
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(batch)
        return {self.name: cache}


def build(model, id_lists, prompt_lengths):
    """The :class:`PrefixCache` of what ``id_lists`` share (:func:`shared_prefix`), or None when
    they share nothing or the model's states from it differ from its full forward on the first
    list (relative error above 1e-4 in float32, 2e-2 in 16-bit; a warning says so)."""
    prefix = shared_prefix(id_lists, prompt_lengths)
    if not prefix:
        return None
    name = type(model).__name__
    try:
        cache = PrefixCache(model, prefix)
        sample = torch.tensor([id_lists[0]], device=next(model.parameters()).device)
        mask = torch.ones_like(sample)
        with torch.no_grad():
            full = model.base_model(input_ids=sample, attention_mask=mask).last_hidden_state
            rest = model.base_model(input_ids=sample[:, cache.length:], attention_mask=mask,
                                    **cache.expand(1)).last_hidden_state
        full = full[:, cache.length:].float()
        error = (rest.float() - full).abs().max().item() / max(full.abs().max().item(), 1e-30)
    except Exception as exception:  # a model without Hugging Face's cache interface
        warnings.warn(f"{name}: no prefix cache ({exception}); every forward reads whole "
                      "sequences")
        return None
    tolerance = 1e-4 if next(model.parameters()).dtype == torch.float32 else 2e-2
    if not error <= tolerance:
        warnings.warn(f"{name}: its states after a cached prefix differ from its full forward "
                      f"(relative error {error:.2g}); every forward reads whole sequences")
        return None
    return cache
