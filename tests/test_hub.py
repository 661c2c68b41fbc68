"""Publishing: model cards, recipes and the zoo, and ``pass-zoo publish`` through huggingface_hub's real
client code down to HTTP, against a loopback server that emulates the Hub API (tests/hub_emulator.py).

One real tiny run (resnet10t, random init, 32 px, a few steps) is built once with ``pass-zoo zoo build``
from a recipe; tests that change files work on copies of it.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import re
import shutil
import socket
from pathlib import Path

import pytest
import timm
import torch
import yaml

import pass_zoo
import pass_zoo.publish.card as card_module
from pass_zoo.publish.card import CardError, render_card
from pass_zoo.cli import _prune_config, build_parser, explicit_prune_flags, main
from pass_zoo.config import PRUNE_FLAGS
from pass_zoo.publish.hub import PUBLISH_FILES
from pass_zoo.fileio import RUN_MARKER

HYPERNET_FILES = {"hypernet.json", "hypernet.safetensors"}  # a PASS run publishes its hypernetwork too
from pass_zoo.recipes import RecipeError, load_recipe

from conftest import offline_hf_cache
from hub_emulator import HubEmulator

# huggingface_hub's own LFS upload (lfs.py) passes a file object as data=; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:Use .content=:DeprecationWarning")

NAME = "tiny-fmnist-pass50"
REPO = "passzoo-test/tiny-fmnist-pass50"
TINY_RECIPE = f"""\
name: tiny-fmnist-pass{{percent}}
hub_id: {REPO}
model: resnet10t
pretrained: none
head: new
dataset: fashion-mnist
target_macs: 0.5
img_size: 32
batch_size: 8
train_subset: 32
val_subset: 32
seed: 3
search:
  steps: 2
finetune:
  steps: 2
"""


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _error_line(argv) -> str:
    rc, _, err = _run(argv)
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pass-zoo: error: ") and "Traceback" not in err, err
    return lines[0]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _snapshot(folder: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns, _sha(p.read_bytes())) for p in folder.iterdir()}


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A recipes folder with the tiny recipe (+ one never built) and the tiny entry built into runs/."""
    root = tmp_path_factory.mktemp("zoo")
    (root / "recipes").mkdir()
    (root / "recipes" / "tiny.yaml").write_text(TINY_RECIPE)
    (root / "recipes" / "other.yaml").write_text("model: resnet18\ntarget_macs: 0.3\nhub_id: someone/r18\n")
    rc, out, err = _run(["zoo", "build", NAME, "--recipes-dir", str(root / "recipes"),
                         "--runs-dir", str(root / "runs")])
    assert rc == 0, err[-3000:]
    return {"root": root, "recipes": root / "recipes", "runs": root / "runs", "run": root / "runs" / NAME,
            "stdout": out}


