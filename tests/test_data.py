import numpy as np
import pytest
import torch

from pathlib import Path

from autoft import hookimpl, plugins
from autoft.data.decoding import decode_and_split, decode_image, load_data, stratified_split
from autoft.errors import AutoftError
from autoft.specs import DatasetSpec


def test_class_folder_is_detected_decoded_and_split_stratified(class_folder):
    data = load_data(str(class_folder), image_size=16, val_fraction=0.25, seed=0)
    assert data.classes == ["blue", "green", "red"]
    assert data.train.images.shape[1:] == (3, 16, 16) and data.train.images.dtype == torch.uint8
    assert len(data.train) + len(data.val) == 24 and data.test is None
    # stratified: each class has exactly 2 of its 8 images in validation
    assert torch.bincount(data.val.labels).tolist() == [2, 2, 2]


def test_split_is_seeded(class_folder):
    a = load_data(str(class_folder), image_size=8, seed=1)
    b = load_data(str(class_folder), image_size=8, seed=1)
    c = load_data(str(class_folder), image_size=8, seed=2)
    assert torch.equal(a.val.images, b.val.images)
    assert not torch.equal(a.val.images, c.val.images)


def test_pre_split_folder_keeps_the_users_splits(split_folder):
    data = load_data(str(split_folder), image_size=8)
    assert (len(data.train), len(data.val), len(data.test)) == (18, 6, 9)


def test_pre_split_folder_without_val_carves_it_from_train(split_folder):
    import shutil

    shutil.rmtree(split_folder / "val")
    data = load_data(str(split_folder), image_size=8, val_fraction=0.34)
    assert len(data.test) == 9 and len(data.train) + len(data.val) == 18 and len(data.val) >= 3


def test_csv_manifest_with_relative_paths(class_folder):
    manifest = class_folder / "labels.csv"
    rows = ["path,label"] + [f"{p.relative_to(class_folder)},{p.parent.name}" for p in sorted(class_folder.glob("*/*.png"))]
    manifest.write_text("\n".join(rows) + "\n")
    data = load_data(str(manifest), image_size=8)
    assert data.classes == ["blue", "green", "red"] and len(data.train) + len(data.val) == 24
    explicit = load_data(f"csv:{manifest}", image_size=8)
    assert torch.equal(explicit.val.labels, data.val.labels)


def test_sample_digits_are_the_real_scans(digits):
    assert digits.classes == [str(d) for d in range(10)]
    assert len(digits.train) + len(digits.val) == 1797
    assert digits.hflip is False and digits.image_size == 32


def test_unreadable_images_are_skipped_and_counted(class_folder):
    (class_folder / "red" / "broken.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        data = load_data(str(class_folder), image_size=8)
    assert len(data.skipped) == 1 and data.skipped[0][0].endswith("broken.png")
    assert len(data.train) + len(data.val) == 24


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda root: root / "missing", "data not found"),
        (lambda root: (root / "empty").mkdir() or root / "empty", "no images found"),
        (lambda root: root / "colours" / "red", "no images found"),  # a folder of images, no classes
    ],
)
def test_unusable_data_is_a_clear_error(class_folder, make, message):
    source = make(class_folder.parent)
    with pytest.raises(AutoftError, match=message):
        load_data(str(source), image_size=8)


def test_one_class_only_is_an_error(class_folder):
    import shutil

    shutil.rmtree(class_folder / "green")
    shutil.rmtree(class_folder / "blue")
    with pytest.raises(AutoftError, match="at least two classes"):
        load_data(str(class_folder), image_size=8)


def test_unknown_format_prefix_suggests_close_matches():
    with pytest.raises(AutoftError, match="did you mean sample"):
        plugins.registry().dataset("sampel:digits")


def test_decode_crops_the_centre_square(tmp_path):
    from PIL import Image

    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, 10:20] = 255  # white centre third
    Image.fromarray(wide).save(tmp_path / "wide.png")
    out = decode_image(tmp_path / "wide.png", 10)
    assert out.shape == (3, 10, 10) and out.float().mean() > 200


def test_stratified_split_falls_back_when_a_class_has_one_image():
    keep, held = stratified_split(np.array([0, 0, 0, 0, 1, 1, 1, 2]), 0.25, seed=0)
    assert len(keep) + len(held) == 8 and not set(keep) & set(held)


# ---------------------------------------------------------------------------
# One folder rule for search/train and predict (recursive), with one warning for what is left out


def _messy(class_folder):
    """Sub-albums, hidden files and folders, non-images, a file outside any class folder, and
    a name that is not UTF-8 (Linux names are bytes)."""
    import os

    from conftest import make_image

    make_image(class_folder / "red" / "album" / "deeper" / "nested.png", (220, 40, 40), seed=1)
    make_image(Path(os.fsdecode(os.fsencode(class_folder / "red") + b"/\xff\xfe.png")), (220, 40, 40), seed=4)
    make_image(class_folder / "red" / ".hidden.png", (220, 40, 40), seed=2)
    make_image(class_folder / "blue" / ".thumbnails" / "t.png", (40, 60, 220), seed=3)
    (class_folder / "green" / "notes.txt").write_text("not an image")
    (class_folder / "README.md").write_text("about these photos")
    return class_folder


