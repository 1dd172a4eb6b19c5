"""The distillation loop: a student trained on answer-only labels with one of four methods.

- ``sft``: the student's cross-entropy on the data's answers;
- ``seqkd``: the same on the teacher's greedy answers (generated once, ``seqkd-answers.jsonl``);
- ``uld``: :func:`mlot_kernels.uld_loss`;
- ``mlot``: :class:`mlot_kernels.MultiLevelOTLoss` (``preset`` and ``loss_options``).

The teacher is frozen in eval mode (optionally bfloat16) and sees its few-shot prompt; the student
its zero-shot prompt (:mod:`mlot_kernels.distill.prompts`). The tokens every teacher sequence
starts with (its system turn, the worked examples) are read once
(:mod:`mlot_kernels.distill.prefix_cache`). By default (``loss_from='hidden'``) neither model
builds its logits: the losses read each model's last hidden state and output layer
(:class:`mlot_kernels.losses.outputs.Hidden`), projecting only the rows they need; a model whose logits
are not its output layer applied to its last hidden state is refused by name
(:func:`mlot_kernels.distill.models.output_layer`), and ``loss_from='logits'`` keeps the logits.
AdamW and, by default, the paper's OneCycle schedule step once per global batch of
``batch_size × grad_accum × world_size`` examples. Under ``torchrun`` the student is wrapped in
DistributedDataParallel (NCCL on GPUs, gloo on CPU) and the ranks split each global batch, so a
step's gradient is the same mean over micro-batches whatever the number of processes.

Outputs under ``out``: ``metrics.jsonl`` (one line per step: loss terms, learning rate,
throughput), ``checkpoint.pt`` (every ``checkpoint_every`` steps and at the end, written
atomically: student, optimizer, scheduler, every rank's RNG states, step; ``resume`` continues
from it), ``model/`` (the trained student and its tokenizer), ``summary.json`` and, with
``eval_data``, ``eval.json``.
"""

import contextlib
import dataclasses
import json
import os
import random
import sys
import time

import torch
import torch.distributed as dist

from mlot_kernels.distill import prefix_cache
from mlot_kernels.distill.data import FORMATS, METRIC, load_examples, write_jsonl
from mlot_kernels.distill.evaluate import evaluate, generate
from mlot_kernels.distill.files import load_torch, replace_atomically, save_torch, write_json
from mlot_kernels.distill.methods import LOSS_FROM, METHODS, TEACHER_METHODS, Method, hidden
from mlot_kernels.distill.models import (DTYPES, HiddenStates, load_model, load_tokenizer,
                                         output_layer, resolve_device, sample_ids)
from mlot_kernels.distill.prompts import (DistillationCollator, answer_end_id, encode, features,
                                          prompt, teacher_inputs)
from mlot_kernels.distill.teacher_cache import token_digest

