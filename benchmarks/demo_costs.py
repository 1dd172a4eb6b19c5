"""What the real-teacher demo's two speed-ups buy, each against the code path it replaced, in one
process (``python -m benchmarks.demo_costs [--out FILE]``; needs the ``real`` assets).

- **The teacher's shared prefix** (:mod:`mlot_kernels.distill.prefix_cache`): SmolLM2's greedy
  answers to 64 of the demo's chat prompts with ``SHOTS`` worked examples (8 new tokens, one
  batch; 2, the demo's first choice: it now uses 8, whose whole-read baseline takes over 10
  minutes to time here), and its forward
  over a batch of 16 training sequences (prompt and answer), with the prefix cache and with
  every sequence read whole. The answers are checked equal.
- **Chunks of at least 64 rows** (:data:`mlot_kernels.ops.row_chunks.MIN_ROWS`): one ``sft`` step
  (forward, backward, AdamW) of the demo's student, a 3-layer Llama of width 128 with Mistral's
  32,000 tokenizer, on 16 of its zero-shot sequences, against the same step with chunks of a
  sixteenth of the embedding (8 rows at this width), the rule before.

Each time is the median of rounds after a warm-up call (:func:`benchmarks.timing.median_seconds`).
"""

import argparse
import json
import platform

import torch

from benchmarks.timing import median_seconds
from mlot_kernels.ops import row_chunks
from mlot_kernels.distill import assets, prefix_cache
from mlot_kernels.distill.data import demo_examples
from mlot_kernels.distill.demo import llama
from mlot_kernels.distill.evaluate import generate
from mlot_kernels.distill.methods import Method
from mlot_kernels.distill.models import (HiddenStates, load_model, load_tokenizer, output_layer,
                                         pad_with_eos)
from mlot_kernels.distill.prompts import collate, encode, prompt
from mlot_kernels.losses.outputs import Hidden, cross_entropy

SHOTS = 2


def _without_prefix(fn):
    """``fn()`` with :func:`mlot_kernels.distill.prefix_cache.build` finding no prefix."""
    build = prefix_cache.build
    prefix_cache.build = lambda *args: None
    try:
        return fn()
    finally:
        prefix_cache.build = build


def teacher_prefix():
    folder = assets.teacher_folder()
    teacher, tokenizer = load_model(folder, trainable=False), load_tokenizer(folder)
    examples = demo_examples(80, seed=1)
    shots, queries = examples[:SHOTS], examples[16:80]
    texts = [prompt(tokenizer, e, shots) for e in queries]

    def answers():
        return generate(teacher, tokenizer, texts, 8, 64, 512)

    seqs = [encode(tokenizer, prompt(tokenizer, e, shots), e.answer, 512) for e in queries[:16]]
    batch = collate(seqs, tokenizer.pad_token_id)
    cache = prefix_cache.build(teacher, [s.input_ids for s in seqs], [s.prompt_length for s in seqs])

    def forward(prefix):  # the loop's teacher forward (uld, mlot), with or without the prefix
        Method("uld", teacher, prefix=prefix).teacher_forward(batch, True)

    same = answers() == _without_prefix(answers)
    out = dict(prompt_tokens=sum(s.prompt_length for s in seqs) / len(seqs),
               prefix_tokens=cache.length, answers_equal=same)
    for name, step in (("generate_64", answers), ("forward_16", lambda: forward(cache))):
        out[name + "_prefix_s"] = median_seconds(step, 10.0, 3, 5)[0]
    out["generate_64_whole_s"] = median_seconds(lambda: _without_prefix(answers), 10.0, 3, 5)[0]
    out["forward_16_whole_s"] = median_seconds(lambda: forward(None), 10.0, 3, 5)[0]
    for name in ("generate_64", "forward_16"):
        out[name + "_speedup"] = out[name + "_whole_s"] / out[name + "_prefix_s"]
    return out


def student_step():
    tokenizer = pad_with_eos(assets.load_tokenizer("mistral"))
    torch.manual_seed(0)
    student = llama(tokenizer, 128, 3, tokenizer.bos_token_id)
    seqs = [encode(tokenizer, prompt(tokenizer, e), e.answer, 512)
            for e in demo_examples(16, seed=1)]
    batch = collate(seqs, tokenizer.pad_token_id)
    head = output_layer(student, batch["input_ids"][:1, :16])
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    model = HiddenStates(student)

    def step():
        hidden = model(batch["input_ids"], batch["attention_mask"])
        cross_entropy(Hidden(hidden, *head), batch["labels"], "fused").backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    out = dict(rows=int((batch["labels"] != -100).sum()))
    rule = row_chunks.MIN_ROWS
    for name, rows in (("min_64_rows", rule), ("sixteenth_only", 1)):
        row_chunks.MIN_ROWS = rows
        try:
            out[name + "_s"] = median_seconds(step, 10.0, 10, 40)[0]
        finally:
            row_chunks.MIN_ROWS = rule
    out["speedup"] = out["sixteenth_only_s"] / out["min_64_rows_s"]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="", help="JSON file for the results")
    args = parser.parse_args(argv)
    results = dict(machine=dict(cpu=platform.processor() or platform.machine(),
                                threads=torch.get_num_threads(), torch=torch.__version__),
                   teacher_prefix=teacher_prefix(), student_step=student_step())
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
