import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from autoft import plugins
from autoft.errors import AutoftError
from autoft.core.events import EpochEnd
from autoft.training import resolve_params, train
from autoft.model.backbones import build_backbone
from autoft.model.checkpoints import load_checkpoint
from autoft.training.trainer import Trainer, TrainerConfig
from conftest import make_image

TINY = ["test_resnet", "test_vit", "test_efficientnet"]


@pytest.mark.parametrize("name", TINY)
def test_groups_run_from_stem_to_head_and_cover_every_parameter_once(name):
    backbone = build_backbone(name, num_classes=4)
    names = [n for n, _ in backbone.model.named_parameters()]
    grouped = [p for g in backbone.groups for p in g.params]
    assert sorted(grouped) == sorted(names) and len(grouped) == len(set(grouped))
    assert backbone.groups[0].name == "stem" and backbone.groups[-1].name == "head"
    head_params = dict(backbone.model.named_parameters())
    assert {head_params[p].shape[0] for p in backbone.head.params} == {4}  # the classifier's outputs


@pytest.mark.parametrize("name", TINY)
def test_freeze_depth_k_freezes_exactly_the_first_k_groups(name):
    backbone = build_backbone(name, num_classes=3)
    n = len(backbone.groups)
    strategy = plugins.registry().strategy("freeze").factory()
    for depth in (0, 1, n - 1):
        plan = strategy.apply(backbone, {"freeze_depth": depth})
        backbone.model.zero_grad(set_to_none=True)
        backbone.model.train()
        backbone.model(torch.rand(2, 3, 32, 32)).sum().backward()
        by_name = dict(backbone.model.named_parameters())
        for i, group in enumerate(backbone.groups):
            grads = [by_name[p].grad for p in group.params]
            if i < depth:
                assert all(g is None for g in grads), f"group {group.name} should be frozen at depth {depth}"
            else:
                assert any(g is not None and g.abs().sum() > 0 for g in grads), f"group {group.name} should train"
        trainable = {id(p) for g in plan.param_groups for p in g["params"]}
        assert trainable == {id(p) for p in backbone.model.parameters() if p.requires_grad}


def test_frozen_batchnorm_keeps_its_running_statistics(digits):
    backbone = build_backbone("test_resnet", num_classes=10)
    before = backbone.model.bn1.running_mean.clone()
    params = resolve_params("freeze", len(backbone.groups), {"freeze_depth": 1})
    Trainer(backbone, digits, params, TrainerConfig(epochs=1, batch_size=128), registry=plugins.registry()).fit()
    assert torch.equal(backbone.model.bn1.running_mean, before)  # stem frozen: stats untouched
    assert not torch.equal(backbone.model.layer4[0].bn1.running_mean, torch.zeros_like(before[:0]))


def test_linear_probe_trains_only_the_head():
    backbone = build_backbone("test_resnet", num_classes=3)
    plugins.registry().strategy("linear-probe").factory().apply(backbone, {})
    trainable = {n for n, p in backbone.model.named_parameters() if p.requires_grad}
    assert trainable == set(backbone.head.params)


def test_l2sp_penalty_is_zero_at_the_start_and_grows_with_distance():
    backbone = build_backbone("test_resnet", num_classes=3)
    strategy = plugins.registry().strategy("l2sp").factory()
    plan = strategy.apply(backbone, {"freeze_depth": 1, "l2sp_alpha": 0.5})
    assert plan.extra_loss is None  # API 2: a loss term, not TrainPlan.extra_loss
    penalty = lambda: strategy.loss_term(None, None, None, None)  # noqa: E731 - L2-SP reads only its own state
    assert penalty().item() == 0.0
    body = plan.param_groups[0]["params"]
    assert plan.param_groups[0]["weight_decay"] == 0.0  # pulled to the start, not to zero
    with torch.no_grad():
        body[0].add_(1.0)
    assert penalty().item() == pytest.approx(0.5 * 0.5 * body[0].numel())


