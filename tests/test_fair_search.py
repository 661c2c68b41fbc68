"""What keeps the method comparison fair and the search sound: equal compute per method, one BN regime
for label mapping and search, a held-out split for choosing settings, the walk's provisional masks at
the step's own budget, and a hypernetwork a few percent of the network it prunes."""
from __future__ import annotations

import json

import pytest
import timm
import torch

from pass_zoo.graph.sequence import build_layer_sequence
from pass_zoo.data import TaskData, hold_out
from pass_zoo.methods.pass_.hypernet import PassHyperNetwork, hypernet_files, hypernet_from_files
from pass_zoo.graph.masks import select_units
from pass_zoo.pipeline import PruneConfig, prune
from pass_zoo.prompt import AdditivePrompt
from pass_zoo.config import FinetuneConfig
from pass_zoo.config import SearchConfig
from pass_zoo.methods.pass_.search import MaskedSearchModel, build_hypernet
from pass_zoo.graph.cost_model import count_params

from conftest import make_model, randomise_bn, write_image_folder


def test_hypernetwork_is_a_few_percent_of_lite0():
    backbone = timm.create_model("tf_efficientnet_lite0", num_classes=10).eval()  # shapes only
    seq = build_layer_sequence(backbone, torch.zeros(1, 3, 64, 64))
    assert max(g.units for g in seq.groups) == 1280  # the widest group, which padded inputs would need
    hypernet = build_hypernet(seq, SearchConfig())
    assert count_params(hypernet) <= 0.06 * count_params(backbone)


@pytest.mark.parametrize("use_prior", [True, False])
def test_prompt_encoder_weights_learn_from_a_zero_prompt(use_prior):
    """A prompt starts at zero; the encoder's first convolution must still get a weight gradient."""
    units = [4, 8, 6]
    hn = PassHyperNetwork(units, hidden=8, use_prior=use_prior)
    g = torch.Generator().manual_seed(0)
    stats = [torch.rand(u, generator=g) + 0.1 for u in units]
    scores = hn(torch.zeros(3, 16, 16), lambda i, provisional: stats[i])
    torch.cat(scores).pow(2).sum().backward()
    first = hn.encoder.net[0].weight.grad
    assert first is not None and first.abs().sum() > 0


def test_no_prior_leaves_every_part_of_the_score_learned():
    units = [5, 7]
    stats = [torch.linspace(0.1, 1.0, u) for u in units]
    for use_prior in (True, False):
        hn = PassHyperNetwork(units, hidden=8, use_prior=use_prior)
        assert hasattr(hn, "prior_gain") == use_prior
        with torch.no_grad():
            for name, p in hn.named_parameters():
                p.fill_(1.0 if name == "prior_gain" else 0.0)
            scores = hn(torch.zeros(3, 16, 16), lambda i, provisional: stats[i])
        spread = max(float(s.max() - s.min()) for s in scores)
        if use_prior:  # the hand-made log-magnitude ranking is still there
            assert torch.allclose(scores[0], torch.log(stats[0] / stats[0].mean()), atol=1e-5)
        else:  # nothing learned yet, nothing ranked
            assert spread == 0.0


def test_without_the_prior_the_walk_starts_from_each_groups_magnitude_ranking():
    units = [5, 7, 6]
    g = torch.Generator().manual_seed(0)
    stats = [torch.rand(u, generator=g) + 0.1 for u in units]
    torch.manual_seed(0)
    hn = PassHyperNetwork(units, hidden=8, use_prior=False)
    assert not hasattr(hn, "prior_gain")
    with torch.no_grad():
        scores = hn(torch.zeros(3, 16, 16), lambda i, provisional: stats[i])
    for s, st in zip(scores, stats):
        # the learned weight on the standardised magnitude starts at 1; the unit embeddings add little
        z = (st - st.mean()) / st.std()
        assert float((s - s.mean() - z).abs().max()) < 0.1
        assert float(torch.corrcoef(torch.stack([s, st]))[0, 1]) > 0.99
    # and it is learned: the weight comes from the walk's output, which the search trains
    assert any(p.requires_grad for p in hn.gain.parameters())


def _magnitude_weights(hn, stats, zs):
    """Each group's weight a(h) on its standardised magnitude ``zs``: the score's slope against it."""
    scores = hn(torch.zeros(3, 16, 16), lambda i, provisional: stats[i])
    return torch.tensor([float(((s.detach() - s.detach().mean()) * z).sum() / (z * z).sum())
                         for s, z in zip(scores, zs)])


