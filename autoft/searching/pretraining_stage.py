"""The pretraining stage of a search: self-supervised training on the unlabelled images, once.

It runs on the unlabelled images plus the labelled pool (labels never enter the loss),
for the epochs the plan gave it, cached across reruns (see :mod:`autoft.pretraining`).
Its checkpoints, the longest-trained first, then the search's starting weights, become
the choices of the searched ``init`` parameter, so the search decides whether and how
much pretraining helps.
"""

from __future__ import annotations

from autoft.data import ImageTensors
from autoft.events import PretrainEnd, PretrainStart
from autoft.io import write_json
from autoft.searching.session import Session


def run_pretraining(session: Session) -> None:
    plan, config = session.plan, session.config
    if not plan.pretrain_epochs or session.unlabelled is None:
        return
    from autoft.pretraining import pretrain

    images = ImageTensors.concat([ImageTensors(session.unlabelled), session.pool])  # the labelled pool stays on disk if it is
    session.emit(PretrainStart(method=config.pretrain, images=len(images)))
    result = pretrain(
        config.backbone, images, None, method=config.pretrain, epochs=plan.pretrain_epochs, batch_size=min(128, max(2, len(images) // 4)),
        weights=session.weights, labelled=session.data, device=str(session.device), seed=config.seed,
        time_budget=None if session.deadline is None else plan.pretrain_seconds * 1.1, deadline=session.deadline,
    )  # fmt: skip
    if not result.checkpoints:
        return
    session.space.choices["init"] = [str(c.path) for c in reversed(result.checkpoints)] + [session.weights or "scratch"]
    session.embedders["pretrained"] = _embed(session, str(result.checkpoints[-1].path))
    session.embedder_weights["pretrained"] = str(result.checkpoints[-1].path)
    session.emit(PretrainEnd(cached=result.cached, out=str(result.out), checkpoints=[(c.epoch, c.knn_accuracy) for c in result.checkpoints]))
    skipped = {"skipped_images": len(session.unlabelled_skipped), "skipped": [{"source": s, "reason": r} for s, r in session.unlabelled_skipped[:100]]}
    write_json(session.out / "pretrain.json", {**result.metrics, **skipped, "cache": str(result.out), "cached": result.cached})


def _embed(session: Session, weights: str):
    from autoft.backbones import build_backbone
    from autoft.pretraining import embed_all

    backbone = build_backbone(session.config.backbone, num_classes=session.data.num_classes, weights=weights, registry=session.registry)
    backbone.model.to(session.device)
    return lambda images: embed_all(backbone, images, session.device).numpy()