@pytest.fixture
def run_copy(zoo, tmp_path):
    dst = tmp_path / NAME
    shutil.copytree(zoo["run"], dst)
    return dst


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The emulated Hub on a loopback port, a token, and huggingface_hub pointed at it (LFS path)."""
    import huggingface_hub.constants as hf_constants

    with HubEmulator() as server:
        # ENDPOINT, HF_HUB_DISABLE_XET and the token path are read at import time: patch the constants too
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(hf_constants, "ENDPOINT", server.url)
        monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)  # Xet storage is not emulated
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hf_constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
        monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
        monkeypatch.setenv("HF_TOKEN", "hf_emulated_write_token")
        # no upload progress bars on stderr, so error tests can check for exactly one line
        monkeypatch.setattr(importlib.import_module("huggingface_hub.utils.tqdm"), "HF_HUB_DISABLE_PROGRESS_BARS", True)
        yield server


# ----------------------------------------------------------------------------- zoo build + card
def test_zoo_build_writes_a_publishable_folder_with_card(zoo):
    run = zoo["run"]
    assert {p.name for p in run.iterdir()} == set(PUBLISH_FILES) | HYPERNET_FILES | {RUN_MARKER}  # no temporaries
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["recipe"]["name"] == NAME and metrics["recipe"]["path"] == str(zoo["recipes"] / "tiny.yaml")
    assert metrics["command"].startswith("pass-zoo zoo build tiny-fmnist-pass50 --recipes-dir")
    assert metrics["config"]["search"]["steps"] == 2 and metrics["config"]["onnx"] is True
    assert f"card            {run / 'README.md'}" in zoo["stdout"]

    rc, out, err = _run(["publish", str(run), "--repo-id", REPO, "--dry-run"])
    assert rc == 0, err
    assert "card (README.md):" in out  # rendered by zoo build for the recipe's hub_id: kept as it is
    assert f'hf-hub:{REPO}"' in out


def test_card_front_matter_and_table_come_from_the_run_files(run_copy, monkeypatch):
    run = run_copy
    for f in ("README.md", "kept_channels.png"):
        (run / f).unlink()
    rc, out, err = _run(["card", str(run), "--repo-id", "me/tiny"])
    assert rc == 0, err
    assert "latency not measured" in out
    card = (run / "README.md").read_text()
    assert (run / "kept_channels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![Kept channels per group](kept_channels.png)" in card

    m = json.loads((run / "metrics.json").read_text())
    meta = _front_matter(card)
    assert meta["library_name"] == "timm" and meta["pipeline_tag"] == "image-classification"
    assert meta["license"] == "apache-2.0"
    assert {"image-classification", "pruning", "pass", "timm", "onnx"} <= set(meta["tags"])
    assert meta["datasets"] == ["zalando-datasets/fashion_mnist"]
    assert "base_model" not in meta  # --pretrained none: no base weights to point to
    result = meta["model-index"][0]["results"][0]
    assert meta["model-index"][0]["name"] == "tiny"
    assert result["task"]["type"] == "image-classification"
    assert result["dataset"]["type"] == "zalando-datasets/fashion_mnist"
    assert result["metrics"][0]["value"] == round(100 * m["top1"], 2)

    assert f"| MACs | {m['macs_dense'] / 1e6:.2f} M | {m['macs_slim'] / 1e6:.2f} M " \
           f"({100 * m['macs_slim'] / m['macs_dense']:.1f} %) |" in card
    assert f"| parameters | {m['params_dense'] / 1e6:.2f} M | {m['params_slim'] / 1e6:.2f} M " in card
    assert f"| **{100 * m['top1']:.2f} %** |" in card
    assert f"{100 * m['top1_after_search']:.2f} %" in card
    assert "| ORT CPU latency | not measured | not measured |" in card
    assert f"{m['val_images']} test images" in card
    assert m["command"] in card and "Recipe `" in card and "hf-hub:me/tiny" in card
    export = json.loads((run / "export.json").read_text())
    assert f"{export['max_abs_diff_random']:.2g} on random inputs" in card
    masks = json.loads((run / "masks.json").read_text())
    kept, total = sum(g["kept"] for g in masks["groups"]), sum(g["total"] for g in masks["groups"])
    assert f"{len(masks['groups'])} channel groups in forward order; {kept} of {total} channels kept" in card
    narrow = min(masks["groups"], key=lambda g: g["kept"] / g["total"])
    assert f"Narrowest group: `{narrow['name']}`, {narrow['kept']} of {narrow['total']} channels kept" in card
    assert masks["narrowest_group"]["kept_fraction"] == min(g["kept_units"] / g["units"] for g in masks["groups"])

    # a measured latency.json replaces "not measured" with its numbers
    assert main(["latency", str(run), "--batch", "1", "--repeats", "2", "--warmup", "0", "--threads", "1",
                 "--json", str(run / "latency.json")]) == 0
    lat = json.loads((run / "latency.json").read_text())["results"][0]
    card = render_card(run, "me/tiny")
    assert f"| ORT CPU latency, batch 1 | {lat['dense_ms']:.2f} ms | {lat['slim_ms']:.2f} ms " \
           f"({lat['speedup']:.2f}x faster) |" in card
    assert "| ORT CPU latency | not measured" not in card

    # pretrained weights: base_model and license follow timm's pretrained_cfg of the base architecture
    m["config"]["pretrained"] = "timm"
    (run / "metrics.json").write_text(json.dumps(m))
    meta = _front_matter(render_card(run, "me/tiny"))
    cfg = timm.models.get_pretrained_cfg("resnet10t")
    assert meta["base_model"] == cfg.hf_hub_id and meta["license"] == cfg.license


def test_card_metadata_parses_back_through_huggingface_hub(run_copy, monkeypatch):
    """The Hub reads the card with huggingface_hub's ModelCard: the model-index must come back as the
    run's own result, and a template whose front matter breaks is refused, not written."""
    from huggingface_hub import ModelCard

    run = run_copy
    m = json.loads((run / "metrics.json").read_text())
    card = ModelCard(render_card(run, "me/tiny"), ignore_metadata_errors=False)
    assert card.data.library_name == "timm" and card.data.pipeline_tag == "image-classification"
    assert card.data.model_name == "tiny" and card.data.datasets == ["zalando-datasets/fashion_mnist"]
    (result,) = card.data.eval_results
    assert (result.task_type, result.dataset_type, result.dataset_split, result.metric_type) == \
        ("image-classification", "zalando-datasets/fashion_mnist", "test", "accuracy")
    assert result.metric_value == round(100 * m["top1"], 2)

    # a template whose front matter no longer parses is refused before anything is written
    templates = run.parent / "templates"
    shutil.copytree(card_module.template_dir(), templates)
    text = (templates / "model_card.md").read_text()
    (templates / "model_card.md").write_text(text.replace("$front_matter", "$front_matter  - [unclosed\n", 1))
    monkeypatch.setattr(card_module, "template_dir", lambda: templates)
    with pytest.raises(CardError, match="front matter"):
        render_card(run, "me/tiny")


