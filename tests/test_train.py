"""The training loop: schedule, sampler, exact resume, gradient accumulation, NaN stop, DDP."""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from loader_batches import flipped_planes
from robustface.config import save_config
from robustface.data import normalize_images
from robustface.data.loader import collate
from robustface.errors import ConfigError
from robustface.train import NonFiniteLossError, Trainer
from robustface.train import checkpoint as ckpt
from robustface.train.sampler import ResumableSampler
from robustface.train.schedule import warmup_poly
from robustface.train.trainer import _architecture_changes
from synth_configs import tiny_train_config


def _cfg(out: Path, data: Path, *extra: str):
    return tiny_train_config(
        out,
        data,
        "data.batch_size=8",
        "data.val_targets=[lfw]",
        "train.epochs=2",
        "train.log_every=1",
        *extra,
    )


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {f"backbone.{k}": v.clone() for k, v in trainer.backbone.state_dict().items()}
    out.update({f"fc.{k}": v.clone() for k, v in trainer.fc.state_dict().items()})
    return out


# ----------------------------------------------------------------------------------- schedule
def test_warmup_poly_matches_formula():
    f = warmup_poly(total_steps=10, warmup_steps=4, power=2.0)
    expected = [0.0, 0.25, 0.5, 0.75] + [(1 - (s - 4) / 6) ** 2 for s in range(4, 11)]
    np.testing.assert_allclose([f(s) for s in range(11)], expected)
    assert warmup_poly(5)(0) == 1.0 and warmup_poly(5)(5) == 0.0
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_poly(5, 6)


# ------------------------------------------------------------------------------------ sampler
def test_sampler_partitions_whole_global_batches():
    samplers = [ResumableSampler(103, 5, rank=r, world_size=3, seed=1) for r in range(3)]
    for s in samplers:
        s.set_epoch(2)
    seqs = [list(s) for s in samplers]
    assert all(len(q) == 30 for q in seqs)  # 6 global batches of 15
    flat = sorted(i for q in seqs for i in q)
    assert len(set(flat)) == 90 and flat[-1] < 103
    perm = torch.randperm(103, generator=torch.Generator().manual_seed(3)).tolist()
    assert seqs[1] == perm[1:90:3]


def test_sampler_resumes_mid_epoch_on_any_world_size():
    full = ResumableSampler(64, 4, rank=0, world_size=1, seed=7)
    full.set_epoch(1)
    order = list(full)
    two = [ResumableSampler(64, 2, rank=r, world_size=2, seed=7) for r in range(2)]
    for s in two:
        s.set_epoch(1, start=8)
    assert sorted(i for s in two for i in s) == sorted(order[8:])
    assert list(two[0]) == order[8::2] and list(two[1]) == order[9::2]
    with pytest.raises(ValueError, match="multiple of the global batch"):
        two[0].set_epoch(0, start=3)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableSampler(3, 2, world_size=2)


# ------------------------------------------------------------------------------- exact resume
@pytest.mark.slow
@pytest.mark.parametrize(
    "classifier",
    [
        "fc.name=full",
        "fc.name=partial_fc",
        "fc.name=partial_fc,fc.sample_rate=0.5",
        # a stateful head, per-batch label noise and angle probes resume exactly too
        "fc.name=full,head.name=robustface,data.batch_noise_closed=0.25,train.probe_every=3",
    ],
)
def test_resume_from_any_step_gives_identical_weights(synth_train_dir, tmp_path, classifier):
    # dropout and negative sampling draw from the torch RNG: resuming must restore those streams
    extra = [*classifier.split(","), "train.checkpoint_every=1", "train.keep_checkpoints=20"]
    extra += ["optim.warmup_epochs=0.5", "data.flip=true", "data.blur=0.5", "model.dropout=0.2"]
    straight = Trainer(_cfg(tmp_path / "a", synth_train_dir, *extra))
    result = straight.fit()
    assert result.steps == 16  # 2 epochs x 64 / 8
    expected = _weights(straight)
    # stop after step 5 (mid-epoch) and after step 8 (epoch end), resume each
    for step in (5, 8):
        source = ckpt.checkpoint_dir(tmp_path / "a" / "checkpoints", step)
        resumed = Trainer(
            _cfg(tmp_path / f"b{step}", synth_train_dir, *extra, f"train.resume={source}")
        )
        assert resumed.global_step == step
        resumed.fit()
        got = _weights(resumed)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(got[key], value), f"resumed at {step}: {key} differs"
        for key, value in straight.head.state_dict().items():
            assert torch.equal(resumed.head.state_dict()[key], value), f"head {key} differs"
        if "probe_every" in classifier:  # the probe's history continues across the resume
            want = json.loads((tmp_path / "a" / "analysis" / "summary.json").read_text())
            have = json.loads((tmp_path / f"b{step}" / "analysis" / "summary.json").read_text())
            assert [s["step"] for s in have["stages"]] == [3, 6, 9, 12, 15, 16]
            assert have == want


