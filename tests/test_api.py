"""`import autoft` gives what the CLI gives, as functions returning result objects; the CLI
is a thin layer over them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import autoft
from autoft.cli import make_app

runner = CliRunner()


def test_import_autoft_is_light():
    code = "import sys, autoft; autoft.hookimpl, autoft.AutoftError, autoft.__version__; print(sorted(m for m in ('torch', 'timm', 'optuna') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # the API resolves on first use, not at import


def test_the_command_answers_help_without_importing_torch():
    """``autoft --help`` or ``--version`` in a fifth of a second, not the two of importing torch
    (six on a busy machine, where they counted against a search's --timeout)."""
    code = (
        "import sys; from autoft.cli import make_app\n"
        "try:\n    make_app()(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'timm', 'optuna') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("name", ["train", "search", "pretrain", "export", "load_checkpoint"])
def test_the_api_functions_are_callable_however_submodules_were_imported(name):
    import autoft.deploy.exporting
    import autoft.searching  # binds its module to the package: it must not shadow autoft.search

    assert name in autoft.__all__
    assert callable(getattr(autoft, name))
    from autoft import search

    assert callable(search)


def test_train_pretrain_and_export_return_result_objects(class_folder, tmp_path):
    from autoft.deploy.exporting import ExportResult
    from autoft.training.pretraining import PretrainResult
    from autoft.training import TrainResult
    from autoft.model.checkpoints import LoadedModel

    pretrained = autoft.pretrain("test_resnet", class_folder, tmp_path / "pretrain", method="simclr", epochs=1, batch_size=8, image_size=16, device="cpu")
    assert isinstance(pretrained, PretrainResult)
    assert pretrained.final.path.is_file() and len(pretrained.history) == 1

    epochs_seen = []
    result = autoft.train(
        "test_resnet", class_folder, tmp_path / "run", epochs=2, image_size=16, batch_size=8, device="cpu",
        weights=str(pretrained.final.path), on_epoch=epochs_seen.append,
    )
    assert isinstance(result, TrainResult)
    assert [e["epoch"] for e in result.history] == [e["epoch"] for e in epochs_seen] == [1, 2]
    assert result.classes == ["blue", "green", "red"]
    assert 0.0 <= result.metrics["val_accuracy"] <= 1.0
    assert result.params["weights"] == str(pretrained.final.path)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["val_accuracy"] == result.metrics["val_accuracy"]

    loaded = autoft.load_checkpoint(result.out)
    assert isinstance(loaded, LoadedModel) and loaded.classes == result.classes

    exported = autoft.export(result.checkpoint, tmp_path / "onnx")
    assert isinstance(exported, ExportResult)
    assert exported.model.is_file() and exported.report["checks"]["fp32"]


def test_a_user_error_is_an_autoft_error_not_an_exit():
    with pytest.raises(autoft.AutoftError, match="unknown strategy"):
        autoft.train("test_resnet", "sample:digits", None, strategy="no-such-strategy")


def test_the_cli_passes_its_options_to_the_api(monkeypatch, tmp_path):
    """`autoft train` only parses options and prints; the work is autoft.training.train."""
    from autoft import training

    calls = []

    def recording_train(backbone, data, out, **options):
        calls.append((backbone, data, out, options))
        return training.TrainResult(out=out, checkpoint=out / "model.pt", metrics={"val_accuracy": 0.5, "best_epoch": 1}, params={}, classes=["a", "b"])

    monkeypatch.setattr(training, "train", recording_train)
    result = runner.invoke(
        make_app(),
        ["train", "--backbone", "torchvision:resnet18", "--data", "sample:digits", "--out", str(tmp_path), "--epochs", "3",
         "--strategy", "l2sp", "--param", "l2sp_alpha=0.1", "--freeze-depth", "2", "--image-size", "32"],
    )
    assert result.exit_code == 0, result.output
    [(backbone, data, out, options)] = calls
    assert (backbone, data, out) == ("torchvision:resnet18", "sample:digits", tmp_path)
    assert options["epochs"] == 3 and options["strategy"] == "l2sp" and options["freeze_depth"] == 2 and options["image_size"] == 32
    assert options["extra_params"] == {"l2sp_alpha": 0.1}
    assert "val accuracy 0.500" in result.output
