"""Families outside the curated table: cross-stage-partial and dual-path concatenations, GRN,
MLP-Mixer token mixing, per-model input sizes, the slim safety net and the per-family sweep.

Small random-init timm models (cut with model kwargs), perturbed by ``check.perturb`` so a wrong gate
shows in the outputs; masked == slim is compared in eval mode.
"""
from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn as nn

from pass_zoo import build_layer_sequence, select_units, slim
from pass_zoo.cli import main
from pass_zoo.errors import AdapterError, BackboneError, NotAClassifierError
from pass_zoo.graph.masks import to_channel_masks, to_unit_masks
from pass_zoo.tools import check
from pass_zoo.tools.check import STAGES, CheckResult, check_setup, perturb


def _model(name, **kwargs):
    torch.manual_seed(0)
    return perturb(timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval())


def _masked_and_slim(model, size, keep=0.5, seed=2):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    seq = build_layer_sequence(model, x[:1])
    g = torch.Generator().manual_seed(seed)
    units = select_units([torch.rand(grp.units, generator=g) for grp in seq.groups], seq, keep, round_to=1)
    masks = to_channel_masks(units, seq)
    slim_model, _ = slim(model, masks, x[:1])
    with torch.no_grad():
        dense = model(x)
        with seq.gated([u.float() for u in to_unit_masks(masks, seq)]):
            gated = model(x)
        slimmed = slim_model.eval()(x)
    return seq, masks, slim_model, dense, gated, slimmed


def _close(a, b, tol=1e-5):
    return float((a - b).abs().max()) <= tol * max(1.0, float(a.abs().max()))


# ------------------------------------------------------------------------------ concatenations
@pytest.mark.parametrize("name,kwargs", [
    ("cs3darknet_s", {}),  # cross-stage split + concat
    ("dpn48b", {"k_sec": (1, 1, 1, 1)}),  # dual paths: channel slices, residual + dense concat
])
def test_split_concat_families_slim_exactly(name, kwargs):
    model = _model(name, **kwargs)
    seq, masks, slim_model, dense, gated, slimmed = _masked_and_slim(model, 32)
    assert len(seq.groups) > 0
    assert slimmed.shape == gated.shape == (2, 10)
    assert _close(gated, slimmed)
    assert not _close(dense, gated, 1e-4)  # the masks act
    assert sum(p.numel() for p in slim_model.parameters()) < sum(p.numel() for p in model.parameters())