@pytest.mark.slow
def test_resume_auto_continues_an_interrupted_run(synth_train_dir, tmp_path):
    cfg = _cfg(tmp_path / "r", synth_train_dir, "train.max_steps=3", "data.val_targets=[]")
    Trainer(cfg).fit()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "r" / "checkpoints")] == [
        "step_00000003"
    ]
    cfg = _cfg(tmp_path / "r", synth_train_dir, "train.resume=auto", "data.val_targets=[]")
    trainer = Trainer(cfg)
    assert trainer.global_step == 3
    assert trainer.fit().steps == 16


# ---------------------------------------------------------------------- gradient accumulation
def test_gradient_accumulation_averages_micro_batches(synth_train_dir, tmp_path):
    cfg = _cfg(
        tmp_path / "g",
        synth_train_dir,
        "train.grad_accum=2",
        "train.grad_clip=0",
        "optim.momentum=0",
        "optim.weight_decay=0",
        "optim.power=0",
        "data.flip=false",
        "fc.name=full",
    )
    trainer = Trainer(cfg)
    reference = copy.deepcopy(trainer)
    before = _weights(trainer)
    batches = [trainer.trainset[i] for i in trainer.sampler]
    trainer._train_step(iter(trainer.loader))
    # by hand: mean of the two micro-batch losses, one SGD step of lr 0.05
    params = [*reference.backbone.parameters(), *reference.fc.parameters()]
    total = 0
    for m in range(2):
        images = torch.stack([b[0] for b in batches[8 * m : 8 * m + 8]])  # uint8, as sent
        images = normalize_images(images)  # as the trainer does on its device
        labels = torch.tensor([b[1] for b in batches[8 * m : 8 * m + 8]])
        total = total + reference._forward_loss(images, labels) / 2
    grads = torch.autograd.grad(total, [p for p in params if p.requires_grad], allow_unused=True)
    named = [
        *(f"backbone.{n}" for n, p in reference.backbone.named_parameters() if p.requires_grad),
        *(f"fc.{n}" for n, p in reference.fc.named_parameters() if p.requires_grad),
    ]
    after = _weights(trainer)
    for name, grad in zip(named, grads, strict=True):
        expected = before[name] - 0.05 * (grad if grad is not None else 0)
        torch.testing.assert_close(after[name], expected, rtol=1e-4, atol=1e-6, msg=name)


def test_the_step_trains_on_the_per_sample_images_flipped_on_the_device(synth_train_dir, tmp_path):
    # the loader sends the images before their flip; _train_step must flip exactly those drawn
    # (per-sample path: TrainSet[i], flip and blur drawn from rng([seed, epoch, i]))
    cfg = _cfg(tmp_path / "f", synth_train_dir, "data.flip=true", "data.blur=0.5",
               "train.grad_accum=2", "data.val_targets=[]")  # fmt: skip
    trainer = Trainer(cfg)
    seen = []
    forward = trainer._forward_loss
    trainer._forward_loss = lambda images, labels: seen.append(images) or forward(images, labels)
    trainer._train_step(iter(trainer.loader))
    order = list(trainer.sampler)
    flips = torch.cat([collate(trainer.trainset.__getitems__(order[k : k + 8]))[2] for k in (0, 8)])
    assert len(seen) == 2 and 0 < int(flips.sum()) < 16  # images flipped and not
    for m, images in enumerate(seen):
        stacked = torch.stack([trainer.trainset[i][0] for i in order[8 * m : 8 * m + 8]])
        assert torch.equal(images, normalize_images(stacked))


