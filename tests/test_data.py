import numpy as np
import pytest
import torch

from autoft import plugins
from autoft.data import decode_image, load_data, stratified_split
from autoft.errors import AutoftError


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
