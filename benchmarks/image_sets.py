"""Eight real image sets from images that install with packages, written as folders.

Every image here ships inside scikit-learn or scikit-image (``pip install scikit-image``):
nothing is downloaded. The sets differ on purpose in channels (gray, RGB), size (16 to
96 px), classes (2 to 20), labels a class (5 to 50), the unlabelled pool (none, or every
image not labelled), and how the test images differ from the training ones (a random
split, another region of the same photos, or another rendering of the source). Half are
``tuning`` sets, the ones a change may be tried on; the other half are ``held-out``,
looked at only to confirm.

Each set is written as ``ROOT/NAME/train/<class>/*.png``, ``ROOT/NAME/test/<class>/*.png``
and, when it has one, a flat ``ROOT/NAME/unlabelled/*.png``.

    python benchmarks/image_sets.py [--keep DIR]   # build all eight, print their shapes
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from digits_folders import DigitFolders

TEST_PER_CLASS = 60  # held-out test images a class, at most: enough to see a few points' difference


@dataclass
class ImageSet:
    name: str
    role: str  # "tuning" or "held-out"
    shift: str  # how the test images differ from the training ones
    classes: list[str]
    labelled: list[tuple[np.ndarray, int]]  # (H, W) gray or (H, W, 3) RGB uint8 images
    test: list[tuple[np.ndarray, int]]
    unlabelled: list[np.ndarray] = field(default_factory=list)

    def describe(self) -> str:
        image = self.labelled[0][0]
        channels = "RGB" if image.ndim == 3 else "gray"
        per_class = len(self.labelled) // len(self.classes)
        return (f"{self.name} [{self.role}]: {channels} {image.shape[0]} px, {len(self.classes)} classes, {per_class} labelled a class, "
                f"{len(self.unlabelled) or 'no'} unlabelled, {len(self.test)} test ({self.shift})")  # fmt: skip


def write(image_set: ImageSet, root: Path) -> DigitFolders:
    """The set as folders, and its pixels (channels first, in [0, 1]) for the pixel baselines."""
    folder = root / image_set.name

    def save(image: np.ndarray, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        return path

    for i, (image, label) in enumerate(image_set.labelled):
        save(image, folder / "train" / image_set.classes[label] / f"{i:05d}.png")
    for i, image in enumerate(image_set.unlabelled):
        save(image, folder / "unlabelled" / f"{i:05d}.png")
    test = [save(image, folder / "test" / image_set.classes[label] / f"{i:05d}.png") for i, (image, label) in enumerate(image_set.test)]

    def pixels(images: list[np.ndarray]) -> np.ndarray:
        return np.stack([(image if image.ndim == 2 else image.transpose(2, 0, 1)).astype(np.float32).ravel() / 255 for image in images])

    return DigitFolders(
        folder / "train", folder / "unlabelled" if image_set.unlabelled else None, test, np.asarray([label for _, label in image_set.test]),
        pixels([image for image, _ in image_set.labelled]), np.asarray([label for _, label in image_set.labelled]), pixels([image for image, _ in image_set.test]),
    )  # fmt: skip


# ---------------------------------------------------------------------------
# Cutting photos into classes


def _patches(image: np.ndarray, size: int, stride: int) -> list[np.ndarray]:
    rows, cols = image.shape[:2]
    return [image[top : top + size, left : left + size] for top in range(0, rows - size + 1, stride) for left in range(0, cols - size + 1, stride)]


def _halves(image: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    middle = image.shape[axis] // 2
    return (image[:middle], image[middle:]) if axis == 0 else (image[:, :middle], image[:, middle:])


def _gray(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype == bool:
        return (image * 255).astype(np.uint8)
    if image.dtype != np.uint8:
        image = (255 * (image - image.min()) / max(float(image.max() - image.min()), 1e-9)).astype(np.uint8)
    return np.asarray(Image.fromarray(image[..., :3]).convert("L")) if image.ndim == 3 else image


def _choose(pools: list[list[np.ndarray]], per_class: int, rng: np.random.Generator, keep_rest: bool) -> tuple[list, list]:
    """``per_class`` labelled images from each class's pool; the rest unlabelled (or dropped)."""
    labelled, rest = [], []
    for label, pool in enumerate(pools):
        order = rng.permutation(len(pool))
        labelled += [(pool[i], label) for i in order[:per_class]]
        rest += [pool[i] for i in order[per_class:]] if keep_rest else []
    return labelled, [rest[i] for i in rng.permutation(len(rest))]


