"""One fine-tuning run: build a backbone, apply a strategy, train, evaluate, save.

``autoft train`` is one call of :func:`train`; ``autoft search`` calls :func:`fit` once
per trial on data decoded once for the whole search.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from autoft import plugins
from autoft.data import DataSplits, ImageTensors, Normalize, load_data, to_float, train_augmentation
from autoft.errors import AutoftError
from autoft.io import atomic_path, write_json
from autoft.specs import Backbone

CHECKPOINT_NAME = "model.pt"
CHECKPOINT_FORMAT = 1
METRICS = ("accuracy", "f1_macro")

# A known-good recipe: the first trial of every search, and `autoft train`'s defaults.
DEFAULT_PARAMS: dict[str, Any] = {"lr": 1e-3, "dropout": 0.1, "weight_decay": 0.01, "strategy": "freeze"}


# ---------------------------------------------------------------------------
# Devices and seeds


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AutoftError("--device cuda was asked for, but no CUDA GPU is usable here; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise AutoftError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------
# Backbones and weights


def build_backbone(name: str, *, num_classes: int, dropout: float = 0.0, weights: str | None = None, registry=None) -> Backbone:
    """Build backbone ``name`` through its plugin; ``weights`` is none, a file, or a source tag."""
    registry = registry or plugins.registry()
    spec, model_name = registry.backbone(name)
    weights = None if weights in (None, "", "none", "scratch") else str(weights)
    weights_file = Path(weights).expanduser() if weights and _looks_like_path(weights) else None
    if weights_file is not None and not weights_file.is_file():
        raise AutoftError(f"weights file not found: {weights}")
    backbone = spec.factory(model_name, num_classes=num_classes, dropout=dropout, weights=None if weights_file else weights)
    check_groups(backbone, name)
    if weights_file is not None:
        load_weights(backbone.model, weights_file)
    return backbone


def _looks_like_path(weights: str) -> bool:
    return Path(weights).expanduser().exists() or any(s in weights for s in ("/", "\\")) or weights.endswith(
        (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
    )


def check_groups(backbone: Backbone, name: str) -> None:
    """The contract: groups cover every parameter exactly once."""
    named = [n for n, _ in backbone.model.named_parameters()]
    grouped = [p for g in backbone.groups for p in g.params]
    if sorted(grouped) != sorted(named):
        missing = set(named) - set(grouped)
        extra = [p for p in grouped if grouped.count(p) > 1 or p not in named]
        raise AutoftError(
            f"backbone {name!r}: its parameter groups must cover every parameter once "
            f"(missing {sorted(missing)[:3]}, duplicated or unknown {sorted(set(extra))[:3]})"
        )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AutoftError(f"cannot read weights from {path}: {type(exc).__name__}: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # an autoft checkpoint, or a Lightning one
    if not isinstance(state, dict):
        raise AutoftError(f"{path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_weights(model: torch.nn.Module, path: Path) -> list[str]:
    """Load matching tensors from ``path``; return the model keys left at their initial values.

    Tensors whose shape differs (a classifier for other classes) are skipped, so weights
    from pretraining or another task start the backbone while the head stays fresh.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise AutoftError(f"no tensor in {path} matches this backbone; was it saved from another architecture?")
    model.load_state_dict(usable, strict=False)
    return sorted(set(own) - set(usable))


# ---------------------------------------------------------------------------
# Parameters


def resolve_params(strategy_name: str, n_groups: int, given: dict[str, Any], registry=None) -> dict[str, Any]:
    """Complete ``given`` with the defaults, and check it through the strategy's own ``suggest``."""
    import optuna

    registry = registry or plugins.registry()
    strategy = registry.strategy(strategy_name).factory()
    params = {**DEFAULT_PARAMS, **strategy.default_params(n_groups), **{k: v for k, v in given.items() if v is not None}}
    params["strategy"] = strategy_name
    fixed = optuna.trial.FixedTrial(params)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # out-of-range values get our clearer error below
            strategy.suggest(fixed, n_groups)
    except ValueError as exc:  # a parameter the strategy needs is missing
        raise AutoftError(f"invalid parameters for strategy {strategy_name!r}: {exc}") from None
    for name, distribution in fixed.distributions.items():
        if not _within(distribution, params[name]):
            raise AutoftError(f"invalid parameters for strategy {strategy_name!r}: {name}={params[name]!r} is outside {_describe(distribution)}")
    return params