def test_card_refuses_a_missing_metric(run_copy):
    run = run_copy
    (run / "README.md").unlink()
    m = json.loads((run / "metrics.json").read_text())
    del m["top1"]
    (run / "metrics.json").write_text(json.dumps(m))
    with pytest.raises(CardError, match="metrics.json has no value for 'top1'"):
        render_card(run)
    assert "'top1'" in _error_line(["card", str(run)])
    assert not (run / "README.md").exists()

    m["top1"], m["head"] = 0.5, "flm"  # a label-mapped run must show its zero-shot dense top-1
    (run / "metrics.json").write_text(json.dumps(m))
    with pytest.raises(CardError, match="'top1_dense_zero_shot'"):
        render_card(run)
    (run / "masks.json").unlink()
    assert "masks.json is missing" in _error_line(["card", str(run)])


# ----------------------------------------------------------------------------- publish refusals
def test_publish_refuses_incomplete_and_failed_parity_runs(run_copy, zoo):
    run = run_copy
    (run / "masks.safetensors").unlink()
    assert "incomplete run, missing masks.safetensors" in _error_line(
        ["publish", str(run), "--repo-id", REPO, "--dry-run"])
    assert "missing masks.safetensors" in _error_line(["publish", str(run), "--repo-id", REPO])
    shutil.copy(zoo["run"] / "masks.safetensors", run)

    export = json.loads((run / "export.json").read_text())
    (run / "export.json").write_text(json.dumps({**export, "passed": False}))
    err = _error_line(["publish", str(run), "--repo-id", REPO, "--dry-run"])
    assert "ONNX parity check did not pass (export.json passed=False)" in err

    (run / "export.json").write_text(json.dumps(export))
    with open(run / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    assert "model.onnx is not the file export.json verified" in _error_line(
        ["publish", str(run), "--repo-id", REPO, "--dry-run"])

    (run / "model.onnx").unlink()
    assert "missing model.onnx" in _error_line(["publish", str(run), "--repo-id", REPO, "--dry-run"])


def test_dry_run_changes_nothing(run_copy, monkeypatch):
    run = run_copy
    (run / "README.md").unlink()  # the card must be rendered in memory only
    (run / "kept_channels.png").unlink()
    before = _snapshot(run)
    monkeypatch.delenv("HF_TOKEN", raising=False)  # a dry run needs no token and no network
    rc, out, err = _run(["publish", str(run), "--repo-id", "me/other-name", "--dry-run", "--private"])
    assert rc == 0, err
    assert _snapshot(run) == before
    assert "would upload to me/other-name@main (private)" in out
    for name in PUBLISH_FILES:
        assert re.search(rf"^  {re.escape(name)} ", out, re.M), name
    size = (run / "model.safetensors").stat().st_size
    assert f"{size / 1024 / 1024:.1f} MB" in out and "(rendered on publish)" in out
    assert _front_matter(out[out.index("---\n"):])["model-index"][0]["name"] == "other-name"


def test_publish_without_token_or_network_fails_cleanly(run_copy, monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    run = run_copy
    before = _snapshot(run)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    assert "no Hugging Face token" in _error_line(["publish", str(run), "--repo-id", REPO])
    assert _snapshot(run) == before

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(hf_constants, "ENDPOINT", dead)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
    err = _error_line(["publish", str(run), "--repo-id", REPO, "--token", "hf_x"])
    assert f"creating {REPO} on the Hub failed, nothing was uploaded: cannot reach the Hub at {dead}" in err
    assert _snapshot(run) == before  # no hub.json: nothing was published


def test_create_repo_refused_uploads_nothing(run_copy, hub):
    run = run_copy
    hub.fail["create"] = 403
    err = _error_line(["publish", str(run), "--repo-id", REPO])
    assert "nothing was uploaded" in err and "403 Forbidden" in err
    # create_repo(exist_ok=True) looks the repo up after a 403 (it might exist): it does not
    assert [r[0] for r in hub.requests if r[0] != "harnesses"] == ["create", "repo_info"]
    assert hub.commits == [] and not (run / "hub.json").exists()

    hub.fail = {"commit": 401}  # the repo exists, the commit is refused: no hub.json either
    err = _error_line(["publish", str(run), "--repo-id", REPO])
    assert "uploading to" in err and "401 Unauthorized" in err
    assert hub.commits == [] and not (run / "hub.json").exists()


# ----------------------------------------------------------------------------- publish through HTTP
def test_publish_sends_every_file_to_the_hub_api_and_the_upload_loads_back(run_copy, hub, tmp_path, monkeypatch):
    run = run_copy
    (run / "README.md").unlink()  # rendered automatically for the target repo
    rc, out, err = _run(["publish", str(run), "--repo-id", REPO, "--private"])
    assert rc == 0, err
    assert [r for r in hub.requests if r[0] == "unexpected"] == []
    assert hub.created == [{"name": "tiny-fmnist-pass50", "organization": "passzoo-test", "visibility": "private"}]
    assert all(r[3].get("authorization") == "Bearer hf_emulated_write_token"
               for r in hub.requests if r[0] in ("create", "preupload", "commit"))
    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert commit["repo"] == REPO and commit["revision"] == "main"
    assert commit["content_type"] == "application/x-ndjson"
    assert set(commit["files"]) == set(PUBLISH_FILES) | HYPERNET_FILES  # every publishable file, nothing else
    for name, data in commit["files"].items():
        assert _sha(data) == _sha((run / name).read_bytes()), name
    assert {"model.safetensors", "model.onnx", "masks.safetensors", "kept_channels.png"} <= set(commit["lfs"])
    assert hub.validated and _front_matter(hub.validated[0])["model-index"][0]["name"] == "tiny-fmnist-pass50"

    record = json.loads((run / "hub.json").read_text())
    assert record["repo_id"] == REPO and record["revision"] == "main" and record["private"] is True
    assert record["commit_url"].startswith(f"{hub.url}/{REPO}/commit/") and record["commit_url"] in out
    assert record["files"] == {name: _sha(data) for name, data in commit["files"].items()}

    # What the Hub received, served from an offline cache, loads through timm and runs the card's snippets
    expected = timm.create_model(f"local-dir:{run}", pretrained=True).eval()
    offline_hf_cache(tmp_path, monkeypatch, commit["files"], repo=REPO)
    model = timm.create_model(f"hf-hub:{REPO}", pretrained=True).eval()
    assert isinstance(model, pass_zoo.PassPrunedModel)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), expected(x))

    from PIL import Image

    cwd = tmp_path / "user"
    cwd.mkdir()
    Image.new("L", (28, 28), 128).save(cwd / "image.png")
    monkeypatch.chdir(cwd)
    card = commit["files"]["README.md"].decode()
    blocks = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(blocks) == 2 and f'timm.create_model("hf-hub:{REPO}", pretrained=True)' in blocks[0]
    namespace, printed = {}, io.StringIO()
    with contextlib.redirect_stdout(printed):
        for block in blocks:  # the card's code, as written
            exec(compile(block, "README.md", "exec"), namespace)
    torch_label, onnx_label = printed.getvalue().split()
    assert torch_label == onnx_label and torch_label in model.pretrained_cfg["label_names"]