# -------------------------------------------------------------------------------- NaN handling
def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(synth_train_dir, tmp_path):
    cfg = _cfg(
        tmp_path / "n", synth_train_dir, "train.checkpoint_every=1", "train.keep_checkpoints=5"
    )
    trainer = Trainer(cfg)
    original = trainer._forward_loss
    calls = {"n": 0}

    def poisoned(images, labels):
        calls["n"] += 1
        loss = original(images, labels)
        return loss * float("nan") if calls["n"] == 3 else loss

    trainer._forward_loss = poisoned
    with pytest.raises(NonFiniteLossError, match="at step 3"):
        trainer.fit()
    kept = ckpt.list_checkpoints(tmp_path / "n" / "checkpoints")
    assert [p.name for p in kept] == ["step_00000001", "step_00000002"]
    resumed = Trainer(_cfg(tmp_path / "n2", synth_train_dir, f"train.resume={kept[-1]}"))
    assert resumed.global_step == 2


# ------------------------------------------------------------------------ evaluation and outputs
def test_outputs_and_verification_callback(synth_train_dir, tmp_path):
    cfg = _cfg(
        tmp_path / "o", synth_train_dir, "train.eval_every=8", "data.val_targets=[lfw, cfp_fp]"
    )
    result = Trainer(cfg).fit()
    out = tmp_path / "o"
    for name in ("config.yaml", "meta.json", "metrics.jsonl", "backbone.pth", "best_backbone.pth"):
        assert (out / name).is_file(), name
    assert set(result.verification) == {"lfw", "cfp_fp"}
    assert 0.0 <= result.verification["lfw"]["accuracy_mean"] <= 1.0
    rows = [line for line in (out / "metrics.jsonl").read_text().splitlines() if "val_mean" in line]
    assert len(rows) == 3  # steps 8, 16 and the final evaluation
    assert result.best["step"] in (8, 16)
    state = torch.load(out / "backbone.pth", weights_only=True)
    assert "fc.weight" in state and "features.running_mean" in state  # bare backbone state_dict


def test_final_evaluation_and_probe_report_progress(synth_train_dir, tmp_path, capsys):
    extra = ["train.max_steps=2", "train.progress=true", "data.val_targets=[lfw, cfp_fp]",
             "train.probe_every=5", "train.probe_samples=8"]  # fmt: skip
    cfg = _cfg(tmp_path / "p", synth_train_dir, *extra)
    Trainer(cfg).fit()
    err = capsys.readouterr().err
    order = [err.index(line) for line in ("verification 1/2: lfw, 80 images",
             "verification 2/2: cfp_fp, 40 images", "final angle probe (8 samples)",
             "saving the angle probe's arrays and plots")]  # fmt: skip
    assert order == sorted(order)
    assert "embedding" in err  # a bar per verification set
    timing = json.loads((tmp_path / "p" / "train_results.json").read_text())["timing"]
    assert timing["after_training_s"] <= timing["total_s"] and timing["evaluation_s"] > 0


def test_resume_auto_on_a_finished_run_says_it_is_complete(synth_train_dir, tmp_path, capsys):
    cfg = _cfg(tmp_path / "f", synth_train_dir, "train.max_steps=3", "data.val_targets=[lfw]")
    first = Trainer(cfg).fit()
    metrics = (tmp_path / "f" / "metrics.jsonl").read_text()
    capsys.readouterr()
    again = Trainer(_cfg(tmp_path / "f", synth_train_dir, "train.max_steps=3",
                         "data.val_targets=[lfw]", "train.resume=auto")).fit()  # fmt: skip
    assert "is already complete (step 3 of 3)" in capsys.readouterr().out
    last_loss = [json.loads(r)["loss"] for r in metrics.splitlines() if '"loss"' in r][-1]
    assert again.steps == 3 and again.loss == first.loss == last_loss  # not NaN
    assert again.verification["lfw"]["accuracy_mean"] == first.verification["lfw"]["accuracy_mean"]
    assert (tmp_path / "f" / "metrics.jsonl").read_text() == metrics  # nothing trained or evaluated


def test_resumed_final_step_keeps_its_loss(synth_train_dir, tmp_path):
    """A run stopped after its last checkpoint but before its results: the loss comes from the
    metrics, not NaN."""
    cfg = _cfg(tmp_path / "l", synth_train_dir, "train.max_steps=3", "data.val_targets=[]")
    first = Trainer(cfg).fit()
    (tmp_path / "l" / "train_results.json").unlink()
    again = Trainer(_cfg(tmp_path / "l", synth_train_dir, "train.max_steps=3",
                         "data.val_targets=[]", "train.resume=auto")).fit()  # fmt: skip
    assert again.steps == 3 and again.loss == first.loss


