"""Cross-tokenizer distillation inside ``transformers.Trainer``: :class:`DistillationTrainer`.

The student trains with the Trainer's loop (its ``TrainingArguments``, accelerate's DDP,
``resume_from_checkpoint``, PEFT, gradient checkpointing, bf16, its callbacks and loggers) on
the loss of one method of the reference loop (:mod:`mlot_kernels.distill.methods`): ``mlot``
(:class:`mlot_kernels.MultiLevelOTLoss`, ``loss_options`` any of its options, ``preset``
included), ``uld`` (:func:`mlot_kernels.uld_loss`) or ``sft`` (the student's cross-entropy).

Rows are TRL's (``prompt``/``completion``, standard or conversational, and ``messages``) or this
project's QA rows (:func:`mlot_kernels.distill.data.conversations`); each model's sequence is its
prompt, through its tokenizer's chat template where it has one, then the completion and the
token that ends it, and the labels cover the completion only, on both sides
(:mod:`mlot_kernels.distill.prompts`, the same code as ``mlot-distill``'s). Rows are tokenised
once, at construction; :class:`DistillationCollator` pads both models' sequences.

As in ``mlot-distill``: by default (``loss_from="hidden"``) neither model builds its logits,
the losses read the last hidden states and output layers; the teacher is frozen, reads the
prompt prefix its sequences share once (:mod:`mlot_kernels.distill.prefix_cache`), and with
``teacher_cache`` its hidden states at the answer rows are stored per training example. The
step's loss is the mean of its micro-batches' losses (the Trainer divides each by the
gradient-accumulation steps), so 2 processes equal 1 process accumulating 2 micro-batches. The
loss terms are logged as ``ce``, ``distill``, ``had``/``sl``/``sd`` (mlot) or ``uld`` (uld), the
mean over the steps since the last log and over processes (``eval_``-prefixed in evaluation).

The hidden-state path reads the student's output layer directly: with FSDP or DeepSpeed ZeRO-3,
whose parameters are sharded, use ``loss_from="logits"``.
"""

import inspect
import warnings

import torch
import transformers

from mlot_kernels.distill import prefix_cache
from mlot_kernels.distill.data import conversations
from mlot_kernels.distill.methods import LOSS_FROM, Method, hidden
from mlot_kernels.distill.models import output_layer, pad_with_eos, sample_ids
from mlot_kernels.distill.prompts import (DistillationCollator, Encoded, answer_end_id,
                                          encode_conversation, features, teacher_inputs)
from mlot_kernels.distill.teacher_cache import token_digest

__all__ = ["DistillationCollator", "DistillationTrainer", "encode_rows"]

METHODS = ("mlot", "uld", "sft")
COLUMNS = ("index", "input_ids", "labels", "teacher_input_ids", "teacher_labels")