def test_strategy_parameters_are_validated_against_their_ranges():
    with pytest.raises(AutoftError, match="invalid parameters"):
        resolve_params("freeze", 6, {"freeze_depth": 9})


def test_short_run_on_digits_reaches_the_accuracy_floor_and_repeats_exactly(digits, tmp_path):
    a = train("test_resnet", digits, tmp_path / "a", epochs=4, batch_size=64, seed=3)
    assert a.metrics["val_accuracy"] >= 0.80  # chance is 0.10
    b = train("test_resnet", digits, tmp_path / "b", epochs=4, batch_size=64, seed=3)
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]
    assert a.metrics["val_accuracy"] == b.metrics["val_accuracy"]


def test_checkpoint_rebuilds_the_same_classifier(digits, tmp_path):
    result = train("test_resnet", digits, tmp_path, epochs=1, batch_size=128)
    loaded = load_checkpoint(tmp_path)
    assert loaded.classes == digits.classes and loaded.meta["image_size"] == 32
    x = digits.val.images[:8].float() / 255
    expected = torch.nn.Sequential(*loaded.network()[:1], result.backbone.model.eval())(x)
    assert torch.allclose(loaded.network()(x), expected, atol=1e-5)


def test_weights_file_starts_the_backbone_and_skips_a_mismatched_head(tmp_path):
    from safetensors.torch import save_file

    source = build_backbone("test_resnet", num_classes=7)
    torch.save(source.model.state_dict(), tmp_path / "w.pt")
    save_file(source.model.state_dict(), str(tmp_path / "w.safetensors"))
    for file in ("w.pt", "w.safetensors"):
        target = build_backbone("test_resnet", num_classes=3, weights=str(tmp_path / file))
        stem = target.groups[0].params[0]
        assert torch.equal(target.model.get_parameter(stem), source.model.get_parameter(stem))
        assert target.model.fc.weight.shape[0] == 3


def test_weights_from_another_architecture_are_refused(tmp_path):
    torch.save(build_backbone("test_vit", num_classes=3).model.state_dict(), tmp_path / "vit.pt")
    with pytest.raises(AutoftError, match="no tensor"):
        build_backbone("test_resnet", num_classes=3, weights=str(tmp_path / "vit.pt"))


def test_nan_loss_is_an_error_not_a_silent_model(digits):
    backbone = build_backbone("test_resnet", num_classes=10)
    params = resolve_params("full", len(backbone.groups), {"lr": 1e12})
    with pytest.raises(FloatingPointError, match="loss is"):
        Trainer(backbone, digits, params, TrainerConfig(epochs=2, batch_size=256), registry=plugins.registry()).fit()


def test_an_interrupted_fit_resumes_from_its_state_file_exactly(digits, tmp_path):
    small = digits.__class__(**{**digits.__dict__, "train": digits.train.subset(range(256))})

    def run(state_file=None, stop_at=None):
        torch.manual_seed(0)
        backbone = build_backbone("test_resnet", num_classes=10)
        params = resolve_params("l2sp", len(backbone.groups), {"freeze_depth": 1})
        seen = []

        def on_event(event):
            if isinstance(event, EpochEnd):
                seen.append(event)
                if event.epoch == stop_at:
                    raise KeyboardInterrupt  # a crash right after the epoch's state was written

        try:
            result = Trainer(backbone, small, params, TrainerConfig(epochs=3, batch_size=64, state_file=state_file, state_interval=0), registry=plugins.registry(), on_event=on_event).fit()
        except KeyboardInterrupt:
            return None, seen, backbone
        return result, seen, backbone

    straight, _, straight_model = run()
    state = tmp_path / "state.pt"
    assert run(state, stop_at=2)[0] is None and state.is_file()
    resumed, seen, resumed_model = run(state)
    assert [e.resumed for e in seen] == [True, True, False]
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in straight.history]
    for a, b in zip(straight_model.model.state_dict().values(), resumed_model.model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_pretrained_tag_offline_is_a_clear_error_naming_weights_path(monkeypatch):
    import huggingface_hub.constants

    from autoft_plugins import timm_backbones

    monkeypatch.setattr(timm_backbones, "_hub_reachable", lambda *a, **k: False)
    # restored after the test: the plugin switches the hub to its local cache when offline
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", huggingface_hub.constants.HF_HUB_OFFLINE)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", "/nonexistent-autoft-test-cache")  # nothing cached
    with pytest.raises(AutoftError, match=r"--weights PATH"):
        build_backbone("test_resnet", num_classes=3, weights="pretrained")


