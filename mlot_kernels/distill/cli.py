"""``mlot-distill``: ``demo``, ``train`` and ``eval`` (``mlot-distill SUBCOMMAND --help``).

``train`` has one flag per field of :class:`mlot_kernels.distill.trainer.TrainConfig`
(``--batch-size 8``, ``--resume``/``--no-resume``, ``--loss-option k=20`` for each override of the
MultiLevelOT options) and ``--config FILE``, a YAML or JSON mapping of the same names; flags
override the file.
"""

import argparse
import dataclasses
import json
import sys

from mlot_kernels.distill.data import FORMATS, METRIC, load_examples
from mlot_kernels.distill.files import write_json
from mlot_kernels.distill.trainer import TrainConfig


def _option(text):
    """``name=value`` of ``--loss-option``, the value read as YAML (numbers, booleans, strings)."""
    import yaml

    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, yaml.safe_load(value)


def add_train_flags(parser):
    parser.add_argument("--config", help="YAML or JSON file of TrainConfig fields")
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.name == "loss_options":
            parser.add_argument("--loss-option", dest="loss_options", action="append",
                                type=_option, default=argparse.SUPPRESS, metavar="NAME=VALUE",
                                help="an option of the MultiLevelOT loss (repeatable)")
        elif field.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS)
        else:
            kind = {"int": int, "float": float, "str": str}.get(field.type, field.type)
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS,
                                help=f"default: {field.default!r}")


def read_config(path):
    """The mapping in a YAML or JSON file, its keys checked against TrainConfig's fields."""
    import yaml

    with open(path) as f:
        values = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of settings, got "
                         f"{type(values).__name__}")
    values = {key.replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ValueError(f"--config {path}: unknown setting(s) {unknown}")
    return values


def train_config(args):
    """TrainConfig from ``--config`` and the flags given (flags win)."""
    values = read_config(args.config) if args.config else {}
    given = {k: v for k, v in vars(args).items() if k not in ("config", "command")}
    if "loss_options" in given:
        given["loss_options"] = dict(values.get("loss_options", {}), **dict(given["loss_options"]))
    return TrainConfig(**{**values, **given})


def run_eval(args):
    from mlot_kernels.distill.evaluate import evaluate
    from mlot_kernels.distill.models import load_model, load_tokenizer, resolve_device

    examples = load_examples(args.data, args.data_format, args.split, args.limit or None)
    shots = []
    if args.shots:
        shots = load_examples(args.shots_data or args.data, args.data_format, args.shots_split,
                              args.shots)
        if not args.shots_data:
            examples = examples[args.shots:]  # the worked examples are not scored
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    model = load_model(args.model, args.dtype, resolve_device(args.device), trainable=False)
    result = evaluate(model, tokenizer, examples, METRIC[args.data_format], shots,
                      args.max_new_tokens, args.batch_size, args.max_length)
    if args.out:
        write_json(result, args.out)
    print(json.dumps(result["scores"]))
    return result


def parser():
    top = argparse.ArgumentParser(prog="mlot-distill", description=__doc__.split("\n")[0])
    sub = top.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the offline end-to-end demo (generated data, a real or toy teacher)")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in seconds")
    demo.add_argument("--seeds", type=int, nargs="+", default=[0],
                      help="student seeds; several give mean and spread")
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--teacher", choices=("smollm2", "toy"), default="smollm2",
                      help="smollm2: the real SmolLM2-135M-Instruct (default); toy: a small "
                      "teacher trained here on generated tokenizers")
    add_train_flags(sub.add_parser("train", help="distil a student from a teacher"))
    ev = sub.add_parser("eval", help="greedy decoding and scores of a model on a data set")
    ev.add_argument("--model", required=True)
    ev.add_argument("--tokenizer", default="")
    ev.add_argument("--data", required=True)
    ev.add_argument("--data-format", choices=FORMATS, default="jsonl")
    ev.add_argument("--split", default="validation")
    ev.add_argument("--limit", type=int, default=0)
    ev.add_argument("--shots", type=int, default=0, help="worked examples in the prompt")
    ev.add_argument("--shots-data", default="", help="where they come from (default: --data, "
                    "whose first --shots examples are then not scored)")
    ev.add_argument("--shots-split", default="train")
    ev.add_argument("--max-new-tokens", type=int, default=150)
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--max-length", type=int, default=512)
    ev.add_argument("--dtype", default="float32")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--out", default="", help="JSON file for the scores and predictions")
    return top


def main(argv=None):
    args = parser().parse_args(argv)
    from transformers.utils import logging
    logging.disable_progress_bar()  # per-file loading bars; the training bar stays
    if args.command == "demo":
        from mlot_kernels.distill import demo
        demo.run(args.out, args.quick, tuple(args.seeds), device=args.device,
                 teacher=args.teacher)
    elif args.command == "train":
        from mlot_kernels.distill.trainer import train
        print(json.dumps(train(train_config(args)), indent=1))
    else:
        run_eval(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
