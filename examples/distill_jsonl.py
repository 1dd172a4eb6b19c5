"""Distil a teacher into a student with another tokenizer, from a JSONL file in TRL's format.

Each line of ``--data`` is one row: ``{"prompt": "...", "completion": "..."}`` (standard),
``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}``
or ``{"prompt": [messages], "completion": [{"role": "assistant", ...}]}`` (conversational).
Every ``transformers.TrainingArguments`` flag works (``--per_device_train_batch_size``,
``--gradient_accumulation_steps``, ``--bf16``, ``--gradient_checkpointing``,
``--resume_from_checkpoint``, ...), and so does ``torchrun``:

    python examples/distill_jsonl.py --student STUDENT --teacher TEACHER --data train.jsonl \\
        --output_dir runs/distil --method mlot --preset paper --max_steps 300 --learning_rate 1e-5
    torchrun --nproc_per_node 2 examples/distill_jsonl.py ...   # the same, on 2 processes

``--lora_r 16`` trains a PEFT LoRA adapter instead of the whole student.
"""

import dataclasses
import json

from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, TrainingArguments

from mlot_kernels.integrations.transformers import DistillationTrainer


@dataclasses.dataclass
class ScriptArguments:
    student: str = dataclasses.field(metadata={"help": "the student: a hub name or a local path"})
    data: str = dataclasses.field(metadata={"help": "a JSONL file of rows in TRL's format"})
    teacher: str = dataclasses.field(default="", metadata={"help": "the teacher (not for sft)"})
    method: str = dataclasses.field(default="mlot", metadata={"help": "mlot, uld or sft"})
    preset: str = dataclasses.field(default="paper", metadata={"help": "mlot: paper or official"})
    student_tokenizer: str = dataclasses.field(default="", metadata={"help": "default: --student"})
    teacher_tokenizer: str = dataclasses.field(default="", metadata={"help": "default: --teacher"})
    max_length: int = 1024
    teacher_cache: str = dataclasses.field(
        default="", metadata={"help": "a directory for the teacher's hidden states per row"})
    lora_r: int = dataclasses.field(default=0, metadata={"help": "LoRA rank (0: no LoRA)"})


def main():
    script, args = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses()
    with open(script.data, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    student = AutoModelForCausalLM.from_pretrained(script.student)
    if script.lora_r:
        from peft import LoraConfig, get_peft_model
        student = get_peft_model(student, LoraConfig(r=script.lora_r, target_modules="all-linear"))
    teacher = AutoModelForCausalLM.from_pretrained(script.teacher) if script.method != "sft" else None
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=rows,
        processing_class=AutoTokenizer.from_pretrained(script.student_tokenizer or script.student),
        teacher_processing_class=AutoTokenizer.from_pretrained(script.teacher_tokenizer
                                                               or script.teacher),
        method=script.method, max_length=script.max_length,
        loss_options={"preset": script.preset} if script.method == "mlot" else None,
        teacher_cache=script.teacher_cache or None)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model()


if __name__ == "__main__":
    main()
