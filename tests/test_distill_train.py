"""The distillation loop end to end on tiny local models: every method, the teacher cache,
the CLI and its config file, evaluation, kill-and-resume, and torchrun with 2 CPU processes."""

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time

import pytest
import torch
import yaml

from mlot_kernels.distill import cli
from mlot_kernels.distill.trainer import TrainConfig, train
from tests.distill_setup import cli_args, run_cli


def read_log(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def final_weights(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["model"]


TERMS = {"sft": {"ce"}, "seqkd": {"ce"}, "uld": {"ce", "distill", "uld"},
         "mlot": {"ce", "distill", "had", "sl", "sd"}}


@pytest.mark.parametrize("method,preset", [("sft", "paper"), ("seqkd", "paper"), ("uld", "paper"),
                                           ("mlot", "paper"), ("mlot", "official")])
def test_every_method_trains_and_writes_its_outputs(tiny, tmp_path, method, preset):
    out = tmp_path / "run"
    summary = train(TrainConfig(**tiny.config(out, method=method, preset=preset,
                                              eval_data=tiny.held_out)))
    log = read_log(out)
    assert [r["step"] for r in log] == [0, 1, 2, 3]
    for record in log:
        assert TERMS[method] | {"loss"} <= set(record)
        assert all(torch.isfinite(torch.tensor(record[k])) for k in TERMS[method])
        expected = record["ce"] + record.get("distill", 0.0)
        assert record["loss"] == pytest.approx(expected, rel=1e-6)
    assert log[0]["lr"] < log[1]["lr"]  # OneCycle warms up
    assert summary["steps"] == 4 and summary["final"]["ce"] == pytest.approx(
        sum(r["ce"] for r in log) / 4)
    assert summary["teacher_forwards"] == (4 if method in ("uld", "mlot") else 0)
    for name in ("model/config.json", "checkpoint.pt", "summary.json", "eval.json"):
        assert (out / name).exists(), name
    scores = json.loads((out / "eval.json").read_text())
    assert scores["n"] == 8 and 0.0 <= scores["scores"]["f1"] <= 100.0
    if method == "seqkd":
        generated = [json.loads(line) for line in (out / "seqkd-answers.jsonl").read_text().splitlines()]
        assert len(generated) == 48


def test_bfloat16_teacher_gives_the_float32_terms_to_bf16_precision(tiny, tmp_path):
    runs = {}
    for dtype in ("float32", "bfloat16"):
        train(TrainConfig(**tiny.config(tmp_path / dtype, method="mlot", max_steps=1,
                                        teacher_dtype=dtype)))
        runs[dtype] = read_log(tmp_path / dtype)[0]
    for key in ("ce", "had", "sl", "sd"):
        assert runs["bfloat16"][key] == pytest.approx(runs["float32"][key], rel=3e-2), key
    assert runs["bfloat16"]["had"] != runs["float32"]["had"]  # the teacher did run in bf16


def test_training_changes_the_student_and_lowers_the_loss(tiny, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**tiny.config(out, method="mlot", max_steps=24, lr=3e-3, schedule="constant")))
    log = read_log(out)
    first, last = sum(r["loss"] for r in log[:4]) / 4, sum(r["loss"] for r in log[-4:]) / 4
    assert last < 0.9 * first


@pytest.mark.parametrize("method,preset", [("mlot", "paper"), ("mlot", "official"),
                                           ("uld", "paper")])
def test_teacher_cache_skips_the_teacher_and_changes_nothing(tiny, tmp_path, method, preset):
    """Epoch 2 of a cached run and a whole second run read the cache: no teacher forward, and
    the loss curve of a run without a cache (1e-5), for the official preset's batch ranking and
    ULD too; the cached hidden states serve other loss options, not another teacher dtype."""
    common = dict(method=method, preset=preset, batch_size=8, epochs=2, max_steps=0,
                  schedule="constant")
    plain = train(TrainConfig(**tiny.config(tmp_path / "plain", **common)))
    cache = str(tmp_path / "cache")
    first = train(TrainConfig(**tiny.config(tmp_path / "first", teacher_cache=cache, **common)))
    second = train(TrainConfig(**tiny.config(tmp_path / "second", teacher_cache=cache, **common)))
    steps = 2 * (48 // 8)
    assert plain["teacher_forwards"] == steps
    assert first["teacher_forwards"] == steps // 2
    assert second["teacher_forwards"] == 0
    expected = [r["loss"] for r in read_log(tmp_path / "plain")]
    for run in ("first", "second"):
        assert [r["loss"] for r in read_log(tmp_path / run)] == pytest.approx(expected, rel=1e-5)
    if method == "mlot":
        other = train(TrainConfig(**tiny.config(tmp_path / "other", teacher_cache=cache,
                                                loss_options=dict(k=20), **common)))
        assert other["teacher_forwards"] == 0
    with pytest.raises(ValueError, match=r"differing: \['teacher_dtype'\]"):
        train(TrainConfig(**tiny.config(tmp_path / "bf16", teacher_cache=cache,
                                        teacher_dtype="bfloat16", **common)))


def test_teacher_cache_refuses_a_tokenizer_changed_under_its_path(tiny, tmp_path):
    """The teacher's tokenizer folder gets a chat template after the cache was filled: the same
    path now encodes other teacher tokens, and the run stops, naming ``teacher_tokens``."""
    import shutil

    from mlot_kernels.distill.models import load_tokenizer

    folder = str(tmp_path / "teacher-tokenizer")
    shutil.copytree(tiny.teacher_tokenizer, folder)
    common = dict(teacher_tokenizer=folder, teacher_cache=str(tmp_path / "cache"), max_steps=1)
    train(TrainConfig(**tiny.config(tmp_path / "first", **common)))
    tokenizer = load_tokenizer(folder)
    tokenizer.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}<end>"
                               "{% endfor %}")
    tokenizer.save_pretrained(folder)
    with pytest.raises(ValueError, match=r"differing: \['teacher_tokens'\]"):
        train(TrainConfig(**tiny.config(tmp_path / "second", **common)))


