"""Loading Hugging Face causal LMs and tokenizers (a local path or a hub name)."""

import os

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device):
    """``'auto'``: the process's CUDA device under torchrun (``LOCAL_RANK``), else cuda:0 when
    there is one, else cpu; any other value is a torch device string."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def load_tokenizer(name_or_path):
    """AutoTokenizer of ``name_or_path``, padded as :func:`pad_with_eos` says."""
    from transformers import AutoTokenizer

    return pad_with_eos(AutoTokenizer.from_pretrained(name_or_path))


def pad_with_eos(tokenizer):
    """``tokenizer``, which pads with its eos where it has no pad token."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path, dtype="float32", device="cpu", trainable=True):
    """AutoModelForCausalLM of ``name_or_path`` in ``dtype`` on ``device``; a model that is not
    ``trainable`` is frozen (no gradients) and in eval mode."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype]).to(device)
    if not trainable:
        model.eval().requires_grad_(False)
    return model


# Config attributes of Hugging Face models whose logits are not their output layer applied to
# their last hidden state, and what each does (the hidden-state path refuses them by name).
LOGIT_TRANSFORMS = {
    "final_logit_softcapping": "caps the logits, cap * tanh(logits / cap) (Gemma 2 and 3)",
    "logit_scale": "multiplies the logits by logit_scale (Cohere)",
    "logits_scaling": "divides the logits by logits_scaling (Granite)",
    "lm_head_multiplier": "multiplies the logits by lm_head_multiplier (Falcon-H1)",
}
NEUTRAL = (None, 1, 1.0)


class HiddenStates(torch.nn.Module):
    """A causal LM without its output layer: ``forward(input_ids, attention_mask)`` is its last
    hidden state after the final norm [B, T, H] (``model.base_model``'s ``last_hidden_state``),
    so the logits [B, T, V] are never built. ``model`` is its only submodule (DDP wraps this)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, **cache):
        """``cache``: a key/value cache of what precedes ``input_ids``
        (:meth:`mlot_kernels.distill.prefix_cache.PrefixCache.expand`)."""
        return self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                     **cache).last_hidden_state


def sample_ids(sequences, device, length=16):
    """[1, length] token ids of the first of ``sequences`` (:class:`mlot_kernels.distill.
    prompts.Encoded`): the input on which :func:`output_layer` checks a model's head."""
    return torch.tensor([sequences[0].input_ids[:length]], device=device)


def output_layer(model, sample_ids):
    """(weight [V, H], bias [V] or None) of ``model``'s output layer, once checked to give its
    logits from its last hidden state on ``sample_ids`` [1, T]; a model whose logits are
    anything else (a known config attribute, or a mismatch on the sample) is refused with a
    ValueError that names it."""
    name = type(model).__name__
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for attribute, what in LOGIT_TRANSFORMS.items():
        if getattr(config, attribute, None) not in NEUTRAL:
            raise ValueError(f"{name}: config.{attribute} = {getattr(config, attribute)!r} "
                             f"{what}, so its logits are not its output layer applied to its "
                             "last hidden state; train with loss_from='logits' "
                             "(--loss-from logits)")
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"{name}: its output layer is {type(head).__name__}, not a "
                         "torch.nn.Linear; train with loss_from='logits' (--loss-from logits)")
    with torch.no_grad():
        mask = torch.ones_like(sample_ids)
        logits = model(input_ids=sample_ids, attention_mask=mask).logits.float()
        hidden = HiddenStates(model)(sample_ids, mask)
        rebuilt = torch.nn.functional.linear(hidden, head.weight, head.bias).float()
    tolerance = 1e-4 if head.weight.dtype == torch.float32 else 2e-2
    error = (rebuilt - logits).abs().max().item() / max(logits.abs().max().item(), 1e-30)
    if not error <= tolerance:
        raise ValueError(f"{name}: its logits differ from its output layer applied to its last "
                         f"hidden state (relative error {error:.2g} on a sample) so the "
                         "hidden-state path would compute another loss; train with "
                         "loss_from='logits' (--loss-from logits)")
    return head.weight, head.bias
