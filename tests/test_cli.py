"""The CLI: `autoft train`'s outputs, one clear line for every user mistake, and help text that reads plainly."""

import json
import re

import pytest
import typer.main
from rich.text import Text
from typer.testing import CliRunner

from autoft.cli import make_app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(make_app(), list(map(str, args)))


def test_train_writes_checkpoint_metrics_and_labels(split_folder, tmp_path):
    out = tmp_path / "run"
    result = invoke("train", "--backbone", "test_resnet", "--data", split_folder, "--out", out, "--epochs", "2", "--image-size", "32", "--batch-size", "8")
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert {"train_loss", "val_loss", "val_accuracy"} <= set(metrics["epochs"][0])
    assert "test_accuracy" in metrics and metrics["num_test"] == 9
    assert json.loads((out / "labels.json").read_text()) == ["blue", "green", "red"]
    assert (out / "model.pt").is_file()
    assert "val accuracy" in result.output


def test_strategy_parameters_pass_through_param(class_folder, tmp_path):
    result = invoke(
        "train", "--backbone", "test_resnet", "--data", class_folder, "--out", tmp_path, "--epochs", "1",
        "--image-size", "16", "--strategy", "l2sp", "--param", "l2sp_alpha=0.05", "--freeze-depth", "2",
    )
    assert result.exit_code == 0, result.output
    params = json.loads((tmp_path / "metrics.json").read_text())["params"]
    assert params["strategy"] == "l2sp" and params["l2sp_alpha"] == 0.05 and params["freeze_depth"] == 2


def test_train_from_pretrained_weights_starts_as_the_search_s_default_recipe_does(class_folder, tmp_path):
    """From pretrained weights the head starts from the linear probe and BatchNorm keeps its
    statistics, as in the search's default recipe: a random head on lite0's features starts
    at a loss of 9 on 8 classes, and LP-FT at lr 3e-4 diverged. A flag given still wins."""
    import torch

    from autoft.model.backbones import build_backbone

    torch.save(build_backbone("test_resnet", num_classes=5).model.state_dict(), tmp_path / "w.pt")
    common = ["train", "--backbone", "test_resnet", "--data", class_folder, "--epochs", "1", "--image-size", "16", "--weights", tmp_path / "w.pt"]
    result = invoke(*common, "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    params = json.loads((tmp_path / "a" / "metrics.json").read_text())["params"]
    assert params["head_init"] == "probe" and params["bn"] == "keep"
    result = invoke(*common, "--out", tmp_path / "b", "--param", "head_init=random")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["params"]["head_init"] == "random"
    result = invoke("train", "--backbone", "test_resnet", "--data", class_folder, "--epochs", "1", "--image-size", "16", "--out", tmp_path / "c")
    assert "head_init" not in json.loads((tmp_path / "c" / "metrics.json").read_text())["params"]  # from random weights: no probe to start from


def test_a_diverged_run_ends_in_one_error_line(class_folder, tmp_path):
    result = invoke("train", "--backbone", "test_resnet", "--data", class_folder, "--out", tmp_path, "--epochs", "2", "--image-size", "16", "--lr", "1000")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("error: diverged:") and "learning rate may be too high" in errors[0], result.output
    assert not (tmp_path / "model.pt").exists()  # a broken model is not written


def _one_clear_line(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--data", "{missing}"], ["data not found"]),
        (["--backbone", "resnet5O"], ["unknown backbone", "resnet50"]),
        (["--strategy", "freze"], ["unknown strategy", "freeze"]),
        (["--data", "{empty}"], ["no images found"]),
        (["--data", "{one_class}"], ["at least two classes"]),
        (["--weights", "{missing}/w.pt"], ["weights file not found"]),
        (["--device", "tpu"], ["unknown device"]),
        (["--param", "nonsense"], ["KEY=VALUE"]),
    ],
)
def test_user_mistakes_end_in_one_line_and_exit_2(class_folder, tmp_path, args, needles):
    (tmp_path / "empty").mkdir()
    one_class = tmp_path / "one"
    (one_class / "red").mkdir(parents=True)
    for png in (class_folder / "red").glob("*.png"):
        (one_class / "red" / png.name).write_bytes(png.read_bytes())
    places = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "one_class": one_class}
    base = {"--backbone": "test_resnet", "--data": str(class_folder), "--out": str(tmp_path / "out"), "--epochs": "1", "--image-size": "16"}
    extra = []
    for flag, value in zip(args[::2], args[1::2]):
        value = value.format(**places)
        if flag in base:
            base[flag] = value
        else:
            extra += [flag, value]
    result = invoke("train", *[x for kv in base.items() for x in kv], *extra)
    _one_clear_line(result, *needles)
    assert not (tmp_path / "out" / "model.pt").exists()