SCHEDULES = ("onecycle", "constant")
FINAL_WINDOW = 10  # summary.json's final loss terms: the mean over this many last steps


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run; ``mlot-distill train`` has one flag per field."""

    student: str = ""                 # Hugging Face name or local path of the student
    data: str = ""                    # a local .jsonl/.json/.parquet file or a hub dataset name
    teacher: str = ""                 # the teacher (needed by seqkd, uld and mlot)
    method: str = "mlot"              # sft, seqkd, uld or mlot
    preset: str = "paper"             # mlot: 'paper' or 'official'
    loss_options: dict = dataclasses.field(default_factory=dict)  # mlot: Options overrides
    data_format: str = "jsonl"        # qed, fairytaleqa, dialogsum or jsonl
    split: str = "train"              # hub datasets only
    limit: int = 0                    # use the first `limit` examples (0: all)
    student_tokenizer: str = ""       # default: the student's path
    teacher_tokenizer: str = ""       # default: the teacher's path
    teacher_shots: int = 2            # worked examples in the teacher's prompt
    student_shots: int = 0            # worked examples in the student's prompt
    max_length: int = 512             # tokens per sequence (prompt cut first)
    teacher_dtype: str = "float32"    # float32, bfloat16 or float16
    batch_size: int = 4               # sequences per process per micro-step
    grad_accum: int = 1               # micro-steps per optimizer step
    epochs: int = 1
    max_steps: int = 0                # optimizer steps (0: epochs x steps per epoch)
    lr: float = 1e-6                  # AdamW (peak) learning rate
    weight_decay: float = 0.1
    schedule: str = "onecycle"        # 'onecycle' (torch OneCycleLR) or 'constant'
    pct_start: float = 0.3            # OneCycle: fraction of steps warming up
    max_grad_norm: float = 0.0        # gradient clipping (0: none)
    seed: int = 0
    device: str = "auto"
    kernels: str = "fused"            # 'fused' (torch.ops.mlot) or 'reference'
    loss_from: str = "hidden"         # 'hidden': hidden states and output layers; 'logits'
    out: str = "runs/train"
    checkpoint_every: int = 0         # steps between checkpoints (0: only at the end)
    resume: bool = False              # continue from out/checkpoint.pt
    teacher_cache: str = ""           # directory of cached teacher hidden states (uld, mlot)
    eval_data: str = ""               # held-out data (same format) scored after training
    eval_split: str = "validation"
    eval_limit: int = 0
    max_new_tokens: int = 150         # greedy decoding budget (evaluation and seqkd)
    eval_batch_size: int = 16

    def __post_init__(self):
        for name, allowed in (("method", METHODS), ("schedule", SCHEDULES),
                              ("data_format", FORMATS), ("teacher_dtype", tuple(DTYPES)),
                              ("loss_from", LOSS_FROM)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("student", "data"):
            if not getattr(self, name):
                raise ValueError(f"{name} is required")
        if self.method != "sft" and not self.teacher:
            raise ValueError(f"method {self.method!r} needs a teacher")
        for name in ("batch_size", "grad_accum", "epochs", "max_length", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.teacher_cache and self.method not in ("uld", "mlot"):
            raise ValueError(f"teacher_cache is for methods 'uld' and 'mlot', got method "
                             f"{self.method!r}")
        if self.loss_options and self.method != "mlot":
            raise ValueError(f"loss_options are options of method 'mlot', got {self.method!r}")


# Fields a resumed run may change: they don't enter the computation of the weights.
RESUMABLE_CHANGES = ("resume", "checkpoint_every", "device", "eval_data", "eval_split",
                     "eval_limit", "eval_batch_size")


class Distributed:
    """The torchrun process group (started here when WORLD_SIZE > 1), or a single process."""

    def __init__(self, device):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.owned = self.world > 1 and not dist.is_initialized()
        if self.owned:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self):
        return self.rank == 0

    def mean(self, values, device):
        """The mean of a list of floats over every rank's list (all of equal length)."""
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        if self.world > 1:
            dist.all_reduce(tensor)
        return (tensor / self.world).tolist()

    def gather(self, obj):
        """Every rank's ``obj``, in rank order."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        if self.owned:
            dist.destroy_process_group()


def rng_state():
    state = dict(python=random.getstate(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def step_indices(step, n_examples, global_batch, seed):
    """The example indices of optimizer step ``step``: a seeded permutation per epoch, cut into
    global batches (the last partial batch of an epoch is dropped)."""
    per_epoch = n_examples // global_batch
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return order[position * global_batch:(position + 1) * global_batch].tolist()


def seqkd_answers(teacher, tokenizer, examples, shots, cfg, world, path):
    """The training examples with the teacher's greedy answers (its first lines), generated once
    (ranks split the work) and kept in ``path``."""
    if not os.path.exists(path):
        texts = [prompt(tokenizer, e, shots) for e in examples[world.rank::world.world]]
        mine = generate(teacher, tokenizer, texts, cfg.max_new_tokens, cfg.eval_batch_size,
                        cfg.max_length)
        shards = world.gather(mine)
        answers = [shards[i % world.world][i // world.world] for i in range(len(examples))]
        if world.main:
            generated = [dataclasses.replace(e, answer=a, references=(a,))
                         for e, a in zip(examples, answers)]
            replace_atomically(path, lambda tmp: write_jsonl(generated, tmp))
        world.barrier()
    generated = load_examples(path, "jsonl")
    if [e.id for e in generated] != [e.id for e in examples]:
        raise ValueError(f"{path} holds teacher answers for other examples; remove it")
    return generated


def encode_examples(tokenizer, examples, shots, max_length):
    """Each example's prompt (after ``shots``) and answer, encoded."""
    end = answer_end_id(tokenizer)
    return [encode(tokenizer, prompt(tokenizer, e, shots), e.answer, max_length, end)
            for e in examples]


def build_optimizer(model, cfg, total_steps):
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr,
                                                        total_steps=total_steps,
                                                        pct_start=cfg.pct_start)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return optimizer, scheduler


