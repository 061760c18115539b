"""Built-in dataset formats: class folders, pre-split folders, CSV manifests, sample data.

Folders follow :mod:`autoft.data`'s rule: a class folder's images are all the image files in
it and its subfolders (``DIR/<class>/album/x.jpg`` belongs to ``<class>``); hidden files,
files that are not images and files outside any class folder are left out, and one warning
lists them with the reason.
"""

from __future__ import annotations

import csv
from pathlib import Path

from autoft import hookimpl
from autoft.data import LeftOut, find_images, warn_left_out
from autoft.errors import AutoftError
from autoft.specs import DatasetSpec, LabelledImages

SPLIT_NAMES = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def _scan_classes(folder: Path, left_out: LeftOut) -> dict[str, list[Path]]:
    """``{class name: images}`` for each non-hidden subfolder of ``folder`` that holds images, recursively."""
    classes = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            left_out.append((entry, "hidden"))
        elif not entry.is_dir():
            left_out.append((entry, "outside a class folder"))
        else:
            images, skipped = find_images(entry)
            left_out += skipped
            if images:
                classes[entry.name] = images
            else:
                left_out.append((entry, "class folder without images"))
    return classes


def load_class_folder(source: str) -> LabelledImages:
    """``DIR/<class>/**``: one subfolder per class, its own subfolders included."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise AutoftError(f"not a folder: {source}")
    left_out: LeftOut = []
    classes = _scan_classes(folder, left_out)
    if not classes:
        raise AutoftError(f"no images found in {source}: expected {source}/<class>/<image>")
    warn_left_out(folder, left_out)
    samples, labels = [], []
    for label, files in enumerate(classes.values()):
        samples += files
        labels += [label] * len(files)
    return LabelledImages(samples=samples, labels=labels, classes=list(classes))


def load_split_folder(source: str) -> LabelledImages:
    """``DIR/{train,val,test}/<class>/**``: splits chosen by the user."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise AutoftError(f"not a folder: {source}")
    left_out: LeftOut = []
    split_dirs = {}
    for entry in sorted(folder.iterdir()):
        if entry.is_dir() and not entry.name.startswith(".") and entry.name.lower() in SPLIT_ALIASES:
            split_dirs[SPLIT_ALIASES[entry.name.lower()]] = entry
        else:
            left_out.append((entry, "hidden" if entry.name.startswith(".") else "outside the train/val/test folders"))
    if "train" not in split_dirs:
        raise AutoftError(f"no train/ folder in {source}")
    per_split = {split: _scan_classes(split_dir, left_out) for split, split_dir in split_dirs.items()}
    names = sorted({name for classes in per_split.values() for name in classes})
    if not names:
        raise AutoftError(f"no images found in {source}: expected {source}/train/<class>/<image>")
    warn_left_out(folder, left_out)
    index = {name: i for i, name in enumerate(names)}
    samples, labels, splits = [], [], []
    for split, classes in per_split.items():
        for name, files in classes.items():
            samples += files
            labels += [index[name]] * len(files)
            splits += [split] * len(files)
    return LabelledImages(samples=samples, labels=labels, classes=names, splits=splits)


def load_csv(source: str) -> LabelledImages:
    """A CSV manifest ``path,label`` (an optional ``split`` column); paths relative to the file."""
    manifest = Path(source).expanduser()
    if not manifest.is_file():
        raise AutoftError(f"CSV manifest not found: {source}")
    with manifest.open(newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        header, rows = [c.strip().lower() for c in rows[0]], rows[1:]
    else:
        header = ["path", "label", "split"][: max((len(r) for r in rows), default=2)]
    if not rows:
        raise AutoftError(f"no rows in {source}")
    col = {name: i for i, name in enumerate(header)}
    if "path" not in col or "label" not in col:
        raise AutoftError(f"{source}: expected columns path,label")
    names = sorted({r[col["label"]].strip() for r in rows if len(r) > col["label"]})
    index = {name: i for i, name in enumerate(names)}
    samples, labels, splits = [], [], []
    for line, row in enumerate(rows, start=2 if "path" in header else 1):
        if len(row) <= max(col["path"], col["label"]):
            raise AutoftError(f"{source}:{line}: expected path,label")
        samples.append(manifest.parent / row[col["path"]].strip())
        labels.append(index[row[col["label"]].strip()])
        if "split" in col:
            split = row[col["split"]].strip().lower() if len(row) > col["split"] else ""
            if split not in SPLIT_ALIASES:
                raise AutoftError(f"{source}:{line}: split must be train, val or test, got {split!r}")
            splits.append(SPLIT_ALIASES[split])
    return LabelledImages(samples=samples, labels=labels, classes=names, splits=splits or None)


SAMPLES = {"digits": "scikit-learn's 1,797 real 8x8 scans of handwritten digits"}


def load_sample(name: str) -> LabelledImages:
    """Sample data sets that ship with installed packages, so a first run needs no data."""
    if name != "digits":
        raise AutoftError(f"unknown sample dataset {name!r}; available: {', '.join(SAMPLES)}")
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # 0..16 ink levels
    return LabelledImages(
        samples=list(images),
        labels=digits.target.tolist(),
        classes=[str(d) for d in digits.target_names],
        image_size=32,
        hflip=False,  # a mirrored 2 is not a 2
    )


def _is_split_folder(source: str) -> bool:
    folder = Path(source).expanduser()
    return folder.is_dir() and (folder / "train").is_dir()


def _is_class_folder(source: str) -> bool:
    return Path(source).expanduser().is_dir()


def _is_csv(source: str) -> bool:
    return Path(source).suffix.lower() == ".csv" and Path(source).expanduser().is_file()


@hookimpl
def autoft_register_datasets(register):
    register(DatasetSpec("split-folder", "Pre-split folders DIR/{train,val,test}/<class>/*", load_split_folder, _is_split_folder))
    register(DatasetSpec("folder", "One subfolder per class: DIR/<class>/*", load_class_folder, _is_class_folder))
    register(DatasetSpec("csv", "A CSV manifest path,label[,split]; paths relative to the file", load_csv, _is_csv))
    register(DatasetSpec("sample", "Sample data that ships with installed packages: sample:digits", load_sample))
