"""CAFace aggregator: published layout, a formula-level reference forward, sequential memory,
checkpoint loading and input errors."""

from __future__ import annotations

import argparse
import math
import warnings

import pytest
import torch

from robustface.errors import DataFormatError
from robustface.fuse.caface import CAFace, load_caface_checkpoint


def _published_shapes() -> dict[str, tuple[int, ...]]:
    """The released aggregator's state dict (REFERENCE §7), written out by hand."""
    shapes: dict[str, tuple[int, ...]] = {
        "style_maker.cfc": (384, 2),
        "style_maker.cfcs.0": (384, 2),
        "style_maker.relu.weight": (1,),
        "style_maker.linear.weight": (64, 384),
        "style_maker.linear.bias": (64,),
        "style_maker.bn.weight": (64,),
        "style_maker.bn.bias": (64,),
        "style_maker.bn.running_mean": (64,),
        "style_maker.bn.running_var": (64,),
        "style_maker.bn.num_batches_tracked": (),
        "fusion_net.clustering_layer.group_token": (1, 4, 128),
    }
    for i in range(2):
        p = f"fusion_net.clustering_layer.blocks.{i}."
        for name, shape in [
            ("norm1.weight", (128,)),
            ("norm1.bias", (128,)),
            ("attn.qkv.weight", (384, 128)),
            ("attn.qkv.bias", (384,)),
            ("attn.proj.weight", (128, 128)),
            ("attn.proj.bias", (128,)),
            ("norm2.weight", (128,)),
            ("norm2.bias", (128,)),
            ("mlp.fc1.weight", (512, 128)),
            ("mlp.fc1.bias", (512,)),
            ("mlp.fc2.weight", (128, 512)),
            ("mlp.fc2.bias", (128,)),
        ]:
            shapes[p + name] = shape
    p = "fusion_net.clustering_layer.cluster_block."
    for name in ["norm_tokens", "norm_x", "assign.q_proj", "assign.k_proj"]:
        shapes[p + name + ".weight"] = (128,) if name.startswith("norm") else (128, 128)
        shapes[p + name + ".bias"] = (128,)
    for i in range(2):
        p = f"fusion_net.conf_mlp.{i}."
        shapes[p + "skip_connect_gate"] = ()
        shapes[p + "ln.weight"] = (256,)
        shapes[p + "ln.bias"] = (256,)
        for name, shape in [
            ("tokens_mlp_block.fc1.weight", (8, 4)),
            ("tokens_mlp_block.fc1.bias", (8,)),
            ("tokens_mlp_block.fc2.weight", (4, 8)),
            ("tokens_mlp_block.fc2.bias", (4,)),
            ("channels_mlp_block.fc1.weight", (128, 256)),
            ("channels_mlp_block.fc1.bias", (128,)),
            ("channels_mlp_block.fc2.weight", (256, 128)),
            ("channels_mlp_block.fc2.bias", (256,)),
        ]:
            shapes[p + name] = shape
    shapes.update(
        {
            "fusion_net.conf_mlp.2.fc1.weight": (256, 256),
            "fusion_net.conf_mlp.2.fc1.bias": (256,),
            "fusion_net.conf_mlp.2.fc2.weight": (512, 256),
            "fusion_net.conf_mlp.2.fc2.bias": (512,),
            "norm_emb.scale": (),
            "norm_emb.pe": (61, 64),
            "norm_emb.norm_bn.running_mean": (1,),
            "norm_emb.norm_bn.running_var": (1,),
            "norm_emb.norm_bn.num_batches_tracked": (),
        }
    )
    return shapes


def _model(seed: int = 0) -> CAFace:
    """A CAFace in eval mode with every parameter and BN statistic perturbed away from its init
    (zero ``cfc``, unit gates, ...), so that each term of the formula matters."""
    torch.manual_seed(seed)
    model = CAFace()
    with torch.no_grad():
        for p in model.parameters():
            scale = 0.3 if p.ndim < 2 else 1.0 / math.sqrt(p.shape[-1])
            p.add_(torch.randn_like(p) * scale)
        model.style_maker.bn.running_mean.normal_()
        model.style_maker.bn.running_var.uniform_(0.5, 2.0)
        model.norm_emb.norm_bn.running_mean.fill_(20.0)
        model.norm_emb.norm_bn.running_var.fill_(16.0)
    return model.eval()


