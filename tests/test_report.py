"""``robustface report``: one comparison table from verification, IJB and MegaFace JSON files."""

from __future__ import annotations

import json

import pytest

from robustface.cli import main
from robustface.evaluate.compare import combine, metrics_of


def _ver(acc: dict[str, float]) -> dict[str, dict[str, float]]:
    return {name: {"accuracy_mean": a, "accuracy_std": 0.01, "val": 0.5} for name, a in acc.items()}


def _megaface(rank1: float, tar: float, size: int = 1_000_000) -> dict:
    sizes = {
        "10": {"rank1": 0.999, "tar": 0.999, "cmc": [0.999]},
        str(size): {"rank1": rank1, "tar": tar, "cmc": [rank1]},
    }
    return {"kind": "megaface", "results": {"far_target": 1e-6, "sizes": sizes}, "model": None}


def _ijbc(tars: dict[str, float]) -> dict:
    return {"kind": "ijbc", "results": {"verification": {"tar_at_far": tars}}, "config": {}}


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
        "G1": {"rank": {"1": 0.9, "5": 0.95}, "tpir_at_fpir": {"0.01": 0.7, "0.1": 0.8}},
        "G2": {"rank": {"1": 0.8, "5": 0.9}, "tpir_at_fpir": {"0.01": 0.5, "0.1": None}},
    }
    rows = _rows(combine([_write(tmp_path / "run" / "ijbc.json", doc)]))
    assert rows[0] == [
        "run",
        "IJBC TAR@FAR=0.0001 (%)",
        "IJBC rank-1 (%)",
        "IJBC TPIR@FPIR=0.01 (%)",
    ]  # FPIR 0.1 is undefined for G2, so no mean is shown
    assert rows[2] == ["run/ijbc", "95.00", "85.00", "60.00"]


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