def test_logits_path_equals_hidden_path(tiny, tmp_path):
    """loss_from='logits' (the models' logits) follows the default hidden-state path's loss
    curve, with and without a teacher cache."""
    common = dict(method="mlot", max_steps=3)
    train(TrainConfig(**tiny.config(tmp_path / "hidden", **common)))
    train(TrainConfig(**tiny.config(tmp_path / "logits", loss_from="logits", **common)))
    train(TrainConfig(**tiny.config(tmp_path / "cached", loss_from="logits",
                                    teacher_cache=str(tmp_path / "cache"), **common)))
    expected = [r["loss"] for r in read_log(tmp_path / "hidden")]
    for run in ("logits", "cached"):
        assert [r["loss"] for r in read_log(tmp_path / run)] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("values,message", [
    (dict(method="kd"), "method must be one of"),
    (dict(method="uld", teacher=""), "needs a teacher"),
    (dict(method="sft", teacher_cache="x"), "teacher_cache is for methods 'uld' and 'mlot'"),
    (dict(loss_from="probs"), "loss_from must be one of"),
    (dict(method="sft", loss_options=dict(k=3)), "loss_options are options of method 'mlot'"),
    (dict(batch_size=0), "batch_size must be at least 1"),
    (dict(data_format="csv"), "data_format must be one of"),
])
def test_bad_settings_are_named(tiny, tmp_path, values, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**tiny.config(tmp_path, **values))


def test_unknown_loss_option_and_small_data_are_named(tiny, tmp_path):
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['kk'\]"):
        train(TrainConfig(**tiny.config(tmp_path / "a", loss_options=dict(kk=1))))
    with pytest.raises(ValueError, match="48 examples, fewer than one global batch"):
        train(TrainConfig(**tiny.config(tmp_path / "b", batch_size=25, grad_accum=2)))


def test_a_finished_run_is_not_overwritten(tiny, tmp_path):
    train(TrainConfig(**tiny.config(tmp_path, method="sft", max_steps=1)))
    with pytest.raises(FileExistsError, match="pass resume"):
        train(TrainConfig(**tiny.config(tmp_path, method="sft", max_steps=1)))
    # a truncated checkpoint stops the resume with its file's name
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:200])
    with pytest.raises(ValueError, match=f"cannot read the checkpoint {checkpoint}"):
        train(TrainConfig(**tiny.config(tmp_path, method="sft", max_steps=2, resume=True)))


def test_config_file_and_flags(tiny, tmp_path):
    """--config (YAML or JSON) gives the fields; flags override them; loss options merge."""
    values = tiny.config(tmp_path / "out", method="mlot", loss_options=dict(k=12, sd=False))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    args = cli.parser().parse_args(["train", "--config", str(path), "--batch-size", "2",
                                    "--loss-option", "k=7", "--loss-option", "ranking=token",
                                    "--resume"])
    cfg = cli.train_config(args)
    assert cfg.batch_size == 2 and cfg.resume is True and cfg.lr == values["lr"]
    assert cfg.loss_options == dict(k=7, sd=False, ranking="token")
    (tmp_path / "run.json").write_text(json.dumps(dict(values, bogus=1)))
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['bogus'\]"):
        cli.train_config(cli.parser().parse_args(["train", "--config", str(tmp_path / "run.json")]))