def _inputs(b: int, t: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    unit = torch.nn.functional.normalize(torch.randn(b, t, 512, generator=g), dim=-1)
    norms = 20.0 + 12.0 * torch.randn(b, t, 1, generator=g)  # spans the whole clip range
    styles = torch.randn(b, t, 384, 2, generator=g)
    return unit * norms.abs(), styles


# --------------------------------------------------------------------- reference (plain ops)
def _ln(x, w, b):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * w + b


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _softmax(x, dim):
    e = torch.exp(x - x.max(dim=dim, keepdim=True).values)
    return e / e.sum(dim=dim, keepdim=True)


def _lin(sd, name, x):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def _reference(sd, f, s):
    """CAFace on one set written out from the paper/REFERENCE formulas; f (T,512), s (T,384,2).
    Returns (fused (512,), per-frame weights (T,))."""
    t = f.shape[0]
    norm = torch.sqrt((f * f).sum(1, keepdim=True))
    unit = f / (norm + 1e-5)
    # Style Input Maker
    z = s[:, :, 0] * sd["style_maker.cfc"][:, 0] + s[:, :, 1] * sd["style_maker.cfc"][:, 1]
    a = sd["style_maker.relu.weight"]
    z = torch.where(z >= 0, z, a * z)
    z = _lin(sd, "style_maker.linear", z)
    bn = "style_maker.bn."
    z = (z - sd[bn + "running_mean"]) / torch.sqrt(sd[bn + "running_var"] + 1e-5)
    z = z * sd[bn + "weight"] + sd[bn + "bias"]
    # Norm embedding: sinusoid table built here from its formula
    nb = "norm_emb.norm_bn."
    nz = (norm[:, 0] - sd[nb + "running_mean"]) / torch.sqrt(sd[nb + "running_var"] + 1e-5)
    nz = torch.clamp(nz, -3, 3) * 10
    idx = [math.trunc(v) + 30 for v in nz.tolist()]
    emb = torch.zeros(t, 64)
    for r, pos in enumerate(idx):
        for i in range(32):
            angle = pos * math.exp(2 * i * (-math.log(10000.0) / 64))
            emb[r, 2 * i] = math.sin(angle)
            emb[r, 2 * i + 1] = math.cos(angle)
    x = torch.cat([z, sd["norm_emb.scale"] * emb], dim=1)
    # Cluster Network
    cl = "fusion_net.clustering_layer."
    tokens = sd[cl + "group_token"][0]
    h = torch.cat([x, tokens], dim=0)
    for i in range(2):
        p = f"{cl}blocks.{i}."
        y = _ln(h, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        qkv = _lin(sd, p + "attn.qkv", y)
        heads = []
        for hd in range(8):
            q = qkv[:, hd * 16 : (hd + 1) * 16]
            k = qkv[:, 128 + hd * 16 : 128 + (hd + 1) * 16]
            v = qkv[:, 256 + hd * 16 : 256 + (hd + 1) * 16]
            heads.append(_softmax(q @ k.T / 4.0, dim=1) @ v)
        h = h + _lin(sd, p + "attn.proj", torch.cat(heads, dim=1))
        y = _ln(h, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
        h = h + _lin(sd, p + "mlp.fc2", _gelu(_lin(sd, p + "mlp.fc1", y)))
    h = h[:t]
    cb = cl + "cluster_block."
    key = _ln(h, sd[cb + "norm_x.weight"], sd[cb + "norm_x.bias"])
    qt = _lin(
        sd,
        cb + "assign.q_proj",
        _ln(tokens, sd[cb + "norm_tokens.weight"], sd[cb + "norm_tokens.bias"]),
    )
    kt = _lin(sd, cb + "assign.k_proj", key)
    attn = _softmax(qt @ kt.T / math.sqrt(128), dim=0)  # (M, T), over the clusters
    anorm = attn / torch.clamp(attn.sum(1, keepdim=True), min=1.0)
    mu = anorm @ unit
    cstyle = anorm @ key
    # Aggregation Network
    u = torch.cat([tokens, cstyle], dim=1)  # (4, 256)
    for i in range(2):
        p = f"fusion_net.conf_mlp.{i}."
        lw, lb = sd[p + "ln.weight"], sd[p + "ln.bias"]
        y = _ln(u, lw, lb).T  # (256, 4): the token MLP mixes the 4 clusters
        y = _lin(sd, p + "tokens_mlp_block.fc2", _gelu(_lin(sd, p + "tokens_mlp_block.fc1", y))).T
        u = sd[p + "skip_connect_gate"] * u + y
        y = _lin(
            sd,
            p + "channels_mlp_block.fc2",
            _gelu(_lin(sd, p + "channels_mlp_block.fc1", _ln(u, lw, lb))),
        )
        u = u + y
    w = _lin(sd, "fusion_net.conf_mlp.2.fc2", _gelu(_lin(sd, "fusion_net.conf_mlp.2.fc1", u)))
    w = _softmax(w, dim=0)  # (4, 512), over the clusters per channel
    fused = (w * mu).sum(0)
    frame = (attn / attn.sum(1, keepdim=True) * w.mean(1, keepdim=True)).sum(0)
    return fused, frame


# --------------------------------------------------------------------------------- tests
def test_published_layout_and_parameter_count():
    model = CAFace()
    assert sum(p.numel() for p in model.parameters()) == 786_524
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == _published_shapes()
    assert model.style_maker.cfc is model.style_maker.cfcs[0]


def test_forward_matches_formula_reference():
    model = _model()
    sd = {k: v.double() for k, v in model.state_dict().items()}
    model = model.double()
    f, s = _inputs(2, 9)
    f, s = f.double(), s.double()
    with torch.no_grad():
        out = model(f, s)
    for i in range(2):
        fused, frame = _reference(sd, f[i], s[i])
        torch.testing.assert_close(
            out.fused[i], fused, rtol=1e-6, atol=1e-8
        )  # pe is a float32 table
        torch.testing.assert_close(
            out.frame_weights[i], frame, rtol=1e-6, atol=1e-8
        )  # pe is a float32 table
    torch.testing.assert_close(out.frame_weights.sum(1), torch.ones(2, dtype=torch.float64))
    # the norm buckets span the clipped range and the attention differs per set
    assert not torch.allclose(out.fused[0], out.fused[1])


def test_one_chunk_is_the_whole_set():
    model = _model()
    f, s = _inputs(2, 11)
    with torch.no_grad():
        whole = model(f, s)
        fused, frame = model.fuse_sequential(f, s, chunk_size=11)
        fused_big, _ = model.fuse_sequential(f, s, chunk_size=9999)
    assert torch.equal(fused, whole.fused) and torch.equal(frame, whole.frame_weights)
    assert torch.equal(fused_big, whole.fused)


def test_chunks_are_near_equal_array_split_parts():
    model = _model()
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[1]))
    f, s = _inputs(1, 75)
    with torch.no_grad():
        _, frame = model.fuse_sequential(f, s, chunk_size=8)
    assert sizes == [8, 8, 8, 8, 8, 7, 7, 7, 7, 7]
    assert frame.shape == (1, 75)


def test_memory_is_the_count_weighted_mean_and_order_invariant():
    model = _model()
    with torch.no_grad():  # flatter assignments: every cluster's soft count per chunk >= 1
        model.fusion_net.clustering_layer.cluster_block.assign.q_proj.weight.mul_(0.1)
    f, s = _inputs(2, 36)
    chunks = [slice(0, 12), slice(12, 24), slice(24, 36)]
    with torch.no_grad():
        outs = [model(f[:, c], s[:, c]) for c in chunks]
        alone = [o.memory for o in outs]
        total = sum(m.counts for m in alone)
        assert bool((torch.stack([m.counts for m in alone]) >= 1).all())
        mean_features = sum(m.counts * m.features for m in alone) / total
        # in this regime the memory is the true soft mean of the unit features
        unit = f / (f.norm(dim=-1, keepdim=True) + 1e-5)
        soft_sum = sum(o.assign @ unit[:, c] for o, c in zip(outs, chunks, strict=True))
        torch.testing.assert_close(mean_features, soft_sum / total, rtol=1e-5, atol=1e-6)
        results = []
        for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
            memory = None
            for i in order:
                out = model(f[:, chunks[i]], s[:, chunks[i]], memory)
                memory = out.memory
            results.append(out.fused)
            torch.testing.assert_close(memory.features, mean_features, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(memory.counts, total)
        seq, frame = model.fuse_sequential(f, s, chunk_size=12)
        # per-frame weights as the official demo: all assignments over the total soft counts,
        # with the last chunk's aggregation weights
        assign = torch.cat([o.assign for o in outs], dim=-1)
        last_w = out.weights.mean(-1, keepdim=True)  # order [1, 2, 0]: w does not depend on order
        expected = (assign / assign.sum(-1, keepdim=True) * last_w).sum(1)
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seq, results[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(frame, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(frame.sum(1), torch.ones(2))
    assert not torch.allclose(seq, model(f, s).fused.detach(), atol=1e-4)  # chunking matters


def test_memory_detached_in_eval_kept_in_training():
    model = _model()
    f, s = _inputs(2, 6)
    f.requires_grad_(True)
    s.requires_grad_(True)
    assert not model(f, s).memory.features.requires_grad
    fused, frame = model.fuse_sequential(f, s, chunk_size=2)
    # only the last chunk's graph is kept alive (frame weights sum to 1: weigh them)
    (fused.sum() + (frame * torch.arange(6.0)).sum()).backward()
    for grad in (f.grad, s.grad):
        assert bool((grad[:, :4] == 0).all()) and bool((grad[:, 4:] != 0).any())
    model.train()
    assert model(f, s).memory.features.requires_grad


def test_checkpoint_round_trip(tmp_path):
    model = _model(seed=3)
    state = {f"aggregator.{k}": v for k, v in model.state_dict().items()}
    state["model.input_layer.0.weight"] = torch.randn(64, 3, 3, 3)
    state["center.weight"] = torch.randn(10, 512)
    path = tmp_path / "CAFace.ckpt"
    torch.save(
        {"state_dict": state, "hyper_parameters": {"arch": "ir_101", "use_memory": True}}, path
    )
    ckpt = load_caface_checkpoint(path)
    assert not ckpt.aggregator.training
    assert ckpt.aggregator.style_maker.cfc is ckpt.aggregator.style_maker.cfcs[0]
    assert list(ckpt.backbone_state_dict) == ["input_layer.0.weight"]
    assert torch.equal(ckpt.centers, state["center.weight"])
    assert ckpt.hyper_parameters["arch"] == "ir_101"
    f, s = _inputs(1, 5)
    with torch.no_grad():
        assert torch.equal(ckpt.aggregator(f, s).fused, model(f, s).fused)


def test_checkpoint_with_namespace_hyper_parameters_needs_the_opt_in(tmp_path):
    state = {f"aggregator.{k}": v for k, v in CAFace().state_dict().items()}
    path = tmp_path / "ns.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": argparse.Namespace(arch="ir_101")}, path)
    with pytest.raises(DataFormatError, match=r"ns\.ckpt: refused to unpickle .*Namespace"):
        load_caface_checkpoint(path)
    ckpt = load_caface_checkpoint(path, unsafe_legacy_load=True)
    assert ckpt.hyper_parameters == {"arch": "ir_101"}


def test_checkpoint_errors_name_file_and_keys(tmp_path):
    state = {f"aggregator.{k}": v for k, v in CAFace().state_dict().items()}
    bad_shape = dict(state)
    bad_shape["aggregator.fusion_net.conf_mlp.2.fc2.weight"] = torch.zeros(1, 256)
    path = tmp_path / "shape.ckpt"
    torch.save({"state_dict": bad_shape}, path)
    with pytest.raises(DataFormatError, match=r"shape\.ckpt.*conf_mlp\.2\.fc2\.weight \(1, 256\)"):
        load_caface_checkpoint(path)
    missing = {k: v for k, v in state.items() if "norm_emb.scale" not in k}
    missing["aggregator.extra"] = torch.zeros(1)
    path = tmp_path / "keys.ckpt"
    torch.save({"state_dict": missing}, path)
    with pytest.raises(
        DataFormatError, match=r"keys\.ckpt.*missing \['norm_emb\.scale'\].*'extra'"
    ):
        load_caface_checkpoint(path)
    path = tmp_path / "none.ckpt"
    torch.save({"state_dict": {"model.x": torch.zeros(1)}}, path)
    with pytest.raises(DataFormatError, match=r"none\.ckpt.*no 'aggregator"):
        load_caface_checkpoint(path)


@pytest.mark.parametrize(
    ("features", "styles", "message"),
    [
        (torch.randn(1, 3, 128), torch.randn(1, 3, 384, 2), r"features: expected shape"),
        (torch.randn(1, 0, 512), torch.randn(1, 0, 384, 2), "empty set"),
        (torch.randn(1, 3, 512), None, "styles: CAFace needs"),
        (
            torch.randn(1, 3, 512),
            torch.randn(1, 3, 256, 2),
            r"styles: expected shape \(1, 3, 384, 2\)",
        ),
        (
            torch.full((1, 3, 512), float("nan")),
            torch.randn(1, 3, 384, 2),
            "features: contains NaN",
        ),
        (torch.randn(1, 3, 512), torch.full((1, 3, 384, 2), float("inf")), "styles: contains NaN"),
        (
            torch.cat([torch.randn(1, 2, 512), torch.zeros(1, 1, 512)], dim=1),
            torch.randn(1, 3, 384, 2),
            "set 0, image 2 has a zero-norm feature",
        ),
    ],
)
def test_bad_inputs(features, styles, message):
    model = CAFace().eval()
    with pytest.raises(ValueError, match=message):
        model(features, styles)
    with pytest.raises(ValueError, match=message):
        model.fuse_sequential(features, styles, chunk_size=2)


def test_bad_chunk_size():
    f, s = _inputs(1, 3)
    with pytest.raises(ValueError, match="chunk_size"):
        CAFace().eval().fuse_sequential(f, s, chunk_size=0)


def test_caface_behind_the_aggregator_interface(tmp_path):
    from robustface.fuse import AGGREGATORS, CAFaceAggregator

    model = _model(seed=4)
    f, s = _inputs(1, 30, seed=5)
    agg = AGGREGATORS.build("caface", model=model, chunk_size=8)
    assert isinstance(agg, CAFaceAggregator) and agg.needs_styles
    with torch.no_grad():
        want, _ = model.fuse_sequential(f, s, 8)  # 8,8,7,7
    want = torch.nn.functional.normalize(want[0], dim=0)
    torch.testing.assert_close(agg.fuse(f[0], s[0]), want, rtol=0, atol=1e-6)
    memory = agg.memory()  # the same chunks, fed as a stream
    for start, stop in ((0, 8), (8, 16), (16, 23), (23, 30)):
        memory.update(f[0, start:stop], s[0, start:stop])
    torch.testing.assert_close(memory.result(), want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="styles"):
        agg.fuse(f[0])
    # a released checkpoint's path works as the model
    path = tmp_path / "CAFace.ckpt"
    torch.save({"state_dict": {f"aggregator.{k}": v for k, v in model.state_dict().items()}}, path)
    from_file = AGGREGATORS.build("caface", model=path, chunk_size=8)
    torch.testing.assert_close(from_file.fuse(f[0], s[0]), want, rtol=0, atol=1e-6)


def test_a_file_that_is_not_pytorch_is_one_short_line(tmp_path):
    path = tmp_path / "some.bin"
    path.write_bytes(b"\x93NUMPY not a torch file " * 20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DataFormatError) as info:
            load_caface_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not a PyTorch checkpoint (unpickling failed: ")
    assert len(message.splitlines()) == 1 and "http" not in message and len(message) < 200
    assert not [w for w in caught if issubclass(w.category, UserWarning)]