def test_same_config_and_seed_repeat_exactly_whatever_the_default_thread_count(
    synth_train_dir, tmp_path
):
    """CPU kernels split their sums by thread: ``train.threads`` fixes the count, so two processes
    whose PyTorch default differs (OMP_NUM_THREADS 1 and 2) end with identical weights."""
    results = []
    for threads in ("1", "2"):
        out = tmp_path / f"t{threads}"
        cfg = _cfg(out, synth_train_dir, "train.max_steps=6", "data.val_targets=[lfw]",
                   "train.threads=1", "data.flip=true")  # fmt: skip
        save_config(cfg, tmp_path / f"t{threads}.yaml")
        env = {
            **os.environ,
            "OMP_NUM_THREADS": threads,
            "PYTHONPATH": str(Path(__file__).parents[1] / "src"),
        }
        command = [
            sys.executable,
            "-m",
            "robustface.cli",
            "train",
            str(tmp_path / f"t{threads}.yaml"),
        ]
        subprocess.run(command, check=True, env=env, capture_output=True)
        saved = json.loads((out / "train_results.json").read_text())
        assert saved["timing"]["threads"] == 1
        results.append((saved, torch.load(out / "backbone.pth", weights_only=True)))
    (a, wa), (b, wb) = results
    assert a["loss"] == b["loss"] and a["verification"] == b["verification"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_refuses_to_mix_runs_in_one_output_dir(synth_train_dir, tmp_path):
    cfg = _cfg(tmp_path / "m", synth_train_dir, "train.max_steps=2", "data.val_targets=[]")
    Trainer(cfg).fit()
    # the same command again is this run, not "another run"; another config says what differs
    last = f"{tmp_path / 'm' / 'checkpoints'} already holds checkpoints (last step_00000002)"
    with pytest.raises(FileExistsError) as info:
        Trainer(cfg)
    assert str(info.value) == (
        f"{last} of this run (the same config); set train.resume=auto to continue it, or choose "
        "another output_dir"
    )
    other = _cfg(tmp_path / "m", synth_train_dir, "train.max_steps=3", "data.val_targets=[]")
    with pytest.raises(FileExistsError) as info:
        Trainer(other)
    assert str(info.value).startswith(
        f"{last} of a run with another config (train.max_steps: run 2, now 3); "
    )


@pytest.mark.slow
def test_metrics_after_the_checkpoint_are_dropped_on_resume(synth_train_dir, tmp_path):
    extra = ["train.checkpoint_every=2", "train.keep_checkpoints=20", "data.val_targets=[]"]
    Trainer(_cfg(tmp_path / "k", synth_train_dir, *extra)).fit()
    source = ckpt.checkpoint_dir(tmp_path / "k" / "checkpoints", 4)
    for later in ckpt.list_checkpoints(tmp_path / "k" / "checkpoints"):
        if later.name > source.name:
            shutil.rmtree(later)
    Trainer(_cfg(tmp_path / "k", synth_train_dir, *extra, f"train.resume={source}")).fit()
    steps = [
        json.loads(x)["step"] for x in (tmp_path / "k" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 17))


def test_bad_config_errors(synth_train_dir, tmp_path):
    # component names and parameters are checked when the config is loaded (load_config)
    with pytest.raises(ConfigError, match="r18_tiny"):
        Trainer(_cfg(tmp_path / "x", synth_train_dir, "model.backbone=r18_tinny"))
    with pytest.raises(FileNotFoundError, match=r"agedb_30\.bin"):
        Trainer(_cfg(tmp_path / "y", synth_train_dir, "data.val_targets=[agedb_30]"))
    with pytest.raises(ConfigError, match="margn"):
        Trainer(_cfg(tmp_path / "z", synth_train_dir, "head.params.margn=0.3"))
    # a SynthFace directory built from other values is never silently regenerated
    bad = ["data.source=synthface", f"data.path={synth_train_dir}", "synth.identities=9"]
    with pytest.raises(ValueError, match=r"synth\.identities"):
        Trainer(_cfg(tmp_path / "w", synth_train_dir, *bad))
    assert (synth_train_dir / "train.rec").is_file()


def test_a_set_up_that_fails_leaves_no_new_run_directory(synth_train_dir, tmp_path):
    """A data path or verification set that is not there fails the set-up after the run
    directory was made: a directory this run created is removed (no config.yaml / meta.json
    of a run that never started); one that was there before gets its files back as they were."""
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Trainer(_cfg(tmp_path / "x", tmp_path / "nowhere"))
    assert not (tmp_path / "x").exists()
    with pytest.raises(FileNotFoundError, match=r"agedb_30\.bin"):
        Trainer(_cfg(tmp_path / "y" / "run", synth_train_dir, "data.val_targets=[agedb_30]"))
    assert not (tmp_path / "y" / "run").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("kept")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Trainer(_cfg(mine, tmp_path / "nowhere"))
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]  # no config.yaml / meta.json
    assert (mine / "notes.txt").read_text() == "kept"