def _write_odd(folder, name: bytes, content: bytes) -> None:
    """A file whose name is raw bytes, as Linux allows: Python sees them as lone surrogates."""
    import os

    with open(os.fsencode(folder) + b"/" + name, "wb") as f:
        f.write(content)


def test_files_named_in_no_encoding_train_or_are_skipped_with_a_warning(class_folder, tmp_path):
    _write_odd(class_folder / "red", b"\xff\xfe.png", (class_folder / "red" / "0.png").read_bytes())
    _write_odd(class_folder / "green", b"caf\xe9 \x80.png", b"not a png")
    result = invoke("train", "--backbone", "test_resnet", "--data", class_folder, "--out", tmp_path / "out", "--epochs", "1", "--image-size", "16")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "skipped 1 unreadable image(s) of 26" in result.output
    assert (tmp_path / "out" / "model.pt").exists()

    # A class whose only file is such a name, and no image: that file's warning, then one error line.
    for png in class_folder.glob("[gb]*/[0-9].png"):
        png.unlink()
    result = invoke("train", "--backbone", "test_resnet", "--data", class_folder, "--out", tmp_path / "out2", "--epochs", "1", "--image-size", "16")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    *warnings, error = result.output.strip().splitlines()
    assert all(w.startswith("warning: ") for w in warnings)
    assert any(w.startswith("warning: skipped 1 unreadable") and "/green/caf" in w for w in warnings)
    assert error == "error: need at least two classes, found 1 ('red')"


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.startswith("autoft ")


def test_python_dash_m_autoft_is_the_command():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "autoft", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("autoft "), done.stderr


# ---------------------------------------------------------------------------
# Help text

TYPE_LABELS = re.compile(r"<(str|int|float|bool|path|Path|list\[[^\]]*\])( range)?>")
COMMANDS = ["plugins", "train", "pretrain", "search", "export", "predict", "serve"]


def help_of(*command):
    result = runner.invoke(make_app(), [*command, "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)], ids=["autoft", *COMMANDS])
def test_help_shows_plain_metavars(command):
    text = help_of(*command)
    assert "Show this message and exit." in text
    assert not TYPE_LABELS.search(text), TYPE_LABELS.search(text).group(0)


def test_help_metavars_name_the_value():
    search = help_of("search")
    assert re.search(r"--trials\s+INTEGER \[x>=1\]", search)
    assert re.search(r"--timeout\s+DURATION ", search) and re.search(r"--weights\s+auto\|scratch\|PATH\|TAG ", search)
    assert re.search(r"--onnx\s+--no-onnx\s+Export", search)  # a flag takes no value
    predict = help_of("predict")
    assert re.search(r"MODEL_OR_RUN\s+model\.onnx", predict) and re.search(r"--top-k\s+INTEGER \[x>=1\]", predict)


def _options():
    root = typer.main.get_command(make_app())
    return [(name, p) for name, command in root.commands.items() for p in command.params]


def test_every_default_written_in_help_is_shown():
    """Rich reads "[default: x]" as markup and drops it: each one must be escaped."""
    written = [(name, p) for name, p in _options() if p.help and "default:" in p.help]
    assert len(written) >= 15
    for name, p in written:
        assert "[default:" in Text.from_markup(p.help).plain, f"{name} --{p.name}: {p.help}"
    export = help_of("export")
    assert "[default: the run folder for fp32" in export and "[default: torch.onnx's for the dynamo exporter" in export
    assert "[default: as many as --timeout allows" in help_of("search")


def test_batch_size_has_one_minimum_for_training():
    minimums = {name: p.min for name, p in _options() if p.name == "batch_size" and name in ("train", "search", "pretrain")}
    assert minimums == {"train": 2, "search": 2, "pretrain": 2}
    result = invoke("train", "--backbone", "test_resnet", "--data", "sample:digits", "--out", "unused", "--batch-size", "1")
    assert result.exit_code == 2 and "greater than or equal to 2" in result.output, result.output


@pytest.mark.parametrize("timeout, said", [("5", True), ("2.5", True), ("5s", False), ("30m", False)])
def test_a_bare_timeout_is_taken_as_seconds_and_said(timeout, said):
    result = invoke("search", "--backbone", "resnet5O", "--data", "sample:digits", "--timeout", timeout)
    assert result.exit_code == 2 and "unknown backbone" in result.output  # the value passed through to the search
    assert (f"warning: --timeout {timeout} is taken as {timeout} seconds" in result.output) == said, result.output
