"""Greedy decoding and scores: the paper's evaluation (first line of the greedy output)."""

import torch

from mlot_kernels.distill import prefix_cache
from mlot_kernels.distill.metrics import first_line, score
from mlot_kernels.distill.prompts import answer_end_id, encode_prompt, left_pad, prompt


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens, batch_size, max_length):
    """The first line of ``model``'s greedy continuation of each prompt text.

    Prompts are batched by length, their shared prefix read once (:mod:`mlot_kernels.distill.
    prefix_cache`; the remainders are left-padded after it); decoding stops at the token budget,
    at the answer's end token (:func:`answer_end_id`), or once a sequence has written a newline
    (what follows it is dropped anyway).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = [encode_prompt(tokenizer, text, max_length) for text in prompts]
    prefix = prefix_cache.build(model, ids, [len(i) for i in ids])
    shared = prefix.length if prefix else 0
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    outputs = [None] * len(ids)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = left_pad([ids[i][shared:] for i in chunk], tokenizer.pad_token_id)
        cache = {}
        if prefix:  # the prefix, then the left-padded remainders
            head = torch.tensor([ids[chunk[0]][:shared]]).expand(len(chunk), shared)
            batch = dict(input_ids=torch.cat([head, batch["input_ids"]], 1),
                         attention_mask=torch.cat([torch.ones_like(head),
                                                   batch["attention_mask"]], 1))
            cache = prefix.expand(len(chunk))
        batch = {k: v.to(device) for k, v in batch.items()}
        tokens = model.generate(**batch, **cache, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=answer_end_id(tokenizer), stop_strings=["\n"],
                                tokenizer=tokenizer)
        new = tokens[:, batch["input_ids"].shape[1]:]
        for i, row in zip(chunk, new):
            outputs[i] = first_line(tokenizer.decode(row, skip_special_tokens=True))
    model.train(was_training)
    return outputs


def evaluate(model, tokenizer, examples, metric, shots=(), max_new_tokens=150, batch_size=16,
             max_length=512):
    """``{"scores": {...}, "predictions": [...]}`` of ``model`` on ``examples`` prompted with
    ``shots`` worked examples (zero-shot when empty), scored with ``metric`` ('qa': F1 and
    EM; 'rouge': ROUGE-LSum), in percent."""
    texts = [prompt(tokenizer, example, shots) for example in examples]
    predictions = generate(model, tokenizer, texts, max_new_tokens, batch_size, max_length)
    scores = score(predictions, [e.references for e in examples], metric)
    return dict(scores=scores, n=len(examples),
                predictions=[dict(id=e.id, prediction=p, references=list(e.references))
                             for e, p in zip(examples, predictions)])
