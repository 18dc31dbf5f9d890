"""``robustface report``: one comparison table from verification, IJB and MegaFace JSON files."""

from __future__ import annotations

import json

import pytest

from robustface.cli import main
from robustface.evaluate.compare import combine, metrics_of


def _ver(acc: dict[str, float]) -> dict[str, dict[str, float]]:
    return {name: {"accuracy_mean": a, "accuracy_std": 0.01, "val": 0.5} for name, a in acc.items()}


def _megaface(rank1: float, tar: float, size: int = 1_000_000, probes: int = 3530) -> dict:
    n_neg = probes * size
    sizes = {
        "10": {"rank1": 0.999, "tar": None, "tar_insightface": 0.999, "num_negatives": 35300},
        str(size): {"rank1": rank1, "tar": tar, "num_negatives": n_neg, "tar_insightface": tar},
    }
    return {"kind": "megaface", "results": {"far_target": 1e-6, "sizes": sizes}, "model": None}


def _ijbc(tars: dict[str, float], impostor: int = 10**7) -> dict:
    ver = {"tar_at_far": tars, "tar_at_far_insightface": tars, "impostor": impostor}
    return {"kind": "ijbc", "results": {"verification": ver}, "config": {}}


def _gallery(rank: dict, tpirs: dict, nonmated: int, insightface: dict | None = None) -> dict:
    """One gallery's 1:N results; without ``insightface`` as written before that field existed."""
    r = {"rank": rank, "tpir_at_fpir": tpirs, "nonmated_probes": nonmated}
    return r if insightface is None else r | {"tpir_at_fpir_insightface": insightface}


def _write(path, doc):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def _rows(table: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()]


def test_combine_runs(tmp_path):
    a, b = tmp_path / "arcface", tmp_path / "robustface"
    _write(a / "verification.json", _ver({"lfw": 0.99, "cfp_fp": 0.9}))
    _write(a / "megaface.json", _megaface(0.98, 0.985))
    _write(a / "meta.json", {"seed": 0})  # not an evaluation: skipped inside a directory
    _write(
        b / "train_results.json", {"steps": 10, "verification": _ver({"cfp_fp": 0.95, "lfw": 1})}
    )
    _write(b / "ijbc.json", _ijbc({"1e-05": 0.9, "0.0001": 0.95}))

    rows = _rows(combine([a, b]))
    header = rows[0]
    assert header == [
        "run",
        "lfw (%)",
        "cfp_fp (%)",
        "avg (%)",
        "MegaFace Id (%)",
        "MegaFace Ver (%)",
        "IJBC TAR@FAR=1e-05 (%)",
        "IJBC TAR@FAR=0.0001 (%)",
    ]
    assert rows[2] == ["arcface", "99.00", "90.00", "94.50", "98.00", "98.50", "-", "-"]
    assert rows[3] == ["robustface", "100.00", "95.00", "97.50", "-", "-", "90.00", "95.00"]


def test_ijb_identification_columns(tmp_path):
    doc = _ijbc({"0.0001": 0.95})
    doc["results"]["identification"] = {
        "G1": _gallery({"1": 0.9, "5": 0.95}, {"0.01": 0.7, "0.1": 0.8}, nonmated=500),
        "G2": _gallery({"1": 0.8, "5": 0.9}, {"0.01": 0.5, "0.1": None}, nonmated=500),
    }
    rows = _rows(combine([_write(tmp_path / "run" / "ijbc.json", doc)]))
    assert rows[0] == [
        "run",
        "IJBC TAR@FAR=0.0001 (%)",
        "IJBC G1 rank-1 (%)",
        "IJBC G1 TPIR@FPIR=0.01 (%)",
        "IJBC G1 TPIR@FPIR=0.1 (%)",
        "IJBC G2 rank-1 (%)",
        "IJBC G2 TPIR@FPIR=0.01 (%)",
    ]  # each gallery on its own, never averaged; FPIR 0.1 is undefined for G2
    assert rows[2] == ["run/ijbc", "95.00", "90.00", "70.00", "80.00", "80.00", "50.00"]


def _tar_cells(table: str) -> dict[str, list[str]]:
    rows = _rows(table.split("\n\n")[0])
    return {row[0]: row[1:] for row in rows[2:]} | {"header": rows[0][1:]}