def test_without_the_prior_the_magnitude_weight_moves_slowly():
    # a(h) reads the whole walk output, so Adam moves it far faster than one parameter; without the prior the
    # part read from the walk moves at a tenth of that pace, and twenty steps that push it down leave the
    # ranking in place
    units = [5, 7, 6]
    g = torch.Generator().manual_seed(0)
    stats = [torch.rand(u, generator=g) + 0.1 for u in units]
    zs = [(st - st.mean()) / st.std() for st in stats]
    moved = {}
    for pace in (1.0, 0.1):
        torch.manual_seed(0)
        hn = PassHyperNetwork(units, hidden=16, use_prior=False, magnitude_pace=pace)
        for h in hn.heads:  # the slope then reads a(h) alone
            h.embed.requires_grad_(False).zero_()
        opt = torch.optim.Adam([p for p in hn.parameters() if p.requires_grad], lr=2e-3)
        for _ in range(20):
            scores = hn(torch.zeros(3, 16, 16), lambda i, provisional: stats[i])
            # a loss whose gradient flattens every group's magnitude ranking
            loss = sum((s * z).sum() for s, z in zip(scores, zs))
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            moved[pace] = 1.0 - _magnitude_weights(hn, stats, zs)
    assert float(moved[1.0].min()) > 0.3  # read at full pace, twenty steps take a third of it away
    assert 0.0 < float(moved[0.1].max()) < 0.4 * float(moved[1.0].min())  # still learned, but slowly
    # a saved hypernetwork keeps its pace; files written before the pace existed read a(h) as they learned it
    torch.manual_seed(0)
    files = hypernet_files(PassHyperNetwork(units, hidden=16, use_prior=False))
    assert json.loads(files["hypernet.json"])["magnitude_pace"] == 0.1
    assert hypernet_from_files(files).magnitude_pace == 0.1
    old = json.loads(files["hypernet.json"])
    del old["magnitude_pace"]
    assert hypernet_from_files({**files, "hypernet.json": json.dumps(old).encode()}).magnitude_pace == 1.0
    # with the prior, a(h) is read as learned, as before
    assert PassHyperNetwork(units, hidden=16).magnitude_pace == 1.0


def test_provisional_threshold_is_the_selection_at_the_next_budget():
    backbone = randomise_bn(make_model("resnet10t"))
    for p in backbone.parameters():
        p.requires_grad_(False)
    seq = build_layer_sequence(backbone, torch.zeros(1, 3, 32, 32))
    torch.manual_seed(0)
    prompt = AdditivePrompt(32, 4)
    cfg = SearchConfig(hidden=16, round_to=1)
    model = MaskedSearchModel(backbone, seq, prompt, build_hypernet(seq, cfg), 0.4, cfg)
    seen = []
    model.hypernet.register_forward_hook(lambda mod, inp, out: seen.append([s.detach() for s in out]) and None)
    model.set_budget(0.8, 0.4)  # a warm-up step: this step at 80 % MACs, the next at 40 %
    with torch.no_grad():
        _, hard = model.propose()
    scores = seen[-1]
    assert seq.macs([int(h.sum()) for h in hard]) <= 0.8 * seq.dense_macs
    at_next = select_units(scores, seq, 0.4, 1)
    thr = float(model.hypernet.threshold)
    assert [torch.equal(s > thr, m) for s, m in zip(scores, at_next)] == [True] * len(scores)
    assert sum(int(h.sum()) for h in hard) > sum(int(m.sum()) for m in at_next)


def test_holdout_comes_from_training_images_and_is_the_same_for_every_seed():
    train = torch.utils.data.TensorDataset(torch.arange(100).float(), torch.arange(100) % 3)
    val = torch.utils.data.TensorDataset(torch.zeros(7), torch.zeros(7, dtype=torch.long))
    task = TaskData(train, val, ["a", "b", "c"])
    split = hold_out(task, 20)
    held = {int(split.val[i][0]) for i in range(len(split.val))}
    rest = {int(split.train[i][0]) for i in range(len(split.train))}
    assert len(held) == 20 and len(rest) == 80 and not held & rest and held | rest == set(range(100))
    assert held == {int(hold_out(task, 20).val[i][0]) for i in range(20)}
    with pytest.raises(Exception, match="--holdout must be in"):
        hold_out(task, 100)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """pass and group-norm on the same tiny task: 3 stage-1 steps, 5 fine-tune steps."""
    root = tmp_path_factory.mktemp("fair")
    data = write_image_folder(root / "imgs", ["ant", "bee", "cat"], n_train=6, n_val=3)
    runs = {}
    for method in ("pass", "group-norm", "l1"):
        cfg = PruneConfig(model="resnet10t", pretrained="none", dataset=f"imagefolder:{data}", img_size=32,
                          target_macs=0.5, head="new", batch_size=6, method=method, onnx=False,
                          out=str(root / method), search=SearchConfig(steps=3, hidden=8),
                          finetune=FinetuneConfig(steps=5))
        prune(cfg)
        runs[method] = json.loads((root / method / "metrics.json").read_text())
    return runs


def test_every_method_gets_the_same_weight_updates(tiny_runs):
    for method, m in tiny_runs.items():
        assert m["compute"]["weight_updates"] == 5, method
    assert tiny_runs["pass"]["finetune_steps"] == 5
    assert tiny_runs["group-norm"]["finetune_steps"] == 2  # 3 of its 5 updates were the regularised training
    assert tiny_runs["l1"]["finetune_steps"] == 5


