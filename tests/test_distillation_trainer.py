"""DistillationTrainer (mlot_kernels.integrations.transformers) on tiny local models with two
different tokenizers: it trains and logs the terms, its loss on a batch is mlot-distill's,
2 torchrun processes equal 1 accumulating 2, a resumed run ends with the uninterrupted one's
weights, LoRA, gradient checkpointing and bf16 run, TRL's row formats, errors that name what
is wrong."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainingArguments

from mlot_kernels.distill.data import demo_examples, load_examples
from mlot_kernels.distill.models import load_tokenizer
from mlot_kernels.distill.prompts import DistillationCollator, query
from mlot_kernels.distill.trainer import TrainConfig, step_indices, train
from mlot_kernels.integrations.transformers import DistillationTrainer, encode_rows
from mlot_kernels.losses.answers import IGNORE_INDEX

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TERMS = {"mlot": {"ce", "distill", "had", "sl", "sd"}, "uld": {"ce", "distill", "uld"},
         "sft": {"ce"}}


def trl_rows(n, seed):
    """TRL standard rows of the demo's questions (the completion starts with its space)."""
    return [dict(prompt=query(e), completion=f" {e.answer}") for e in demo_examples(n, seed)]


def arguments(out, **overrides):
    values = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=4,
                  learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1,
                  report_to=[], use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True)
    return TrainingArguments(**(values | overrides))


def make_trainer(tiny, out, rows, method="mlot", student=None, **options):
    args = options.pop("args", None) or arguments(out)
    return DistillationTrainer(
        model=student or AutoModelForCausalLM.from_pretrained(tiny.student),
        teacher_model=AutoModelForCausalLM.from_pretrained(tiny.teacher) if method != "sft" else None,
        args=args, train_dataset=rows, processing_class=load_tokenizer(tiny.student_tokenizer),
        teacher_processing_class=load_tokenizer(tiny.teacher_tokenizer), method=method,
        **options)


def logged(trainer, key):
    return [r[key] for r in trainer.state.log_history if key in r and "train_runtime" not in r]


@pytest.mark.parametrize("method,steps", [("mlot", 24), ("uld", 2), ("sft", 2)])
def test_trains_and_logs_the_terms(tiny, tmp_path, method, steps):
    """Every step logs each term of the method, and the loss is their sum; over 24 steps of
    mlot the loss falls."""
    trainer = make_trainer(tiny, tmp_path, trl_rows(48, seed=21), method,
                           args=arguments(tmp_path, max_steps=steps, learning_rate=3e-3))
    trainer.train()
    loss = logged(trainer, "loss")
    assert len(loss) == steps
    for key in TERMS[method]:
        values = logged(trainer, key)
        assert len(values) == steps and all(torch.isfinite(torch.tensor(values))), key
    distill = logged(trainer, "distill") if method != "sft" else [0.0] * steps
    assert loss == pytest.approx([c + d for c, d in zip(logged(trainer, "ce"), distill)], rel=1e-5)
    if steps >= 24:
        assert sum(loss[-4:]) / 4 < 0.9 * sum(loss[:4]) / 4


@pytest.mark.parametrize("method,options", [("mlot", {"preset": "paper"}),
                                            ("mlot", {"preset": "official"}), ("uld", None)])
def test_loss_on_a_batch_is_mlot_distills(tiny, tmp_path, method, options):
    """The first step's loss of `mlot-distill train` (zero-shot prompts on both sides) equals
    the trainer's loss on the same batch of the same data (1e-6)."""
    preset = (options or {}).get("preset", "paper")
    cfg = TrainConfig(**tiny.config(tmp_path / "loop", method=method, preset=preset,
                                    max_steps=1, teacher_shots=0))
    train(cfg)
    with open(tmp_path / "loop" / "metrics.jsonl") as f:
        expected = json.loads(f.readline())
    rows = load_examples(tiny.train, "jsonl")
    trainer = make_trainer(tiny, tmp_path / "hf", rows, method, loss_options=options,
                           max_length=cfg.max_length)
    batch = trainer.data_collator([trainer.train_dataset[i]
                                   for i in step_indices(0, len(rows), cfg.batch_size, cfg.seed)])
    trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    assert float(loss) == pytest.approx(expected["loss"], rel=1e-6)


