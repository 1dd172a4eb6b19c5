"""Reading a Hugging Face causal LM's output layer for the hidden-state path: plain heads are
read (with and without a bias), and every model whose logits are something else is refused by
name, from its config or from a sample."""

import pytest
import torch
from transformers import (CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM,
                          GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig,
                          OPTForCausalLM)

from mlot_kernels.distill.models import HiddenStates, output_layer

SMALL = dict(vocab_size=60, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
             num_attention_heads=2, num_key_value_heads=2)


def sample():
    return torch.randint(0, 60, (1, 7), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("make", [
    lambda: LlamaForCausalLM(LlamaConfig(**SMALL)),
    lambda: GPT2LMHeadModel(GPT2Config(vocab_size=60, n_embd=16, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0)),
    lambda: OPTForCausalLM(OPTConfig(vocab_size=60, hidden_size=16, ffn_dim=32,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     word_embed_proj_dim=8)),  # a projection before the head
], ids=["llama", "gpt2-tied", "opt-projected"])
def test_plain_heads_are_read(make):
    """The weight and bias give the model's logits from HiddenStates' output."""
    model = make().eval()
    weight, bias = output_layer(model, sample())
    with torch.no_grad():
        logits = model(input_ids=sample()).logits
        hidden = HiddenStates(model)(sample(), torch.ones_like(sample()))
    torch.testing.assert_close(torch.nn.functional.linear(hidden, weight, bias), logits)


@pytest.mark.parametrize("make,message", [
    (lambda: Gemma2ForCausalLM(Gemma2Config(**SMALL, head_dim=8)),
     r"Gemma2ForCausalLM: config.final_logit_softcapping = 30.0 caps the logits"),
    (lambda: CohereForCausalLM(CohereConfig(**SMALL, logit_scale=0.5)),
     r"CohereForCausalLM: config.logit_scale = 0.5 multiplies the logits"),
], ids=["gemma2-softcapping", "cohere-logit-scale"])
def test_known_logit_transforms_are_refused_by_name(make, message):
    with pytest.raises(ValueError, match=message + r".*loss_from='logits'"):
        output_layer(make().eval(), sample())


class ScaledLlama(LlamaForCausalLM):
    """A model whose logits are scaled in its forward, with no config attribute that says so."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 1.5
        return out


def test_any_other_transform_is_refused_from_a_sample():
    with pytest.raises(ValueError, match=r"ScaledLlama: its logits differ from its output layer "
                                         r"applied to its last hidden state"):
        output_layer(ScaledLlama(LlamaConfig(**SMALL)).eval(), sample())