def test_a_failed_set_up_keeps_a_finished_synthface_render(tmp_path, monkeypatch):
    """data.source=synthface renders into the new run directory; a set-up that fails after the
    render (here: the render holds no training set) keeps the render alone, for the next try,
    and removes the rest (config.yaml, meta.json); an unfinished render goes with the run."""
    from robustface.data.synth import builder

    def fake_render(path: Path, *args, **kwargs) -> None:
        path.mkdir(parents=True)
        (path / "synthface.json").write_text("{}")

    monkeypatch.setattr(builder, "ensure_synthface", fake_render)
    run = tmp_path / "run"
    with pytest.raises((FileNotFoundError, ConfigError, ValueError)):
        Trainer(_cfg(run, tmp_path, "data.source=synthface", "data.path=null"))
    assert [p.name for p in run.iterdir()] == ["synthface"]
    assert (run / "synthface" / "synthface.json").read_text() == "{}"
    monkeypatch.setattr(builder, "ensure_synthface", lambda path, *a, **k: path.mkdir())
    other = tmp_path / "other"
    with pytest.raises((FileNotFoundError, ConfigError, ValueError)):
        Trainer(_cfg(other, tmp_path, "data.source=synthface", "data.path=null"))
    assert not other.exists()


def test_resuming_with_another_architecture_is_refused_and_keeps_the_run(synth_train_dir, tmp_path):
    """Resuming a run with another model.width (or backbone, embedding or input size,
    classifier or head) is a one-line error naming each key, not load_state_dict's traceback,
    and the run's config.yaml and meta.json stay those of its weights."""
    extra = ["data.val_targets=[]", "train.max_steps=2", "train.checkpoint_every=2"]
    Trainer(_cfg(tmp_path / "run", synth_train_dir, *extra)).fit()
    run = tmp_path / "run"
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "meta.json")}
    wider = _cfg(run, synth_train_dir, *extra, "train.resume=auto", "model.width=0.25")
    message = r"model differs .*\(model\.width: checkpoint 0\.125, config 0\.25\)"
    with pytest.raises(ValueError, match=message):
        Trainer(wider)
    other_head = _cfg(run, synth_train_dir, *extra, "train.resume=auto", "head.name=curricularface")
    with pytest.raises(
        ValueError, match=r"head\.name: checkpoint 'arcface', config 'curricularface'"
    ):
        Trainer(other_head)
    assert {name: (run / name).read_bytes() for name in before} == before
    # the same settings resume (the run is complete: nothing to train)
    Trainer(_cfg(run, synth_train_dir, *extra, "train.resume=auto"))


def test_resuming_with_a_classifier_of_another_size_is_refused(synth_train_dir, tmp_path):
    """fc.params.k (sub-centers per class) sizes the classifier's weight (C*k rows): another k
    is a one-line error naming fc.params and both shapes, not load_state_dict's traceback."""
    extra = ["data.val_targets=[]", "train.max_steps=2", "train.checkpoint_every=2"]
    extra += ["fc.name=subcenter", "model.embedding_size=32"]
    trainer = Trainer(_cfg(tmp_path / "run", synth_train_dir, *extra, "fc.params.k=2"))
    trainer.fit()
    classes = trainer.num_classes
    more = _cfg(tmp_path / "run", synth_train_dir, *extra, "fc.params.k=3", "train.resume=auto")
    shapes = rf"weight: checkpoint \({2 * classes}, 32\), config \({3 * classes}, 32\)"
    with pytest.raises(ValueError, match=r"classifier .*fc\.params.*" + shapes):
        Trainer(more)
    Trainer(_cfg(tmp_path / "run", synth_train_dir, *extra, "fc.params.k=2", "train.resume=auto"))