def test_teacher_cache_gives_the_uncached_terms(tiny, tmp_path):
    """Two epochs with a teacher cache: the teacher runs in the first only, and every logged
    term is the uncached run's; evaluation rows (never cached) score the same."""
    rows, runs, scores = trl_rows(8, seed=22), {}, {}
    for name, cache in (("plain", None), ("cached", str(tmp_path / "cache"))):
        runs[name] = make_trainer(tiny, tmp_path / name, rows, teacher_cache=cache,
                                  args=arguments(tmp_path / name, num_train_epochs=2,
                                                 max_steps=-1, learning_rate=0.0))
        runs[name].train()
        scores[name] = runs[name].evaluate(eval_dataset=trl_rows(4, seed=28))
    assert runs["cached"].distill.teacher_forwards == 2
    assert runs["plain"].distill.teacher_forwards == 4 + 1
    for key in TERMS["mlot"]:
        assert logged(runs["cached"], key) == pytest.approx(logged(runs["plain"], key), rel=1e-5)
    assert {f"eval_{key}" for key in TERMS["mlot"]} | {"eval_loss"} <= set(scores["cached"])
    for key in {f"eval_{key}" for key in TERMS["mlot"]} | {"eval_loss"}:
        assert scores["cached"][key] == pytest.approx(scores["plain"][key], rel=1e-5), key
    assert scores["plain"]["eval_loss"] == pytest.approx(
        scores["plain"]["eval_ce"] + scores["plain"]["eval_distill"], rel=1e-5)


def run_example(tiny, data, out, *flags, torchrun=False):
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node", "2"] if torchrun else [])
    args = ["--student", tiny.student, "--student_tokenizer", tiny.student_tokenizer,
            "--teacher", tiny.teacher, "--teacher_tokenizer", tiny.teacher_tokenizer,
            "--data", str(data), "--output_dir", str(out), "--per_device_train_batch_size", "2",
            "--learning_rate", "1e-3", "--lr_scheduler_type", "constant", "--seed", "0",
            "--use_cpu", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1",
            "--disable_tqdm", "true", *flags]
    result = subprocess.run([*launcher, os.path.join(ROOT, "examples", "distill_jsonl.py"), *args],
                            env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(os.path.join(out, "model.safetensors"))


def test_torchrun_two_processes_equal_one_accumulating_two(tiny, tmp_path):
    """examples/distill_jsonl.py under torchrun (2 gloo processes, micro-batches of 2) ends with
    the weights of 1 process accumulating 2 micro-batches of 2 (1e-5): the same global batches
    and the same mean gradient."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in trl_rows(24, seed=23)))
    one = run_example(tiny, data, tmp_path / "one", "--max_steps", "4",
                      "--gradient_accumulation_steps", "2")
    two = run_example(tiny, data, tmp_path / "two", "--max_steps", "4", torchrun=True)
    start = load_file(os.path.join(tiny.student, "model.safetensors"))
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(one[name], start[name]) for name in one if name in start)


def test_resume_from_checkpoint_gives_the_uninterrupted_weights(tiny, tmp_path):
    """Hugging Face's resume (model, optimizer, scheduler, RNG states, the data order replayed
    to the step) ends with exactly the uninterrupted run's weights here (CPU, float32)."""
    rows = trl_rows(24, seed=24)
    args = dict(max_steps=6, save_strategy="steps", save_steps=3)
    straight = make_trainer(tiny, tmp_path / "a", rows, args=arguments(tmp_path / "a", **args))
    straight.train()
    # a run that stopped at step 3 (its checkpoint-3 is the straight run's), resumed from it
    resumed = make_trainer(tiny, tmp_path / "a", rows, args=arguments(tmp_path / "a", **args))
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    expected = straight.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert logged(resumed, "loss") == logged(straight, "loss")  # steps 1-3 from the checkpoint


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.pt"])
def test_a_truncated_checkpoint_names_its_file(tiny, tmp_path, damaged):
    rows = trl_rows(8, seed=25)
    args = arguments(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    make_trainer(tiny, tmp_path, rows, args=args).train()
    path = tmp_path / "checkpoint-1" / damaged
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="checkpoint-1"):
        make_trainer(tiny, tmp_path, rows, args=args).train(
            resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


def test_lora_student_with_gradient_checkpointing(tiny, tmp_path):
    """A PEFT LoRA student trains its adapters only, with gradient checkpointing on; the first
    step's loss is that of the same LoRA student without checkpointing."""
    peft = pytest.importorskip("peft")
    losses = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        student = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny.student),
                                      peft.LoraConfig(r=4, target_modules=["c_attn"]))
        before = {k: v.clone() for k, v in student.named_parameters()}
        trainer = make_trainer(tiny, tmp_path, trl_rows(8, seed=26), student=student,
                               args=arguments(tmp_path, max_steps=2, learning_rate=1e-2,
                                              gradient_checkpointing=checkpointing))
        trainer.train()
        losses[checkpointing] = logged(trainer, "loss")
        changed = {k for k, v in student.named_parameters() if not torch.equal(v, before[k])}
        assert changed and all("lora_" in k for k in changed)
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-6)


