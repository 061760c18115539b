"""Shared fixtures: small generated image folders, digits decoded once per session, a trained
and exported run, live HTTP servers, and a real PostgreSQL server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}


def make_image(path: Path, colour: tuple[int, int, int], seed: int, size: int = 24) -> Path:
    """A noisy square of one dominant colour: easy to tell apart, cheap to decode."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """autoft's cache (decoded images, pretraining) in a folder of this test session, never the user's."""
    with pytest.MonkeyPatch.context() as patch:
        root = tmp_path_factory.mktemp("autoft-cache")
        patch.setenv("AUTOFT_CACHE_DIR", str(root))
        yield root


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    """DIR/<class>/*.png with three colour classes, 8 images each."""
    root = tmp_path / "colours"
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(8):
            make_image(root / name / f"{i}.png", colour, seed=100 * c + i)
    return root


@pytest.fixture
def split_folder(tmp_path: Path) -> Path:
    """DIR/{train,val,test}/<class>/*.png."""
    root = tmp_path / "split"
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        for c, (name, colour) in enumerate(COLOURS.items()):
            for i in range(n):
                make_image(root / split / name / f"{i}.png", colour, seed=hash((split, c, i)) % 10_000)
    return root


@pytest.fixture(scope="session")
def digits():
    """scikit-learn digits, decoded once at 32px and split (seed 0)."""
    from autoft.data.decoding import load_data

    return load_data("sample:digits", image_size=32, seed=0)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """A test_resnet trained briefly on digits at 32px: a run folder ``digits`` with model.pt (export, predict, serve)."""
    from autoft.training import train

    out = tmp_path_factory.mktemp("runs") / "digits"  # a train run: exports serve it as "digits"
    train("test_resnet", "sample:digits", out, epochs=2, batch_size=64, lr=3e-3, freeze_depth=0, image_size=32, device="cpu")
    return out


@pytest.fixture(scope="session")
def digits_onnx(digits_run: Path, tmp_path_factory) -> Path:
    """``digits_run`` exported to fp32 ONNX with a Triton repository: the export folder."""
    from autoft.deploy.exporting import export

    out = tmp_path_factory.mktemp("digits_onnx")
    export(digits_run, out, triton=True)
    return out


@pytest.fixture(scope="session")
def nan_onnx(digits_onnx: Path, tmp_path_factory) -> Path:
    """``digits_onnx`` with its classifier's weights set to NaN: it loads and runs, and answers NaN."""
    import shutil

    import numpy as np
    import onnx
    from onnx import numpy_helper

    out = tmp_path_factory.mktemp("nan_onnx") / "export"
    shutil.copytree(digits_onnx, out)
    model = onnx.load(str(out / "model.onnx"))
    for weight in model.graph.initializer:
        if len(weight.dims) == 2:  # the linear head: NaN reaches every logit with no activation to hide it
            weight.CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(weight), np.nan), weight.name))
    onnx.save(model, str(out / "model.onnx"))
    return out


@pytest.fixture(scope="module")
def live_app():
    """Start an ASGI app on uvicorn at 127.0.0.1 (a real socket, as clients reach it), in a
    thread: ``address = live_app(app, **uvicorn_options)``. The servers stop when the test module ends."""
    import socket
    import threading
    import time

    import uvicorn

    started = []

    def start(app, **options) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **options))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        started.append((server, thread))
        for _ in range(400):
            if server.started:
                return f"127.0.0.1:{port}"
            time.sleep(0.05)
        raise RuntimeError("the server did not start")

    yield start
    for server, thread in started:
        server.should_exit = True
        thread.join(10)


# ---------------------------------------------------------------------------
# PostgreSQL: a real server for the storage tests, started once per session


def _postgres_bin() -> Path | None:
    """Debian's server binaries (/usr/lib/postgresql/<version>/bin), newest first, or PATH's."""
    import shutil

    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if found:
        return found[-1].parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).resolve().parent if on_path else None


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server of its own on 127.0.0.1 (initdb in a temporary folder, trust auth);
    yields its base URL ``postgresql://postgres@127.0.0.1:PORT``. Under root, which initdb
    refuses, the server runs as the ``postgres`` user (``nobody`` where there is none)."""
    import os
    import pwd
    import shutil
    import socket
    import subprocess
    import tempfile

    bin_dir = _postgres_bin()
    if bin_dir is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed; .ci/run installs Debian's postgresql package")
        pytest.skip("PostgreSQL is not installed (apt-get install -y postgresql); CI always runs these tests")
    root = Path(tempfile.mkdtemp(prefix="autoft-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        user = next((u for u in ("postgres", "nobody") if _user_exists(u)), None)
        assert user is not None, "no unprivileged user to run PostgreSQL as"
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
        run_as = ["runuser", "-u", user, "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"

    def pg(tool: str, *args: str) -> None:
        subprocess.run([*run_as, str(bin_dir / tool), *args], check=True, capture_output=True, text=True, cwd=root)

    try:
        pg("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        pg("pg_ctl", "-D", str(data), "-o", options, "-l", str(root / "server.log"), "-w", "-t", "60", "start")
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"PostgreSQL did not start: {exc.stderr or exc.stdout}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True, cwd=root)
        shutil.rmtree(root, ignore_errors=True)


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """A new, empty database on the session's PostgreSQL server: ``postgresql://.../<db>``,
    as ``--storage`` takes it. Dropped after the test."""
    import uuid

    import psycopg

    name = f"autoft_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{postgres_server}/postgres", autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    yield f"{postgres_server}/{name}"
    with psycopg.connect(f"{postgres_server}/postgres", autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def whole_reads(monkeypatch) -> list[str]:
    """Every time a set on disk is read whole (``ImageTensors.images``), as its repr."""
    from autoft.data import ImageTensors

    reads: list[str] = []
    read_whole = ImageTensors.images.fget

    def recorded(self):
        if self.on_disk:
            reads.append(repr(self))
        return read_whole(self)

    monkeypatch.setattr(ImageTensors, "images", property(recorded))
    return reads


@pytest.fixture(scope="session")
def registry():
    """The installed plugins, built once: what autoft's commands pass down to every layer."""
    from autoft import plugins

    return plugins.registry()


NOISY_COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 50)}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """DIR/<class>/*.png: four noisy colours, 24 images each, 16 px; a tiny model learns them in a few epochs."""
    import numpy as np

    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for name, colour in NOISY_COLOURS.items():
        (root / name).mkdir()
        for i in range(24):
            pixels = np.clip(np.array(colour) + rng.normal(0, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root
