"""``best/``: the final model staged in a folder of its own (checkpoint, verified ONNX export,
metrics), then swapped in at once, so a crash never leaves a half-written ``best/``."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from autoft.core.events import Export
from autoft.core.io import file_lock, publish_dir, write_json
from autoft.core.text import duration
from autoft.deploy.exporting import ExportFailed
from autoft.model.checkpoints import CHECKPOINT_NAME, load_checkpoint
from autoft.model.metrics import metric_specs, test_metrics
from autoft.searching.finishing import FinalModel
from autoft.searching.planning import VERIFY_IMAGES
from autoft.searching.session import Session

BEST_FOLDER = "best"
PUBLISH_LOCK = ".publish.lock"  # in the search's folder: held while best/ is staged and swapped in


def publish_best(session: Session, final: FinalModel, metrics: dict[str, Any]) -> Path:
    """Write ``best/`` in a staging folder (model, ONNX export, metrics), then swap it in at once."""
    with file_lock(session.ctx.out / PUBLISH_LOCK):  # one publisher at a time: the staging folders left are no one's
        remove_stale_staging(session.ctx.out)
        return _publish(session, final, metrics)


def remove_stale_staging(out: Path) -> list[Path]:
    """Delete the staging folders a killed or failed publish left (``.best.*.partial``, and the
    ``.best.old-*`` a swap without ``renameat2`` leaves for a moment). Call it holding
    :data:`PUBLISH_LOCK`: no live process is writing one then."""
    stale = [p for pattern in (f".{BEST_FOLDER}.*.partial", f".{BEST_FOLDER}.old-*") for p in out.glob(pattern) if p.is_dir()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def _publish(session: Session, final: FinalModel, metrics: dict[str, Any]) -> Path:
    target = session.ctx.out / BEST_FOLDER
    staging = session.ctx.out / f".{BEST_FOLDER}.{uuid.uuid4().hex[:8]}.partial"
    staging.mkdir(parents=True)
    from autoft.model.checkpoints import save_ensemble

    save_ensemble(staging / CHECKPOINT_NAME, final.checkpoints, final.weights)
    loaded = load_checkpoint(staging / CHECKPOINT_NAME, registry=session.ctx.registry)
    if session.ctx.config.export_onnx:
        from autoft.deploy.exporting import export

        session.emit(Export(number=final.trials[0] if final.trials else None))
        with session.timed("export"):
            verify = session.ctx.pool.subset(session.ctx.splits[0][1][:VERIFY_IMAGES])
            started = time.monotonic()
            exported = export(loaded, staging, images=verify, name=session.study.study_name, registry=session.ctx.registry)
            took = time.monotonic() - started
        metrics["onnx_check"] = exported.report.get("checks", {})
        if final.is_ensemble:
            _time_ensemble(session, final, metrics, staging / "model.onnx", verify, took)
    else:
        write_json(staging / "labels.json", session.ctx.data.classes)
    if session.ctx.data.test is not None and len(session.ctx.data.test):
        metrics.update(test_metrics(loaded.network().to(session.ctx.device), session.ctx.data, session.ctx.device, 256, metric_specs(session.ctx.config.metric, session.ctx.registry)))
    write_json(staging / "metrics.json", metrics)
    publish_dir(staging, target)
    return target


def _time_ensemble(session: Session, final: FinalModel, metrics: dict[str, Any], model: Path, verify: Any, export_took: float) -> None:
    """``metrics["latency_ms"]``: the exported ensemble against its first member alone, or a note
    saying why it was not measured. Exporting one member again costs less than the ensemble's
    export took; past the budget the report goes without."""
    left = session.ctx.budget.left()
    if left is not None and left <= export_took:
        metrics.setdefault("notes", []).append(f"the ensemble's serving latency was not measured: timing it needs about {duration(export_took)}, {duration(max(left, 0.0))} left")
        return
    try:
        metrics["latency_ms"] = ensemble_latency(model, load_checkpoint(final.checkpoints[0], registry=session.ctx.registry), verify)
    except ExportFailed as failure:  # the ensemble passed its verification; its member alone, exported only to be timed, did not
        metrics.setdefault("notes", []).append(f"the ensemble's serving latency was not measured: its first member alone failed its export ({failure})")


def ensemble_latency(ensemble_model: Path, single: Any, images: Any, batch_size: int = 32) -> dict[str, Any]:
    """Milliseconds per batch of the exported ensemble against one of its members, measured
    with onnxruntime on the same images in the same run: what the ensemble costs to serve."""
    import tempfile

    from autoft.deploy.exporting import export_verified
    from autoft.deploy.inference import create_session

    pixels = images.take(range(min(batch_size, len(images)))).float().div(255).numpy()
    with tempfile.TemporaryDirectory(prefix="autoft-latency-") as work:
        member, _ = export_verified(single.network().cpu().eval(), images, int(single.meta["image_size"]), Path(work), None)
        timed = {"single": _milliseconds(create_session(member), pixels), "model": _milliseconds(create_session(ensemble_model), pixels)}
    return {**timed, "batch_size": len(pixels)}


def _milliseconds(session: Any, pixels: np.ndarray, repeats: int = 5) -> float:
    name = session.get_inputs()[0].name
    session.run(None, {name: pixels})  # the first run pays for allocation
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, {name: pixels})
        times.append(1000 * (time.perf_counter() - started))
    return round(sorted(times)[len(times) // 2], 3)
