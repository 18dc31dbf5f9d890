"""Config loading: YAML, dotted overrides, every error reported at once with key and source."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from robustface.config import Config, SynthConfig, load_config, parse_override, save_config
from robustface.errors import ConfigError
from robustface.train.experiment import ExperimentConfig, cell_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides():
    cfg = load_config(None, ["synth.identities=7", "seed=3", "synth.difficulty=0.5"])
    assert cfg.seed == 3
    assert cfg.synth.identities == 7
    assert cfg.synth.difficulty == 0.5
    assert cfg.synth.images_per_identity == SynthConfig().images_per_identity


def test_yaml_then_override_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 5\nsynth:\n  identities: 50\n  difficulty: 2\n")
    cfg = load_config(path, ["synth.identities=60"])
    assert (cfg.seed, cfg.synth.identities) == (5, 60)
    assert isinstance(cfg.synth.difficulty, float) and cfg.synth.difficulty == 2.0


def test_unknown_key_in_file_names_key_file_and_suggestion(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("synth:\n  identites: 50\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "synth.identites" in msg
    assert "did you mean 'synth.identities'" in msg


def test_all_errors_reported_at_once(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("seed: abc\nsynth:\n  sibling_rate: 2.0\n  image_folder: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["synth.nope=1", "synth.lfw_pairs=[1]"])
    lines = str(err.value).splitlines()[1:]
    joined = "\n".join(lines)
    assert len(lines) == 5, joined
    assert "seed: expected int, got 'abc'" in joined
    assert "synth.image_folder: expected bool, got 1" in joined
    assert "--set synth.nope=1: unknown key 'synth.nope'" in joined
    assert "synth.lfw_pairs: expected int" in joined
    assert "synth.sibling_rate: must be in [0, 1], got 2.0" in joined


def test_bool_is_not_an_int_and_int_is_a_float():
    with pytest.raises(ConfigError, match=r"synth\.identities: expected int, got True"):
        load_config(None, ["synth.identities=true"])
    assert load_config(None, ["synth.sibling_rate=0"]).synth.sibling_rate == 0.0


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("synth.identities")
    with pytest.raises(ConfigError, match="empty key segment"):
        parse_override("synth..identities=3")
    with pytest.raises(ConfigError, match="'seed' is not a section"):
        load_config(None, ["seed.x=1"])
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("synth: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(top)


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(None, ["synth.identities=11", "output_dir=x/y", "synth.image_folder=true"])
    save_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["synth"]["identities"] == 11
    again = load_config(tmp_path / "config.yaml")
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


SHIPPED = [*sorted((REPO / "configs").glob("*.yaml")), REPO / "src/robustface/recipes/demo.yaml"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
@pytest.mark.filterwarnings("error::FutureWarning")  # no deprecated keys in what we ship
def test_shipped_configs_load(path):
    if path.name.startswith("experiment"):
        exp = load_config(path, cls=ExperimentConfig)
        for method in exp.methods:  # every method's overrides apply to the base cleanly
            cell = cell_config(exp, method, exp.noise[-1], exp.seeds[0], Path("data"))
            assert cell.seed == exp.seeds[0] and cell.data.path == "data"
    elif path.name.startswith("invert"):
        from robustface.invert import InvertConfig

        assert isinstance(load_config(path, cls=InvertConfig), InvertConfig)
    elif path.name.startswith("clean"):
        from robustface.clean.loop import CleanConfig

        assert load_config(path, cls=CleanConfig).base.head.name == "robustface_stable"
    else:
        assert isinstance(load_config(path), Config)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{path.name}: first line must be a comment with its command"
    assert "robustface" in path.read_text().split("\n\n")[0], (
        f"{path.name}: header names no command"
    )


def test_mapping_entries_and_more_checks():
    cfg = load_config(None, ["head.params={scale: 32.0}", "head.params.margin=0.3"])
    assert cfg.head.params == {"scale": 32.0, "margin": 0.3}
    assert load_config(None, ["head.params.easy_margin=true"]).head.params == {"easy_margin": True}
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optim.power=-1", "seed=-2", "data.source=folder", "data.path=x"])
    msg = str(err.value)
    assert "optim.power: must be >= 0" in msg and "seed: must be >= 0" in msg
    assert "data.val_dir: needed" in msg


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    import os

    from robustface.utils.io import write_text_atomic

    write_text_atomic(tmp_path / "x.txt", "hi")
    mask = os.umask(0o022)
    os.umask(mask)
    assert (tmp_path / "x.txt").stat().st_mode & 0o777 == 0o666 & ~mask


def test_components_checked_against_their_registries_all_at_once():
    """Names and params of every component are checked inside load_config, with the other
    problems, each naming its key."""
    with pytest.raises(ConfigError) as err:
        load_config(None, ["fc.name=partail_fc", "model.backbone=r18_tinny", "data.source=recc",
                           "data.path=x", "head.params.margn=0.3", "seed=-1"])  # fmt: skip
    lines = str(err.value).splitlines()[1:]
    joined = "\n".join(lines)
    assert len(lines) == 5, joined
    assert "fc.name: unknown classifier 'partail_fc' (did you mean 'partial_fc'?)" in joined
    assert "model.backbone: unknown backbone 'r18_tinny' (did you mean 'r18_tiny'?)" in joined
    assert "data.source: unknown data source 'recc' (did you mean 'rec'?)" in joined
    assert "head.params: head 'arcface': got an unexpected keyword argument 'margn'" in joined
    assert "seed: must be >= 0" in joined
    with pytest.raises(ConfigError) as err:
        load_config(None, ["head.name=arcfase", "fc.name=full", "fc.params.sample_rate=0.5"])
    msg = str(err.value)
    assert "head.name: unknown head 'arcfase'" in msg
    assert "fc.params: classifier 'full': got an unexpected keyword argument 'sample_rate'" in msg
    # the model section is checked against its backbone's constructor (on the meta device)
    with pytest.raises(ConfigError, match=r"model: .*unexpected keyword argument 'dropout'"):
        load_config(None, ["model.backbone=mbf", "model.dropout=0.3"])
    assert load_config(None, ["model.backbone=ir_50", "model.dropout=0.3"]).model.dropout == 0.3


def test_classifier_params_values_and_trainer_supplied_keys():
    cfg = load_config(None, ["fc.name=subcenter", "fc.params.k=2"])
    assert cfg.fc.params == {"k": 2}
    with pytest.raises(ConfigError) as err:
        load_config(None, ["fc.params.sample_rate=1.5", "fc.params.num_classes=3"])
    msg = str(err.value)
    assert "fc.params: sample_rate must be in (0, 1], got 1.5" in msg
    assert "fc.params.num_classes: set by the trainer" in msg
    with pytest.raises(ConfigError, match=r"head\.params\.num_classes: set by the trainer"):
        load_config(None, ["head.name=centerbiasface", "head.params.num_classes=3"])
    with pytest.raises(ConfigError, match=r"use fc\.name full or partial_fc, not subcenter"):
        load_config(None, ["head.name=centerbiasface", "fc.name=subcenter"])


def test_deprecated_classifier_aliases():
    """fc.sample_rate / fc.k still read (into params, with a deprecation note) for a classifier
    that takes them, are an error for one that does not, and their old defaults (which older
    versions wrote for every classifier) are dropped."""
    from robustface.train.components import classifier_kwargs

    with pytest.warns(FutureWarning, match=r"fc\.sample_rate is deprecated.*fc\.params\.sample"):
        cfg = load_config(None, ["fc.name=partial_fc", "fc.sample_rate=0.5"])
    assert classifier_kwargs(cfg) == ({"sample_rate": 0.5}, [])
    with pytest.warns(FutureWarning, match=r"fc\.k is deprecated"):
        cfg = load_config(None, ["fc.name=subcenter", "fc.k=2"])
    assert classifier_kwargs(cfg)[0] == {"k": 2}
    with pytest.raises(ConfigError) as err:
        load_config(None, ["fc.name=full", "fc.sample_rate=0.5", "fc.k=2"])
    msg = str(err.value)
    assert "fc.sample_rate: classifier 'full' has no parameter 'sample_rate'" in msg
    assert "fc.k: classifier 'full' has no parameter 'k'" in msg
    with pytest.raises(ConfigError, match=r"fc\.k: given twice, here and as params\.k"):
        load_config(None, ["fc.name=subcenter", "fc.k=2", "fc.params.k=4"])
    # a run directory's config.yaml written before fc.params existed
    old = load_config(None, ["fc.name=full", "fc.sample_rate=1.0", "fc.k=3"])
    assert classifier_kwargs(old) == ({}, [])


def test_string_params_reach_the_head_and_are_checked_there():
    """head.params may hold strings (BoundaryFace's formula); the head's constructor checks them."""
    cfg = load_config(None, ["head.name=boundaryface", "head.params.formula=paper"])
    assert cfg.head.params == {"formula": "paper"}
    with pytest.raises(ConfigError, match=r"head\.params: .*formula"):
        load_config(None, ["head.name=boundaryface", "head.params.formula=papr"])


def test_verification_dir_comes_from_the_data_source(tmp_path):
    def where(*overrides):
        return load_config(None, list(overrides)).data.verification_dir(tmp_path)

    assert where("data.source=synthface") == tmp_path / "synthface"
    assert where("data.source=synthface", "data.path=/s") == Path("/s")
    assert where("data.source=rec", "data.path=/d/train.rec") == Path("/d")
    assert where("data.source=rec", "data.path=/d") == Path("/d")
    assert where("data.source=folder", "data.path=/f", "data.val_targets=[]") is None
    assert where("data.source=folder", "data.path=/f", "data.val_dir=/v") == Path("/v")


def test_config_changes_reads_keys_added_since_the_run_as_their_defaults():
    from robustface.config import config_changes, to_dict

    cfg = load_config(overrides=["train.max_steps=3"])
    saved = to_dict(cfg)
    del saved["data"]["batch_noise_closed"]  # a run from before the key existed: its default
    assert config_changes(saved, cfg) == []
    saved["train"]["max_steps"] = 2
    assert config_changes(saved, cfg) == ["train.max_steps: run 2, now 3"]
    saved["data"]["removed_since"] = 1  # does not read as a Config: compared as it is
    assert config_changes(saved, cfg) == [
        "data.batch_noise_closed: run None, now 0.0",
        "data.removed_since: run 1, now None",
        "train.max_steps: run 2, now 3",
    ]


def test_a_fresh_start_over_the_same_runs_checkpoints_is_this_run_however_the_dir_is_spelt(
    tmp_path, monkeypatch
):
    from robustface.train.checkpoint import refuse_fresh_start

    monkeypatch.chdir(tmp_path)
    cfg = load_config(overrides=["output_dir=runs/a"])
    save_config(cfg, Path("runs/a/config.yaml"))
    (tmp_path / "runs/a/checkpoints/step_00000002").mkdir(parents=True)
    (tmp_path / "runs/a/checkpoints/step_00000002/main.pt").write_bytes(b"")
    again = load_config(overrides=[f"output_dir={tmp_path / 'runs/a'}"])
    with pytest.raises(FileExistsError, match=r"of this run \(the same config\); set train"):
        refuse_fresh_start(again.output_dir, again)