def test_architecture_keys_an_older_checkpoint_does_not_hold_are_not_compared():
    # a checkpoint from before a key existed (here model.width) still resumes; keys it holds
    # are compared with the config's
    model = {"backbone": "r18_tiny", "width": 0.25, "embedding_size": 32, "input_size": 32}
    new = {"model": model, "fc": {"name": "full"}, "head": {"name": "arcface"}}
    old = {"model": {"backbone": "r18_tiny", "embedding_size": 32, "input_size": 32}, "fc": {}}
    assert _architecture_changes(old, new) == []
    old["model"]["embedding_size"] = 64
    assert _architecture_changes(old, new) == ["model.embedding_size: checkpoint 64, config 32"]
    assert _architecture_changes({}, new) == []


def test_an_unset_architecture_key_is_the_backbones_own_value_when_resuming():
    """``model.input_size`` / ``width`` unset (None: the backbone's own) and the same value given
    explicitly are the same model: resuming is not refused. r18 takes 112 px at width 1 and the
    r18_tiny preset 56 px at width 0.25 (their docstrings); another value is still a change."""

    def config(backbone: str, input_size: int | None, width: float | None) -> dict:
        model = {"backbone": backbone, "embedding_size": 32, "input_size": input_size}
        model["width"] = width
        return {"model": model, "fc": {"name": "full"}, "head": {"name": "arcface"}}

    assert _architecture_changes(config("r18", None, None), config("r18", 112, 1)) == []
    assert _architecture_changes(config("r18", 112, 1.0), config("r18", None, None)) == []
    assert _architecture_changes(config("r18_tiny", None, None), config("r18_tiny", 56, 0.25)) == []
    assert _architecture_changes(config("r18_tiny", 56, None), config("r18_tiny", None, 0.25)) == []
    assert _architecture_changes(config("r18", None, None), config("r18", 96, 0.5)) == [
        "model.input_size: checkpoint 112, config 96",
        "model.width: checkpoint 1.0, config 0.5",
    ]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("fc.name", "partail_fc", r"fc\.name: unknown classifier 'partail_fc' \(did you mean"),
        ("model.backbone", "r18_tinny", r"model\.backbone: unknown backbone"),
        ("data.source", "recc", r"data\.source: unknown data source"),
        ("head.name", "arcfase", r"head\.name: unknown head"),
    ],
)
def test_invalid_config_in_code_writes_nothing(synth_train_dir, tmp_path, key, value, message):
    """A config built in code (not through load_config) is checked before the run directory,
    its meta.json and config.yaml, or a SynthFace set are written."""
    cfg = _cfg(tmp_path / "run", synth_train_dir, "data.source=synthface", "data.path=null")
    section, field = key.split(".")
    setattr(getattr(cfg, section), field, value)
    with pytest.raises(ConfigError, match=message):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()


def test_callbacks_run_at_fixed_points(synth_train_dir, tmp_path, monkeypatch):
    """A new callback is one class registered in CALLBACKS plus its name in the order; the
    trainer calls its hooks at fixed points, on the step and epoch they name."""
    from robustface.train import trainer as trainer_module
    from robustface.train.callbacks import CALLBACK_ORDER, CALLBACKS, Callback

    events: list[tuple[str, int, int]] = []

    class Recorder(Callback):
        def _note(self, name: str) -> None:
            events.append((name, self.trainer.global_step, self.trainer.epoch))

        def on_train_start(self) -> None:
            self._note("start")

        def on_step_end(self) -> None:
            self._note("step")

        def on_epoch_end(self) -> None:
            self._note("epoch")

        def on_loop_end(self) -> None:
            self._note("loop_end")

        def on_train_end(self) -> None:
            self._note("end")

        def summarize(self, summary: dict) -> None:
            summary["recorded"] = len(events)

        def close(self) -> None:
            self._note("close")

    if "test_recorder" not in CALLBACKS:
        CALLBACKS.register("test_recorder")(Recorder)
    monkeypatch.setattr(trainer_module, "CALLBACK_ORDER", (*CALLBACK_ORDER, "test_recorder"))
    cfg = _cfg(tmp_path / "cb", synth_train_dir, "data.val_targets=[]", "train.max_steps=10")
    trainer = Trainer(cfg)
    per_epoch = trainer.steps_per_epoch
    assert per_epoch < 10  # the run crosses an epoch boundary
    trainer.fit()
    want = [("start", 0, 0)]
    for step in range(1, 11):
        want.append(("step", step, step > per_epoch))
        if step == per_epoch:
            want.append(("epoch", step, 1))
    want += [("loop_end", 10, 1), ("end", 10, 1), ("close", 10, 1)]
    assert events == want
    results = json.loads((tmp_path / "cb" / "train_results.json").read_text())
    assert results["recorded"] == len(want)  # summarized after close, on success