def test_compute_is_recorded_per_stage(tiny_runs):
    # every method spends the shared 3 batches training head and prompt on its masks (PASS: its search);
    # group-norm first trains the weights for as many
    for method, batches in (("pass", 3), ("group-norm", 6), ("l1", 3)):
        c = tiny_runs[method]["compute"]
        assert c["stage1_batches"] == batches and c["stage1_images"] == 6 * batches
        assert c["stage1_backward_passes"] == batches
        assert c["finetune_images"] == 6 * c["finetune_steps"]
        assert c["label_mapping_images"] == 0  # a new head: no label mapping


def test_a_new_head_learns_in_stage_1_for_every_method(tmp_path):
    """l1 reads only weights, yet with a new head it spends stage 1 on a linear probe, as PASS trains
    its head during the search: the fine-tune then starts from a trained head for every method."""
    from pass_zoo.graph.sequence import build_layer_sequence
    from pass_zoo.methods.torch_pruning import baseline_scores
    from pass_zoo.train.loop import make_accelerator

    model = make_model("resnet10t", num_classes=3)
    seq = build_layer_sequence(model, torch.zeros(1, 3, 32, 32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(12, 3, 32, 32, generator=g), torch.arange(12) % 3)
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    prompt = AdditivePrompt(32, 2)
    baseline_scores("l1", model, seq, prompt, loader, 3, make_accelerator("no"), train_head=True)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}  # the head learned; the backbone is untouched
    assert all(p.grad is None for p in model.parameters())


def test_taylor_with_a_new_head_trains_it_and_still_scores_every_group():
    from pass_zoo.methods.torch_pruning import baseline_scores
    from pass_zoo.train.loop import make_accelerator

    model = make_model("resnet10t", num_classes=3)
    seq = build_layer_sequence(model, torch.zeros(1, 3, 32, 32))
    head_before = model.fc.weight.detach().clone()
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(12, 3, 32, 32, generator=g), torch.arange(12) % 3)
    scores = baseline_scores("taylor", model, seq, AdditivePrompt(32, 2), torch.utils.data.DataLoader(data, 4),
                             3, make_accelerator("no"), train_head=True)
    assert [s.numel() for s in scores] == [grp.units for grp in seq.groups]
    assert all(torch.isfinite(s).all() for s in scores)
    assert not torch.equal(model.fc.weight, head_before)  # the head learned over the gradient batches


def test_masked_probe_trains_head_and_prompt_on_the_gated_network_only():
    """--baseline-probe masked: PASS's stage 1 with fixed masks. The head and the prompt learn, the
    backbone's weights and BN running statistics do not, and the head learned on the *masked*
    network (its features differ from the dense network's), with the same masks as without it."""
    from pass_zoo.methods.torch_pruning import group_scores, train_on_masks
    from pass_zoo.train.loop import make_accelerator
    import torch_pruning as tp

    torch.manual_seed(0)
    model = make_model("resnet10t", num_classes=3)
    randomise_bn(model)
    seq = build_layer_sequence(model, torch.zeros(1, 3, 32, 32))
    scores = group_scores(seq, tp.importance.GroupMagnitudeImportance(p=1, normalizer="mean"))
    units = select_units(scores, seq, 0.5, 1, "global")
    g = torch.Generator().manual_seed(2)
    data = torch.utils.data.TensorDataset(torch.randn(12, 3, 32, 32, generator=g), torch.arange(12) % 3)
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    prompt = AdditivePrompt(32, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompt_before = [p.detach().clone() for p in prompt.parameters()]
    losses = train_on_masks(model, seq, prompt, loader, units, SearchConfig(steps=4, lr_prompt=0.5, lr_head=0.05),
                            make_accelerator("no"))
    assert len(losses) == 4 and all(isinstance(v, float) and v > 0 for v in losses)
    after = model.state_dict()
    assert {k for k in before if not torch.equal(before[k], after[k])} == {"fc.weight", "fc.bias"}
    assert any(not torch.equal(a, b) for a, b in zip(prompt.parameters(), prompt_before))
    assert all(p.grad is None for p in model.parameters()) and not model.training


def test_the_fair_stage1_is_the_default_for_every_criterion(tmp_path):
    data = write_image_folder(tmp_path / "imgs", ["ant", "bee"], n_train=4, n_val=2)
    cfg = PruneConfig(model="resnet10t", pretrained="none", dataset=f"imagefolder:{data}", img_size=32,
                      head="new", batch_size=4, method="taylor", onnx=False, out=str(tmp_path / "run"),
                      search=SearchConfig(steps=2, hidden=8), finetune=FinetuneConfig(steps=1))
    assert cfg.search.probe == "masked"
    m = prune(cfg)
    assert m["compute"]["stage1_batches"] == 4  # 2 to probe the head and sum gradients, 2 on its masks
    assert len(m["probe_losses"]) == 2 and m["search_losses"] == []  # the 2 on its masks, each one's loss
