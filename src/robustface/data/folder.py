"""Image folders (one sub-folder per identity) as a dataset, and their conversion to RecordIO."""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data
from tqdm import tqdm

from robustface.data.image import JPEG_MAGIC, decode_image, encode_image
from robustface.data.recordio import write_insightface_rec
from robustface.errors import DataFormatError
from robustface.utils.io import write_text_atomic

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset", "folder_to_rec"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")  # what an image folder is read for


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images under ``root/<identity>/``; identities sorted by folder name get labels ``0..C-1``.

    Files are matched by extension (case-insensitive) and sorted by name within each identity.
    Hidden entries (names starting with ``.``) are skipped; other files without an image
    extension and folders inside an identity folder are skipped with a warning and listed in
    ``skipped``. ``ds[i]`` is
    ``(image, label)``: an ``HxWx3`` uint8 RGB array, or ``transform(image)``.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[np.ndarray], Any] | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ) -> None:
        self.root = Path(root)
        self.transform = transform
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
        folders = sorted(
            p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        if not folders:
            raise DataFormatError(self.root, "no identity sub-folders")
        self.classes: list[str] = [p.name for p in folders]
        self.samples: list[Path] = []
        counts = []
        skipped: list[Path] = []
        for folder in folders:
            entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
            files = sorted(p for p in entries if p.is_file() and p.suffix.lower() in exts)
            skipped.extend(sorted(p for p in entries if p.is_dir() or p.suffix.lower() not in exts))
            if not files:
                raise DataFormatError(
                    folder, f"identity folder has no images with extensions {sorted(exts)}"
                )
            self.samples.extend(files)
            counts.append(len(files))
        self.skipped = skipped
        if skipped:  # never silently: say what was left out
            warnings.warn(
                f"{self.root}: skipped {len(skipped)} files without an image extension "
                f"{sorted(exts)} or sub-folders (images are read from each identity folder "
                f"itself, not below it), e.g. {skipped[0]}",
                stacklevel=2,
            )
        self._labels = np.repeat(np.arange(len(folders), dtype=np.int64), counts)

    @property
    def num_classes(self) -> int:
        """Number of identities (sub-folders)."""
        return len(self.classes)

    @property
    def labels(self) -> np.ndarray:
        """Class label of every image (int64)."""
        return self._labels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        i = operator.index(index)
        if not 0 <= i < len(self.samples):
            raise IndexError(f"index {i} out of range for {len(self.samples)} images")
        path = self.samples[i]
        image = decode_image(path.read_bytes(), path)
        label = int(self._labels[i])
        if self.transform is not None:
            return self.transform(image), label
        return image, label


def folder_to_rec(
    root: str | Path,
    out_dir: str | Path,
    *,
    image_size: tuple[int, int] | None = None,
    quality: int = 95,
    show_progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Convert an identity-per-folder tree into the insightface RecordIO layout in ``out_dir``.

    JPEG files are stored byte for byte; other formats are re-encoded as JPEG at ``quality``.
    Every image is decoded once to check it; with ``image_size=(H, W)`` each one must already
    have that size (images are never resized here). Writes ``train.rec``, ``train.idx``,
    ``property`` and ``classes.txt`` (folder name of label ``i`` on line ``i``); returns the
    ``.rec`` path. An existing ``train.rec`` in ``out_dir`` is replaced only with ``overwrite``
    (other files there, such as verification ``.bin`` sets, are kept).
    """
    existing = Path(out_dir) / "train.rec"
    if existing.exists() and not overwrite:
        raise FileExistsError(f"{existing} exists; pass overwrite=True (CLI: --overwrite)")
    dataset = ImageFolderDataset(root)
    if image_size is not None:
        expected = (int(image_size[0]), int(image_size[1]))
        hint = "resize/align the images first"
    else:
        first = dataset.samples[0]
        expected = decode_image(first.read_bytes(), first).shape[:2]
        hint = f"all images must share the size of {first} (the property file holds one size)"

    def items() -> Iterator[tuple[bytes, int]]:
        paths = tqdm(dataset.samples, desc="folder_to_rec", unit="img", disable=not show_progress)
        for path, label in zip(paths, dataset.labels.tolist(), strict=True):
            data = path.read_bytes()
            image = decode_image(data, path)
            if image.shape[:2] != expected:
                height, width = image.shape[:2]
                raise DataFormatError(
                    path,
                    f"image is {height}x{width} (HxW), expected {expected[0]}x{expected[1]}; "
                    + hint,
                )
            yield (data if data[:2] == JPEG_MAGIC else encode_image(image, "jpg", quality)), label

    rec = write_insightface_rec(out_dir, items(), image_size=expected)
    write_text_atomic(Path(out_dir) / "classes.txt", "".join(f"{c}\n" for c in dataset.classes))
    return rec
