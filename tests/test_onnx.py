"""ONNX export (insightface convention) and evaluation of .onnx models through load_backbone."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import TensorProto, helper

from robustface.cli import main
from robustface.deploy.onnx import INPUT_NAME, OUTPUT_NAME, OnnxBackbone, export_onnx
from robustface.evaluate.megaface import load_feature_set
from robustface.models import build_backbone
from robustface.models.loading import load_backbone

KW = {"input_size": 32, "width": 0.125, "embedding_size": 16}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A run directory with a tiny random r18, its model, and its export by the CLI."""
    tmp = tmp_path_factory.mktemp("onnx")
    run = tmp / "run"
    run.mkdir()
    torch.manual_seed(0)
    model = build_backbone("r18", **KW).eval()
    torch.save(model.state_dict(), run / "backbone.pth")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"backbone": "r18", **KW}}))
    assert main(["export", "onnx", str(run), "--out", str(tmp / "m.onnx"), "--no-check"]) == 0
    return run, model, tmp / "m.onnx"


def test_export_round_trip_and_dynamic_batch(exported):
    _, model, path = exported
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == [INPUT_NAME]
    assert [o.name for o in graph.output] == [OUTPUT_NAME]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]

    loaded, size = load_backbone(path)
    assert isinstance(loaded, OnnxBackbone) and size == 32
    for batch in (1, 7):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            expected = model(x)
        got = loaded(x)
        assert got.dtype == torch.float32 and got.shape == (batch, 16)
        torch.testing.assert_close(
            torch.nn.functional.normalize(got), torch.nn.functional.normalize(expected)
        )


def test_bgr_weights_are_exported_taking_rgb(tmp_path):
    torch.manual_seed(0)
    model = build_backbone("ir_18", dropout=0.0, **KW).eval()  # AdaFace family: BGR weights
    torch.save(model.state_dict(), tmp_path / "ir.pth")
    report = export_onnx(tmp_path / "ir.pth", tmp_path / "ir.onnx", backbone="ir_18", **KW)
    assert (report.input_size, report.embedding_size, report.opset) == (32, 16, 17)
    assert report.max_abs_diff_normalised <= 1e-4
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model(x.flip(1)))
    got = torch.nn.functional.normalize(OnnxBackbone(tmp_path / "ir.onnx")(x))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_verification_same_from_onnx_and_pth(tmp_path, exported, synth_train_dir):
    run, _, onnx_path = exported
    lfw = str(synth_train_dir / "lfw.bin")
    for name, source in (("pth", run), ("onnx", onnx_path)):
        out = str(tmp_path / f"{name}.json")
        code = main(["eval", "verification", str(source), "--bins", lfw, "--out", out])
        assert code == 0
    pth = json.loads((tmp_path / "pth.json").read_text())["lfw"]
    onx = json.loads((tmp_path / "onnx.json").read_text())["lfw"]
    assert onx["accuracy_mean"] == pytest.approx(pth["accuracy_mean"], abs=1e-9)
    assert onx["xnorm"] == pytest.approx(pth["xnorm"], rel=1e-4)


def _mxnet_style_model(path):
    """A fixed-batch graph that normalises inside (``_minusscalar0``/``_mulscalar0`` nodes)."""
    nodes = [
        helper.make_node("Sub", ["data", "mean"], ["centred"], name="_minusscalar0"),
        helper.make_node("Mul", ["centred", "scale"], ["scaled"], name="_mulscalar0"),
        helper.make_node("GlobalAveragePool", ["scaled"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["fc1"], name="flatten"),
    ]
    graph = helper.make_graph(
        nodes,
        "mx",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [2, 3, 8, 8])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [2, 3])],
        [
            helper.make_tensor("mean", TensorProto.FLOAT, [], [127.5]),
            helper.make_tensor("scale", TensorProto.FLOAT, [], [1 / 127.5]),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def test_raw_pixel_graph_and_fixed_batch(tmp_path):
    _mxnet_style_model(tmp_path / "mx.onnx")
    model = OnnxBackbone(tmp_path / "mx.onnx")
    assert model.raw_pixels and model.fixed_batch == 2 and model.input_size == 8
    x = torch.rand(5, 3, 8, 8) * 2 - 1  # 5 rows through a batch-2 graph: padded chunks
    torch.testing.assert_close(model(x), x.mean(dim=(2, 3)))
    bgr = OnnxBackbone(tmp_path / "mx.onnx", color_order="BGR")
    torch.testing.assert_close(bgr(x), x.flip(1).mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="takes 8x8 input"):
        model(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="input_size=16 but the model takes 8"):
        OnnxBackbone(tmp_path / "mx.onnx", input_size=16)


def test_errors(tmp_path, exported):
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"bad\.onnx: not a readable ONNX model"):
        load_backbone(tmp_path / "bad.onnx")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"bad\.pth: not a PyTorch checkpoint"):
        load_backbone(tmp_path / "bad.pth", backbone="r18")
    with pytest.raises(FileNotFoundError, match="no such ONNX model"):
        OnnxBackbone(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="fixed architecture; drop backbone"):
        load_backbone(exported[2], backbone="r18")
    run = exported[0]
    with pytest.raises(ValueError, match="differ from PyTorch's"):
        export_onnx(run, tmp_path / "strict.onnx", atol=-1.0)
    assert not list(tmp_path.glob("*strict.onnx*"))  # nothing left behind
    with pytest.raises(ValueError, match="already an ONNX model"):
        export_onnx(tmp_path / "bad.onnx", tmp_path / "x.onnx")
    assert main(["export", "onnx", str(tmp_path / "nope"), "--out", str(tmp_path / "o.onnx")]) == 2