def _random_split(pools: list[list[np.ndarray]], rng: np.random.Generator, fraction: float = 0.3) -> tuple[list[list[np.ndarray]], list]:
    """Each class's images split at random: (the training pools, the test images)."""
    train, test = [], []
    for label, pool in enumerate(pools):
        order = rng.permutation(len(pool))
        cut = min(TEST_PER_CLASS, int(fraction * len(pool)))
        test += [(pool[i], label) for i in order[:cut]]
        train.append([pool[i] for i in order[cut:]])
    return train, test


def _region_split(photos: list[np.ndarray], size: int, stride: int, axis: int, rng: np.random.Generator) -> tuple[list[list[np.ndarray]], list]:
    """Training patches from the first half of each photo, test patches from the other half."""
    train, test = [], []
    for label, photo in enumerate(photos):
        first, second = _halves(photo, axis)
        train.append(_patches(first, size, stride))
        tiles = _patches(second, size, size)
        test += [(tiles[i], label) for i in rng.permutation(len(tiles))[:TEST_PER_CLASS]]
    return train, test


def _resized(image: np.ndarray, size: int, resample) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((size, size), resample))


def _skimage(*names: str) -> list[np.ndarray]:
    try:
        import skimage.data
    except ImportError:
        raise SystemExit("these image sets need scikit-image: pip install scikit-image") from None
    loaded = [getattr(skimage.data, name)(**({"rng": 0} if name == "binary_blobs" else {})) for name in names]
    return [np.asarray(image[0] if isinstance(image, tuple) else image) for image in loaded]  # a stereo pair: its left image


# ---------------------------------------------------------------------------
# The sets


def digits(rng: np.random.Generator) -> ImageSet:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    images = [_resized((row.reshape(8, 8) * 255 / 16).astype(np.uint8), 16, Image.Resampling.BICUBIC) for row in x]
    train, test = _random_split([[im for im, label in zip(images, y) if label == c] for c in range(10)], rng)
    labelled, rest = _choose(train, 10, rng, keep_rest=True)
    return ImageSet("digits", "tuning", "random split", [str(c) for c in range(10)], labelled, test, rest)


def photo_tiles(rng: np.random.Generator) -> ImageSet:
    from sklearn.datasets import load_sample_images

    train, test = _region_split(list(load_sample_images().images), 32, 16, axis=1, rng=rng)
    labelled, _ = _choose(train, 20, rng, keep_rest=False)
    return ImageSet("photo-tiles", "tuning", "left half for training, right half for test", ["china", "flower"], labelled, test)


def faces(rng: np.random.Generator) -> ImageSet:
    images = _skimage("lfw_subset")[0]
    images = [(255 * image).astype(np.uint8) for image in images]
    train, test = _random_split([images[:100], images[100:]], rng)
    labelled, _ = _choose(train, 50, rng, keep_rest=False)
    return ImageSet("lfw-faces", "tuning", "random split", ["face", "background"], labelled, test)


def large_patches(rng: np.random.Generator) -> ImageSet:
    names = ["astronaut", "coffee", "hubble_deep_field", "immunohistochemistry"]
    train, test = _region_split([photo[..., :3] for photo in _skimage(*names)], 96, 32, axis=1, rng=rng)
    labelled, rest = _choose(train, 5, rng, keep_rest=True)
    return ImageSet("photo-96", "tuning", "left half for training, right half for test", names, labelled, test, rest)


