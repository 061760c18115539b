"""The dataset format contract."""

from __future__ import annotations

import pytest

from autoft import plugins
from autoft.errors import AutoftError
from autoft.specs import DatasetSpec, LabelledImages
from autoft.testing.common import _Contract


class DatasetContract(_Contract):
    """What autoft relies on in a dataset format: set ``dataset_source`` to what a user types
    (``myformat:path/to/data``), or override ``dataset_under_test(self, tmp_path)`` to
    write example files first and return their source string."""

    dataset_source: str = ""

    @pytest.fixture
    def dataset_under_test(self) -> str:
        if not self.dataset_source:
            raise AssertionError(f"{type(self).__name__} must set dataset_source or override dataset_under_test")
        return self.dataset_source

    def load(self, source: str, registry: plugins.Registry) -> tuple[DatasetSpec, LabelledImages]:
        spec, argument = registry.dataset(source)
        return spec, spec.factory(argument)

    def test_resolves_to_a_format(self, dataset_under_test, registry):
        spec, argument = registry.dataset(dataset_under_test)
        assert isinstance(spec, DatasetSpec)
        assert isinstance(argument, str)

    def test_returns_consistent_labelled_images(self, dataset_under_test, registry):
        _, labelled = self.load(dataset_under_test, registry)
        assert isinstance(labelled, LabelledImages)
        assert len(labelled.samples) == len(labelled.labels) > 0
        assert all(isinstance(c, str) for c in labelled.classes)
        assert len(set(labelled.classes)) == len(labelled.classes), "class names must be unique"
        labels = [int(label) for label in labelled.labels]
        assert all(0 <= label < len(labelled.classes) for label in labels), "labels index classes"
        assert len(set(labels)) >= 2, "a classifier needs two classes"
        if labelled.splits is not None:
            assert len(labelled.splits) == len(labelled.samples)
            assert set(labelled.splits) <= {"train", "val", "test"}
            assert "train" in set(labelled.splits)

    def test_every_image_decodes(self, dataset_under_test, registry):
        from autoft.data.decoding import decode_and_split

        _, labelled = self.load(dataset_under_test, registry)
        data = decode_and_split(labelled, image_size=16, seed=0)
        assert not data.skipped, f"undecodable samples: {data.skipped[:3]}"
        assert data.train.image_shape == (3, 16, 16)  # not .images: a plugin's large set stays on disk
        assert len(data.train) + len(data.val) + (len(data.test) if data.test else 0) == len(labelled.samples)

    def test_loads_the_same_twice(self, dataset_under_test, registry):
        _, first = self.load(dataset_under_test, registry)
        _, second = self.load(dataset_under_test, registry)
        assert list(map(int, first.labels)) == list(map(int, second.labels)), "the same source must give the same labels in the same order"
        assert first.classes == second.classes

    def test_missing_source_is_a_user_error(self, dataset_under_test, registry, tmp_path):
        spec, _ = registry.dataset(dataset_under_test)
        missing = str(tmp_path / "does-not-exist")
        if spec.detect is not None:
            assert spec.detect(missing) is False
        with pytest.raises(AutoftError):
            spec.factory(missing)
