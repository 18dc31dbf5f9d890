"""End to end on SynthFace: ``robustface embed``, ``verify`` and
``gallery build|add|remove|search``; the gallery's rank-1 equals the 1:N evaluation
(``evaluate.ijb.identification``) of the same features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from robustface.cli import main
from robustface.config import SynthConfig
from robustface.data.synth.builder import build_synthface
from robustface.deploy.embed import read_embeddings
from robustface.deploy.recognizer import Recognizer
from robustface.evaluate.ijb import identification
from robustface.models import build_backbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 identities x 4 images as images/<label>/<n>.jpg (56 px), lfw.bin with 40 pairs."""
    out = tmp_path_factory.mktemp("deploy") / "synthface"
    cfg = SynthConfig(
        identities=6,
        images_per_identity=4,
        open_set_identities=0,
        test_identities=20,
        lfw_pairs=40,
        cfp_fp_pairs=20,
        lowq_pairs=0,
        ijb_identities=0,
        image_folder=True,
        image_size=56,
    )
    build_synthface(out, cfg, workers=1, progress=False)
    return out


def _weights(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    torch.save(build_backbone("r18_tiny", embedding_size=32).state_dict(), path)
    return path


def test_embed_verify_gallery_end_to_end(synth: Path, tmp_path: Path, capsys):
    model = _weights(tmp_path / "backbone.pth", 0)
    images = synth / "images"
    ids = sorted(p.name for p in images.iterdir())
    files = {i: sorted((images / i).iterdir()) for i in ids}

    # embed a folder
    assert main(["embed", str(model), str(images), "--out", str(tmp_path / "emb"), "--quiet"]) == 0
    emb, _, sources = read_embeddings(tmp_path / "emb")
    assert emb.shape == (24, 32) and sources[0]["path"] == f"{ids[0]}/0000.jpg"
    assert "images/s" in capsys.readouterr().err

    # verify a genuine and an impostor pair at a FAR calibrated on lfw.bin (20 impostor pairs)
    rec = Recognizer.from_pretrained(model)
    genuine, impostor = (files[ids[0]][0], files[ids[0]][1]), (files[ids[0]][0], files[ids[1]][0])
    lfw = str(synth / "lfw.bin")
    for a, b in (genuine, impostor):
        assert (
            main(["verify", str(model), str(a), str(b), "--far", "0.1", "--calibration", lfw]) == 0
        )
        out = capsys.readouterr().out
        record = json.loads((tmp_path / "backbone.pth.calibration.json").read_text())
        threshold = record["entries"][0]["threshold"]
        score = rec.compare(str(a), str(b))
        assert f"score {score:.4f}" in out
        assert out.rstrip().endswith("same person" if score >= threshold else "different people")
    assert record["model_sha256"] == rec.info.sha256 and len(record["entries"]) == 1
    assert main(["verify", str(model), str(a), str(b), "--far", "0.01", "--calibration", lfw]) == 2
    assert "not measurable with its 20 impostor pairs" in capsys.readouterr().err

    # gallery: identities 0-3 enrolled from images 0-1; images 2-3 of all 6 searched
    enrolled = ids[:4]
    (tmp_path / "enrol.tsv").write_text(
        "".join(f"{i}\t{f}\n" for i in enrolled for f in files[i][:2]), encoding="utf-8"
    )
    gallery = str(tmp_path / "gallery")
    assert main(["gallery", "build", str(model), gallery, str(tmp_path / "enrol.tsv")]) == 0
    probes = [f for i in ids for f in files[i][2:]]
    probe_ids = np.array([int(f.parent.name) for f in probes])
    (tmp_path / "probes.txt").write_text("".join(f"{f}\n" for f in probes), encoding="utf-8")
    assert (
        main(
            [
                "gallery",
                "search",
                str(model),
                gallery,
                str(tmp_path / "probes.txt"),
                "-k",
                "1",
                "--out",
                str(tmp_path / "hits.tsv"),
                "--quiet",
            ]
        )
        == 0
    )
    rows = [r.split("\t") for r in (tmp_path / "hits.tsv").read_text().splitlines()[1:]]
    top1 = np.array([int(r[2]) for r in rows])
    mated = np.isin(probe_ids, [int(i) for i in enrolled])
    rank1 = np.mean(top1[mated] == probe_ids[mated])
    # the 1:N evaluation of the same model on the same features: enrolment images fused by the
    # mean of unit features (written out here), probes unit-normalised
    raw = rec.embed([f for i in enrolled for f in files[i][:2]], normalize=False)
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    fused = unit.reshape(4, 2, -1).sum(1)
    fused /= np.linalg.norm(fused, axis=1, keepdims=True)
    result = identification(
        fused, np.array([int(i) for i in enrolled]), rec.embed(probes), probe_ids, ranks=(1,)
    )
    assert rank1 == result["rank"][1]
    capsys.readouterr()

    # open-set rejection, add, remove; a gallery of another model is refused naming both
    assert (
        main(
            [
                "gallery",
                "search",
                str(model),
                gallery,
                str(probes[0]),
                "--threshold",
                "1.0",
                "--quiet",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "1 of 1 query rejected as unknown" in captured.err and captured.out.endswith("\t0\n")
    (tmp_path / "more.tsv").write_text(f"{ids[5]}\t{files[ids[5]][0]}\n", encoding="utf-8")
    assert main(["gallery", "add", str(model), gallery, str(tmp_path / "more.tsv")]) == 0
    assert capsys.readouterr().out == "added 1 image, 1 new identity; 5 in all\n"
    # the same image again is refused, naming it; --skip-enrolled leaves it out and says so
    assert main(["gallery", "add", str(model), gallery, str(tmp_path / "more.tsv")]) == 2
    err = capsys.readouterr().err
    assert f"1 of 1 images are already enrolled under the same identity: {files[ids[5]][0]} " in err
    assert "--skip-enrolled" in err
    args = ["gallery", "add", str(model), gallery, str(tmp_path / "enrol.tsv"), "--skip-enrolled"]
    assert main([*args, "--quiet"]) == 0
    assert capsys.readouterr().out == (
        "added 0 images (8 already enrolled, skipped), 0 new identities; 5 in all\n"
    )
    assert main(["gallery", "remove", gallery, ids[0]]) == 0
    manifest = json.loads((tmp_path / "gallery" / "manifest.json").read_text())
    assert manifest["identities"] == 4 and manifest["images"] == 7
    other = _weights(tmp_path / "other.pth", 1)
    assert main(["gallery", "search", str(other), gallery, str(probes[0])]) == 2
    err = capsys.readouterr().err
    assert "built with another model" in err and "backbone.pth" in err and "other.pth" in err

    # a gallery built from an `embed` output: the same identities
    assert main(["gallery", "build", str(model), str(tmp_path / "g2"), str(tmp_path / "emb")]) == 0
    assert json.loads((tmp_path / "g2" / "manifest.json").read_text())["identities"] == 6
    assert main(["gallery", "build", str(other), str(tmp_path / "g3"), str(tmp_path / "emb")]) == 2
    assert "embedded by" in capsys.readouterr().err


def test_user_errors_are_one_line_naming_the_file_or_parameter(synth: Path, tmp_path: Path, capsys):
    model = _weights(tmp_path / "backbone.pth", 0)
    images = synth / "images"
    a, b = sorted((images / sorted(p.name for p in images.iterdir())[0]).iterdir())[:2]

    def fails(*argv: str) -> str:
        assert main([str(x) for x in argv]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if ": error: " in line]
        assert len(lines) == 1 and "Traceback" not in err
        return lines[0]

    # a cosine threshold outside [-1, 1]; a missing calibration set
    assert "--threshold" in fails("verify", model, a, b, "--threshold", "2")
    nope = tmp_path / "nope.bin"
    assert f"{nope}: no such file (--calibration)" in fails(
        "verify", model, a, b, "--far", "0.1", "--calibration", nope
    )
    # a calibration exists at FAR 0.1, but made with flip: --no-flip says so
    lfw = synth / "lfw.bin"
    assert (
        main(["verify", str(model), str(a), str(b), "--far", "0.1", "--calibration", str(lfw)]) == 0
    )
    capsys.readouterr()
    err = fails("verify", model, a, b, "--far", "0.1", "--no-flip")
    assert "made with flip=true" in err and "drop --no-flip" in err

    # a missing enrolment path; a small gallery lowers --nlist and says so
    assert f"{tmp_path / 'none'}: no such" in fails(
        "gallery", "build", model, tmp_path / "g", tmp_path / "none"
    )
    gallery = tmp_path / "g"
    args = ["gallery", "build", model, gallery, images, "--index", "ivf", "--nlist", "8"]
    assert main([str(x) for x in [*args, "--quiet"]]) == 0
    captured = capsys.readouterr()
    assert "--nlist 8 lowered to 1 for 6 identities" in captured.err
    assert "embedding" not in captured.err  # --quiet: no progress bar
    # removing someone not enrolled
    assert "not enrolled: nobody" in fails("gallery", "remove", gallery, "nobody")
    # a corrupt manifest and a corrupt progress record are named
    (gallery / "manifest.json").write_text("", encoding="utf-8")
    assert f"{gallery / 'manifest.json'}: not a gallery manifest" in fails(
        "gallery", "search", model, gallery, a
    )
    out = tmp_path / "emb"
    (tmp_path / "emb.partial").mkdir()
    (tmp_path / "emb.partial" / "progress.json").write_text("", encoding="utf-8")
    assert f"{tmp_path / 'emb.partial' / 'progress.json'}: not a progress record" in fails(
        "embed", model, images, "--out", out, "--quiet"
    )