def test_tars_the_impostors_cannot_measure(tmp_path):
    tars = {"1e-06": 0.0117, "1e-05": 0.0117, "0.0001": 0.3, "0.001": 0.5}
    new = _ijbc({"1e-06": None, "1e-05": None, "0.0001": 0.3, "0.001": 0.5}, impostor=12_000)
    new["results"]["verification"]["tar_at_far_insightface"] = tars
    old = _ijbc(tars, impostor=12_000)  # from before tar_at_far_insightface: rule from the count
    del old["results"]["verification"]["tar_at_far_insightface"]
    big = _ijbc(tars, impostor=2_000_000)  # 1e-06 x 2M = 2 impostor pairs: all measurable
    for name, doc in (("new", new), ("old", old), ("big", big)):
        _write(tmp_path / name / "ijbc.json", doc)
    paths = [tmp_path / name for name in ("new", "old", "big", "mf")]
    mf = _megaface(0.9, 0.85, size=100)  # 3,530 probes x 100 distractors < 1e6
    mf["results"]["sizes"]["100"]["tar"] = None
    _write(tmp_path / "mf" / "megaface.json", mf)
    table = combine(paths)
    cells = _tar_cells(table)
    fars = ("1e-06", "1e-05", "0.0001", "0.001")
    assert cells["header"][:4] == [f"IJBC TAR@FAR={f} (%)" for f in fars]
    assert cells["new"][:4] == cells["old"][:4] == ["n/m", "n/m", "30.00", "50.00"]
    assert cells["big"][:4] == ["1.17", "1.17", "30.00", "50.00"]
    assert cells["mf"] == ["-"] * 4 + ["90.00", "n/m"]
    assert _tar_cells(combine(paths, "insightface"))["mf"][-1] == "85.00*"
    note = table.split("\n\n")[1]
    assert note.startswith("n/m: not measurable (new, IJBC: 12,000 impostor pairs, FAR >= 8.33e-05")
    assert "old, IJBC: 12,000" in note and "mf, MegaFace @100: 353,000 impostor pairs" in note
    assert "big" not in note
    table = combine(paths, far_reading="insightface")
    cells = _tar_cells(table)
    assert cells["new"][:4] == cells["old"][:4] == ["1.17*", "1.17*", "30.00", "50.00"]
    assert table.split("\n\n")[1].startswith("*: not measurable (new, IJBC")


def test_tpirs_the_nonmated_probes_cannot_measure(tmp_path):
    raw = {"0.01": 0.25, "0.1": 0.6}
    new = _ijbc({"0.1": 0.5})
    new["results"]["identification"] = {
        "G1": _gallery({"1": 0.9}, {"0.01": 0.7, "0.1": 0.8}, 100, {"0.01": 0.7, "0.1": 0.8}),
        "G2": _gallery({"1": 0.8}, {"0.01": None, "0.1": 0.6}, 30, raw),
    }
    old = _ijbc({"0.1": 0.5})  # before tpir_at_fpir_insightface: the rule from the count
    old["results"]["identification"] = {
        "G1": _gallery({"1": 0.9}, {"0.01": 0.7, "0.1": 0.8}, 100),
        "G2": _gallery({"1": 0.8}, raw, 30),
    }
    paths = [
        _write(tmp_path / name / "ijbc.json", doc) for name, doc in (("new", new), ("old", old))
    ]
    table = combine(paths)
    cells = _tar_cells(table)
    assert cells["header"] == [
        "IJBC TAR@FAR=0.1 (%)",
        "IJBC G1 rank-1 (%)",
        "IJBC G1 TPIR@FPIR=0.01 (%)",
        "IJBC G1 TPIR@FPIR=0.1 (%)",
        "IJBC G2 rank-1 (%)",
        "IJBC G2 TPIR@FPIR=0.01 (%)",
        "IJBC G2 TPIR@FPIR=0.1 (%)",
    ]
    expected = ["50.00", "90.00", "70.00", "80.00", "80.00", "n/m", "60.00"]
    assert cells["new/ijbc"] == cells["old/ijbc"] == expected
    note = table.split("\n\n")[1]
    assert note.startswith(
        "n/m: not measurable (new/ijbc, IJBC G2: 30 non-mated probes, FPIR >= 0.0333; "
        "old/ijbc, IJBC G2: 30 non-mated probes"
    )
    assert "G1" not in note
    table = combine(paths, "insightface")
    cells = _tar_cells(table)
    assert cells["new/ijbc"][5] == cells["old/ijbc"][5] == "25.00*"
    assert table.split("\n\n")[1].startswith("*: not measurable (new/ijbc, IJBC G2: 30 non-mated")