def test_publish_to_a_branch_through_the_default_upload_pipeline(run_copy, hub, monkeypatch):
    """huggingface_hub's default path when hf_xet is installed (the streamed pipeline), with a Hub that
    keeps every file inline -- the Xet storage transfer itself is not emulated."""
    import huggingface_hub.constants as hf_constants
    from huggingface_hub.utils._runtime import is_xet_available  # what upload_folder consults

    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", False)
    assert is_xet_available()  # so upload_folder takes the streamed pipeline, not create_commit
    hub.inline_all = True
    run = run_copy
    rc, out, err = _run(["publish", str(run), "--repo-id", REPO, "--revision", "v1"])
    assert rc == 0, err
    assert [r for r in hub.requests if r[0] == "unexpected"] == []
    assert hub.created == [{"name": "tiny-fmnist-pass50", "organization": "passzoo-test"}]  # Hub's default visibility
    assert hub.branches == [(REPO, "v1")]
    (commit,) = hub.commits
    assert commit["revision"] == "v1" and set(commit["files"]) == set(PUBLISH_FILES) | HYPERNET_FILES
    assert commit["lfs"] == []
    for name, data in commit["files"].items():
        assert _sha(data) == _sha((run / name).read_bytes()), name
    assert json.loads((run / "hub.json").read_text())["revision"] == "v1"


