"""The decoded-image cache: reuse, keys, verification, sets larger than memory, `autoft cache`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from autoft.data import cache
from autoft import data as data_module
from autoft.data import decoding
from autoft.cli import make_app
from autoft.data import ImageTensors
from autoft.data.decoding import decode_and_split, load_data
from autoft.specs import LabelledImages
from conftest import make_image


@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> Path:
    """An empty cache for one test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("AUTOFT_CACHE_DIR", str(root))
    return root


@pytest.fixture
def count_decodes(monkeypatch):
    """How many images were decoded since the fixture started."""
    calls = []
    real = decoding.decode_image

    def counting(source, size):
        calls.append(source)
        return real(source, size)

    monkeypatch.setattr(decoding, "decode_image", counting)
    return calls


def entries(root: Path) -> list[Path]:
    return sorted(p for p in (root / cache.IMAGES).iterdir() if not p.name.startswith("."))


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOFT_CACHE_DIR", str(tmp_path / "x"))
    assert cache.cache_root() == tmp_path / "x"
    monkeypatch.delenv("AUTOFT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root() == tmp_path / "xdg" / "autoft"


def test_a_second_load_reads_the_cache_and_decodes_nothing(class_folder, own_cache, count_decodes):
    first = load_data(str(class_folder), image_size=16, seed=0)
    assert len(count_decodes) == 24
    second = load_data(str(class_folder), image_size=16, seed=0)
    assert len(count_decodes) == 24, "the second load decoded again"
    assert torch.equal(first.train.images, second.train.images) and torch.equal(first.val.labels, second.val.labels)
    assert len(entries(own_cache)) == 1
    from autoft_plugins.datasets import load_class_folder

    uncached = decode_and_split(load_class_folder(str(class_folder)), image_size=16, seed=0, use_cache=False)
    assert torch.equal(uncached.train.images, second.train.images)


def test_the_key_follows_the_files_the_size_and_the_pixels(class_folder, own_cache, count_decodes):
    load_data(str(class_folder), image_size=16)
    load_data(str(class_folder), image_size=12)  # another size: another entry
    assert len(entries(own_cache)) == 2 and len(count_decodes) == 48
    changed = class_folder / "red" / "0.png"
    make_image(changed, (0, 0, 0), seed=7)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    reloaded = load_data(str(class_folder), image_size=16)
    assert len(count_decodes) == 72 and len(entries(own_cache)) == 3
    red = reloaded.train.images[reloaded.train.labels == 2].float().mean()
    assert red < 200  # the black image is in, not the cached red one

    arrays = [np.full((4, 4), 10 * i, np.uint8) for i in range(4)]
    key = cache.images_key(arrays, 8)
    arrays[3] = arrays[3].copy()
    assert cache.images_key(arrays, 8) == key  # same pixels, another object: same key
    arrays[3][0, 0] += 1
    assert cache.images_key(arrays, 8) != key



# A file name is bytes on Linux: anything but "/" and NUL, UTF-8 or not.
file_names = st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"/", b"_").replace(b"\0", b"_")).filter(lambda b: b not in (b".", b".."))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(file_names, min_size=1, max_size=4, unique=True))
def test_the_key_of_files_with_any_names_is_stable_and_tells_them_apart(tmp_path, names):
    folder = os.fsencode(tmp_path) + b"/" + os.urandom(6).hex().encode()
    os.mkdir(folder)
    paths = []
    for name in names:
        with open(folder + b"/" + name, "wb") as f:
            f.write(b"pixels")
        paths.append(os.fsdecode(folder + b"/" + name))  # how os.listdir hands them to the dataset plugin
    key = cache.images_key(paths, 16)
    assert key == cache.images_key([Path(p) for p in paths], 16) and len(key) == 40
    if len(paths) > 1:
        assert cache.images_key(paths[::-1], 16) != key  # the order, and so each name, counts
    assert cache.images_key(paths[:1] + [paths[0] + "x"], 16) != cache.images_key(paths[:1] * 2, 16)


