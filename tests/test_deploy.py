"""robustface.deploy: Recognizer (same numbers as eval), embed_to_dir (bad inputs, resume) and the
verification threshold calibration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robustface.data.image import encode_image
from robustface.data.verification import load_bin_images
from robustface.deploy.align import align_face
from robustface.deploy.embed import embed_to_dir, open_inputs, read_embeddings
from robustface.deploy.recognizer import Recognizer
from robustface.deploy.verify import (
    calibrate,
    calibration_file,
    find_calibration,
    pair_scores,
    record_calibration,
)
from robustface.errors import DataFormatError
from robustface.evaluate.verification import _pair_distances, embed_pairs
from robustface.models import build_backbone
from robustface.models.loading import load_backbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "backbone.pth"
    torch.save(build_backbone("r18_tiny", embedding_size=32).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def rec(weights: Path) -> Recognizer:
    return Recognizer.from_pretrained(weights, batch_size=16)


@pytest.fixture(scope="module")
def faces(synth_train_dir: Path) -> np.ndarray:
    images, _ = load_bin_images(synth_train_dir / "lfw.bin")
    return images[:24]


def _write_faces(folder: Path, images: np.ndarray) -> list[Path]:
    paths = []
    for i, image in enumerate(images):
        path = folder / f"id{i % 3}" / f"{i:03d}.png"  # PNG: lossless, decoded pixels are exact
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_image(image, "png"))
        paths.append(path)
    return paths


def test_recognizer_embeds_as_eval_verification(rec: Recognizer, weights: Path, faces, tmp_path):
    model, size = load_backbone(weights)
    expected, _ = embed_pairs(faces, model, batch_size=16, input_size=size)  # eval's path
    assert (rec.input_size, rec.embedding_size, rec.info.color_order) == (56, 32, "RGB")
    np.testing.assert_array_equal(rec.embed(faces, normalize=False), expected)
    paths = _write_faces(tmp_path, faces)
    np.testing.assert_array_equal(rec.embed(paths, normalize=False), expected)
    pil = [Image.fromarray(f) for f in faces[:2]]
    # another batch composition: equal up to float rounding of the convolutions
    np.testing.assert_allclose(rec.embed(pil, normalize=False), expected[:2], rtol=1e-5, atol=1e-3)
    unit = expected[3] / np.linalg.norm(expected[3])
    np.testing.assert_allclose(rec.embed(str(paths[3])), unit, rtol=1e-4, atol=1e-6)
    # compare: the cosine of the two embeddings; eval's squared distance is 2 - 2 cos
    dist = _pair_distances(expected[:2].astype(np.float64))[0]
    assert rec.compare(faces[0], faces[1]) == pytest.approx(1 - dist / 2, abs=1e-6)


def test_recognizer_metadata_bgr_and_size_checks(weights: Path, rec: Recognizer):
    bgr = Recognizer.from_pretrained(weights, color_order="BGR")
    assert bgr.info.color_order == "BGR" and bgr.info.sha256 == rec.info.sha256
    with pytest.raises(ValueError, match="embedding of size 16, the model's embedding size is 32"):
        rec.compare(np.ones(16, np.float32), np.ones(16, np.float32))
    with pytest.raises(ValueError, match="not a square aligned crop; give its 5 landmarks"):
        rec.embed(np.zeros((60, 40, 3), np.uint8))


def test_landmarks_align_as_eval_ijb_and_bad_landmarks_are_named(rec: Recognizer, faces):
    canvas = np.zeros((160, 160, 3), np.uint8)
    canvas[20:132, 30:142] = faces[0]
    template = np.array(
        [[38.29, 51.70], [73.53, 51.50], [56.03, 71.74], [41.55, 92.37], [70.73, 92.20]]
    )
    marks = template + np.array([30, 20])
    crop = align_face(canvas, marks, 56)  # what eval ijb feeds the model
    np.testing.assert_array_equal(
        rec.embed(canvas, marks, normalize=False), rec.embed(crop, normalize=False)
    )
    with pytest.raises(ValueError, match=r"faces\[1\]: cannot align .*all its points at one"):
        rec.embed([canvas, canvas], [marks, np.full((5, 2), 50.0)])
    with pytest.raises(ValueError, match=r"faces\[0\]: cannot align .*NaN"):
        rec.embed([canvas], [np.full((5, 2), np.nan)])
    with pytest.raises(ValueError, match=r"cannot align .*shape \(5, 2\)"):
        rec.embed([canvas], [marks[:4]])


def test_embed_dir_folder_fp16_list_and_sources(rec: Recognizer, faces, tmp_path):
    paths = _write_faces(tmp_path / "in", faces[:10])
    inputs = open_inputs(tmp_path / "in")
    assert inputs.kind == "folder" and len(inputs) == 10
    result = embed_to_dir(rec, inputs, tmp_path / "out", show_progress=False, log=lambda s: None)
    emb, norms, sources = read_embeddings(tmp_path / "out")
    order = sorted(paths, key=lambda p: p.relative_to(tmp_path / "in").as_posix())
    raw = rec.embed(order, normalize=False)
    np.testing.assert_allclose(norms, np.linalg.norm(raw, axis=1), rtol=1e-6)
    np.testing.assert_allclose(emb * norms[:, None], raw, rtol=1e-5, atol=1e-6)
    assert [s["path"] for s in sources] == [
        p.relative_to(tmp_path / "in").as_posix() for p in order
    ]
    assert result.rows == 10 and not result.bad
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["model"]["sha256"] == rec.info.sha256 and manifest["rows"] == 10
    # fp16 and a list file (relative paths, comments) give the same rows
    (tmp_path / "list.txt").write_text(
        "# faces\n" + "".join(f"in/{s['path']}\n" for s in sources), encoding="utf-8"
    )
    embed_to_dir(
        rec,
        open_inputs(tmp_path / "list.txt"),
        tmp_path / "out16",
        dtype="float16",
        show_progress=False,
        log=lambda s: None,
    )
    emb16, _, _ = read_embeddings(tmp_path / "out16")
    assert emb16.dtype == np.float16
    np.testing.assert_allclose(emb16.astype(np.float32), emb, atol=2e-3)
    with pytest.raises(FileExistsError, match="overwrite"):
        embed_to_dir(rec, inputs, tmp_path / "out", show_progress=False, log=lambda s: None)


def test_embed_dir_bad_inputs_are_named_counted_and_skipped_only_on_request(
    rec: Recognizer, faces, tmp_path
):
    _write_faces(tmp_path / "in", faces[:6])
    (tmp_path / "in" / "id0" / "notes.txt").write_text("not an image")
    (tmp_path / "in" / "id1" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    inputs = open_inputs(tmp_path / "in")
    with pytest.raises(
        DataFormatError,
        match=r"2 of 8 inputs cannot be used: id0/notes\.txt: "
        r".*cannot decode.*id1/broken\.jpg: .*--skip-bad",
    ):
        embed_to_dir(rec, inputs, tmp_path / "out", show_progress=False, log=lambda s: None)
    assert not (tmp_path / "out").exists() and (tmp_path / "out.partial").is_dir()
    logs: list[str] = []
    result = embed_to_dir(
        rec, inputs, tmp_path / "out", skip_bad=True, show_progress=False, log=logs.append
    )
    assert result.resumed_from == 8 and result.rows == 6 and len(result.bad) == 2
    bad = (tmp_path / "out" / "bad.tsv").read_text().splitlines()
    assert len(bad) == 3 and "id0/notes.txt" in bad[1] and "id1/broken.jpg" in bad[2]
    emb, _, sources = read_embeddings(tmp_path / "out")
    assert emb.shape == (6, 32) and all(s["path"].endswith(".png") for s in sources)
    assert "6 of 8 inputs (2 bad)" in logs[-1]


def test_embed_dir_bad_input_is_named_once_in_words_that_agree(rec: Recognizer, tmp_path):
    # the reason no longer repeats the path the row names ("missing.jpg: missing.jpg: ..."), and
    # one input / one row / "it" are singular
    (tmp_path / "list.txt").write_text("missing.jpg\n")
    logs: list[str] = []
    with pytest.raises(DataFormatError) as info:
        embed_to_dir(
            rec,
            open_inputs(tmp_path / "list.txt"),
            tmp_path / "o",
            show_progress=False,
            log=logs.append,
        )
    message = str(info.value)
    assert message.count("missing.jpg") == 1
    assert message.startswith(
        f"{tmp_path / 'list.txt'}: 1 of 1 input cannot be used: missing.jpg: cannot read: "
    )
    assert "Fix or remove it, or pass --skip-bad (skip_bad=True) to leave it out" in message
    assert message.endswith(f"; 0 rows embedded so far kept in {tmp_path / 'o.partial'}")
    result = embed_to_dir(
        rec, open_inputs(tmp_path / "list.txt"), tmp_path / "o", skip_bad=True,
        show_progress=False, log=logs.append,
    )  # fmt: skip
    assert result.bad == [(0, "missing.jpg", "cannot read: No such file or directory")]
    assert logs[-1].startswith("embedded 0 of 1 input (1 bad)")


def test_embed_dir_resume_gives_identical_files(rec: Recognizer, faces, tmp_path):
    _write_faces(tmp_path / "in", faces)
    (tmp_path / "in" / "id2" / "zz_bad.png").write_bytes(b"garbage")
    inputs = open_inputs(tmp_path / "in")
    rec4 = Recognizer(
        rec.model, rec.input_size, path=rec.info.path, sha256=rec.info.sha256, batch_size=4
    )
    quiet = {"show_progress": False, "log": lambda s: None, "skip_bad": True}
    embed_to_dir(rec4, inputs, tmp_path / "whole", **quiet)
    first = embed_to_dir(rec4, inputs, tmp_path / "resumed", stop_after=2, **quiet)
    assert first.rows == 8 and not (tmp_path / "resumed").exists()
    second = embed_to_dir(rec4, inputs, tmp_path / "resumed", **quiet)
    assert second.resumed_from == 8
    for name in ("embeddings.npy", "norms.npy", "sources.tsv", "bad.tsv"):
        assert (tmp_path / "whole" / name).read_bytes() == (
            tmp_path / "resumed" / name
        ).read_bytes()
    # an interrupted run of another model is not resumed into
    embed_to_dir(rec4, inputs, tmp_path / "other", stop_after=1, **quiet)
    other = Recognizer(rec.model, rec.input_size, sha256="0" * 64, batch_size=4)
    with pytest.raises(ValueError, match="interrupted run with another model"):
        embed_to_dir(other, inputs, tmp_path / "other", **quiet)


def test_calibration_threshold_far_and_record(rec: Recognizer, synth_train_dir: Path, tmp_path):
    bin_path = synth_train_dir / "lfw.bin"
    scores, issame = pair_scores(rec, bin_path)
    impostor = np.sort(scores[~issame])[::-1]
    far = 2 / impostor.size
    entry = calibrate(rec, bin_path, far)
    # independent: accept score >= t; the lowest score above the third-best impostor's accepts
    # two impostors and the most genuine pairs (no ties here)
    t = scores[scores > impostor[2]].min()
    assert entry["threshold"] == pytest.approx(t)
    assert entry["far_reached"] == pytest.approx(2 / impostor.size)
    assert entry["tar"] == pytest.approx(np.mean(scores[issame] >= t))
    with pytest.raises(DataFormatError, match=f"not measurable with its {impostor.size} impostor"):
        calibrate(rec, bin_path, 0.5 / impostor.size)
    model = tmp_path / "m.pth"
    model.write_bytes(b"x")
    mine = Recognizer(rec.model, rec.input_size, path=model, sha256="a" * 64)
    record_calibration(mine, entry)
    assert calibration_file(model) == tmp_path / "m.pth.calibration.json"
    assert find_calibration(mine, far) == entry
    assert find_calibration(mine, far, bin_path) == entry
    assert find_calibration(mine, 0.5) is None
    stale = Recognizer(rec.model, rec.input_size, path=model, sha256="b" * 64)
    assert find_calibration(stale, far) is None  # other weights: never reused


def test_embed_dir_ijb_layout_matches_eval_ijb_and_rec_input(
    rec: Recognizer, faces, synth_train_dir: Path, tmp_path
):
    from robustface.data.ijb import read_ijb_meta, write_ijb_meta
    from robustface.data.recordio import RecordIODataset
    from robustface.evaluate.ijb import embed_ijb_images

    root = tmp_path / "IJBX"
    (root / "loose_crop").mkdir(parents=True)
    rng = np.random.default_rng(0)
    template = np.array(
        [[38.29, 51.70], [73.53, 51.50], [56.03, 71.74], [41.55, 92.37], [70.73, 92.20]]
    )
    names, marks = [], []
    for i, face in enumerate(faces[:6]):
        dx, dy = rng.integers(0, 40, 2)
        canvas = np.zeros((160, 160, 3), np.uint8)
        canvas[dy : dy + 112, dx : dx + 112] = face
        (root / "loose_crop" / f"{i}.png").write_bytes(encode_image(canvas, "png"))
        names.append(f"{i}.png")
        marks.append(template + np.array([dx, dy]))
    write_ijb_meta(
        root,
        "IJBX",
        np.array(names),
        np.arange(6) // 2,
        np.arange(6),
        np.array(marks),
        np.ones(6),
        np.array([[0, 1]]),
        np.array([0]),
    )
    inputs = open_inputs(root)
    assert inputs.kind == "ijb" and inputs.columns == ("image", "template", "media")
    embed_to_dir(rec, inputs, tmp_path / "out", show_progress=False, log=lambda s: None)
    emb, norms, sources = read_embeddings(tmp_path / "out")
    views = embed_ijb_images(
        rec.model, read_ijb_meta(root, "IJBX"), size=rec.input_size, batch_size=16, workers=1
    )  # eval ijb's embedding
    raw = views.sum(axis=1)
    np.testing.assert_allclose(emb * norms[:, None], raw, rtol=1e-5, atol=1e-4)
    assert [s["template"] for s in sources] == ["0", "0", "1", "1", "2", "2"]

    ds = RecordIODataset(synth_train_dir / "train.rec")
    inputs = open_inputs(ds.rec_path)
    assert inputs.kind == "rec" and len(inputs) == len(ds)
    embed_to_dir(rec, inputs, tmp_path / "rec", show_progress=False, log=lambda s: None)
    emb, _, sources = read_embeddings(tmp_path / "rec")
    expected = rec.embed([ds[i][0] for i in range(len(ds))])
    np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-6)
    assert [int(s["label"]) for s in sources] == ds.labels.tolist()


def test_a_directory_holding_a_rec_is_the_training_set(synth_train_dir):
    """A training set's directory (train.rec beside lfw.bin, manifest.json...) gives its
    records, as data.path and inspect read it, not every file below it as an image."""
    from robustface.data.recordio import RecordIODataset

    inputs = open_inputs(synth_train_dir)
    ds = RecordIODataset(synth_train_dir)
    assert (inputs.kind, inputs.path, len(inputs)) == ("rec", ds.rec_path, len(ds))