def test_an_existing_out_is_replaced_only_with_overwrite_and_never_the_weights(tmp_path, exported):
    run, out = exported[0], tmp_path / "m.onnx"
    out.write_bytes(b"an earlier export")
    with pytest.raises(
        FileExistsError, match=r"m\.onnx exists; pass overwrite=True \(CLI: --overw"
    ):
        export_onnx(run, out, check=False)
    assert out.read_bytes() == b"an earlier export"
    assert main(["export", "onnx", str(run), "--out", str(out), "--no-check", "--overwrite"]) == 0
    assert onnx.load(str(out)).graph.output[0].name == OUTPUT_NAME
    weights = run / "backbone.pth"
    before = weights.read_bytes()
    with pytest.raises(ValueError, match=r"backbone\.pth: the weights being exported"):
        export_onnx(run, weights, check=False, overwrite=True)
    assert weights.read_bytes() == before
    with pytest.raises(IsADirectoryError, match=r"a directory; the output is the \.onnx file"):
        export_onnx(run, tmp_path, check=False)


def test_the_runs_weights_are_never_overwritten_by_any_name(tmp_path, exported, monkeypatch):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(exported[0], run)
    shutil.copy(run / "backbone.pth", run / "best_backbone.pth")  # exported: best_backbone.pth
    link = tmp_path / "link.onnx"
    link.symlink_to(run / "best_backbone.pth")
    hard = tmp_path / "hard.onnx"
    os.link(run / "best_backbone.pth", hard)
    monkeypatch.chdir(tmp_path)
    saved = {p: p.read_bytes() for p in (run / "backbone.pth", run / "best_backbone.pth")}
    for out in (run / "backbone.pth", Path("run/best_backbone.pth"), link, hard):
        with pytest.raises(ValueError, match="the weights being exported"):
            export_onnx(run, out, check=False, overwrite=True)
    assert {p: p.read_bytes() for p in saved} == saved


def test_megaface_embeds_images_with_an_onnx_model(tmp_path, exported):
    import cv2

    rng = np.random.default_rng(0)
    lists = {"fs": [f"id{i % 3}/id{i % 3}_{i}.png" for i in range(6)]}
    lists["mf"] = [f"0/owner{i}/{i}_0.jpg" for i in range(5)]
    for root, paths in lists.items():
        for rel in paths:
            (tmp_path / root / rel).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(tmp_path / root / rel), rng.integers(0, 256, (40, 40, 3), np.uint8))
    ids = [p.split("/")[0] for p in lists["fs"]]
    (tmp_path / "fs.json").write_text(json.dumps({"path": lists["fs"], "id": ids}))
    (tmp_path / "mf.json").write_text(json.dumps({"path": lists["mf"]}))
    flags = ["--probe-images", "fs", "--probe-list", "fs.json", "--distractor-images", "mf"]
    flags += ["--distractor-list", "mf.json", "--cache", "cache", "--out", "out"]
    args = [str(tmp_path / f) if i % 2 else f for i, f in enumerate(flags)]
    code = main(["eval", "megaface", str(exported[2]), *args, "--sizes", "5", "--quiet"])
    assert code == 0
    report = json.loads((tmp_path / "out" / "megaface.json").read_text())
    assert report["model"]["sha256"] and report["results"]["num_trials"] == 6
    probe = load_feature_set(tmp_path / "cache" / "probe.npz")
    assert probe.features.shape == (6, 16) and probe.labels.tolist() == ids