def test_eval_command_scores_a_model(tiny, tmp_path):
    out = tmp_path / "eval.json"
    result = run_cli(["eval", "--model", tiny.teacher, "--tokenizer", tiny.teacher_tokenizer,
                      "--data", tiny.held_out, "--shots", "1", "--shots-data", tiny.train,
                      "--max-new-tokens", "4", "--device", "cpu", "--out", str(out)])
    assert result.returncode == 0, result.stderr
    written = json.loads(out.read_text())
    assert written["n"] == 8 and len(written["predictions"]) == 8
    assert json.loads(result.stdout.strip().splitlines()[-1]) == written["scores"]


def test_kill_and_resume_gives_the_same_weights(tiny, tmp_path):
    """A run killed with SIGKILL between checkpoints and resumed ends with the weights and the
    loss curve of an uninterrupted run."""
    values = tiny.config(None, method="mlot", max_steps=60, checkpoint_every=10)
    straight = tmp_path / "straight"
    done = run_cli(["train", *cli_args(dict(values, out=str(straight)))])
    assert done.returncode == 0, done.stderr

    killed = tmp_path / "killed"
    args = ["train", *cli_args(dict(values, out=str(killed)))]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "mlot_kernels.distill.cli", *args], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = killed / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 25:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    logged = len(log.read_text().splitlines())
    assert 25 <= logged < 60
    assert torch.load(killed / "checkpoint.pt", weights_only=False)["step"] == 10 * (logged // 10)

    resumed = run_cli(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert [r["step"] for r in read_log(killed)] == list(range(60))
    assert [r["loss"] for r in read_log(killed)] == [r["loss"] for r in read_log(straight)]
    expected, actual = final_weights(straight), final_weights(killed)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def test_torchrun_two_processes_match_one(tiny, tmp_path):
    """2 gloo processes with micro-batches of 2 follow the loss curve of one process with 2
    accumulated micro-batches of 2: the same global batches and the same mean gradient."""
    values = tiny.config(None, method="mlot", batch_size=2, max_steps=6)
    one = run_cli(["train", *cli_args(dict(values, grad_accum=2, out=str(tmp_path / "one")))])
    assert one.returncode == 0, one.stderr
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", "-m", "mlot_kernels.distill.cli", "train",
                          *cli_args(dict(values, out=str(tmp_path / "two")))],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr
    log_one, log_two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2
    for key in ("loss", "ce", "had", "sl", "sd"):
        assert [r[key] for r in log_two] == pytest.approx([r[key] for r in log_one], rel=1e-5)
    expected, actual = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("teacher", ["smollm2", "toy"])
def test_console_script_runs_the_quick_demo(tmp_path, teacher):
    """``mlot-distill demo --quick``: the whole pipeline at tiny sizes, with the real teacher
    (the default; every method; the teacher's forward runs once per example, after the prefix
    its prompts share) and with the toy one, its table, JSON and plots."""
    script = os.path.join(sysconfig.get_path("scripts"), "mlot-distill")
    assert os.path.exists(script), f"no {script}: pip install -e . declares the console script"
    choice = ["--teacher", "toy"] if teacher == "toy" else []
    result = subprocess.run([script, "demo", "--quick", *choice, "--out", str(tmp_path)],
                            text=True, capture_output=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    expected = {"sft", "uld", "mlot-paper", "mlot-official"} | ({"seqkd"} if teacher != "toy" else set())
    assert set(results["methods"]) == expected
    assert {"f1", "em"} <= set(results["teacher"]["scores"])
    for entry in results["methods"].values():
        assert entry["per_seed"][0]["final"]["ce"] > 0 and "mean" in entry["f1"]
    for plot in ("loss_curves.png", "scores.png"):
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"
    assert "| student, mlot-paper |" in result.stdout
    if teacher == "smollm2":
        assert results["teacher"]["vocabulary"] == 49152
        assert results["setup"]["student_vocabulary"] == 32000
        forwards = {label: entry["per_seed"][0]["teacher_forwards"]
                    for label, entry in results["methods"].items()}
        # uld fills the cache; both presets read it (either answer rule): no forward
        assert forwards["uld"] > 0 and forwards["mlot-paper"] == forwards["mlot-official"] == 0
        assert results["methods"]["uld"]["per_seed"][0]["teacher_prefix_tokens"] > 100