def test_traced_concat_widths_replace_torch_pruning_guesses():
    """A concat of a sliced tensor: the width Torch-Pruning infers by walking back is the whole
    producer, the traced width is the slice."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(3, 4, 1)
            self.c = nn.Conv2d(10, 6, 1)
            self.fc = nn.Linear(6, 2)

        def forward(self, x):
            a = self.a(x)
            y = self.c(torch.cat([a[:, :6], self.b(x)], 1))
            return self.fc(y.mean((2, 3)))

        def get_classifier(self):
            return self.fc

    from pass_zoo.graph.groups import build_graph

    graph = build_graph(Net(), torch.randn(1, 3, 4, 4))
    cats = [n for n in graph.module2node.values() if type(n.module).__name__ == "_ConcatOp"]
    assert [c.module.concat_sizes for c in cats] == [[6, 4]]


def test_a_concat_without_known_widths_is_one_line(monkeypatch):
    import torch_pruning as tp

    from pass_zoo.graph import groups

    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = self.a(x)
            return self.b(torch.cat([y, torch.zeros_like(y).detach()], 1))  # an input without gradient

    def no_widths(graph, node):  # what Torch-Pruning 1.6 does where it cannot infer a width (DPN, CS3-Darknet)
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    monkeypatch.setattr(tp.dependency.index_mapping, "update_concat_index_mapping", no_widths)
    with pytest.raises(AdapterError, match=r"^Torch-Pruning cannot tell the widths of a concatenation reading "
                                           r"layer 'a' \(an input without gradient"):
        groups.build_graph(Cat(), torch.randn(1, 3, 4, 4))
    with pytest.raises(AdapterError, match="^cannot build the dependency graph|^Torch-Pruning cannot tell"):
        build_layer_sequence(Cat(), torch.randn(1, 3, 4, 4))


# ------------------------------------------------------------------------------ slim safety net
def test_a_slim_model_that_does_not_run_is_a_one_line_error_naming_the_group():
    class HardCodedWidth(nn.Module):
        """Reads its input width from a constant (as a reshape to a fixed channel count would)."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            if x.shape[1] != 8:
                raise RuntimeError(f"expected input to have 8 channels, but got {x.shape[1]} channels instead")
            return self.conv(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = HardCodedWidth()
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(self.b(torch.relu(self.a(x))).mean((2, 3)))

        def get_classifier(self):
            return self.fc

    net, x = Net().eval(), torch.randn(1, 3, 4, 4)
    seq = build_layer_sequence(net, x)
    masks = {g.name: torch.ones(g.channels, dtype=torch.bool) for g in seq.groups}
    masks["a"][:3] = False
    with pytest.raises(AdapterError) as info:
        slim(net, masks, x)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("slimming group 'a' breaks the model's forward pass (expected input to have 8 channels")
    masks["a"][:] = True  # nothing removed: it slims and runs
    slim_model, _ = slim(net, masks, x)
    assert torch.equal(slim_model(x), net(x))


# ------------------------------------------------------------------------------ GRN
def test_convnextv2_grn_channels_are_pruned_exactly():
    model = _model("convnextv2_atto", depths=(1, 1, 1, 1))
    seq, masks, slim_model, dense, gated, slimmed = _masked_and_slim(model, 32)
    grn_groups = [g for g in seq.groups if g.channel_norms]
    assert grn_groups and all(g.name.endswith("mlp.fc1") for g in grn_groups)
    assert _close(gated, slimmed) and not _close(dense, gated, 1e-4)
    for g in grn_groups:
        grn = slim_model.get_submodule(g.channel_norms[0].module_name)
        kept = int(masks[g.name].sum())
        assert grn.weight.shape == grn.bias.shape == (kept,)
        assert slim_model.get_submodule(g.name).weight.shape[0] == kept


def test_grn_gate_is_what_makes_it_exact(monkeypatch):
    """Gating only fc2's input (GRN's cross-channel mean still over every channel) is not exact."""
    from pass_zoo.graph import families

    model = _model("convnextv2_atto", depths=(1, 1, 1, 1))
    family = families.channel_norm_family(model.stages[0].blocks[0].mlp.grn)
    monkeypatch.setattr(type(family), "gated_forward", lambda self, mod, x, keep: mod.forward(x))
    _, _, _, _, gated, slimmed = _masked_and_slim(model, 32)
    assert not _close(gated, slimmed, 1e-4)


def test_grn_export_reloads(tmp_path):
    from pass_zoo import save_slim_model
    from pass_zoo.prompt import PromptedModel, create_prompt

    kwargs = {"depths": (1, 1, 1, 1)}
    model = _model("convnextv2_atto", **kwargs)
    x = torch.randn(1, 3, 32, 32)
    seq = build_layer_sequence(model, x)
    g = torch.Generator().manual_seed(2)
    masks = to_channel_masks(select_units([torch.rand(grp.units, generator=g) for grp in seq.groups], seq, 0.5,
                                          round_to=1), seq)
    slim_model, history = slim(model, masks, x)
    prompted = PromptedModel(slim_model.eval(), create_prompt("additive", 32, 2)).eval()
    save_slim_model(prompted, tmp_path / "run", base_arch="convnextv2_atto", history=history, num_classes=10,
                    label_names=[str(i) for i in range(10)], base_pretrained_cfg=dict(model.pretrained_cfg),
                    img_size=32, model_kwargs=kwargs)
    loaded = timm.create_model(f"local-dir:{tmp_path / 'run'}", pretrained=True).eval()
    with torch.no_grad():
        assert _close(prompted(x), loaded(x))


# ------------------------------------------------------------------------------ MLP-Mixer
def test_mixer_token_and_channel_mlps_are_gated():
    from timm.models.mlp_mixer import MlpMixer

    torch.manual_seed(0)
    model = perturb(MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=32).eval())
    seq, masks, _, dense, gated, slimmed = _masked_and_slim(model, 32)
    assert {"blocks.0.mlp_tokens.fc1", "blocks.0.mlp_channels.fc1"} <= set(seq.names)  # token and channel MLPs
    assert _close(gated, slimmed) and not _close(dense, gated, 1e-4)


def test_perturb_fills_zero_initialised_weights():
    from timm.models.mlp_mixer import MlpMixer

    raw = MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=1, embed_dim=32).eval()
    assert not raw.head.weight.any()  # timm zero-initialises the Mixer classifier: a constant output
    model = perturb(raw)
    assert model.head.weight.std() > 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
    assert not torch.allclose(out[0], out[1])


# ------------------------------------------------------------------------------ input sizes
def test_check_setup_uses_the_smallest_size_that_runs(monkeypatch):
    size, kwargs, model = check_setup("resnet10t")
    assert (size, kwargs) == (64, {}) and isinstance(model, nn.Module)

    calls = []
    real = check._runs_at

    def needs_128(model, size, stride_floor=True):  # a pooling kernel larger than its input below 128 px
        calls.append(size)
        if size < 128:
            raise RuntimeError("Kernel size can't be greater than actual input size")
        real(model, size, stride_floor)

    monkeypatch.setattr(check, "_runs_at", needs_128)
    size, _, _ = check_setup("resnet10t")
    assert size == 128 and calls == [64, 96, 128]


def test_check_setup_reads_min_input_size_and_the_total_stride():
    cfg = timm.get_pretrained_cfg("botnet26t_256")
    size, _, _ = check_setup("botnet26t_256")
    assert size == cfg.min_input_size[-1] > 64
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()
    with pytest.raises(BackboneError, match=r"last feature map is under 2x2 at 32 px \(total stride 32\)"):
        check._runs_at(model, 32)
    assert check_setup("resnet10t", 32)[0] == 32  # a size asked for only has to run