# ----------------------------------------------------------------------------- DDP on gloo
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str, data: str, *extra: str) -> None:
    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )  # fmt: skip
    torch.set_num_threads(1)
    cfg = _cfg(Path(out), Path(data), "fc.name=partial_fc", "train.max_steps=3",
               "data.val_targets=[]", "data.batch_size=4", *extra)  # fmt: skip
    try:
        Trainer(cfg).fit()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_partial_fc_two_ranks_then_resume_on_one(synth_train_dir, tmp_path):
    out = tmp_path / "ddp"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(out), str(synth_train_dir)), nprocs=2)
    path = ckpt.list_checkpoints(out / "checkpoints")[-1]
    main = ckpt.load_main(path)
    assert main["world_size"] == 2 and main["progress"]["global_step"] == 3
    shards = ckpt.load_rank_states(path, 2)
    full = torch.cat([s["fc"]["module"]["weight"] for s in shards])
    assert full.shape == (8, 32)
    one = Trainer(_cfg(tmp_path / "one", synth_train_dir, "fc.name=partial_fc",
                       f"train.resume={path}", "data.val_targets=[]"))  # fmt: skip
    assert torch.equal(one.fc.weight.detach(), full)
    momentum = torch.cat([s["fc"]["optim"]["state"][0]["momentum_buffer"] for s in shards])
    assert torch.equal(one.opt_fc.state_dict()["state"][0]["momentum_buffer"], momentum)
    assert one.global_step == 3


@pytest.mark.slow
def test_centerbias_centres_are_sharded_in_checkpoints_and_reshard(synth_train_dir, tmp_path):
    out = tmp_path / "cb"
    head = "head.name=centerbiasface"
    probe = "train.probe_every=3"  # the last step is probed: the final probe must not run again
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(out), str(synth_train_dir), head, probe),
             nprocs=2)  # fmt: skip
    assert (out / "analysis" / "angles.npz").is_file()
    path = ckpt.list_checkpoints(out / "checkpoints")[-1]
    main = ckpt.load_main(path)
    assert "centers" not in main["head"] and "t" in main["head"]
    shards = ckpt.load_rank_states(path, 2)
    centres = torch.cat([s["fc"]["head"]["centers"] for s in shards])
    assert centres.shape == (8, 32) and bool((centres.norm(dim=1) > 0).any())
    one = Trainer(_cfg(tmp_path / "one", synth_train_dir, "fc.name=partial_fc", head,
                       f"train.resume={path}", "data.val_targets=[]"))  # fmt: skip
    assert torch.equal(one.head.centers, centres)
    assert torch.equal(one.head.t, main["head"]["t"])
    result = one.fit()
    assert result.steps == 16 and np.isfinite(result.loss)


def test_trainer_supplied_head_params_are_not_settable(synth_train_dir, tmp_path):
    with pytest.raises(ValueError, match=r"head\.params\.num_classes: set by the trainer"):
        Trainer(_cfg(tmp_path / "a", synth_train_dir, "head.name=centerbiasface",
                     "head.params.num_classes=3"))  # fmt: skip
    with pytest.raises(ValueError, match="not subcenter"):
        Trainer(_cfg(tmp_path / "b", synth_train_dir, "head.name=centerbiasface",
                     "fc.name=subcenter"))  # fmt: skip


@pytest.mark.parametrize("fc", ["full", "partial_fc"])
@pytest.mark.parametrize("head", __import__("robustface.heads").heads.list_heads())
def test_every_config_usable_head_trains_through_the_trainer(synth_train_dir, tmp_path, head, fc):
    extra = ["train.max_steps=2", "data.val_targets=[]", f"head.name={head}", f"fc.name={fc}"]
    extra += ["head.params={}"]
    if head == "boundaryface":
        extra.append("head.params.epoch_start=0")  # label correction from the first step
    result = Trainer(_cfg(tmp_path / "h", synth_train_dir, *extra)).fit()
    assert result.steps == 2 and np.isfinite(result.loss)


