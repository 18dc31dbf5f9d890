"""Training data sources: where ``data.source`` finds (or makes) the training set.

A source is a :class:`DataSource` subclass registered in ``DATA_SOURCES`` under the name
``data.source`` takes. The trainer builds it as ``cls(data_config, synth_config, run_dir)``,
calls :meth:`DataSource.prepare` on rank 0 (which may write data, e.g. render a SynthFace set)
and then :meth:`DataSource.dataset` on every rank.

Adding a source: one module with a ``DataSource`` subclass decorated with
``@DATA_SOURCES.register("name")``, plus one import line for it at the end of this module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

from torch.utils.data import Dataset

from robustface.utils.registry import Registry

if TYPE_CHECKING:
    from robustface.config import DataConfig, SynthConfig

__all__ = ["DATA_SOURCES", "DataSource", "FolderSource", "RecSource", "SynthFaceSource"]


class DataSource(ABC):
    """A training set named by ``data.source``; ``data.path`` is where it lives."""

    def __init__(self, data: DataConfig, synth: SynthConfig | None, run_dir: Path) -> None:
        self.data = data
        self.synth = synth
        self.run_dir = Path(run_dir)

    def prepare(self, progress: bool = True) -> None:  # noqa: B027  (an optional hook)
        """Make or check the data before any rank reads it (rank 0 only; default: nothing)."""

    @abstractmethod
    def dataset(self) -> Dataset:
        """The training set: a dataset of ``(image, label)`` with ``num_classes`` and ``labels``."""

    def open_set(self) -> Dataset | None:
        """Outside images for on-the-fly open-set noise when ``data.open_source`` is not given."""
        return None

    def verification_dir(self) -> Path | None:
        """Where named ``val_targets`` are found without ``data.val_dir`` (default: nowhere)."""
        return None


DATA_SOURCES: Registry[type[DataSource]] = Registry("data source")
"""Registered training-data sources, each built as ``cls(data, synth, run_dir)``."""


@DATA_SOURCES.register("rec")
class RecSource(DataSource):
    """An InsightFace ``.rec`` / ``.idx`` pair (``data.path``: the ``.rec`` or its directory)."""

    def dataset(self) -> Dataset:
        from robustface.data.recordio import RecordIODataset

        return RecordIODataset(self.data.path)

    def verification_dir(self) -> Path | None:
        """The ``.rec``'s directory."""
        if not self.data.path:
            return None
        rec = Path(self.data.path)
        return rec.parent if rec.suffix == ".rec" else rec


@DATA_SOURCES.register("folder")
class FolderSource(DataSource):
    """A directory of one sub-directory of images per identity."""

    def dataset(self) -> Dataset:
        from robustface.data.folder import ImageFolderDataset

        return ImageFolderDataset(self.data.path)


@DATA_SOURCES.register("synthface")
class SynthFaceSource(DataSource):
    """A SynthFace benchmark: ``data.path``, or rendered into the run's ``synthface/``."""

    @property
    def path(self) -> Path:
        """The SynthFace directory."""
        return Path(self.data.path) if self.data.path else self.run_dir / "synthface"

    def prepare(self, progress: bool = True) -> None:
        """Render the set unless it exists; a directory we were given is checked against
        ``synth`` and never regenerated."""
        from robustface.data.synth.builder import check_synthface, ensure_synthface

        if self.data.path and (self.path / "synthface.json").is_file():
            check_synthface(self.path, self.synth)
        else:
            ensure_synthface(self.path, self.synth, progress=progress)

    def dataset(self) -> Dataset:
        from robustface.data.recordio import RecordIODataset

        return RecordIODataset(self.path)

    def open_set(self) -> Dataset | None:
        from robustface.data.recordio import RecordIODataset

        return RecordIODataset(self.path / "open_set")

    def verification_dir(self) -> Path | None:
        """The SynthFace directory, which holds its pair sets."""
        return self.path
