"""No command runs code planted in a run folder: every pickle is read with weights_only=True."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from autoft.cli import make_app


class PlantedPickle:
    """Unpickling this calls exec(), which writes ``marker``: proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code from the file ran')",))


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "pwned"


@pytest.fixture
def planted_run(tmp_path, marker) -> Path:
    """A run folder whose model.pt looks like an autoft checkpoint but runs code when unpickled."""
    run = tmp_path / "copied-run"
    run.mkdir()
    payload = {"format": 1, "backbone": "test_resnet", "classes": ["a", "b"], "image_size": 32, "params": {}, "state_dict": PlantedPickle(marker)}
    torch.save(payload, run / "model.pt")
    return run


def test_the_planted_file_is_a_real_attack(planted_run, marker):
    torch.load(planted_run / "model.pt", weights_only=False)  # what autoft must never do
    assert marker.read_text() == "code from the file ran"


def _command(name: str, run: Path, tmp_path: Path, class_folder: Path) -> list[str]:
    image = next(class_folder.rglob("*.png"))
    return {
        "predict": ["predict", str(run), str(image)],
        "export": ["export", str(run)],
        "serve": ["serve", str(run), "--port", "0", "--device", "cpu"],
        "train --weights": [
            "train", "--backbone", "test_resnet", "--data", str(class_folder), "--out", str(tmp_path / "out"),
            "--weights", str(run / "model.pt"), "--epochs", "1", "--image-size", "16",
        ],
    }[name]


COMMANDS = ["predict", "export", "serve", "train --weights"]


@pytest.mark.parametrize("name", COMMANDS)
def test_a_planted_pickle_never_runs(name, planted_run, marker, tmp_path, class_folder):
    result = CliRunner().invoke(make_app(), _command(name, planted_run, tmp_path, class_folder))
    assert not marker.exists(), f"autoft {name} ran code from {planted_run / 'model.pt'}"
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("name", COMMANDS)
def test_a_planted_pickle_is_refused_in_one_line_naming_the_file(name, planted_run, marker, tmp_path, class_folder):
    result = CliRunner().invoke(make_app(), _command(name, planted_run, tmp_path, class_folder))
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert str(planted_run) in lines[0]
    assert "weights_only=False" not in lines[0]  # never advise the unsafe way round