def textures(rng: np.random.Generator) -> ImageSet:
    names = ["brick", "grass", "gravel", "moon"]
    train, test = _region_split([_gray(image) for image in _skimage(*names)], 48, 16, axis=0, rng=rng)
    labelled, rest = _choose(train, 5, rng, keep_rest=True)
    return ImageSet("textures", "held-out", "top half for training, bottom half for test", names, labelled, test, rest)


def photos(rng: np.random.Generator) -> ImageSet:
    names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "stereo_motorcycle", "retina"]
    train, test = _random_split([_patches(photo[..., :3], 64, 64) for photo in _skimage(*names)], rng)  # no overlap: a random split leaks nothing
    labelled, _ = _choose(train, 10, rng, keep_rest=False)
    return ImageSet("photos-8", "held-out", "random split", names, labelled, test)


def scenes(rng: np.random.Generator) -> ImageSet:
    names = ["camera", "moon", "page", "coins", "cell", "clock", "text", "brick", "grass", "gravel", "checkerboard", "shepp_logan_phantom",
             "horse", "binary_blobs", "microaneurysms", "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field"]  # fmt: skip
    pools = [_patches(_gray(image), 16, 16) for image in _skimage(*names)]
    pools = [[pool[i] for i in rng.permutation(len(pool))[:300]] for pool in pools]  # the larger photos would swamp the pool
    train, test = _random_split(pools, rng)
    labelled, rest = _choose(train, 5, rng, keep_rest=True)
    return ImageSet("gray-scenes-20", "held-out", "random split", names, labelled, test, rest)


def digits_shift(rng: np.random.Generator) -> ImageSet:
    """Trained on smooth renderings of the scans, tested on blocky, noisy, shifted ones of other scans."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    scans = [(row.reshape(8, 8) * 255 / 16).astype(np.uint8) for row in x]
    order = rng.permutation(len(y))
    train_pools = [[_resized(scans[i], 24, Image.Resampling.BICUBIC) for i in order[: len(y) // 2] if y[i] == c] for c in range(10)]
    labelled, _ = _choose(train_pools, 30, rng, keep_rest=False)
    test = []
    for c in range(10):
        for i in [i for i in order[len(y) // 2 :] if y[i] == c][:TEST_PER_CLASS]:
            blocky = np.roll(_resized(scans[i], 24, Image.Resampling.NEAREST).astype(np.float32), rng.integers(-2, 3, 2), axis=(0, 1))
            test.append((np.clip(blocky + rng.normal(0, 20, blocky.shape), 0, 255).astype(np.uint8), c))
    return ImageSet("digits-shift", "held-out", "another rendering: nearest-neighbour, noisy, shifted", [str(c) for c in range(10)], labelled, test)


SETS: dict[str, Callable[[np.random.Generator], ImageSet]] = {
    "digits": digits, "photo-tiles": photo_tiles, "lfw-faces": faces, "photo-96": large_patches,
    "textures": textures, "photos-8": photos, "gray-scenes-20": scenes, "digits-shift": digits_shift,
}  # fmt: skip
ROLES = {"digits": "tuning", "photo-tiles": "tuning", "lfw-faces": "tuning", "photo-96": "tuning",
         "textures": "held-out", "photos-8": "held-out", "gray-scenes-20": "held-out", "digits-shift": "held-out"}  # fmt: skip


def build(name: str, seed: int = 0) -> ImageSet:
    image_set = SETS[name](np.random.default_rng(seed))
    assert image_set.role == ROLES[name]
    return image_set


def main() -> None:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, default=None, help="write the sets here instead of a temporary folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        for name in SETS:
            image_set = build(name)
            folders = write(image_set, args.keep or Path(scratch))
            print(f"{image_set.describe()}; pixels {folders.train_pixels.shape[1]} a row")


if __name__ == "__main__":
    main()
