"""Built-in dataset formats: class folders, pre-split folders, CSV manifests, sample data."""

from __future__ import annotations

import csv
from pathlib import Path

from autoft import hookimpl
from autoft.data import image_files
from autoft.errors import AutoftError
from autoft.specs import DatasetSpec, LabelledImages

SPLIT_NAMES = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_class_folder(source: str) -> LabelledImages:
    """``DIR/<class>/*``: one subfolder per class."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise AutoftError(f"not a folder: {source}")
    classes = [d for d in _class_dirs(folder) if image_files(d)]
    if not classes:
        raise AutoftError(f"no images found in {source}: expected {source}/<class>/<image>")
    samples, labels = [], []
    for label, class_dir in enumerate(classes):
        files = image_files(class_dir)
        samples += files
        labels += [label] * len(files)
    return LabelledImages(samples=samples, labels=labels, classes=[d.name for d in classes])


def load_split_folder(source: str) -> LabelledImages:
    """``DIR/{train,val,test}/<class>/*``: splits chosen by the user."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise AutoftError(f"not a folder: {source}")
    split_dirs = {SPLIT_ALIASES[d.name.lower()]: d for d in _class_dirs(folder) if d.name.lower() in SPLIT_ALIASES}
    if "train" not in split_dirs:
        raise AutoftError(f"no train/ folder in {source}")
    names = sorted({c.name for d in split_dirs.values() for c in _class_dirs(d) if image_files(c)})
    index = {name: i for i, name in enumerate(names)}
    samples, labels, splits = [], [], []
    for split, split_dir in split_dirs.items():
        for class_dir in _class_dirs(split_dir):
            files = image_files(class_dir)
            samples += files
            labels += [index[class_dir.name]] * len(files)
            splits += [split] * len(files)
    if not samples:
        raise AutoftError(f"no images found in {source}: expected {source}/train/<class>/<image>")
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