def _corrupt_block(folder: Path) -> None:
    with open(folder / cache.IMAGES_FILE, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize(
    "damage",
    [
        _corrupt_block,
        lambda folder: os.truncate(folder / cache.IMAGES_FILE, 1000),
        lambda folder: (folder / cache.META_FILE).write_text("{not json"),
        lambda folder: (folder / cache.META_FILE).unlink(),
    ],
    ids=["flipped-byte", "truncated", "bad-meta", "no-meta"],
)
def test_a_damaged_cache_is_rebuilt_never_read(class_folder, own_cache, count_decodes, damage):
    original = load_data(str(class_folder), image_size=16)
    (entry,) = entries(own_cache)
    damage(entry)
    with pytest.warns(UserWarning, match="unusable"):
        again = load_data(str(class_folder), image_size=16)
    assert len(count_decodes) == 48
    assert torch.equal(again.train.images, original.train.images)
    assert not (cache._verify(entry))  # the rebuilt entry verifies


def test_sampled_verification_still_checks_the_first_and_last_blocks(monkeypatch):
    monkeypatch.setattr(cache, "FULL_VERIFY_BYTES", 10)
    blocks = cache._blocks_to_verify(1000, size=10**9)
    assert blocks[0] == 0 and blocks[-1] == 999 and len(blocks) <= cache.SAMPLED_BLOCKS + 2


def test_entries_left_by_killed_processes_are_removed_and_live_ones_kept(class_folder, own_cache):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    key = cache.images_key(data_module.find_images(class_folder)[0], 16)
    root = own_cache / cache.IMAGES
    abandoned = root / f".{key}.{dead}.abcd1234.partial"
    running = root / f".{key}.{os.getpid()}.abcd1234.partial"
    for folder in (abandoned, running):
        folder.mkdir(parents=True)
        (folder / cache.IMAGES_FILE).write_bytes(b"x" * 10)
    load_data(str(class_folder), image_size=16)
    assert not abandoned.exists() and running.exists()


def test_two_writers_of_one_key_keep_the_first_entry(own_cache):
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    for value in (1, 2):
        with cache.new_images("samekey", 4, samples=[]) as (writer, _):
            for image in images + value:
                writer.append(image)
    store = cache.open_images("samekey")
    assert store.rows == 2 and int(store.read_all().max()) == 1
    assert [p.name for p in (own_cache / cache.IMAGES).iterdir()] == ["samekey"]  # no partial left behind


def test_an_unwritable_cache_decodes_in_memory_with_a_warning(class_folder, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("AUTOFT_CACHE_DIR", str(blocker))
    with pytest.warns(UserWarning, match="without the cache"):
        data = load_data(str(class_folder), image_size=8)
    assert len(data.train) + len(data.val) == 24 and not data.train.on_disk


def test_progress_is_reported_while_decoding_and_silent_from_the_cache(class_folder, own_cache):
    seen = []
    with decoding.reporting_progress(lambda done, total: seen.append((done, total))):
        load_data(str(class_folder), image_size=16)
        assert seen[-1] == (24, 24) and [d for d, _ in seen] == sorted(d for d, _ in seen)
        seen.clear()
        load_data(str(class_folder), image_size=16)
    assert seen == []


def test_a_set_over_the_memory_limit_stays_on_disk_and_iterates_like_memory(class_folder, own_cache, monkeypatch):
    in_memory = load_data(str(class_folder), image_size=16, seed=3)
    monkeypatch.setenv("AUTOFT_MAX_IN_MEMORY", "1k")
    on_disk = load_data(str(class_folder), image_size=16, seed=3)
    assert on_disk.train.on_disk and not in_memory.train.on_disk
    order = torch.randperm(len(on_disk.train), generator=torch.Generator().manual_seed(0))
    got = list(on_disk.train.iter_batches(order, batch_size=5))
    expected = list(in_memory.train.iter_batches(order, batch_size=5))
    assert [len(y) for _, y in got] == [5, 5, 5, 4]
    for (x, y), (x2, y2) in zip(got, expected):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    both = ImageTensors.concat([on_disk.train, on_disk.val])
    assert both.on_disk and torch.equal(both.images, ImageTensors.concat([in_memory.train, in_memory.val]).images)
    assert torch.equal(on_disk.val.subset([2, 0]).images, in_memory.val.images[[2, 0]])


def test_a_set_on_disk_joined_with_one_in_memory_reads_like_their_concatenation(class_folder, own_cache, monkeypatch):
    in_memory = load_data(str(class_folder), image_size=16, seed=3)
    monkeypatch.setenv("AUTOFT_MAX_IN_MEMORY", "1k")
    on_disk = load_data(str(class_folder), image_size=16, seed=3)
    extra = ImageTensors(torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    joined, expected = ImageTensors.concat([on_disk.train, extra]), ImageTensors.concat([in_memory.train, extra])
    assert joined.on_disk and not expected.on_disk and "1 of them on disk" in repr(joined)
    assert joined.labels[-5:].tolist() == [data_module.UNLABELLED] * 5 and torch.equal(joined.labels, expected.labels)
    batches = [[len(joined) - 1, 0, 3], [2, len(joined) - 2], list(range(len(joined)))]
    for (x, y), (x2, y2) in zip(joined.read_batches(batches), expected.read_batches(batches), strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    picked = joined.subset([len(joined) - 1, 1])
    assert picked.on_disk and torch.equal(picked.images, expected.images[[len(joined) - 1, 1]])
    in_order = list(joined.iter_batches(batch_size=7))
    assert torch.equal(torch.cat([x for x, _ in in_order]), expected.images)


RSS_PROBE = textwrap.dedent(
    """
    import json, sys, zlib
    import sklearn.model_selection, torch, PIL.Image  # imported before the baseline: not the data's memory
    from autoft import plugins
    from autoft.data.decoding import load_data

    plugins.registry()  # loads the plugins (timm...) before the baseline

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    baseline = status("VmRSS")
    data = load_data(sys.argv[1], image_size=int(sys.argv[2]), seed=0)
    seen, total = 0, 0
    for split in (data.train, data.val):
        order = torch.randperm(len(split))
        for images, labels in split.iter_batches(order, batch_size=32):
            total = zlib.crc32(images.numpy(), total)  # read every pixel, with no temporary copy
            seen += len(labels)
    print(json.dumps({"growth": status("VmHWM") - baseline, "seen": seen, "on_disk": data.train.on_disk}))
    """
)


def _probe(folder: Path, size: int, limit: str) -> dict:
    env = {**os.environ, "AUTOFT_MAX_IN_MEMORY": limit, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", RSS_PROBE, str(folder), str(size)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc")
def test_a_dataset_larger_than_the_memory_cap_iterates_with_bounded_rss(tmp_path, own_cache):
    """1,000 images decoded at 160px are 77 MB; held to a 4 MB cap they are read a batch at a time."""
    folder = tmp_path / "many"
    for i in range(1000):
        make_image(folder / f"class{i % 2}" / f"{i}.png", (200, 40, 40) if i % 2 else (40, 40, 200), seed=i, size=8)
    size, decoded = 160, 1000 * 3 * 160 * 160
    load_data(str(folder), image_size=size)  # builds the cache here, so the probes only read it

    capped = _probe(folder, size, "4M")
    assert capped["on_disk"] and capped["seen"] == 1000
    uncapped = _probe(folder, size, "1G")
    assert not uncapped["on_disk"] and uncapped["seen"] == 1000
    # The measure sees a set held in memory (decoded bytes and more), and the cap keeps it out.
    assert uncapped["growth"] > decoded
    print(f"peak RSS growth: {capped['growth'] / 2**20:.1f} MiB capped, {uncapped['growth'] / 2**20:.1f} MiB in memory, {decoded / 2**20:.1f} MiB decoded")
    assert capped["growth"] < decoded / 3, f"peak RSS grew {capped['growth'] / 2**20:.1f} MiB under a 4 MB cap"


def test_cache_list_and_clear_show_and_free_the_entries(class_folder, own_cache):
    runner = CliRunner()
    load_data(str(class_folder), image_size=16)
    pretrain_stage = own_cache / cache.PRETRAIN / "abc123"
    pretrain_stage.mkdir(parents=True)
    (pretrain_stage / "metrics.json").write_text(json.dumps({"backbone": "test_resnet", "method": "simclr", "epochs": [{}, {}]}))
    (pretrain_stage / "backbone.pt").write_bytes(b"0" * 5000)

    listed = runner.invoke(make_app(), ["cache", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.output)["entries"]
    assert [(r["kind"], r["contents"]) for r in rows] == [
        ("images", f"24 images at 16px from {class_folder}"),
        ("pretrain", "simclr pretraining of test_resnet, 2 epochs"),
    ]
    assert rows[0]["bytes"] == 24 * 3 * 16 * 16 + len((Path(rows[0]["path"]) / cache.META_FILE).read_bytes())
    table = runner.invoke(make_app(), ["cache", "list"]).output
    assert f"2 entries, {cache.human_bytes(sum(r['bytes'] for r in rows))}" in table and "pretrain" in table

    only = runner.invoke(make_app(), ["cache", "clear", "--only", "images"])
    assert only.exit_code == 0 and "removed 1 entries" in only.output
    assert pretrain_stage.exists() and not entries(own_cache)
    assert runner.invoke(make_app(), ["cache", "clear"]).exit_code == 0 and not pretrain_stage.exists()
    assert "is empty" in runner.invoke(make_app(), ["cache", "list"]).output
    wrong = runner.invoke(make_app(), ["cache", "clear", "--only", "weights"])
    assert wrong.exit_code == 2 and "--only takes images or pretrain" in wrong.output


def test_in_memory_samples_are_cached_by_content(own_cache, count_decodes):
    samples = [np.full((6, 6), 40 * (i % 2) + i, np.uint8) for i in range(8)]
    labelled = LabelledImages(samples=samples, labels=[i % 2 for i in range(8)], classes=["a", "b"])
    decode_and_split(labelled, image_size=8)
    decode_and_split(labelled, image_size=8)
    assert len(count_decodes) == 8


def test_the_cli_decoding_display_shows_count_and_rate_then_stops(class_folder, own_cache, capsys, monkeypatch):
    from autoft.cli.common import console
    from autoft.cli.progress import decoding_progress

    monkeypatch.setattr(console, "_force_terminal", True)  # a bar is drawn only where it can move
    with decoding_progress():
        load_data(str(class_folder), image_size=16)
        assert decoding._decode_progress.get() is not None
    shown = capsys.readouterr().err
    assert "decoding images" in shown and "24/24" in shown and "images/s" in shown
    assert decoding._decode_progress.get() is None
    with decoding_progress():
        load_data(str(class_folder), image_size=16)  # from the cache: nothing to show
    assert "decoding images" not in capsys.readouterr().err
    monkeypatch.setattr(console, "_force_terminal", False)
    with decoding_progress():
        load_data(str(class_folder), image_size=24)  # decoded again, into a log: no bar
    assert "decoding images" not in capsys.readouterr().err
