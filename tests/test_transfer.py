"""Transfer (paper Table 2) and the datasets it uses: class subsets and scikit-learn digits."""
import json

import pytest
import torch
from safetensors.torch import load_file

from pass_zoo.cli import main
from pass_zoo.data import DataSpec, load_task_data
from pass_zoo.errors import DataError, PassZooError
from pass_zoo.methods.pass_.hypernet import load_hypernet
from pass_zoo.transfer import transfer_config

SPEC = DataSpec(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
TINY = ["--model", "mobilenetv3_small_050", "--pretrained", "none", "--head", "new", "--img-size", "32",
        "--train-subset", "48", "--val-subset", "24", "--batch-size", "8", "--search-steps", "2",
        "--finetune-steps", "1", "--no-onnx"]


def test_class_subsets_are_relabelled_in_the_given_order():
    full = load_task_data("fashion-mnist", SPEC)
    part = load_task_data("fashion-mnist@7,5,9", SPEC)
    assert part.class_names == ["Sneaker", "Sandal", "Ankle boot"]
    assert len(part.train) == 18000 and len(part.val) == 3000  # 6000 / 1000 images per class
    x, y = part.val[0]  # val: no random flip, so images compare exactly
    i = part.val.indices[0]
    assert torch.equal(x, full.val[i][0])
    assert y == [7, 5, 9].index(int(full.val.labels[i]))
    assert sorted(set(part.train.labels.tolist())) == [0, 1, 2]


@pytest.mark.parametrize("bad", ["fashion-mnist@3", "fashion-mnist@0-12", "fashion-mnist@a-b", "fashion-mnist@2,2"])
def test_bad_class_lists_are_refused(bad):
    with pytest.raises(DataError, match="class"):
        load_task_data(bad, SPEC)


def test_sklearn_digits_split():
    task = load_task_data("sklearn-digits", SPEC)
    assert task.num_classes == 10 and len(task.train) + len(task.val) == 1797
    x, y = task.val[0]
    assert x.shape == (3, 16, 16) and -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.equal(task.train.labels, load_task_data("sklearn-digits", SPEC).train.labels)  # fixed split


def test_transfer_masks_and_hypernet_between_fashion_mnist_halves(tmp_path, capsys):
    source = tmp_path / "a"
    assert main(["prune", *TINY, "--dataset", "fashion-mnist@0-4", "--out", str(source)]) == 0
    hn = load_hypernet(source)
    assert hn.units == json.loads((source / "hypernet.json").read_text())["units"]

    # (a) the masks of task A, fine-tuned on task B
    out_a = tmp_path / "b-masks"
    assert main(["transfer", str(source), "--mode", "masks", "--dataset", "fashion-mnist@5-9",
                 "--out", str(out_a), "--finetune-steps", "1", "--no-onnx"]) == 0
    src_masks, new_masks = load_file(str(source / "masks.safetensors")), load_file(str(out_a / "masks.safetensors"))
    assert src_masks.keys() == new_masks.keys()
    assert all(torch.equal(src_masks[k], new_masks[k]) for k in src_masks)
    m = json.loads((out_a / "metrics.json").read_text())
    assert m["class_names"] == ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert m["config"]["transfer_mode"] == "masks" and m["config"]["model"] == "mobilenetv3_small_050"

    # (b) the frozen hypernetwork of task A reading a prompt learned on task B
    out_b = tmp_path / "b-hyper"
    assert main(["transfer", str(source), "--mode", "hypernet", "--dataset", "fashion-mnist@5-9",
                 "--out", str(out_b), "--search-steps", "2", "--finetune-steps", "1", "--no-onnx"]) == 0
    saved = load_file(str(out_b / "hypernet.safetensors"))
    original = load_file(str(source / "hypernet.safetensors"))
    for k in original:
        if k != "threshold":  # the walk's running threshold is state, not a learned weight
            assert torch.equal(saved[k], original[k]), k
    m = json.loads((out_b / "metrics.json").read_text())
    assert m["macs_slim"] <= m["target_macs"] * m["macs_dense"]
    assert "transfer (hypernet)" in capsys.readouterr().out


def test_transfer_refuses_a_source_without_what_it_needs(tmp_path):
    with pytest.raises(PassZooError, match="metrics.json"):
        transfer_config(tmp_path, "masks")
    (tmp_path / "metrics.json").write_text(json.dumps({"config": {"method": "taylor"}}))
    with pytest.raises(PassZooError, match="no hypernetwork"):
        transfer_config(tmp_path, "hypernet")
