"""The command line: synth, demo, convert, inspect, and its error reporting."""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from robustface import cli
from robustface.cli import build_parser, main
from robustface.data.image import encode_image
from robustface.data.recordio import RecordIODataset
from robustface.errors import DataFormatError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "smoke.yaml"
SMALL = [
    "--identities", "4", "--images-per-identity", "3", "--open-set-identities", "2",
    "--test-identities", "20", "--lfw-pairs", "20", "--cfp-fp-pairs", "20", "--lowq-pairs", "20",
    "--ijb-identities", "2", "--workers", "1", "--quiet", "--set", "data.batch_size=4",
]  # fmt: skip


def test_synth_flags_override_config(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["synth", "--config", str(TINY), "--out", str(out), *SMALL]) == 0
    summary = json.loads((out / "synthface.json").read_text())
    assert summary["config"]["identities"] == 4
    assert summary["config"]["images_per_identity"] == 3
    assert summary["config"]["open_set_images_per_identity"] == 4  # from the YAML file
    assert "images/s" in capsys.readouterr().out
    assert len(RecordIODataset(out)) == 12


def test_synth_errors_are_reported_not_raised(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["synth", "--out", str(out), "--set", "synth.identites=3", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'synth.identites'" in err and "did you mean" in err
    assert not out.exists()


@pytest.mark.parametrize("bug", [TypeError("bad call"), KeyError("k"), AttributeError("no x")])
def test_a_bug_inside_a_command_keeps_its_traceback(monkeypatch, bug):
    def broken(args: argparse.Namespace) -> int:
        raise bug

    monkeypatch.setattr(cli, "_cmd_report", broken)
    with pytest.raises(type(bug)) as raised:
        main(["report", "run"])
    assert raised.value is bug


def test_a_user_error_inside_a_command_is_one_line(monkeypatch, capsys):
    def bad_file(args: argparse.Namespace) -> int:
        raise DataFormatError("x.rec", "bad magic 0x00000000", key=3)

    monkeypatch.setattr(cli, "_cmd_report", bad_file)
    assert main(["report", "run"]) == 2
    err = capsys.readouterr().err
    assert err == "robustface report: error: x.rec [record 3]: bad magic 0x00000000\n"
    # an unknown registry name (a KeyError) is a user error too, printed unquoted
    assert main(["eval", "ijb", "run", "--data", "d", "--aggregation", "max"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("robustface eval: error: unknown template aggregator 'max'")
    assert err.count("\n") == 1
    # a parameter of the wrong type is the user's error (though still a TypeError): one line
    from robustface.utils.guards import check_real

    def bad_param(args: argparse.Namespace) -> int:
        check_real("margin", "abc")
        return 0

    monkeypatch.setattr(cli, "_cmd_report", bad_param)
    assert main(["report", "run"]) == 2
    err = capsys.readouterr().err
    assert err == "robustface report: error: margin must be a number, got str 'abc'\n"
    with pytest.raises(TypeError):
        check_real("margin", "abc")


@pytest.mark.slow
def test_demo_writes_run_directory_and_reuses_data(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["demo", "--config", str(TINY), "--out", str(run), "--noise", "C34O34", *SMALL,
            "--set", "train.probe_every=2", "--set", "train.probe_samples=12"]  # fmt: skip
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "SynthFace in" in first and "| train (.rec)" in first and "| lfw" in first
    assert "## Headline: C34O34 label noise" in first
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["output_dir"] == str(run) and cfg["synth"]["identities"] == 4
    meta = json.loads((run / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["robustface"]
    results = json.loads((run / "results.json").read_text())
    assert results["synthface"]["train"]["samples"] == 12
    # 3 images per class: floor(3 * 0.34) = 1 closed-set and 1 open-set sample in each of 4
    assert results["noise"] == {"clean": 4, "closed": 4, "open": 4}
    assert set(results["runs"]) == {"arcface", "robustface_stable", "arcface_clean",
                                    "arcface_cleaned"}  # fmt: skip
    with np.load(run / "cleaning" / "data" / "noise.npz") as left:  # the noise cleaning left
        left_kinds = np.unique(left["kind"]).tolist()
    for name, got in results["runs"].items():
        assert set(got["verification"]) == {"lfw", "cfp_fp", "lowq"}
        assert (run / name / "backbone.pth").is_file()
        with np.load(run / name / "analysis" / "angles.npz") as probe:
            # no noise but low quality; what the cleaning left; all three kinds
            kinds = {"arcface_clean": [0, 3], "arcface_cleaned": left_kinds}.get(name, [0, 1, 2])
            assert sorted(np.unique(probe["groups"]).tolist()) == kinds
    # the clean-label ceiling trains on the clean set; gap closed as robustface experiment's
    clean_cfg = yaml.safe_load((run / "arcface_clean" / "config.yaml").read_text())
    assert clean_cfg["data"]["path"] == str(run / "synthface")
    avg = {name: np.mean([v["accuracy_mean"] for v in got["verification"].values()])
           for name, got in results["runs"].items()}  # fmt: skip
    expected = (avg["robustface_stable"] - avg["arcface"]) / (avg["arcface_clean"] - avg["arcface"])
    closed = results["headline"]["gap_closed"]
    if avg["arcface_clean"] > avg["arcface"]:
        assert closed["robustface_stable"] == pytest.approx(expected)
        assert f"| {100 * expected:.0f}%" in first
    else:
        assert np.isnan(closed["robustface_stable"]) and "| n/a" in first
    assert closed["arcface"] in (0.0,) or np.isnan(closed["arcface"])
    assert "| arcface_clean     | clean (ceiling)" in first
    _check_cleaning_round(run, results, first, avg)
    assert results["seconds"]["wall"] > 0 and results["seconds"]["cpu"] > 0
    metrics = (run / "robustface_stable" / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in metrics]
    assert any("head_last_noise" in row for row in logged)  # the head's counters are logged
    assert (run / "demo.png").stat().st_size > 10_000
    assert (run / "synthface" / "preview.png").stat().st_size > 1000
    for name in results["runs"]:  # the final printout names the plots each run has
        assert f"{run / name} (analysis/angles.png, training.png)\n" in first
    assert main([*args, "--set", "train.probe_every=0", "--no-clean"]) == 0
    again = capsys.readouterr().out
    assert "reusing the existing set" in again
    for name in ("arcface", "robustface_stable", "arcface_clean"):  # no probe: no angles plot
        assert not (run / name / "analysis").exists()
        assert f"{run / name} (training.png)\n" in again
    # no cleaning round: none reported, and the first run's round and retraining are gone
    assert "cleaning" not in json.loads((run / "results.json").read_text())
    assert "arcface_cleaned" not in again and "cleaning round" not in again
    assert not (run / "cleaning").exists() and not (run / "arcface_cleaned").exists()


def _check_cleaning_round(run: Path, results: dict, printed: str, avg: dict) -> None:
    """The demo's cleaning round: robustface_stable's flags removed from the noisy set, ArcFace
    retrained on what is left; precision / recall counted here from the flags and the noise list."""
    from robustface.clean.evaluate import format_ratio

    def ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    with open(run / "cleaning" / "score" / "flags.csv", newline="") as fh:
        flag = np.array([row["flag"] for row in csv.DictReader(fh)])
    with np.load(run / "synthface_C34O34" / "noise.npz") as noise:
        kind = noise["kind"]  # 0 clean, 1 closed-set, 2 open-set
    removed = ~np.isin(flag, ["clean", "hard"])
    got = results["cleaning"]["evaluation"]

    def precision_recall(is_kind: np.ndarray, flagged: np.ndarray) -> tuple[float, float]:
        hit = int(np.sum(is_kind & flagged))
        return ratio(hit, int(flagged.sum())), ratio(hit, int(is_kind.sum()))

    want = {
        "closed": precision_recall(kind == 1, flag == "mislabeled"),
        "open": precision_recall(kind == 2, flag == "open_set"),
        "removal": precision_recall(kind > 0, removed),
    }
    for name, (precision, recall) in want.items():
        np.testing.assert_equal((got[name]["precision"], got[name]["recall"]), (precision, recall))
    kept = ratio(np.sum(~removed & (kind == 0)), np.sum(kind == 0))
    np.testing.assert_equal(got["clean"]["kept"], kept)
    line = (f"removal precision {format_ratio(want['removal'][0])}, recall "
            f"{format_ratio(want['removal'][1])}; clean samples kept: {format_ratio(kept)} of "
            f"{np.sum(kind == 0)}")  # fmt: skip
    assert line in printed and "## One cleaning round (robustface_stable's flags)" in printed
    # the cleaned set holds what was kept; ArcFace retrained on it, with its gap closed
    assert results["cleaning"]["samples"] == len(RecordIODataset(run / "cleaning" / "data"))
    assert results["cleaning"]["samples"] == int(np.sum(~removed))
    cfg = yaml.safe_load((run / "arcface_cleaned" / "config.yaml").read_text())
    assert (
        cfg["data"]["path"] == str(run / "cleaning" / "data") and cfg["head"]["name"] == "arcface"
    )
    assert "| arcface_cleaned   | C34O34, cleaned" in printed
    closed = results["headline"]["gap_closed"]["arcface_cleaned"]
    if avg["arcface_clean"] > avg["arcface"]:
        gap = (avg["arcface_cleaned"] - avg["arcface"]) / (avg["arcface_clean"] - avg["arcface"])
        assert closed == pytest.approx(gap)
    else:
        assert np.isnan(closed)


def test_demo_printout_lists_only_the_plots_a_run_has(tmp_path):
    from robustface.demo import run_plots

    assert run_plots(tmp_path) == ""
    (tmp_path / "training.png").write_bytes(b"png")
    assert run_plots(tmp_path) == " (training.png)"
    (tmp_path / "analysis").mkdir()
    (tmp_path / "analysis" / "angles.png").write_bytes(b"png")
    assert run_plots(tmp_path) == " (analysis/angles.png, training.png)"


def test_smoke_config_gets_the_demo_noise_at_its_rates():
    """No 'n% noise instead of m%' warning in the smoke demo: every class is big enough for
    floor(n_c * rate) to give the exact MS1MCON-0.20 rates (15% closed, 5% open)."""
    from robustface.data.noise import parse_noise_setting, plan_label_noise

    synth = yaml.safe_load(TINY.read_text())["synth"]
    labels = np.repeat(np.arange(synth["identities"]), synth["images_per_identity"])
    closed, open_ = parse_noise_setting("MS1MCON-0.20")
    counts = plan_label_noise(labels, closed, open_, open_pool=100, seed=0).counts()
    assert counts["closed"] == round(0.15 * labels.size) and counts["open"] == 0.05 * labels.size


def test_convert_and_inspect(tmp_path, capsys):
    src = tmp_path / "faces"
    rng = np.random.default_rng(0)
    for person, n in (("alice", 2), ("bob", 3)):
        (src / person).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)
            (src / person / f"{i}.png").write_bytes(encode_image(img, fmt="png"))
    out = tmp_path / "rec"
    assert main(["convert", str(src), str(out), "--quiet"]) == 0
    ds = RecordIODataset(out)
    assert ds.labels.tolist() == [0, 0, 1, 1, 1]
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| samples" in text and "| 5" in text.split("| samples")[1].splitlines()[0]
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_console_script_help_runs():
    result = subprocess.run(
        [sys.executable, "-m", "robustface.cli", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    for command in ("demo", "synth", "convert", "inspect"):
        assert command in result.stdout


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every (command path, subparser, action) of the parser tree, help and version excluded."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))
        elif not isinstance(action, argparse._HelpAction | argparse._VersionAction):
            yield path, parser, action


def test_help_lists_the_commands_and_every_option_is_described():
    top = build_parser()
    commands = {path[0] for path, _, _ in _walk(top) if path}
    assert {"demo", "synth", "eval", "inspect", "cluster", "fuse"} <= commands
    undocumented, no_default, repeated = [], [], []
    for path, parser, action in _walk(top):
        name = " ".join([*path, action.option_strings[0] if action.option_strings else action.dest])
        if not action.help:
            undocumented.append(name)
        default = action.default
        if not (default is None or default is False or default in ([], argparse.SUPPRESS)):
            text = parser._get_formatter()._expand_help(action)  # as --help prints it
            if "default" not in text:
                no_default.append(name)
            if f"({default}) (default: {default})" in text:
                repeated.append(name)
    assert not undocumented, undocumented
    assert not no_default, no_default
    assert not repeated, repeated


def test_train_then_eval_verification(synth_train_dir, tmp_path, capsys):
    run = tmp_path / "run"
    config = tmp_path / "train.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(run),
                "data": {"source": "rec", "path": str(synth_train_dir), "batch_size": 8,
                         "num_workers": 0, "val_targets": ["lfw"]},
                "model": {"backbone": "r18_tiny", "input_size": 32, "width": 0.125,
                          "embedding_size": 16},
                "fc": {"name": "full"},
                "train": {"epochs": 1, "progress": False, "tensorboard": False},
            }
        )
    )  # fmt: skip
    assert main(["train", str(config), "--set", "train.max_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "3 steps" in out and "| lfw" in out
    report = tmp_path / "eval.json"
    # --targets are found where training found them (the run's data.path), without --data-dir
    args = ["eval", "verification", str(run), "--targets", "lfw", "cfp_fp"]
    assert main([*args, "--out", str(report)]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "| lfw" in text and "| cfp_fp" in text
    assert "embedding" in captured.err  # a progress bar per set, unless --quiet
    # the run's best backbone is evaluated (not its last), and the output says so
    best = run / "best_backbone.pth"
    assert best.is_file() and (run / "backbone.pth").is_file()
    assert f"weights: {best}\n" in text
    results = json.loads(report.read_text())
    assert {r["weights"] for r in results.values()} == {str(best.resolve())}
    train_acc = json.loads((run / "train_results.json").read_text())["verification"]["lfw"]
    assert results["lfw"]["accuracy_mean"] == train_acc["accuracy_mean"]
    # the small set's training splits hold too few impostor pairs to measure VAL@FAR=1e-3
    lfw = results["lfw"]
    assert lfw["val_impostor_pairs"] < 1000 and lfw["min_measurable_far"] > 1e-3
    assert lfw["val"] is None and lfw["val_insightface"] == train_acc["val_insightface"]
    assert "n/m: not measurable (the VAL threshold is chosen on" in text
    # neither --bins nor --targets: a run directory's own data.val_targets, said on stderr
    assert main(["eval", "verification", str(run), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "sets: the run's data.val_targets lfw\n"
    assert "| lfw" in captured.out and "cfp_fp" not in captured.out
    # a missing set names every directory searched
    assert main(["eval", "verification", str(run), "--targets", "agedb_30"]) == 2
    err = capsys.readouterr().err
    assert f"agedb_30.bin: verification set not found in {synth_train_dir} (the run's" in err
    assert ". (the current directory)" in err and "set --data-dir" in err
    assert main([*args[:3], "--targets", "lfw", "--data-dir", str(tmp_path)]) == 2
    assert f"not found in {tmp_path} (--data-dir)" in capsys.readouterr().err
    # a bare state_dict: the architecture is read from the weights, except the input size that
    # r18_tiny's 56 px default does not fit (32 px -> a 2x2 final map)
    bare = ["eval", "verification", str(run / "backbone.pth"), "--data-dir", str(synth_train_dir)]
    assert main([*bare, "--targets", "lfw"]) == 2
    err = capsys.readouterr().err
    assert "2x2 final feature map (input size 17 to 32)" in err and "set --input-size" in err
    assert len(err.strip().splitlines()) == 1
    assert main([*bare, "--targets", "lfw", "--input-size", "32", "--out", str(report)]) == 0
    assert json.loads(report.read_text())["lfw"]["accuracy_mean"] == train_acc["accuracy_mean"]
    assert f"weights: {run / 'backbone.pth'}\n" in capsys.readouterr().out
    assert json.loads(report.read_text())["lfw"]["weights"] == str((run / "backbone.pth").resolve())
    assert main([*bare, "--targets", "lfw", "--input-size", "32", "--quiet"]) == 0
    assert capsys.readouterr().err == ""  # no progress bars
    assert main([*bare, "--targets", "lfw", "--input-size", "32", "--width", "0.25"]) == 2
    assert "--width 0.25 does not fit its weights (--width 0.125)" in capsys.readouterr().err


def test_demo_checks_its_options_before_any_work(tmp_path, capsys):
    run = tmp_path / "run"
    base = ["demo", "--config", str(TINY), "--out", str(run), *SMALL]
    assert main([*base, "--noise", "C150"]) == 2
    assert main([*base, "--robust-head", "arcface"]) == 2  # the config's own head
    assert main([*base, "--robust-head", "robustfase"]) == 2
    err = capsys.readouterr().err
    assert "C150" in err and "nothing to compare" in err and "robustface" in err
    assert not run.exists()


def test_a_bad_device_is_a_one_line_error(tmp_path, capsys):
    assert main(["clean", "score", str(tmp_path / "run"), "--out", str(tmp_path / "o"),
                 "--device", "bogus"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "--device 'bogus': not a torch device" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("devices", "device", "message"),
    [
        (0, "cuda", "--device 'cuda': CUDA is not available (use --device cpu)"),
        (1, "cuda:3", "--device 'cuda:3': only 1 CUDA device(s), cuda:0 to cuda:0"),
    ],
)
def test_a_cuda_device_that_is_not_there_is_a_one_line_error(
    tmp_path, capsys, monkeypatch, devices, device, message
):
    """Not torch's AssertionError ("Torch not compiled with CUDA enabled") from deep inside."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: devices > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
    args = ["eval", "verification", str(tmp_path / "run"), "--targets", "lfw", "--device", device]
    assert main(args) == 2
    assert capsys.readouterr().err == f"robustface eval: error: {message}\n"


def test_ctrl_c_is_one_line_with_how_to_resume(monkeypatch, capsys):
    """Ctrl-C in a command prints one line (no traceback), exit status 130 as a shell gives;
    train's line says how to continue the run."""

    def interrupted(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_report", interrupted)
    assert main(["report", "run"]) == 130
    assert capsys.readouterr().err == "robustface report: interrupted\n"
    monkeypatch.setattr(cli, "_cmd_train", interrupted)
    assert main(["train", "cfg.yaml"]) == 130
    err = capsys.readouterr().err
    assert err == "robustface train: interrupted; continue the run with --set train.resume=auto\n"


def test_train_help_says_what_the_data_needs(capsys):
    """``train --help`` names the data sources with the keys each one needs, and resumption."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needed in ("data.source=rec", "data.source=folder", "data.val_dir", "train.resume=auto"):
        assert needed in text


def test_a_file_where_a_directory_goes_is_one_line(tmp_path, capsys):
    """``clean dirty FILE`` (its OUT/synthface cannot be made under a file): the OS error is the
    user's, one line naming the path, no traceback."""
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    assert main(["clean", "dirty", str(out), "--identities", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("robustface clean: error: ") and "Not a directory" in err
    assert str(out) in err and err.count("\n") == 1 and out.read_text() == "mine"


def test_a_missing_file_opened_by_a_command_is_named_as_path_colon_reason(tmp_path, capsys):
    """An ``OSError`` raised by ``open`` (``eval megaface --probe-list`` missing) reads
    ``PATH: reason``, not Python's ``[Errno 2] No such file or directory: 'PATH'``."""
    import torch

    from robustface.models import build_backbone

    model = tmp_path / "backbone.pth"
    torch.save(build_backbone("r18_tiny", embedding_size=8).state_dict(), model)
    missing = tmp_path / "facescrub_features_list.json"
    args = ["eval", "megaface", str(model), "--probe-list", str(missing)]
    assert main([*args, "--probe-images", str(tmp_path), "--distractor-features", "x"]) == 2
    assert capsys.readouterr().err == (
        f"robustface eval: error: {missing}: No such file or directory\n"
    )