def comparable(cfg):
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_CHANGES}


def load_checkpoint(cfg, path, world):
    if not os.path.exists(path):
        raise FileNotFoundError(f"resume: no checkpoint at {path}")
    state = load_torch(path, "the checkpoint", weights_only=False)
    if state["config"] != comparable(cfg):
        changed = sorted(k for k in comparable(cfg) if state["config"].get(k) != comparable(cfg)[k])
        raise ValueError(f"resume: {path} was written with other settings (differing: {changed})")
    if state["world_size"] != world.world:
        raise ValueError(f"resume: {path} was written by {state['world_size']} processes, "
                         f"this run has {world.world}; the RNG states would not carry over")
    return state


def truncate_log(path, step):
    """Keep the lines of ``path`` for steps before ``step`` (a resumed run rewrites the rest)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] < step]

    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(lines)
    replace_atomically(path, write)


def progress(total, initial, enabled):
    """A tqdm bar on a terminal, None otherwise (logs, CI, torchrun's other ranks)."""
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def train(cfg):
    """Run ``cfg``; returns the summary written to ``out/summary.json`` (rank 0's view)."""
    device = resolve_device(cfg.device)
    world = Distributed(device)
    try:
        return _train(cfg, device, world)
    finally:
        world.close()


def _train(cfg, device, world):
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.out, exist_ok=True)
    checkpoint_path = os.path.join(cfg.out, "checkpoint.pt")
    log_path = os.path.join(cfg.out, "metrics.jsonl")

    student_tok = load_tokenizer(cfg.student_tokenizer or cfg.student)
    student = load_model(cfg.student, device=device)
    student.train()
    teacher = teacher_tok = None
    if cfg.method != "sft":
        teacher_tok = load_tokenizer(cfg.teacher_tokenizer or cfg.teacher)
        teacher = load_model(cfg.teacher, cfg.teacher_dtype, device, trainable=False)

    examples = load_examples(cfg.data, cfg.data_format, cfg.split, cfg.limit or None)
    shots = examples[:max(cfg.teacher_shots, cfg.student_shots)]
    if cfg.method == "seqkd":
        examples = seqkd_answers(teacher, teacher_tok, examples, shots[:cfg.teacher_shots], cfg,
                                 world, os.path.join(cfg.out, "seqkd-answers.jsonl"))
    student_seqs = encode_examples(student_tok, examples, shots[:cfg.student_shots],
                                   cfg.max_length)
    teacher_seqs = (encode_examples(teacher_tok, examples, shots[:cfg.teacher_shots],
                                    cfg.max_length) if teacher else None)

    global_batch = cfg.batch_size * cfg.grad_accum * world.world
    per_epoch = len(examples) // global_batch
    if per_epoch == 0:
        raise ValueError(f"{cfg.data} has {len(examples)} examples, fewer than one global batch "
                         f"(batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} x "
                         f"{world.world} processes = {global_batch})")
    total_steps = cfg.max_steps or cfg.epochs * per_epoch
    optimizer, scheduler = build_optimizer(student, cfg, total_steps)
    from_hidden = cfg.loss_from == "hidden"
    student_head = output_layer(student, sample_ids(student_seqs, device)) if from_hidden else None
    teacher_head = None
    if cfg.method in TEACHER_METHODS and (from_hidden or cfg.teacher_cache):
        teacher_head = output_layer(teacher, sample_ids(teacher_seqs, device))
    model = HiddenStates(student) if from_hidden else student
    if world.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    fingerprint = dict(teacher=cfg.teacher, tokenizer=cfg.teacher_tokenizer or cfg.teacher,
                       data=os.path.abspath(cfg.data) if os.path.exists(cfg.data) else cfg.data,
                       data_format=cfg.data_format, split=cfg.split, limit=cfg.limit,
                       teacher_shots=cfg.teacher_shots, max_length=cfg.max_length,
                       teacher_dtype=cfg.teacher_dtype,
                       teacher_tokens=token_digest(teacher_seqs) if cfg.teacher_cache else None)
    prefix = None
    if cfg.method in TEACHER_METHODS:
        prefix = prefix_cache.build(teacher, [s.input_ids for s in teacher_seqs],
                                    [s.prompt_length for s in teacher_seqs])
    method = Method(cfg.method, teacher, kernels=cfg.kernels, teacher_head=teacher_head,
                    prefix=prefix, cache_dir=cfg.teacher_cache, cache_fingerprint=fingerprint,
                    loss_options=dict(cfg.loss_options, preset=cfg.preset)
                    if cfg.method == "mlot" else None)
    rows = [features(i, s, teacher_seqs[i] if teacher_seqs else None)
            for i, s in enumerate(student_seqs)]
    collator = DistillationCollator(student_tok.pad_token_id,
                                    teacher_tok.pad_token_id if teacher_tok else None)

    start = 0
    if cfg.resume:
        state = load_checkpoint(cfg, checkpoint_path, world)
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"][world.rank])
        start = state["step"]
    elif os.path.exists(checkpoint_path):
        raise FileExistsError(f"{checkpoint_path} exists: pass resume to continue that run, or "
                              "choose another out directory")
    if world.main:
        if cfg.resume:
            truncate_log(log_path, start)
        else:
            open(log_path, "w").close()

    bar = progress(total_steps, start, world.main)
    wall = time.perf_counter()
    for step in range(start, total_steps):
        began = time.perf_counter()
        indices = step_indices(step, len(examples), global_batch, cfg.seed)
        sums, tokens = {}, 0
        for micro in range(cfg.grad_accum):
            first = (micro * world.world + world.rank) * cfg.batch_size
            mine = indices[first:first + cfg.batch_size]
            batch = {k: v.to(device) for k, v in collator([rows[i] for i in mine]).items()}
            sync = micro == cfg.grad_accum - 1 or world.world == 1
            with contextlib.nullcontext() if sync else model.no_sync():
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                outputs = hidden(out, *student_head) if from_hidden else out.logits
                terms = method.terms(mine, outputs, batch["labels"], teacher_inputs(batch))
                (terms["loss"] / cfg.grad_accum).backward()
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach()) / cfg.grad_accum
            tokens += int(batch["attention_mask"].sum())
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        keys = sorted(sums)
        *values, tokens = world.mean([sums[k] for k in keys] + [tokens], device)  # one all-reduce
        means = dict(zip(keys, values))
        tokens *= world.world
        seconds = time.perf_counter() - began
        record = dict(step=step, epoch=step // per_epoch, lr=lr, **means,
                      examples_per_s=global_batch / seconds, tokens_per_s=tokens / seconds)
        if world.main:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if bar:
                bar.set_postfix({k: f"{means[k]:.4g}" for k in keys} |
                                {"ex/s": f"{record['examples_per_s']:.1f}"})
                bar.update()
        done = step + 1
        if done == total_steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
            rngs = world.gather(rng_state())
            if world.main:
                save_torch(dict(step=done, model=student.state_dict(),
                                 optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                                 rng=rngs, world_size=world.world, config=comparable(cfg)),
                            checkpoint_path)
            world.barrier()
    if bar:
        bar.close()
    wall = time.perf_counter() - wall

    summary = dict(method=cfg.method, preset=cfg.preset if cfg.method == "mlot" else None,
                   steps=total_steps, resumed_from=start, world_size=world.world,
                   wall_s=wall, teacher_forwards=method.teacher_forwards,
                   teacher_prefix_tokens=prefix.length if prefix else 0,
                   final=final_terms(log_path) if world.main else None)
    if world.main:
        student.save_pretrained(os.path.join(cfg.out, "model"))
        student_tok.save_pretrained(os.path.join(cfg.out, "model"))
        if cfg.eval_data:
            held_out = load_examples(cfg.eval_data, cfg.data_format, cfg.eval_split,
                                     cfg.eval_limit or None)
            result = evaluate(student, student_tok, held_out, METRIC[cfg.data_format],
                              shots[:cfg.student_shots], cfg.max_new_tokens,
                              cfg.eval_batch_size, cfg.max_length)
            write_json(result, os.path.join(cfg.out, "eval.json"))
            summary["eval"] = result["scores"]
        write_json(summary, os.path.join(cfg.out, "summary.json"))
    world.barrier()
    return summary


def final_terms(log_path):
    """The mean of each logged loss term over the last FINAL_WINDOW steps of the whole run."""
    with open(log_path) as f:
        records = [json.loads(line) for line in f if line.strip()][-FINAL_WINDOW:]
    keys = [k for k in records[-1] if k not in ("step", "epoch", "lr", "examples_per_s",
                                                 "tokens_per_s")]
    return {k: sum(r[k] for r in records) / len(records) for k in keys}