def causal_lm(model):
    """The Hugging Face causal LM inside ``model`` (a PEFT model's base model)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def encode_rows(rows, tokenizer, teacher_tokenizer=None, max_length=1024, name="dataset"):
    """The :func:`mlot_kernels.distill.prompts.features` of each row: its
    :class:`mlot_kernels.distill.prompts.Conversation` tokenised for the student (and the
    teacher), ``index`` its position."""
    end = answer_end_id(tokenizer)
    teacher_end = answer_end_id(teacher_tokenizer) if teacher_tokenizer is not None else None
    out = []
    for index, conversation in enumerate(conversations(rows, name)):
        student = encode_conversation(tokenizer, conversation, max_length, end)
        teacher = encode_conversation(teacher_tokenizer, conversation, max_length, teacher_end) \
            if teacher_tokenizer is not None else None
        out.append(features(index, student, teacher))
    return out


class _LastHidden:
    """Keeps the ``last_hidden_state`` of ``module``'s forward (a causal LM's base model) while
    the whole model runs: the forward goes through the Trainer's wrappers (DDP, PEFT), the
    logits are not built (``logits_to_keep=1``)."""

    def __init__(self, module):
        self.module, self.states = module, None

    def __enter__(self):
        def keep(module, args, output):
            self.states = output.last_hidden_state
        self.handle = self.module.register_forward_hook(keep)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


class DistillationTrainer(transformers.Trainer):
    """``transformers.Trainer`` distilling ``teacher_model`` into ``model`` with ``method``.

    Args (beyond the Trainer's):
        teacher_model: the teacher (a causal LM; frozen here, moved to the Trainer's device);
            not needed by ``sft``.
        processing_class, teacher_processing_class: the student's and the teacher's
            tokenizers (pad with eos where they have no pad token).
        method: ``"mlot"``, ``"uld"`` or ``"sft"``.
        loss_options: ``mlot``'s options (:class:`mlot_kernels.MultiLevelOTLoss`), e.g.
            ``{"preset": "official", "k": 20}``.
        max_length: tokens per sequence, the prompt cut first (TRL's ``max_length``).
        loss_from: ``"hidden"`` (last hidden states and output layers) or ``"logits"``.
        kernels: ``"fused"`` (``torch.ops.mlot``) or ``"reference"`` (plain PyTorch).
        teacher_cache: a directory of the teacher's hidden states per training row.
    ``train_dataset`` and ``eval_dataset`` hold rows (:func:`encode_rows`); the default
    ``data_collator`` is :class:`DistillationCollator`.
    """

    loss_is_scaled_for_ga = False  # a micro-batch mean: the Trainer divides by the GA steps

    def __init__(self, model=None, teacher_model=None, args=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, teacher_processing_class=None,
                 method="mlot", loss_options=None, max_length=1024, loss_from="hidden",
                 kernels="fused", teacher_cache=None, data_collator=None, **kwargs):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if loss_from not in LOSS_FROM:
            raise ValueError(f"loss_from must be one of {LOSS_FROM}, got {loss_from!r}")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an integer of at least 1, got {max_length!r}")
        if model is None or processing_class is None:
            raise ValueError("DistillationTrainer needs model and processing_class (the "
                             "student's tokenizer)")
        needs_teacher = method != "sft"
        for name, value in (("teacher_model", teacher_model),
                            ("teacher_processing_class", teacher_processing_class)):
            if needs_teacher and value is None:
                raise ValueError(f"method {method!r} needs {name}")
        tokenizer = pad_with_eos(processing_class)
        teacher_tokenizer = pad_with_eos(teacher_processing_class) if needs_teacher else None
        self._encode = lambda rows, name: None if rows is None else encode_rows(
            rows, tokenizer, teacher_tokenizer, max_length, name)
        train_rows = self._encode(train_dataset, "train_dataset")
        eval_rows = self._encode_eval(eval_dataset)
        collator = data_collator or DistillationCollator(
            tokenizer.pad_token_id, teacher_tokenizer.pad_token_id if needs_teacher else None)
        super().__init__(model=model, args=args, data_collator=collator,
                         train_dataset=train_rows, eval_dataset=eval_rows,
                         processing_class=processing_class, **kwargs)
        self._signature_columns = list(COLUMNS)  # the collator's columns: none removed
        self._metrics = {"train": {}, "eval": {}}  # mode -> term -> (sum, count) since the log

        device = self.args.device
        sample = next(iter(train_rows or []), None) or next(iter(_first_rows(eval_rows)), None)
        if sample is None:
            raise ValueError("DistillationTrainer needs a train_dataset or an eval_dataset")
        lm = causal_lm(self.model)
        self.student_head = None
        if loss_from == "hidden":
            self.student_head = output_layer(lm, sample_ids([_encoded(sample)], device))
            self._student_base = lm.base_model
            self._keep_one = "logits_to_keep" in inspect.signature(lm.forward).parameters
            if not self._keep_one:
                warnings.warn(f"{type(lm).__name__}.forward has no logits_to_keep: its logits "
                              "are built, then unused")
        teacher_head = prefix = None
        teacher_seqs = [_encoded(r, "teacher_") for r in train_rows or []] if needs_teacher else []
        if needs_teacher:
            self.teacher = teacher_model.to(device).eval().requires_grad_(False)
            if loss_from == "hidden" or teacher_cache:
                teacher_head = output_layer(self.teacher,
                                            sample_ids([_encoded(sample, "teacher_")], device))
            if teacher_seqs:
                prefix = prefix_cache.build(self.teacher, [s.input_ids for s in teacher_seqs],
                                            [s.prompt_length for s in teacher_seqs])
        else:
            self.teacher = None
        options = dict(teacher_head=teacher_head, prefix=prefix, kernels=kernels,
                       loss_options=loss_options)
        fingerprint = None
        if teacher_cache:
            fingerprint = dict(teacher=getattr(teacher_model, "name_or_path", ""),
                               teacher_dtype=str(next(self.teacher.parameters()).dtype),
                               teacher_tokens=token_digest(teacher_seqs))
        self.distill = Method(method, self.teacher, cache_dir=teacher_cache or "",
                              cache_fingerprint=fingerprint, **options)
        # evaluation rows are not training rows: no teacher cache (its keys are their indices)
        self.eval_distill = Method(method, self.teacher, **options) if teacher_cache \
            else self.distill

    def _encode_eval(self, eval_dataset):
        """Evaluation rows encoded (a dict of them: each; a name: the Trainer's own)."""
        if isinstance(eval_dataset, dict):
            return {key: self._encode(rows, f"eval_dataset[{key!r}]")
                    for key, rows in eval_dataset.items()}
        if isinstance(eval_dataset, str):
            return eval_dataset
        return self._encode(eval_dataset, "eval_dataset")

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """The Trainer's evaluation; ``eval_dataset`` given here holds rows, as at
        construction."""
        return super().evaluate(self._encode_eval(eval_dataset), ignore_keys, metric_key_prefix)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The method's loss on a batch of :class:`DistillationCollator`; its terms are kept
        for :meth:`log`."""
        mode = "train" if model.training else "eval"
        student_inputs = dict(input_ids=inputs["input_ids"],
                              attention_mask=inputs["attention_mask"], use_cache=False)
        if self.student_head is not None:
            with _LastHidden(self._student_base) as last:
                model(**student_inputs, **(dict(logits_to_keep=1) if self._keep_one else {}))
            student = hidden(last.states, *self.student_head)
        else:
            student = model(**student_inputs).logits
        method = self.distill if mode == "train" else self.eval_distill
        terms = method.terms(inputs["index"].tolist(), student, inputs["labels"],
                             teacher_inputs(inputs))
        kept = self._metrics[mode]
        for key, value in terms.items():
            if key != "loss":  # the Trainer logs its own
                total, count = kept.get(key, (0.0, 0))
                kept[key] = (total + value.detach().float(), count + 1)
        return (terms["loss"], terms) if return_outputs else terms["loss"]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The loss alone: the distillation losses have no predictions to gather."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs, start_time=None):
        """The Trainer's log with the mean of each loss term since the last log, over every
        process (``eval_``-prefixed in evaluation, and in the metrics ``evaluate`` returns)."""
        mode = "train" if self.model.training else "eval"
        kept = self._metrics[mode]
        if kept:
            keys = sorted(kept)
            means = torch.stack([kept[k][0] / kept[k][1] for k in keys])
            means = self.accelerator.reduce(means, reduction="mean").tolist()
            prefix = "eval_" if mode == "eval" else ""
            logs.update({f"{prefix}{k}": v for k, v in zip(keys, means)})  # evaluate's metrics
            kept.clear()
        super().log(logs, start_time)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        try:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        except Exception as error:
            raise ValueError(f"resume_from_checkpoint: cannot load the model from "
                             f"{resume_from_checkpoint} ({type(error).__name__}: {error})") \
                from error

    def _load_optimizer_and_scheduler(self, checkpoint):
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except Exception as error:
            raise ValueError(f"resume_from_checkpoint: cannot load the optimizer or scheduler "
                             f"from {checkpoint} ({type(error).__name__}: {error})") from error


def _first_rows(eval_rows):
    if isinstance(eval_rows, dict):
        return next(iter(eval_rows.values()), None) or []
    return eval_rows or []


def _encoded(row, side=""):
    """One side's :class:`Encoded` sequence of a :func:`features` row (``side``: "" or
    "teacher_")."""
    return Encoded(row[f"{side}input_ids"], row[f"{side}labels"])
