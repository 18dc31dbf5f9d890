"""Use a model from Python: :class:`Recognizer` embeds and compares faces.

The numbers are those of ``robustface eval``: each crop is resized to the model's input size as
training resizes (:func:`robustface.data.transforms.resize_to`), normalised to
``(x / 255 - 0.5) / 0.5`` RGB, and embedded together with its horizontal flip; the embedding is
the sum of the two raw embeddings (:func:`robustface.evaluate.verification.embed_views`), so
``recognizer.embed(bin_images)`` equals ``embed_pairs`` of ``eval verification`` for the same
batches. Raw images come with their 5 landmarks and are aligned at the input size to the ArcFace
template, as ``eval ijb`` aligns (:func:`robustface.deploy.align.align_face`, rule ``scale``).

Images are given as paths (JPEG/PNG/BMP), PIL images or ``H x W x 3`` uint8 RGB arrays. Whatever
colour order the weights expect (:attr:`ModelInfo.color_order`), a recognizer takes RGB: BGR
models are wrapped by :func:`robustface.models.loading.load_backbone`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from robustface.data.image import decode_image
from robustface.data.transforms import resize_to
from robustface.deploy.align import align_face
from robustface.errors import DataFormatError
from robustface.evaluate.report import model_fingerprint
from robustface.evaluate.verification import embed_views
from robustface.models.loading import BGRInput, load_backbone
from robustface.utils.guards import check_int

__all__ = ["ModelInfo", "Recognizer", "l2_normalize", "read_rgb"]

Face = Any  # a path, a PIL image or an H x W x 3 uint8 RGB array


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is: its file, content hash and how it takes and gives faces."""

    path: str
    sha256: str  # robustface.evaluate.report.model_fingerprint of the file or run directory
    color_order: str  # the channel order the weights expect (the recognizer always takes RGB)
    input_size: int  # side of the square crop the model takes
    embedding_size: int
    flip: bool  # embeddings sum the image's and its mirror's (eval's convention)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def read_rgb(face: Face, name: str = "image") -> np.ndarray:
    """``face`` (a path, PIL image or ``H x W x 3`` uint8 RGB array) as an ``H x W x 3`` uint8
    RGB array; an unreadable file raises :class:`DataFormatError` naming it."""
    if isinstance(face, (str, Path)):
        path = Path(face)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataFormatError(path, f"cannot read: {exc.strerror or exc}") from None
        return decode_image(data, path)
    if isinstance(face, np.ndarray):
        if face.dtype != np.uint8 or face.ndim != 3 or face.shape[2] != 3:
            raise ValueError(f"{name} must be H x W x 3 uint8 RGB, got {face.dtype} {face.shape}")
        return face
    if hasattr(face, "convert") and hasattr(face, "size"):  # a PIL image, without importing PIL
        return np.asarray(face.convert("RGB"))
    raise TypeError(f"{name} must be a path, a PIL image or a uint8 array, got {type(face)}")


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` divided by their L2 norm (float32; a zero row stays zero, as in eval)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms == 0, 1, norms)


class Recognizer:
    """A face recognition model ready to embed and compare faces.

    ``model`` takes normalised RGB ``N x 3 x S x S`` input (S = ``input_size``), in eval mode on
    ``device``; :meth:`from_pretrained` loads one from a run directory, a ``.pth`` or an ``.onnx``.
    """

    def __init__(
        self,
        model: nn.Module,
        input_size: int,
        *,
        path: str | Path = "<module>",
        sha256: str = "",
        device: str | torch.device = "cpu",
        batch_size: int = 256,
        flip: bool = True,
    ) -> None:
        self.model = model.eval()
        self.device = torch.device(device)
        self.batch_size = check_int("batch_size", batch_size, 1)
        input_size = check_int("input_size", input_size, 1)
        probe = np.zeros((1, input_size, input_size, 3), dtype=np.uint8)
        embedding_size = embed_views(probe, self.model, flip=False, device=self.device).shape[-1]
        inner = model.backbone if isinstance(model, BGRInput) else model
        color = "BGR" if isinstance(model, BGRInput) else getattr(inner, "color_order", "RGB")
        self.info = ModelInfo(str(path), sha256, color, input_size, int(embedding_size), flip)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 256,
        flip: bool = True,
        **model_args: Any,
    ) -> Recognizer:
        """Load a run directory, a ``.pth`` / AdaFace ``.ckpt`` or an ``.onnx`` model.

        ``model_args`` are :func:`robustface.models.loading.load_backbone`'s (``backbone``,
        ``embedding_size``, ``width``, ``input_size``, ``color_order``, ``unsafe_legacy_load``);
        the architecture is read from the weights where they determine it.
        """
        model, input_size = load_backbone(path, device=device, **model_args)
        sha = model_fingerprint(path)["sha256"]
        return cls(
            model,
            input_size,
            path=Path(path).resolve(),
            sha256=sha,
            device=device,
            batch_size=batch_size,
            flip=flip,
        )

    @property
    def input_size(self) -> int:
        """Side of the square crop the model takes."""
        return self.info.input_size

    @property
    def embedding_size(self) -> int:
        """Dimension of the embeddings."""
        return self.info.embedding_size

    def crop(
        self, face: Face, landmarks: np.ndarray | None = None, name: str = "image"
    ) -> np.ndarray:
        """The model's ``S x S x 3`` uint8 input crop of one face.

        Without ``landmarks`` the face must be an aligned square crop (resized to S if needed);
        with its ``(5, 2)`` landmarks it is aligned to the ArcFace template at S. A face that
        cannot be used raises ``ValueError`` (:class:`DataFormatError` for a file) naming it.
        """
        image = read_rgb(face, name)
        where = str(face) if isinstance(face, (str, Path)) else name
        if landmarks is None:
            if image.shape[0] != image.shape[1]:
                raise ValueError(
                    f"{where}: {image.shape[1]}x{image.shape[0]} is not a square aligned crop; "
                    "give its 5 landmarks to align it"
                )
            return resize_to(image, self.input_size)
        try:
            return align_face(image, landmarks, self.input_size)
        except ValueError as exc:
            points = np.asarray(landmarks).tolist()
            raise ValueError(f"{where}: cannot align with landmarks {points}: {exc}") from None

    def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        """Raw embeddings ``(N, d)`` float32 of ``N x S x S x 3`` uint8 RGB crops, one batch
        (image + flip summed when :attr:`ModelInfo.flip`)."""
        views = embed_views(crops, self.model, flip=self.info.flip, device=self.device)
        return views.sum(axis=1, dtype=np.float32)

    def embed(
        self,
        faces: Face | Sequence[Face],
        landmarks: np.ndarray | Sequence[np.ndarray | None] | None = None,
        *,
        normalize: bool = True,
        show_progress: bool = False,
    ) -> np.ndarray:
        """Embeddings ``(N, d)`` float32 of ``faces``: a list, or an ``N x H x W x 3`` uint8
        array (one face gives ``(d,)``).

        ``landmarks``: ``None`` (aligned crops), or one ``(5, 2)`` array (or ``None``) per face.
        ``normalize`` returns unit vectors (a zero embedding stays zero); otherwise the raw
        embeddings, whose norm is a quality cue (``robustface.fuse``'s ``norm_weighted``).
        ``show_progress`` shows a progress bar over the batches.
        """
        if isinstance(faces, np.ndarray) and faces.ndim == 4:  # an N x H x W x 3 batch
            faces = list(faces)
        single = not isinstance(faces, (list, tuple))
        items = [faces] if single else list(faces)
        if not items:
            raise ValueError("faces is empty")
        if landmarks is None:
            marks: list[np.ndarray | None] = [None] * len(items)
        else:
            marks = [landmarks] if single else list(landmarks)  # type: ignore[list-item]
            if len(marks) != len(items):
                raise ValueError(f"landmarks: {len(marks)} entries for {len(items)} faces")
        out = []
        starts = range(0, len(items), self.batch_size)
        for start in tqdm(starts, desc="embedding", unit="batch", disable=not show_progress):
            stop = min(start + self.batch_size, len(items))
            crops = np.stack(
                [self.crop(items[i], marks[i], f"faces[{i}]") for i in range(start, stop)]
            )
            out.append(self.embed_crops(crops))
        emb = np.concatenate(out)
        emb = l2_normalize(emb) if normalize else emb
        return emb[0] if single else emb

    def compare(self, a: Face | np.ndarray, b: Face | np.ndarray) -> float | np.ndarray:
        """Cosine similarity of two faces, or of embeddings (float arrays ``(d,)`` or ``(N, d)``,
        compared row by row). A face is anything :meth:`embed` takes, as an aligned crop."""
        ea, eb = (self._embedding(x) for x in (a, b))
        if ea.shape != eb.shape:
            raise ValueError(f"cannot compare embeddings of shapes {ea.shape} and {eb.shape}")
        scores = np.sum(l2_normalize(ea) * l2_normalize(eb), axis=-1)
        return float(scores) if scores.ndim == 0 else scores

    def _embedding(self, x: Face | np.ndarray) -> np.ndarray:
        if isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.floating) and x.ndim <= 2:
            if x.shape[-1] != self.embedding_size:
                raise ValueError(
                    f"an embedding of size {x.shape[-1]}, the model's embedding size is "
                    f"{self.embedding_size}"
                )
            return x
        return self.embed(x, normalize=False)