def _within(distribution, value) -> bool:
    if hasattr(distribution, "choices"):
        return value in distribution.choices
    return distribution.low <= value <= distribution.high


def _describe(distribution) -> str:
    if hasattr(distribution, "choices"):
        return "{" + ", ".join(map(str, distribution.choices)) + "}"
    return f"[{distribution.low}, {distribution.high}]"


# ---------------------------------------------------------------------------
# Training


@dataclass
class FitResult:
    history: list[dict[str, float]]
    best_epoch: int
    val: dict[str, Any]  # loss, accuracy, f1_macro and predictions of the kept weights


def freeze_batchnorm(model: torch.nn.Module) -> None:
    """Keep running statistics of BatchNorm layers whose parameters are all frozen."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            own = list(module.parameters(recurse=False))
            if own and not any(p.requires_grad for p in own):
                module.eval()


def cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.inference_mode()
def evaluate(net: torch.nn.Module, data: ImageTensors, device: torch.device, batch_size: int = 256) -> dict[str, Any]:
    """Loss, accuracy and macro F1 of ``net`` (normalisation included) on ``data``."""
    from sklearn.metrics import f1_score

    net.eval()
    logits = []
    for start in range(0, len(data), batch_size):
        x = to_float(data.images[start : start + batch_size], device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits.append(net(_layout(x, device)).float().cpu())
    out = torch.cat(logits)
    predictions = out.argmax(1)
    labels = data.labels
    return {
        "loss": F.cross_entropy(out, labels).item(),
        "accuracy": (predictions == labels).float().mean().item(),
        "f1_macro": float(f1_score(labels.numpy(), predictions.numpy(), average="macro", zero_division=0)),
        "predictions": predictions,
        "probabilities": out.softmax(1),
    }


def _layout(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def fit(
    backbone: Backbone,
    data: DataSplits,
    params: dict[str, Any],
    *,
    epochs: int,
    batch_size: int = 64,
    device: torch.device | str = "auto",
    seed: int = 0,
    metric: str = "accuracy",
    registry=None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    state_file: Path | None = None,
) -> FitResult:
    """Fine-tune ``backbone`` in place with ``params``; keep the weights of the best epoch.

    ``on_epoch`` sees each epoch's record and may raise (``optuna.TrialPruned``) to stop.
    With ``state_file``, the whole training state is written there (atomically) after
    every epoch, and a run that finds one resumes after its last epoch: the epochs it
    restores are passed to ``on_epoch`` again, marked ``"resumed": True``.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    registry = registry or plugins.registry()
    seed_everything(seed)
    strategy = registry.strategy(params["strategy"]).factory()
    model = backbone.model
    plan = strategy.apply(backbone, params)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    net = torch.nn.Sequential(Normalize(backbone.mean, backbone.std), model).to(device)

    groups = [
        {
            "params": [p for p in g["params"] if p.requires_grad],
            "lr": params["lr"] * g.get("lr_scale", 1.0),
            "weight_decay": g.get("weight_decay", params["weight_decay"]),
        }
        for g in plan.param_groups
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise AutoftError("the strategy left no parameter to train")
    optimizer = torch.optim.AdamW(groups, fused=device.type == "cuda")
    steps_per_epoch = math.ceil(len(data.train) / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(epochs * steps_per_epoch, min(steps_per_epoch, epochs * steps_per_epoch // 10 + 1))
    )
    augment = train_augmentation(data.image_size, data.hflip).to(device)
    generator = torch.Generator().manual_seed(seed)
    # On a GPU the whole uint8 training set usually fits; moving it once beats a copy per batch.
    train_images, train_labels = data.train.images, data.train.labels
    if device.type == "cuda":
        try:
            train_images, train_labels = train_images.to(device), train_labels.to(device)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()  # too big for this GPU: copy it batch by batch instead

    history: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, torch.Tensor], dict[str, Any]] | None = None
    first_epoch = 1
    if state_file is not None and Path(state_file).is_file():
        state = torch.load(state_file, map_location="cpu", weights_only=False)  # our own file: RNG states, optimiser
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        history, best = state["history"], state["best"]
        first_epoch = history[-1]["epoch"] + 1
        for record in history:
            if on_epoch:
                on_epoch({**record, "resumed": True})
    for epoch in range(first_epoch, epochs + 1):
        started = time.perf_counter()
        net.train()
        freeze_batchnorm(model)
        order = torch.randperm(len(data.train), generator=generator)
        # Summed on the device: reading the loss every step would stall a GPU on each batch.
        total_loss, seen = torch.zeros((), device=device), 0
        for step, start in enumerate(range(0, len(order), batch_size)):
            index = order[start : start + batch_size]
            if len(index) < 2 and len(order) > 1:
                continue  # BatchNorm cannot train on a batch of one
            if train_images.device != index.device:
                index = index.to(train_images.device)
            x = _layout(augment(to_float(train_images[index], device)), device)
            y = train_labels[index].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = F.cross_entropy(net(x).float(), y, label_smoothing=0.1)
            if plan.extra_loss is not None:
                loss = loss + plan.extra_loss()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.detach() * len(index)
            seen += len(index)
            if on_batch:
                on_batch(step + 1, steps_per_epoch)
        train_loss = total_loss.item() / max(seen, 1)
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"loss is {train_loss} in epoch {epoch}; the learning rate may be too high")
        val = evaluate(net, data.val, device, batch_size * 2)
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "val_f1_macro": val["f1_macro"],
            "seconds": time.perf_counter() - started,
        }
        history.append(record)
        if best is None or val[metric] > best[0]:
            best = (val[metric], epoch, {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}, val)
        if state_file is not None:
            _save_fit_state(state_file, model, optimizer, scheduler, generator, history, best, device)
        if on_epoch:
            on_epoch(record)
    assert best is not None, "epochs must be at least 1"
    model.load_state_dict(best[2])
    return FitResult(history=history, best_epoch=best[1], val=best[3])


