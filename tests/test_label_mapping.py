"""Frequency label mapping (greedy one-to-one) and folding it into the classifier."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from pass_zoo.label_mapping import fold_label_mapping, frequency_label_mapping, prediction_counts

from conftest import make_model


def test_greedy_resolves_a_row_argmax_collision():
    counts = torch.tensor([[5, 4, 0],
                           [6, 1, 0],
                           [0, 3, 2]])
    assert counts.argmax(1).tolist() == [0, 0, 1]  # naive per-row argmax maps two targets onto source 0
    # by hand: 6 at (1,0) -> t1:s0; then 4 at (0,1) -> t0:s1; then t2 takes the last column
    assert frequency_label_mapping(counts) == [1, 0, 2]


def test_greedy_with_more_sources_than_targets():
    counts = torch.tensor([[1, 9, 8, 0],
                           [0, 10, 7, 3]])
    assert counts.argmax(1).tolist() == [1, 1]
    # 10 at (1,1) -> t1:s1; t0's best remaining column is s2 (8)
    assert frequency_label_mapping(counts) == [2, 1]


def test_greedy_is_greedy_not_optimal():
    # the largest count wins first even though the swap would total more (18 > 10)
    assert frequency_label_mapping(torch.tensor([[10, 9], [9, 0]])) == [0, 1]


def test_mapping_is_one_to_one_even_without_evidence():
    mapping = frequency_label_mapping(torch.zeros(4, 7, dtype=torch.long))
    assert len(mapping) == 4 and len(set(mapping)) == 4 and all(0 <= s < 7 for s in mapping)


def test_input_counts_are_not_modified():
    counts = torch.tensor([[3, 1], [2, 5]])
    copy = counts.clone()
    assert frequency_label_mapping(counts) == [0, 1]
    assert torch.equal(counts, copy)


def test_more_targets_than_sources_is_refused():
    with pytest.raises(ValueError, match="cannot map 3 target classes one-to-one onto 2 source classes"):
        frequency_label_mapping(torch.ones(3, 2))


def test_prediction_counts_by_hand():
    # the "model" predicts the argmax of its input, so predictions are set by construction
    preds = torch.tensor([2, 2, 0, 1, 2, 1])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    x = F.one_hot(preds, 4).float()
    loader = DataLoader(TensorDataset(x, labels), batch_size=4)
    counts = prediction_counts(nn.Identity(), loader, n_target=2, n_source=4)
    assert counts.tolist() == [[1, 0, 2, 0], [0, 2, 1, 0]]
    assert frequency_label_mapping(counts) == [2, 1]


@pytest.mark.parametrize("name", ["resnet10t", "mobilenetv3_small_050"])
def test_folded_head_gives_the_mapped_logits(name):
    model = make_model(name, num_classes=20)
    x = torch.randn(3, 3, 32, 32)
    mapping = [7, 3, 19, 0, 12]
    with torch.no_grad():
        full = model(x)
        folded = fold_label_mapping(model, mapping)
        out = folded(x)
    assert folded is model
    assert model.num_classes == 5
    assert model.get_classifier().out_features == 5
    assert out.shape == (3, 5)
    assert torch.allclose(out, full[:, mapping], atol=1e-6, rtol=0)


def test_fold_needs_a_linear_classifier():
    model = make_model("resnet10t", num_classes=0)  # timm: no classifier (Identity)
    with pytest.raises(ValueError, match="needs a Linear classifier, found Identity"):
        fold_label_mapping(model, [0, 1])