def test_nested_folders_belong_to_their_class_and_what_is_left_out_is_one_warning(class_folder):
    from autoft_plugins.datasets import load_class_folder

    _messy(class_folder)
    with pytest.warns(UserWarning) as caught:
        labelled = load_class_folder(str(class_folder))
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    assert messages[0].startswith(f"left out 4 file(s) or folder(s) under {class_folder}")
    for part in ("2 hidden (blue/.thumbnails, red/.hidden.png)", "1 not an image (green/notes.txt)", "1 outside a class folder (README.md)"):
        assert part in messages[0]
    nested = [label for sample, label in zip(labelled.samples, labelled.labels) if Path(sample).name == "nested.png"]
    assert nested == [labelled.classes.index("red")] and len(labelled.samples) == 26


def test_predict_and_training_read_a_folder_by_the_same_rule(class_folder):
    from autoft.deploy.predict import expand_paths
    from autoft_plugins.datasets import load_class_folder

    _messy(class_folder)
    with pytest.warns(UserWarning, match="left out"):
        trained_on = sorted(map(Path, load_class_folder(str(class_folder)).samples))
    with pytest.warns(UserWarning, match=r"2 not an image \(README.md, green/notes.txt\); 2 hidden"):  # no class folders here
        predicted = sorted(expand_paths([class_folder]))
    assert predicted == trained_on


def test_split_folder_reads_nested_class_folders_too(split_folder):
    from conftest import make_image

    make_image(split_folder / "train" / "red" / "2024" / "extra.png", (220, 40, 40), seed=9)
    data = load_data(str(split_folder), image_size=8)
    assert (len(data.train), len(data.val), len(data.test)) == (19, 6, 9)


# ---------------------------------------------------------------------------
# Labels from dataset plugins are checked before any decoding


def _labelled(labels, classes=("a", "b", "c"), n=None):
    from autoft.specs import LabelledImages

    n = n or len(labels)
    return LabelledImages(samples=[np.full((4, 4), 20 * i % 256, np.uint8) for i in range(n)], labels=labels, classes=list(classes))


def test_out_of_range_labels_name_the_plugin_and_show_the_counts(monkeypatch):
    from autoft.data import decoding as data_module

    monkeypatch.setattr(data_module, "decode_image", lambda *a: pytest.fail("decoded before the labels were checked"))
    labelled = _labelled([0, 0, 1, 1, 2, 3, 3, -1])
    with pytest.raises(AutoftError) as error:
        decode_and_split(labelled, image_size=8, origin="dataset plugin 'npz'")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("dataset plugin 'npz' returned 3 label(s) outside 0..2 for its 3 classes")
    assert "images per label: -1: 1 (out of range), 0: 2, 1: 2, 2: 1, 3: 2 (out of range)" in message


@pytest.mark.parametrize(
    "labels, message",
    [
        (["a", "b", "a", "b"], "returned labels that are not integers \\(e.g. 'a'\\)"),
        ([0.5, 1, 0, 1], "not integers"),
        ([0, 1, 0], "returned 4 samples but 3 labels"),
    ],
)
def test_labels_that_are_not_one_integer_per_sample_are_refused(labels, message):
    with pytest.raises(AutoftError, match=message):
        decode_and_split(_labelled(labels, n=4), image_size=8, origin="dataset plugin 'x'")


def test_a_class_with_fewer_than_two_images_is_one_clear_error():
    labelled = _labelled([0, 0, 0, 1, 1, 2])
    with pytest.raises(AutoftError, match=r"every class needs at least 2 readable images; too few in 'c' \(1\): add images or remove the class"):
        decode_and_split(labelled, image_size=8)
    unused = _labelled([0, 0, 1, 1], classes=("a", "b", "never"))
    with pytest.raises(AutoftError, match=r"too few in 'never' \(0\)"):
        decode_and_split(unused, image_size=8)


def test_a_pre_split_class_without_training_images_is_an_error(split_folder):
    from conftest import make_image

    for i in range(2):
        make_image(split_folder / "test" / "purple" / f"{i}.png", (150, 0, 150), seed=i)
    with pytest.raises(AutoftError, match=r"at least one in train; too few in 'purple' \(0\)"):
        load_data(str(split_folder), image_size=8)


class _FaultyDatasets:
    """A dataset plugin whose labels are wrong, registered for one test."""

    @hookimpl
    def autoft_register_datasets(self, register):
        register(DatasetSpec("badlabels", "Labels past the class list", lambda source: _labelled([0, 1, 2, 5] * 3, n=12)))
        register(DatasetSpec("lonely", "One image in a class", lambda source: _labelled([0, 0, 1, 1, 2], n=5)))


@pytest.fixture
def faulty_plugin():
    pm = plugins.get_plugin_manager()
    pm.register(_FaultyDatasets(), name="faulty-datasets")
    plugins.set_default_plugin_manager(pm)
    yield
    plugins.set_default_plugin_manager(None)


@pytest.mark.parametrize(
    "source, message",
    [
        ("badlabels:x", "dataset plugin 'badlabels' returned 3 label(s) outside 0..2 for its 3 classes; images per label: 0: 3, 1: 3, 2: 3, 5: 3 (out of range)"),
        ("lonely:x", "every class needs at least 2 readable images; too few in 'c' (1): add images or remove the class"),
    ],
)
def test_bad_plugin_data_is_one_red_line_and_exit_2_from_train_and_the_api(faulty_plugin, tmp_path, source, message):
    from typer.testing import CliRunner

    import autoft
    from autoft.cli import make_app

    result = CliRunner().invoke(make_app(), ["train", "--backbone", "test_resnet", "--data", source, "--out", str(tmp_path / "run"), "--epochs", "1"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [f"error: {message}"] and "Traceback" not in result.output
    with pytest.raises(AutoftError) as error:
        autoft.train("test_resnet", source, tmp_path / "api", epochs=1)
    assert str(error.value) == message