# --------------------------------------------------------------------- per-batch label noise
def test_per_batch_noise_is_exact_and_deterministic(synth_train_dir, tmp_path):
    from robustface.data import RecordIODataset, TrainTransform, write_insightface_rec
    from robustface.data.image import encode_image
    from robustface.train.trainer import TrainSet

    rng = np.random.default_rng(0)
    pool = [encode_image(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)) for _ in range(5)]
    write_insightface_rec(tmp_path / "open", [(jpeg, 0) for jpeg in pool])
    base, open_source = RecordIODataset(synth_train_dir), RecordIODataset(tmp_path / "open")
    transform = TrainTransform(flip_p=0.5, normalize=False)
    transform.input_size = 32
    noisy = TrainSet(base, transform, 3, num_classes=8, batch_noise=(0.25, 0.25),
                     open_source=open_source)  # fmt: skip
    clean = TrainSet(base, transform, 3)
    indices = [5, 17, 2, 40, 33, 8, 61, 12]

    def fetch(indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        images, labels, flips = collate(noisy.__getitems__(indices))  # one batch, as the loader's
        planes = torch.from_numpy(flipped_planes(images, flips))
        return list(zip(planes, labels.tolist(), strict=True))

    batch = fetch(indices)
    labels = base.labels
    open_images = [open_source[i][0] for i in range(5)]
    for pos, (index, (image, label)) in enumerate(zip(indices, batch, strict=True)):
        if pos < 2:  # outside image, label kept: equals one of the pool images, augmented alike
            assert label == labels[index]
            assert any(torch.equal(image, noisy._augment(o, index)) for o in open_images)
        elif pos < 4:  # relabelled to another class, image kept
            assert label != labels[index] and 0 <= label < 8
            assert torch.equal(image, clean[index][0])
        else:
            assert label == labels[index] and torch.equal(image, clean[index][0])
    again = fetch(indices)
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(batch, again, strict=True))
    noisy.epoch = 1
    other = [fetch([i, *indices[1:]])[2][1] for i in range(20)]
    assert len(set(other)) > 1  # the draws depend on the batch (and the epoch)
    with pytest.raises(ValueError, match="open_source"):
        TrainSet(base, transform, 3, batch_noise=(0.0, 0.1))
    extra = ["train.max_steps=2", "data.val_targets=[]", "data.batch_noise_closed=0.25",
             "data.batch_noise_open=0.25", f"data.open_source={tmp_path / 'open'}"]  # fmt: skip
    trainer = Trainer(_cfg(tmp_path / "run", synth_train_dir, *extra))
    first = list(trainer.sampler)[:8]  # the loader's first batch goes through __getitems__
    images, labels, flips = next(iter(trainer.loader))
    want_images, want_labels, want_flips = collate(trainer.trainset.__getitems__(first))
    assert labels.tolist() == want_labels.tolist()
    assert labels.tolist()[2:4] != base.labels[first[2:4]].tolist()  # relabelled in the loader
    assert torch.equal(images, want_images) and torch.equal(flips, want_flips)
    result = trainer.fit()
    assert result.steps == 2 and np.isfinite(result.loss)
    with pytest.raises(ConfigError, match="open_source: needed"):
        _cfg(tmp_path / "x", synth_train_dir, "data.batch_noise_open=0.1")


@pytest.mark.slow
@pytest.mark.parametrize("head", __import__("robustface.heads").heads.list_heads())
def test_every_head_lowers_the_loss_on_synthface(synth_train_dir, tmp_path, head):
    extra = ["train.epochs=4", "data.val_targets=[]", f"head.name={head}", "fc.name=full",
             "head.params={scale: 16.0}", "optim.lr=0.1", "train.checkpoint_every=0"]  # fmt: skip
    if head == "boundaryface":
        extra.append("head.params.epoch_start=2")  # label correction in the second half
    trainer = Trainer(_cfg(tmp_path / "h", synth_train_dir, *extra))
    trainer.fit()
    rows = [json.loads(x) for x in (tmp_path / "h" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 32
    # quarters, not single steps: the per-step loss of a margin head on 8-image batches is noisy
    # enough (and thread-count dependent) that 4-step windows fail for MV-Softmax on one thread
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    assert last < 0.85 * first, (head, first, last)
