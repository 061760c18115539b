"""--weights auto: the source's pretrained weights when they are at hand, random ones said out loud."""

from __future__ import annotations

import pytest
import torch

from autoft.backbones import build_backbone
from autoft.weights import resolve_weights

REVISION = "0" * 40


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache folder of this test only: where timm looks for pretrained weights."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def _place(hub_cache, state: dict[str, torch.Tensor]) -> None:
    """test_resnet's pretrained file, laid out as the hub's downloader leaves it."""
    from safetensors.torch import save_file

    repo = hub_cache / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))


def test_auto_uses_pretrained_weights_found_where_the_source_looks(hub_cache):
    import timm

    torch.manual_seed(1)
    source = timm.create_model("test_resnet", num_classes=1000)  # the shape the pretrained file has
    _place(hub_cache, source.state_dict())
    weights, notice = resolve_weights("auto", "test_resnet")
    assert weights == "pretrained" and notice is None
    built = build_backbone("test_resnet", num_classes=3, weights=weights).model.state_dict()
    body = [k for k in source.state_dict() if not k.startswith("fc.")]
    assert body and all(torch.equal(built[k], source.state_dict()[k]) for k in body)  # the file's weights, a fresh head


def test_auto_falls_back_to_random_weights_with_one_line_naming_where_it_looked(hub_cache):
    weights, notice = resolve_weights("auto", "test_resnet")
    assert weights is None
    assert "random weights" in notice and "--weights PATH" in notice and str(hub_cache / "models--timm--test_resnet.r160_in1k") in notice
    assert "\n" not in notice


@pytest.mark.parametrize("given, expected", [("scratch", None), (None, None), ("pretrained", "pretrained"), ("w.pt", "w.pt")])
def test_explicit_weights_are_taken_as_given(given, expected):
    assert resolve_weights(given, "test_resnet") == (expected, None)


def test_a_search_says_it_starts_from_random_weights(hub_cache, tmp_path):
    from typer.testing import CliRunner

    from autoft.cli import make_app

    result = CliRunner().invoke(make_app(), ["search", "--backbone", "test_resnet", "--data", "sample:digits", "--timeout", "0.5s", "--out", str(tmp_path)])
    assert "training test_resnet from random weights" in result.output  # said before anything else happens
    assert result.exit_code == 2 and "cannot hold even the smallest plan" in result.output and "give it at least" in result.output