def test_bf16_gives_the_float32_terms_to_bf16_precision(tiny, tmp_path):
    runs = {}
    for bf16 in (False, True):
        trainer = make_trainer(tiny, tmp_path, trl_rows(8, seed=27),
                               args=arguments(tmp_path, max_steps=1, bf16=bf16))
        trainer.train()
        runs[bf16] = {key: logged(trainer, key)[0] for key in TERMS["mlot"]}
    for key in ("ce", "had", "sl"):
        assert runs[True][key] == pytest.approx(runs[False][key], rel=5e-2), key
    assert runs[True]["ce"] != runs[False]["ce"]  # autocast did run in bf16


def templated(tokenizer):
    tokenizer.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>"
                               "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    return tokenizer


def labelled_text(tokenizer, row):
    ids, labels = row["input_ids"], row["labels"]
    answer = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
    first = labels.index(next(label for label in labels if label != IGNORE_INDEX))
    assert labels[:first] == [IGNORE_INDEX] * first and answer == ids[first:]
    return tokenizer.decode(ids[:first]), tokenizer.decode(answer)


def test_trl_formats_label_the_completion_only_on_both_sides(tiny):
    """Standard rows are written as TRL writes them without a chat template (prompt then
    completion, then eos), and through the template where the tokenizer has one; conversational
    rows through it; the labels cover the completion and its end token only."""
    student = load_tokenizer(tiny.student_tokenizer)
    teacher = templated(load_tokenizer(tiny.teacher_tokenizer))
    messages = [dict(role="user", content="Where does Mara live?"),
                dict(role="assistant", content="Oslo")]
    rows = [dict(prompt="Where does Mara live?", completion=" Oslo", id=7),
            dict(messages=messages),
            dict(prompt=messages[:1], completion=messages[1:])]
    encoded = encode_rows(rows, student, teacher, max_length=64)
    plain_prompt, plain_answer = labelled_text(student, encoded[0])
    assert plain_prompt.strip().endswith("Where does Mara live?")
    assert plain_answer.replace(" ", "").startswith("Oslo")
    assert encoded[0]["labels"][-1] == student.eos_token_id
    for row in encoded:
        prompt, answer = labelled_text(teacher, {"input_ids": row["teacher_input_ids"],
                                                 "labels": row["teacher_labels"]})
        assert prompt.replace(" ", "") == "<user>WheredoesMaralive?</s><assistant>"
        assert answer.replace(" ", "") == "Oslo</s>"[:len(answer.replace(" ", ""))]
    assert encoded[1] == dict(encoded[2], index=1)  # the two conversational forms agree
    batch = DistillationCollator(student.pad_token_id, teacher.pad_token_id)(encoded)
    assert batch["index"].tolist() == [0, 1, 2]
    assert batch["teacher_labels"].shape == batch["teacher_input_ids"].shape


@pytest.mark.parametrize("row,message", [
    (dict(prompt="x"), "row 1: missing field 'completion'"),
    (dict(messages=[dict(role="user", content="x")]), "row 1: field 'messages' must end with"),
    (dict(prompt=[dict(role="user", content="x")], completion="y"),
     "row 1: fields 'prompt' and 'completion' must both be strings"),
    (dict(text="x"), "row 1: expected TRL's 'prompt' and 'completion'"),
    (dict(messages=[dict(role="user")]), "row 1: field 'messages': message 0"),
])
def test_a_row_without_a_needed_field_names_the_row_and_the_field(tiny, row, message):
    rows = [dict(prompt="a", completion="b"), row]
    with pytest.raises(ValueError, match=re.escape(f"train_dataset: {message}")):
        make_trainer(tiny, "unused", rows, method="sft")


@pytest.mark.parametrize("options,message", [
    (dict(method="kd"), "method must be one of ('mlot', 'uld', 'sft'), got 'kd'"),
    (dict(loss_from="probs"), "loss_from must be one of ('hidden', 'logits'), got 'probs'"),
    (dict(max_length=0), "max_length must be an integer of at least 1, got 0"),
    (dict(teacher_model=None), "method 'mlot' needs teacher_model"),
    (dict(loss_options={"k": 0}), "multi_level_ot_loss: k must be >= 1, got 0"),
])
def test_bad_arguments_are_named(tiny, tmp_path, options, message):
    student = AutoModelForCausalLM.from_pretrained(tiny.student)
    values = dict(model=student, teacher_model=AutoModelForCausalLM.from_pretrained(tiny.teacher),
                  args=arguments(tmp_path), train_dataset=trl_rows(4, seed=29),
                  processing_class=load_tokenizer(tiny.student_tokenizer),
                  teacher_processing_class=load_tokenizer(tiny.teacher_tokenizer))
    with pytest.raises(ValueError, match=re.escape(message)):
        DistillationTrainer(**(values | options))