def test_check_setup_refuses_in_one_line_when_no_size_runs(monkeypatch):
    def never(model, size, stride_floor=True):
        raise RuntimeError("Kernel size can't be greater than actual input size\nmore")

    monkeypatch.setattr(check, "_runs_at", never)
    with pytest.raises(BackboneError, match=r"^resnet10t runs at none of the sizes 64-\d+ px \(64 px: Kernel size"):
        check_setup("resnet10t")
    with pytest.raises(BackboneError, match=r"^resnet10t does not run at 48 px \(Kernel size"):
        check_setup("resnet10t", 48)


# ------------------------------------------------------------------------------ sweep
def test_sweep_rule_picks_the_first_small_model_per_family(monkeypatch):
    monkeypatch.setattr(check, "timm_families", lambda: {"fam_a": ["big_a", "small_a", "small_a2"],
                                                         "fam_b": ["big_b", "bigger_b", "big_b2"],
                                                         "fam_c": ["broken_c", "small_c"], "fam_d": ["broken_d"],
                                                         "fam_e": ["encoder_e"]})
    macs = {"big_a": 10**9, "big_b": 2 * 10**9, "bigger_b": 3 * 10**9, "big_b2": 10**9}

    def sized(name):
        if name.startswith("broken"):
            raise BackboneError("cannot size")
        if name.startswith("encoder"):
            raise NotAClassifierError("not an image classifier")
        return 64, macs.get(name, 10**6)

    monkeypatch.setattr(check, "sized_macs", sized)
    chosen = check.select_sweep(echo=lambda *a: None)
    assert chosen["fam_a"] == {"model": "small_a", "img_size": 64, "macs": 10**6}
    # no model under the limit: the family's smallest stands in for it, marked
    assert chosen["fam_b"] == {"model": "big_b2", "img_size": 64, "macs": 10**9, "over_max_macs": True}
    assert chosen["fam_c"]["model"] == "small_c" and "skipped" in chosen["fam_d"]
    assert chosen["fam_e"] == {"skipped": "its models are encoders, not image classifiers"}


def test_sweep_families_are_timm_model_modules():
    families = check.timm_families()
    assert len(families) >= 30 and "timm_model" not in families  # pass_pruned is registered by this package
    assert families["resnet"][0] == timm.list_models(module="resnet")[0]
    assert not any(n.startswith("test_") for names in families.values() for n in names)


def test_sized_macs_counts_at_the_check_size():
    size, macs = check.sized_macs("resnet10t")
    from pass_zoo.graph.cost_model import count_macs

    model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    assert size == 64 and macs == count_macs(model, torch.zeros(1, 3, 64, 64))


def test_sweep_resumes_and_writes_the_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(check, "select_sweep", lambda max_macs, echo: {
        "fam_a": {"model": "m_a", "img_size": 64, "macs": 5}, "fam_b": {"skipped": "cannot build"},
        "fam_c": {"model": "m_c", "img_size": 96, "macs": 7 * 10**8, "over_max_macs": True}})
    ran = []

    def child(name, img_size, timeout, threads):
        ran.append(name)
        ok = name == "m_a"
        return CheckResult(name, family="fam", img_size=64, stages={s: "ok" if ok else "skip" for s in STAGES},
                           reason="" if ok else "adapter: refused")

    monkeypatch.setattr(check, "_child", child)
    out, md = tmp_path / "sweep.json", tmp_path / "c.md"
    assert main(["check", "--sweep", str(out), "--md", str(md), "--machine", "2-core CPU"]) == 1
    assert ran == ["m_a", "m_c"]
    doc = json.loads(out.read_text())
    assert set(doc["results"]) == {"m_a", "m_c"} and doc["machine"] == "2-core CPU"
    table = md.read_text()
    assert "**1/2 (50 %) pass every stage**" in table and "Machine: 2-core CPU." in table
    assert "1 of 3 modules are checked on a model over 300 M MACs; 1 are left out: fam_b (cannot build)" \
        in table and "pass-zoo check --sweep" in table
    assert "| m_c | fam (> 300 M) |" in table and "| m_a | fam |" in table
    del doc["results"]["m_c"]  # an interrupted sweep
    out.write_text(json.dumps(doc))
    ran.clear()
    main(["check", "--sweep", str(out)])
    assert ran == ["m_c"]
    assert "1/2 architectures pass every stage" in capsys.readouterr().out


def test_sweep_flag_errors(capsys):
    assert main(["check", "--sweep", "x.json", "--model", "resnet18"]) == 2
    assert "exactly one of --model NAME, --all or --sweep JSON" in capsys.readouterr().err
    assert main(["check", "--sweep", "x.json", "--img-size", "32"]) == 2
    assert "--sweep picks each model's input size" in capsys.readouterr().err