# ---------------------------------------------------------------------------
# A dataset larger than the memory cap


TRAIN_PROBE = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    import torch
    from autoft.data import cache
    from autoft.data import Normalize
    from autoft.data.decoding import load_data
    from autoft.model.metrics import evaluate
    from autoft.testing import synthetic_splits
    from autoft.training import train

    def peak_bytes():
        # Linux's ru_maxrss starts at the parent's RSS when it forked (pytest's, often larger); VmHWM is this program's own.
        try:
            return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)

    folder, size, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    recipe = {"strategy": "linear-probe", "lr": 0.05, "extra_params": {"augment": "none"}}  # the cheapest step: the data path is measured
    # The same run twice on a batch in memory (and a full validation batch): every module loaded and the
    # peak of a step and of an evaluation at this size reached, from the level that training starts at.
    warm = synthetic_splits(2, 4 * batch, image_size=size)
    warm.train = warm.train.subset(range(batch))
    for _ in range(2):
        train("test_resnet", warm, None, epochs=1, batch_size=batch, device="cpu", **recipe)
    reads = []
    read = cache.ImageStore.read
    cache.ImageStore.read = lambda store, rows: reads.append(np.asarray(rows).size) or read(store, rows)

    baseline = peak_bytes()
    result = train("test_resnet", folder, None, epochs=1, batch_size=batch, image_size=size, device="cpu", **recipe)
    trained = peak_bytes()
    training_reads = list(reads)
    # For scale, what training did before: the training set read whole, and held while validating.
    data = load_data(folder, image_size=size)
    whole = data.train.images
    net = torch.nn.Sequential(Normalize(result.backbone.mean, result.backbone.std), result.backbone.model)
    evaluate(net, data.val, torch.device("cpu"), 2 * batch, [])
    print(json.dumps({
        "growth": trained - baseline, "whole_growth": peak_bytes() - baseline, "whole_bytes": whole.numel(), "on_disk": data.train.on_disk,
        "reads": training_reads, "num_train": result.metrics["num_train"], "num_val": result.metrics["num_val"],
        "val_accuracy": result.metrics["val_accuracy"],
    }))
    """
)


def test_training_a_set_over_the_memory_cap_reads_it_a_batch_at_a_time_with_bounded_rss(tmp_path):
    """1,000 images at 160px decode to 77 MB; under a 4 MB cap ``autoft train`` reads them from the cache a batch at a time."""
    folder = tmp_path / "over-cap"
    for i in range(1000):
        make_image(folder / f"class{i % 2}" / f"{i}.png", (200, 40, 40) if i % 2 else (40, 40, 200), seed=i, size=8)
    size, batch = 160, 16
    env = {
        **os.environ, "AUTOFT_MAX_IN_MEMORY": "4M", "AUTOFT_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "2",
        # glibc's moving mmap threshold keeps freed activations in the heap, so that a peak would depend on the
        # order of past allocations; a fixed one returns every large tensor to the system when it is freed.
        "MALLOC_MMAP_THRESHOLD_": "65536",
    }  # fmt: skip
    done = subprocess.run([sys.executable, "-c", TRAIN_PROBE, str(folder), str(size), str(batch)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    mib = 2**20
    print(f"peak RSS growth: {probe['growth'] / mib:.1f} MiB training, {probe['whole_growth'] / mib:.1f} MiB with the training set read whole "
          f"({probe['whole_bytes'] / mib:.1f} MiB); {len(probe['reads'])} reads of at most {max(probe['reads'])} images")
    assert probe["on_disk"] and probe["val_accuracy"] > 0.9  # it trained: red against blue
    # Every training and validation image came from the cache a batch at a time (validation batches are twice as big).
    assert sum(probe["reads"]) >= probe["num_train"] + probe["num_val"] and max(probe["reads"]) <= 2 * batch
    # The measure sees a set held whole; training stayed far below that.
    assert probe["whole_growth"] > 0.75 * probe["whole_bytes"]
    assert probe["growth"] < probe["whole_bytes"] / 3, f"peak RSS grew {probe['growth'] / mib:.1f} MiB training under a 4 MB cap"


# ---------------------------------------------------------------------------
# LP-FT's probe, fitted to convergence


def test_the_probe_head_gives_logistic_regressions_probabilities_on_the_pooled_features(digits, registry):
    """probe_head sets the head so the network's own output is scikit-learn's logistic regression
    on the features the head reads; the body is untouched."""
    import numpy as np
    import torch

    from autoft.model.backbones import build_backbone
    from autoft.training.baselines import fit_logistic
    from autoft.training.probe_head import pooled_features, probe_head

    torch.manual_seed(0)
    backbone = build_backbone("test_resnet", num_classes=10, registry=registry)
    train, labels = digits.train.subset(np.arange(200)), digits.train.labels.numpy()[:200]
    body = {k: v.clone() for k, v in backbone.model.state_dict().items() if not k.startswith("fc.")}
    assert probe_head(backbone, train, labels, 10, torch.device("cpu"))
    val = digits.val.subset(np.arange(60))
    features = pooled_features(backbone, train, torch.device("cpu")).astype(np.float64)
    offset, spread = features.mean(0), features.std(0).mean()
    probe = fit_logistic((features - offset) / spread, labels, standardise=False)
    expected = probe.predict_proba((pooled_features(backbone, val, torch.device("cpu")) - offset) / spread)
    backbone.model.eval()
    with torch.no_grad():
        from autoft.data import Normalize, to_float

        got = backbone.model(Normalize(backbone.mean, backbone.std)(to_float(val.images, torch.device("cpu")))).softmax(1).numpy()
    assert np.abs(got - expected).max() < 1e-3
    assert all(torch.equal(v, backbone.model.state_dict()[k]) for k, v in body.items())
    assert not probe_head(backbone, train, np.zeros(200, np.int64), 10, torch.device("cpu"))  # one class: nothing to fit


def test_a_fit_from_head_init_probe_starts_where_the_probe_is(digits, registry):
    """Before its first step a head_init=probe fit already classifies like the probe: its first
    evaluation, after a single step at a tiny learning rate, is far above a random head's (with
    BatchNorm's statistics kept, as from pretrained weights by default: a random network's
    initial statistics would move at the first step)."""
    import dataclasses

    from autoft.training.fitting import FitRequest, fit
    from autoft.training.trainer import TrainerConfig

    data = dataclasses.replace(digits, train=digits.train.subset(range(300)), val=digits.val.subset(range(100)))
    accuracy = {}
    for head in ("probe", "random"):
        request = FitRequest("test_resnet", data, {"lr": 1e-6, "strategy": "freeze", "freeze_depth": 0, "head_init": head, "bn": "keep"}, TrainerConfig(steps=1, batch_size=16, eval_every=1, seed=0, device="cpu"), registry)
        accuracy[head] = fit(request).result.history[0]["val_accuracy"]
    assert accuracy["probe"] > accuracy["random"] + 0.2, accuracy