def _save_fit_state(path, model, optimizer, scheduler, generator, history, best, device) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
        "history": history,
        "best": best,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


# ---------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(
    path: Path,
    *,
    backbone_name: str,
    backbone: Backbone,
    classes: list[str],
    image_size: int,
    params: dict[str, Any],
    data: str | None = None,
    seed: int = 0,
) -> Path:
    """Weights plus what rebuilding and preprocessing need, written atomically.

    ``data`` and ``seed`` record where the images came from, so that export can verify
    and calibrate on the same validation split later.
    """
    from autoft import __version__

    payload = {
        "format": CHECKPOINT_FORMAT,
        "autoft_version": __version__,
        "backbone": backbone_name,
        "classes": list(classes),
        "image_size": int(image_size),
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "params": dict(params),
        "data": data,
        "seed": seed,
        "state_dict": {k: v.detach().cpu() for k, v in backbone.model.state_dict().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


@dataclass
class LoadedModel:
    backbone: Backbone
    meta: dict[str, Any]  # the checkpoint without its state dict

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    def network(self) -> torch.nn.Module:
        """The classifier with normalisation inside: float NCHW pixels in [0, 1] -> logits."""
        return torch.nn.Sequential(Normalize(self.meta["mean"], self.meta["std"]), self.backbone.model).eval()


def find_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint file, a train output folder, or a search folder (its ``best/``)."""
    path = Path(path).expanduser()
    for candidate in (path, path / CHECKPOINT_NAME, path / "best" / CHECKPOINT_NAME):
        if candidate.is_file():
            return candidate
    raise AutoftError(f"no autoft checkpoint at {path} (looked for {CHECKPOINT_NAME} and best/{CHECKPOINT_NAME})")


def load_checkpoint(path: str | Path, registry=None) -> LoadedModel:
    file = find_checkpoint(path)
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AutoftError(f"cannot read checkpoint {file}: {type(exc).__name__}: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise AutoftError(f"{file} is not an autoft checkpoint")
    state = payload.pop("state_dict")
    backbone = build_backbone(
        payload["backbone"], num_classes=len(payload["classes"]), dropout=payload["params"].get("dropout", 0.0), registry=registry
    )
    backbone.model.load_state_dict(state)
    backbone.model.eval()
    return LoadedModel(backbone, payload)


# ---------------------------------------------------------------------------
# The Python API behind `autoft train`


@dataclass
class TrainResult:
    out: Path | None
    checkpoint: Path | None
    metrics: dict[str, Any]
    params: dict[str, Any]
    classes: list[str]
    history: list[dict[str, float]] = field(default_factory=list)
    backbone: Backbone | None = None


def test_metrics(net: torch.nn.Module, data: DataSplits, device: torch.device, batch_size: int) -> dict[str, float]:
    if data.test is None or len(data.test) == 0:
        return {}
    result = evaluate(net, data.test, device, batch_size)
    return {"test_loss": result["loss"], "test_accuracy": result["accuracy"], "test_f1_macro": result["f1_macro"]}


def train(
    backbone: str,
    data: str | Path | DataSplits,
    out: str | Path | None = None,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float | None = None,
    freeze_depth: int | None = None,
    dropout: float | None = None,
    weight_decay: float | None = None,
    strategy: str = "freeze",
    weights: str | None = None,
    image_size: int | None = None,
    device: str = "auto",
    seed: int = 0,
    metric: str = "accuracy",
    extra_params: dict[str, Any] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """One fine-tuning run. Writes ``model.pt``, ``metrics.json`` and ``labels.json`` to ``out``."""
    if isinstance(data, Path):
        data = str(data)  # a dataset source, as the CLI passes it
    if epochs < 1:
        raise AutoftError("--epochs must be at least 1")
    if metric not in METRICS:
        raise AutoftError(f"unknown metric {metric!r}; use {' or '.join(METRICS)}")
    registry = plugins.registry()
    spec, model_name = registry.backbone(backbone)  # fail on a bad name before decoding any image
    registry.strategy(strategy)
    torch_device = resolve_device(device)
    data_source = data if isinstance(data, str) else None
    if isinstance(data, str):
        probe = spec.factory(model_name, num_classes=2, dropout=0.0, weights=None)
        data = load_data(data, image_size=image_size, default_size=probe.input_size, seed=seed, registry=registry)
    seed_everything(seed)  # weight initialisation draws from the global generator too
    given = {"lr": lr, "dropout": dropout, "weight_decay": weight_decay, "freeze_depth": freeze_depth, **(extra_params or {})}
    model = build_backbone(backbone, num_classes=data.num_classes, dropout=dropout if dropout is not None else DEFAULT_PARAMS["dropout"], weights=weights, registry=registry)
    params = resolve_params(strategy, len(model.groups), given, registry)
    if weights:
        params["weights"] = weights
    result = fit(model, data, params, epochs=epochs, batch_size=batch_size, device=torch_device, seed=seed, metric=metric, registry=registry, on_epoch=on_epoch, on_batch=on_batch)
    net = torch.nn.Sequential(Normalize(model.mean, model.std), model.model).to(torch_device)
    metrics: dict[str, Any] = {
        "backbone": backbone,
        "metric": metric,
        "best_epoch": result.best_epoch,
        "val_loss": result.val["loss"],
        "val_accuracy": result.val["accuracy"],
        "val_f1_macro": result.val["f1_macro"],
        **test_metrics(net, data, torch_device, batch_size * 2),
        "num_train": len(data.train),
        "num_val": len(data.val),
        "num_test": len(data.test) if data.test is not None else 0,
        "skipped_images": len(data.skipped),
        "params": params,
        "epochs": result.history,
    }
    checkpoint = None
    if out is not None:
        out = Path(out)
        checkpoint = save_checkpoint(out / CHECKPOINT_NAME, backbone_name=backbone, backbone=model, classes=data.classes, image_size=data.image_size, params=params, data=data_source, seed=seed)
        write_json(out / "metrics.json", metrics)
        write_json(out / "labels.json", data.classes)
    return TrainResult(out=out, checkpoint=checkpoint, metrics=metrics, params=params, classes=data.classes, history=result.history, backbone=model)