def test_report_cli_far_reading(tmp_path, capsys):
    doc = _ijbc({"1e-06": None, "0.001": 0.5}, impostor=12_000)
    doc["results"]["verification"]["tar_at_far_insightface"] = {"1e-06": 0.0117, "0.001": 0.5}
    path = _write(tmp_path / "run" / "ijbc.json", doc)
    assert main(["report", str(path)]) == 0
    assert "| run/ijbc | n/m " in capsys.readouterr().out
    assert main(["report", str(path), "--far-reading", "insightface"]) == 0
    out = capsys.readouterr().out
    assert "| run/ijbc | 1.17* " in out and "*: not measurable (run/ijbc, IJBC: 12,000" in out


def test_files_sizes_and_missing_average(tmp_path):
    ver = _write(tmp_path / "x" / "ver.json", _ver({"lfw": 0.9}))
    mf = _write(tmp_path / "y" / "mf.json", _megaface(0.5, 0.25, size=1000))
    rows = _rows(combine([ver, mf]))
    assert rows[0] == ["run", "lfw (%)", "MegaFace Id @1K (%)", "MegaFace Ver @1K (%)"]
    assert rows[2] == ["x/ver", "90.00", "-", "-"] and rows[3] == ["y/mf", "-", "50.00", "25.00"]
    assert metrics_of({"kind": "other", "results": {}}) is None


def test_errors_and_cli(tmp_path, capsys):
    run = tmp_path / "run"
    _write(run / "a.json", _ver({"lfw": 0.9}))
    _write(run / "b.json", _ver({"lfw": 0.8}))
    with pytest.raises(ValueError, match="'lfw \\(%\\)' of run is in both"):
        combine([run])
    junk = _write(tmp_path / "junk.json", {"hello": 1})
    with pytest.raises(ValueError, match=r"junk\.json: not an evaluation result"):
        combine([junk])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no evaluation JSON inside"):
        combine([tmp_path / "empty"])
    with pytest.raises(ValueError, match="megaface results lack"):
        combine([_write(tmp_path / "bad" / "m.json", {"kind": "megaface", "results": {}})])

    out = tmp_path / "table.md"
    assert main(["report", str(run / "a.json"), "--out", str(out)]) == 0
    assert "| run/a |" in capsys.readouterr().out
    assert out.read_text().startswith("| run ")
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_eval_directories_are_named_after_their_run(tmp_path):
    from robustface.evaluate.compare import combine

    for run, acc in (("arcface", 0.91), ("stable", 0.95)):
        (tmp_path / run / "eval").mkdir(parents=True)
        doc = {"lfw": {"accuracy_mean": acc, "accuracy_std": 0.01}}
        (tmp_path / run / "eval" / "verification.json").write_text(json.dumps(doc))
    table = combine([tmp_path / "arcface" / "eval", tmp_path / "stable"])  # eval/ dir or the run
    rows = [line for line in table.splitlines() if line.startswith("| arcface") or
            line.startswith("| stable")]  # fmt: skip
    assert len(rows) == 2 and "91.00" in rows[0] and "95.00" in rows[1]


def test_fingerprint_hashes_once_and_follows_changes(tmp_path, monkeypatch):
    import hashlib
    import os

    from robustface.evaluate import report

    path = tmp_path / "m.pth"
    path.write_bytes(b"weights one")
    first = report.model_fingerprint(path)["sha256"]
    assert first == hashlib.sha256(b"weights one").hexdigest()
    opened = []
    real_open = open

    def counting_open(file, *args, **kwargs):
        opened.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
    assert report.model_fingerprint(path)["sha256"] == first and opened == []  # not read again
    path.write_bytes(b"weights two")
    os.utime(path, ns=(1, 1))  # another modification time: hashed again
    assert report.model_fingerprint(path)["sha256"] == hashlib.sha256(b"weights two").hexdigest()


def test_cli_refusal_lists_accepted_inputs(tmp_path, capsys):
    """A file or directory `report` cannot read names the inputs it takes, not a Python module."""
    junk = _write(tmp_path / "junk.json", {"hello": 1})
    (tmp_path / "empty").mkdir()
    for arg in (junk, tmp_path / "empty"):
        assert main(["report", str(arg)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1
        assert "robustface.evaluate" not in err
        for name in ("eval verification --out", "train_results.json", "megaface.json", "eval ijb"):
            assert name in err