# ----------------------------------------------------------------------------- recipes and the zoo
def test_recipe_loading_and_clear_errors(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(TINY_RECIPE)
    name, cfg, extras = load_recipe(path)
    assert name == NAME and extras["hub_id"] == REPO and extras["path"] == str(path)
    assert (cfg.model, cfg.target_macs, cfg.img_size, cfg.search.steps, cfg.finetune.steps) == \
        ("resnet10t", 0.5, 32, 2, 2)
    assert isinstance(cfg.target_macs, float)

    path.write_text("model: resnet50\ntarget_macs: 0.3\n")
    assert load_recipe(path)[0] == "resnet50-pass30"  # the default name pattern

    for text, message in [
        ("modle: resnet50\n", "unknown recipe key 'modle'"),
        ("search:\n  stpes: 3\n", "unknown recipe key 'search.stpes'"),
        ("target_macs: half\n", "'target_macs' must be float"),
        ("search:\n  steps: 2.5\n", "'search.steps' must be int"),
        ("out: runs/x\n", "'out' is not a recipe setting"),
        ("target_macs: 1.5\n", "--target-macs must be in (0, 1]"),
        ("name: '{arch}-{size}'\n", "name pattern"),
        ("- a list\n", "must be a YAML mapping"),
        ("model: [unclosed\n", "is not valid YAML"),
    ]:
        path.write_text(text)
        with pytest.raises(RecipeError, match=re.escape(message)):
            load_recipe(path)
    path.write_text("modle: resnet50\n")
    assert "unknown recipe key 'modle'" in _error_line(["prune", "--recipe", str(path)])


def test_every_prune_flag_maps_to_a_config_field():
    prune_parser = build_parser()._subparsers._group_actions[0].choices["prune"]
    dests = {a.dest for a in prune_parser._actions} - {"help", "recipe", "num_processes"}  # num_processes: how to launch, not what to run
    assert dests == set(PRUNE_FLAGS)
    args = prune_parser.parse_args([])
    assert _prune_config(args) == pass_zoo.PruneConfig()  # the parser's defaults are the dataclass's


def test_recipe_values_are_defaults_and_typed_flags_override(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(TINY_RECIPE + "onnx: true\n")
    _, base, _ = load_recipe(path)
    argv = ["-v", "prune", "--recipe", str(path), "--seed", "0", "--search-steps", "7", "--no-onnx",
            "--target-macs", "0.6"]
    args = build_parser().parse_args(argv)
    given = explicit_prune_flags(argv)
    assert given == {"recipe", "seed", "search_steps", "no_onnx", "target_macs"}
    cfg = _prune_config(args, base, given)
    assert cfg.seed == 0  # typed explicitly, even though 0 is also the parser's default
    assert (cfg.search.steps, cfg.onnx, cfg.target_macs) == (7, False, 0.6)
    assert (cfg.model, cfg.img_size, cfg.head, cfg.finetune.steps, cfg.search.round_to) == ("resnet10t", 32, "new", 2, 8)
    assert base.seed == 3 and base.search.steps == 2  # the recipe's own config is not modified


def test_prune_with_a_recipe_records_it(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(TINY_RECIPE)
    out = tmp_path / "run"
    rc, stdout, err = _run(["prune", "--recipe", str(path), "--search-steps", "1", "--finetune-steps", "0",
                            "--val-subset", "16", "--no-onnx", "--out", str(out)])
    assert rc == 0, err[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["recipe"] == {"path": str(path), "name": NAME, "hub_id": REPO, "values": yaml.safe_load(TINY_RECIPE)}
    assert m["config"]["search"]["steps"] == 1 and m["config"]["finetune"]["steps"] == 0
    assert m["config"]["img_size"] == 32 and m["config"]["model"] == "resnet10t" and m["val_images"] == 16
    assert not (out / "model.onnx").exists()


def test_zoo_list_shows_recipes_runs_and_hub_ids(zoo, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(zoo["run"], runs / NAME)
    rc, out, err = _run(["zoo", "list", "--recipes-dir", str(zoo["recipes"]), "--runs-dir", str(runs)])
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "ARCH", "DATASET", "TARGET", "LOCAL", "RUN", "TOP-1", "MACS", "HUB"]
    m = json.loads((runs / NAME / "metrics.json").read_text())
    tiny = next(line for line in lines if line.startswith(NAME)).split()
    assert tiny == [NAME, "resnet10t", "fashion-mnist", "50", "%", str(runs / NAME), f"{100 * m['top1']:.2f}", "%",
                    f"{100 * m['macs_ratio']:.1f}", "%", REPO, "(not", "published)"]
    other = next(line for line in lines if line.startswith("resnet18-pass30")).split()  # never built
    assert other[1:] == ["resnet18", "fashion-mnist", "30", "%", "not", "built", "-", "-",
                         "someone/r18", "(not", "published)"]

    (runs / NAME / "hub.json").write_text(json.dumps({"repo_id": REPO, "revision": "main"}))
    rc, out, _ = _run(["zoo", "list", "--recipes-dir", str(zoo["recipes"]), "--runs-dir", str(runs)])
    assert next(line for line in out.splitlines() if line.startswith(NAME)).endswith(f"{REPO}@main")

    assert "no zoo entry named 'nope'" in _error_line(["zoo", "build", "nope", "--recipes-dir", str(zoo["recipes"])])
