"""``pass-zoo``: a thin command-line shell over the Python API."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import sys
from typing import List, Optional

from .backbone import _check_name
from .config import GROUPS, PruneConfig, RUN, WHAT, add_flags, choices_of, from_args
from .errors import PassZooError, one_line, stage_of
from .family import (check_family, family_members, family_pareto, member_folder, member_masks, member_repo_id,
                     prune_family)
from .fileio import atomic_write_json, atomic_write_text, remove_empty_run_dir, unlock_all_run_dirs
from .pipeline import prune
from .recipes import load_recipe, recipe_record
from .transfer import transfer_config
from .validate import (check_name, check_out_vs_inputs, check_output_file, check_repo_id, check_seed,
                       dataset_folder)
from .export.evaluation import evaluate_target
from .export.latency import format_latency, measure_latency
from .export.onnx import EXPORTERS, check_opset, export_run_onnx
from .publish.card import LATENCY_FILE, write_card
from .publish.hub import format_size, publish
from .publish.zoo import build_entry, format_zoo, zoo_entries
from .tools.bench import report, run_bench
from .tools import check as check_tool  # check_tool.run_check: callers may substitute it
from .tools.check import CURATED, markdown_table, run_all, run_sweep
from .tools.measure_costs import latency_points, measure_costs, plot_costs
from .train.launch import relaunch, without_num_processes
from .train.loop import PROGRESS

EPILOG = """examples (offline):
  pass-zoo prune --model tf_efficientnet_lite0 --pretrained bundled --dataset fashion-mnist \\
      --target-macs 0.5 --img-size 64 --out runs/lite0-fmnist-pass50
  pass-zoo zoo build lite0-fmnist-pass50        # the same from recipes/, plus the model card
  pass-zoo publish runs/lite0-fmnist-pass50 --repo-id ORG/lite0-fmnist-pass50 --dry-run
"""


def _add_prune_args(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """``prune``'s options: every config flag (see config.py) plus how to read and launch the run."""

    groups = {name: p.add_argument_group(name) for name in GROUPS}
    add_flags(groups, defaults)
    groups[WHAT].add_argument("--recipe", **({"default": None} if defaults else {}), metavar="FILE",
                              help="take every setting from a recipe YAML (see pass_zoo/recipes.py); flags given "
                                   "here override it; --out defaults to runs/NAME")
    groups[RUN].add_argument("--num-processes", type=int, **({"default": 1} if defaults else {}), metavar="N",
                             help="train on N processes: relaunches itself through 'accelerate launch --multi_gpu' "
                                  "(gloo on the CPU); --batch-size is per process (default: 1)")


def _prune_config(args, base=None, given=None):
    """``base`` (a recipe's PruneConfig; default: PruneConfig()) with the flags in ``given`` applied
    (default: every flag, i.e. the parser's defaults, which are PruneConfig's own)."""

    return from_args(args, base, given)


def explicit_prune_flags(argv: List[str]) -> set:
    """The prune flags typed on the command line (not defaults): ``argv`` parsed by a parser whose
    options have no defaults, so only given options appear in the namespace."""
    parser = argparse.ArgumentParser(prog="pass-zoo prune", add_help=False, argument_default=argparse.SUPPRESS)
    _add_prune_args(parser, defaults=False)
    rest = argv[argv.index("prune") + 1:] if "prune" in argv else argv
    return set(vars(parser.parse_args(rest)))


def _budget_line(m) -> str:
    """What the run kept: MACs (channel masks) or weights (weight masks)."""
    if m.get("mask_kind") == "weight":
        return (f"{100 * m['density']:.1f} % of the prunable weights kept (target {100 * m['target_density']:.0f} %), "
                f"{m['model_zip_bytes'] / 2 ** 20:.1f} of {m['model_bytes'] / 2 ** 20:.1f} MiB zipped")
    return f"{100 * m['macs_ratio']:.1f} % MACs"


def _summary(out, cfg, m) -> str:
    lines = [f"run folder      {out}"]
    if m.get("mask_kind") == "weight":
        lines += [
            f"weights         {m['weights_nonzero'] / 1e6:.2f} M nonzero of {m['params_dense'] / 1e6:.2f} M; "
            f"{100 * m['density']:.1f} % of the prunable weights kept (target {100 * m['target_density']:.0f} %, "
            f"classifier dense)",
            f"size            model.safetensors {m['model_bytes'] / 2 ** 20:.1f} MiB, zipped "
            f"{m['model_zip_bytes'] / 2 ** 20:.1f} MiB, as CSR {m['model_csr_bytes'] / 2 ** 20:.1f} MiB",
        ]
    else:
        budget = m.get("budget") or {"kind": "macs", "target": cfg.target_macs}
        kind = budget["kind"]
        macs_target = f", target {100 * budget['target']:.0f} %" if kind == "macs" else ""
        params_target = (f"  ({100 * m['params_slim'] / m['params_dense']:.1f} % kept, "
                         f"target {100 * budget['target']:.0f} %)" if kind == "params" else "")
        lines += [
            f"MACs            {m['macs_dense'] / 1e6:.1f} M -> {m['macs_slim'] / 1e6:.1f} M  "
            f"({100 * m['macs_ratio']:.1f} % kept{macs_target})",
            f"params          {m['params_dense'] / 1e6:.2f} M -> {m['params_slim'] / 1e6:.2f} M{params_target}",
        ]
        if kind == "latency":
            lines.append(f"latency         {budget['achieved']:.3g} ms measured, {budget['predicted']:.3g} ms by the "
                         f"table, target {budget['target']:g} ms (batch {budget['batch']}, {budget['threads']} ORT "
                         f"thread(s))" + ("" if budget["within_target"] else "  -- over the target on this measurement"))
    diagnostic = m.get("diagnostic_images", m["val_images"])  # the progress figures' val images
    if "top1_dense_zero_shot" in m:
        lines.append(f"top-1 dense     {100 * m['top1_dense_zero_shot']:.2f} %  (label mapping, no training, "
                     f"{diagnostic} val images)")
    lines += [
        f"top-1 searched  {100 * m['top1_after_search']:.2f} %  (slim + prompt, before fine-tuning, "
        f"{diagnostic} val images)",
        f"top-1 slim      {100 * m['top1']:.2f} %  (fine-tuned, {m['val_images']} val images)",
    ]
    if "onnx_max_abs_diff" in m:
        lines.append(f"ONNX            model.onnx, max |logit diff| vs torch {m['onnx_max_abs_diff']:.2g}")
    lines += [
        f"time            {m['total_seconds']:.0f} s  (search {m['search_seconds']:.0f} s, "
        f"fine-tune {m['finetune_seconds']:.0f} s, {m['world_size']} process(es))",
    ]
    return "\n".join(lines)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _remove_empty_tree(path, keep_folder: bool = False) -> None:
    """Remove ``path`` if it holds nothing but empty folders (a run that failed before writing anything);
    ``keep_folder``: it was there before, only the run's marker goes."""

    remove_empty_run_dir(path, keep_folder)


@contextlib.contextmanager
def _tidy_on_failure(out, enabled: bool = True):
    """A run that fails before writing anything leaves nothing behind: its new folder goes, and a folder
    that was there before loses only the run's marker."""
    from pathlib import Path

    existed = Path(out).exists()
    try:
        yield
    except BaseException:
        if enabled:
            _remove_empty_tree(out, keep_folder=existed)
        raise


def add_prune(sub) -> None:
    p = sub.add_parser("prune", help="search masks (PASS, VPNs or a baseline), slim, fine-tune and write a run folder",
                       description="Load a timm backbone, learn channel masks with PASS under a MACs budget and "
                       "physically slim the network -- or weight masks with VPNs under a density budget, the "
                       "masked weights zeroed -- then fine-tune it with its prompt and write the run folder.")
    _add_prune_args(p)
    p.set_defaults(func=cmd_prune)


def cmd_prune(args) -> int:
    from pathlib import Path


    recipe = None
    if args.recipe:

        name, base, extras = load_recipe(args.recipe)
        given = explicit_prune_flags(args._argv)
        typed_budgets = given & {"target_macs", "target_params", "target_latency", "target_density"}
        if typed_budgets:  # a typed budget replaces the recipe's, of whatever kind
            base.clear_budget()
        if "method" in given and "prompt" not in extras["values"]:  # the typed method's own prompt
            base.prompt = "auto"
        cfg = _prune_config(args, base, given)
        if "out" not in given:
            cfg.out = f"runs/{name}"
        recipe = recipe_record(name, extras)
    else:
        cfg = _prune_config(args)
    family = _family_targets(cfg)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if args.num_processes < 1:
        raise PassZooError(f"--num-processes must be >= 1, got {args.num_processes}")
    out = Path(cfg.out or cfg.default_out())
    args._run_dir = out  # where an unexpected error's traceback goes
    existed = out.exists()
    if args.num_processes > 1:
        if distributed:
            raise PassZooError("--num-processes starts its own processes; do not combine it with accelerate launch")

        rc = relaunch(without_num_processes(args._argv), args.num_processes, args.mixed_precision)
        if rc != 0 and not existed:
            _remove_empty_tree(out)
        return rc
    if args.recipe:

        check_out_vs_inputs(out, {f"--recipe {args.recipe}": args.recipe})
    command = "pass-zoo " + " ".join(shlex.quote(a) for a in args._argv)
    if family is not None:
        with _tidy_on_failure(out, enabled=not distributed):
            members = prune_family(cfg, family, command=command, recipe=recipe)
        if _is_main_process():
            kind = cfg.budget_kind()
            for target, m in zip(family, members):
                measured = (m.get("budget") or {}).get("achieved") if kind == "latency" else None
                ms = f", {measured:.3g} ms measured (target {target:g})" if isinstance(measured, (int, float)) else ""
                print(f"{out / member_folder(kind, target)}: top-1 {100 * m['top1']:.2f} % at {_budget_line(m)}{ms}")
            print(f"family          {out / 'family.json'} (one search: {members[0]['compute']['stage1_batches']} "
                  "stage-1 batches)")
        return 0
    with _tidy_on_failure(out, enabled=not distributed):
        m = prune(cfg, command=command, recipe=recipe)
    if _is_main_process():
        (out / "error.log").unlink(missing_ok=True)  # an earlier attempt's, now resumed to the end
        print(_summary(cfg.out or cfg.default_out(), cfg, m))
    return 0


def _family_targets(cfg: PruneConfig) -> Optional[List[float]]:
    """Several values of one budget flag: the family's budgets (checked), the config set to the first."""
    lists = [k for k in ("macs", "params", "latency") if isinstance(getattr(cfg, f"target_{k}"), list)]
    if not lists:
        return None
    given = [k for k in ("macs", "params", "latency", "density") if getattr(cfg, f"target_{k}") is not None]
    if len(given) > 1:
        raise PassZooError(f"a family takes one kind of budget; {' and '.join(f'--target-{k}' for k in given)} "
                           "were both given")
    kind = lists[0]
    targets = check_family(kind, getattr(cfg, f"target_{kind}"), cfg.method)
    setattr(cfg, f"target_{kind}", targets[0])
    return targets


def add_card(sub) -> None:
    p = sub.add_parser("card", help="write a run's model card (README.md) and kept_channels.png",
                       description="Render RUN_DIR's Hub model card from its metrics.json, masks.json, "
                       "export.json and latency.json (if measured), plus a per-layer kept-channel plot.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--repo-id", default=None, metavar="ORG/NAME",
                   help="the Hub repo the card's snippets load (default: hub.json's or the recipe's, else ORG/NAME)")
    p.set_defaults(func=cmd_card)


def cmd_card(args) -> int:
    if args.repo_id is not None:
        check_repo_id(args.repo_id)

    path = write_card(args.run_dir, repo_id=args.repo_id)
    print(f"wrote {path} and {path.parent / 'kept_channels.png'}")
    if not (path.parent / LATENCY_FILE).is_file():
        print(f"note: latency not measured (pass-zoo latency {args.run_dir} --json "
              f"{path.parent / LATENCY_FILE} adds it to the card)")
    return 0


def add_publish(sub) -> None:
    p = sub.add_parser("publish", help="upload a verified run folder to the Hugging Face Hub",
                       description="Check that RUN_DIR is complete and its ONNX export passed, render the card "
                       "if needed, create the repo and upload the publishable files in one commit.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--repo-id", required=True, metavar="ORG/NAME", help="Hub model repo to create or update")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its visibility)")
    p.add_argument("--revision", default=None, help="branch to commit to (created if missing; default: main)")
    p.add_argument("--dry-run", action="store_true", help="print the files and the card; change nothing")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN, then the stored login)")
    p.set_defaults(func=cmd_publish)


def cmd_publish(args) -> int:
    members = family_members(args.run_dir)
    if members:  # a family: each member to its own repo, ORG/NAME-<member>
        for run in members:
            args_member = argparse.Namespace(**{**vars(args), "run_dir": str(run),
                                                "repo_id": member_repo_id(args.repo_id, run)})
            cmd_publish(args_member)
        return 0
    result = publish(args.run_dir, args.repo_id, private=args.private, revision=args.revision,
                     token=args.token, dry_run=args.dry_run)
    listing = "\n".join(f"  {name:<20} {format_size(size):>22}" for name, size in result["files"])
    if args.dry_run:
        where = f"{args.repo_id}@{args.revision or 'main'}" + (" (private)" if args.private else "")
        print(f"dry run: would upload to {where}:\n{listing}\n"
              f"{'card (to be rendered):' if result['render_card'] else 'card (README.md):'}\n"
              f"{result['card']}")
        return 0
    record = result["record"]
    print(f"published {args.run_dir} to {args.repo_id}@{record['revision']}\n{listing}\n"
          f"commit {record['commit_url']}")
    return 0


def add_zoo(sub) -> None:
    p = sub.add_parser("zoo", help="the model zoo: recipes/*.yaml and their runs",
                       description="Zoo entries are recipes (recipes/*.yaml); 'build' runs one end to end "
                       "into RUNS_DIR/NAME, a folder ready for 'pass-zoo publish'.")
    zoo = p.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND")
    zoo.required = True
    for name, help_ in (("list", "every entry, whether it was built locally, its top-1 and MACs"),
                        ("build", "prune + export + card for one entry into RUNS_DIR/NAME")):
        q = zoo.add_parser(name, help=help_, description=help_)
        if name == "build":
            q.add_argument("name", metavar="NAME")
            q.add_argument("--overwrite", action="store_true", help="replace an existing RUNS_DIR/NAME")
        q.add_argument("--runs-dir", default="runs", help="where runs live (default: %(default)s)")
        q.add_argument("--recipes-dir", default=None, help="recipe folder (default: this checkout's recipes/)")
        q.set_defaults(func=cmd_zoo_list if name == "list" else cmd_zoo_build)


def cmd_zoo_list(args) -> int:
    print(format_zoo(zoo_entries(args.recipes_dir, args.runs_dir)))
    return 0


def cmd_zoo_build(args) -> int:
    from pathlib import Path


    check_name(args.name, "zoo entry")  # a folder under --runs-dir
    with _tidy_on_failure(Path(args.runs_dir) / args.name):
        m, cfg, card = build_entry(args.name, recipes_dir=args.recipes_dir, runs_dir=args.runs_dir,
                                   overwrite=args.overwrite, argv=args._argv)
    if _is_main_process():
        if isinstance(m, list):  # a family: a line per member
            for member, card_path in zip(m, card):
                print(f"{card_path.parent}: top-1 {100 * member['top1']:.2f} % at {_budget_line(member)}; card {card_path}")
        else:
            print(_summary(cfg.out, cfg, m) + f"\ncard            {card}")
    return 0


def _val_subset(text: str):
    """--val-subset: N images, 'all' for the whole validation split, 'run' for the run's own subset."""
    if text in ("all", "run"):
        return None if text == "all" else text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got '{text}'") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {n}")
    return n


def _write_json(path: Optional[str], obj) -> None:
    if path:

        atomic_write_json(path, obj)


def add_export(sub) -> None:
    p = sub.add_parser("export", help="(re-)write a run's verified model.onnx and export.json",
                       description="Export RUN_DIR's slim model with its prompt to ONNX, compare ONNX Runtime "
                       "with torch on random and validation images, and keep model.onnx only if they agree.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, at least 17 (default: %(default)s)")
    p.add_argument("--exporter", default="auto", choices=list(EXPORTERS),
                   help="torch.onnx exporter; auto: TorchScript, dynamo if that fails (default: %(default)s)")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from pathlib import Path


    run_dir = Path(args.run_dir.removeprefix("local-dir:"))
    check_opset(args.opset, args.exporter)
    report, error = export_run_onnx(run_dir, opset=args.opset, exporter=args.exporter)
    if error is not None:
        raise error
    real = "n/a" if report["max_abs_diff_real"] is None else f"{report['max_abs_diff_real']:.2g}"
    print(f"wrote {run_dir / 'model.onnx'} (opset {report['opset']}, {report['exporter']} exporter)\n"
          f"max |logit diff| vs torch: random {report['max_abs_diff_random']:.2g}, real {real} "
          f"({report['real_inputs']}); tolerance {report['tolerance']:g}")
    return 0


def _check_json(args, inputs, allowed=()) -> None:
    if args.json:

        check_output_file(args.json, "--json", inputs, allowed)


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="top-1 of a run folder, local-dir:/hf-hub: model or .onnx file",
                       description="Evaluate TARGET on a validation split. Defaults repeat the run's own "
                       "evaluation (dataset, --val-subset, --seed, batch size from its metrics.json).")
    p.add_argument("target", metavar="TARGET", help="RUN_DIR | local-dir:PATH | hf-hub:ORG/NAME | FILE.onnx")
    p.add_argument("--dataset", default=None, help="dataset (default: the run's)")
    p.add_argument("--val-subset", type=_val_subset, default="run",
                   help="N images or 'all' (default: the run's subset for the run's dataset, else all)")
    p.add_argument("--seed", type=int, default=None, help="subset seed (default: the run's)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: the run's eval batch)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: ORT's choice)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    if args.seed is not None:
        check_seed(args.seed)
    for flag, value in (("--batch-size", args.batch_size), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise PassZooError(f"{flag} must be at least 1, got {value}")
    local = None if args.target.startswith("hf-hub:") else args.target.removeprefix("local-dir:")
    _check_json(args, [local, dataset_folder(args.dataset or "")])
    r = evaluate_target(args.target, dataset=args.dataset, val_subset=args.val_subset, seed=args.seed,
                        batch_size=args.batch_size, threads=args.threads)
    subset = "all" if r["val_subset"] is None else r["val_subset"]
    line = (f"top-1 {100 * r['top1']:.2f} %  ({r['correct']}/{r['images']} {r['dataset']} validation images, "
            f"subset {subset}, seed {r['seed']}, {r['backend']})")
    if r["run_top1"] is not None:
        line += f"\nrun's metrics.json top-1 {100 * r['run_top1']:.2f} %"
    print(line)
    _write_json(args.json, r)
    return 0


def add_latency(sub) -> None:
    p = sub.add_parser("latency", help="dense vs slim latency with ONNX Runtime on the CPU",
                       description="Export the dense base model (random init) and the run's slim model to "
                       "ONNX and time them interleaved with ONNX Runtime on the CPU.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    _add_timing_flags(p, "--batch")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: %(default)s)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.set_defaults(func=cmd_latency)


def _add_timing_flags(p, batch_flag: str) -> None:
    """How ``latency`` and ``pareto`` time models with ONNX Runtime."""
    p.add_argument(batch_flag, type=int, nargs="+", default=[1, 32], help="batch sizes (default: 1 32)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per model and batch (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first (default: %(default)s)")


def cmd_latency(args) -> int:
    check_opset(args.opset)
    _check_json(args, [args.run_dir.removeprefix("local-dir:")], allowed=("latency.json",))
    report = measure_latency(args.run_dir, batches=args.batch, threads=args.threads, repeats=args.repeats,
                             warmup=args.warmup, opset=args.opset)
    print(format_latency(report))
    _write_json(args.json, report)
    return 0


def add_costs(sub) -> None:
    p = sub.add_parser("costs", help="measure search overhead, peak memory and speedup vs MACs",
                       description="Step time of a PASS search step with the hypernetwork vs the same step with "
                       "fixed masks, peak memory of search vs fine-tuning at the same batch (each in a fresh "
                       "process), and optionally ORT speedup vs MACs ratio of finished run folders.")
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--pretrained", default="bundled")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--target-macs", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=20, help="timed steps per kind (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latency", nargs="+", default=[], metavar="RUN_DIR",
                   help="also measure ORT speedup of these run folders (batch 1 and 32)")
    p.add_argument("--latency-threads", type=int, default=2, help="ONNX Runtime threads (default: %(default)s)")
    p.add_argument("--out", required=True, help="folder for costs.json and costs.png")
    p.set_defaults(func=cmd_costs)


def cmd_costs(args) -> int:
    from pathlib import Path


    for flag, value in (("--img-size", args.img_size), ("--batch", args.batch)):
        if value < 1:
            raise PassZooError(f"{flag} must be at least 1, got {value}")
    check_seed(args.seed)

    report = measure_costs(args.model, args.pretrained, args.img_size, args.batch, args.target_macs, args.steps,
                           args.warmup, args.threads, args.seed)
    if args.latency:
        report["latency"] = latency_points(args.latency, threads=args.latency_threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(str(out / "costs.json"), report)
    plot_costs(report, out / "costs.png")
    r = report["results"]
    for kind in r:
        print(f"{kind:>12}: {r[kind]['step_ms_median']:8.1f} ms/step  peak +{r[kind]['peak_over_setup_mib'] or 0:.0f} MiB")
    print(f"search step with / without hypernetwork: {report['search_step_with_over_without_hypernet']:.3f}x (CPU time, in turns)")
    if "search_over_finetune_peak_memory" in report:
        print(f"peak memory search / fine-tune: {report['search_over_finetune_peak_memory']:.2f}x")
    for p in report.get("latency", []):
        print(f"{p['run']}: {100 * p['macs_ratio']:.1f} % MACs, batch {p['batch']}: {p['speedup']:.2f}x")
    print(f"wrote {out / 'costs.json'} and {out / 'costs.png'}")
    return 0


def add_transfer(sub) -> None:
    p = sub.add_parser("transfer", help="reuse a run's masks (PASS, VPNs, ...) or PASS's hypernetwork on another task",
                       description="(a) --mode masks: the source run's masks, fine-tuned on the new dataset; "
                       "(b) --mode hypernet: the source run's hypernetwork, frozen, applied to a prompt learned "
                       "on the new dataset. Everything else comes from the source run's configuration.")
    p.add_argument("source", metavar="SOURCE_RUN",
                   help="a finished run folder (task A): any method for --mode masks, PASS for --mode hypernet")
    p.add_argument("--mode", choices=[m for m in choices_of("transfer_mode") if m != "member"], default="hypernet",
                   help="what to transfer")
    p.add_argument("--dataset", required=True, help="task B (e.g. fashion-mnist@5-9 or sklearn-digits)")
    p.add_argument("--out", required=True, help="run folder for task B")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--val-subset", type=int, default=None)
    p.add_argument("--search-steps", type=int, default=None, help="prompt-learning steps for --mode hypernet")
    p.add_argument("--finetune-steps", type=int, default=None)
    p.add_argument("--no-onnx", action="store_true")
    p.set_defaults(func=cmd_transfer)


def cmd_transfer(args) -> int:
    cfg = transfer_config(args.source, args.mode, dataset=args.dataset, out=args.out, overwrite=args.overwrite,
                          seed=args.seed, train_subset=args.train_subset, val_subset=args.val_subset,
                          onnx=False if args.no_onnx else None,
                          search={"steps": args.search_steps} if args.search_steps is not None else None,
                          finetune={"steps": args.finetune_steps} if args.finetune_steps is not None else None)
    with _tidy_on_failure(cfg.out):
        m = prune(cfg, command="pass-zoo " + " ".join(shlex.quote(a) for a in args._argv))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"transfer ({args.mode}) {args.source} -> {args.dataset}: top-1 {100 * m['top1']:.2f} % "
              f"at {_budget_line(m)} (searched {100 * m['top1_after_search']:.2f} %)")
    return 0


def add_masks(sub) -> None:
    p = sub.add_parser("masks", help="masks for another budget from a run's budget-conditioned search",
                       description="Read the masks for a new budget off RUN_DIR's hypernetwork, searched over a "
                       "range of budgets (prune --search-budget-range LO,HI), in one forward pass: no search. "
                       "Writes OUT/masks.safetensors and OUT/masks.json. The run's backbone is rebuilt from its "
                       "settings, so its pretrained weights must load here.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--target-macs", type=float, metavar="F", help="fraction of the dense MACs to keep")
    budget.add_argument("--target-params", type=float, metavar="F", help="fraction of the dense parameters to keep")
    budget.add_argument("--target-latency", type=float, metavar="MS", help="milliseconds, by the run's latency table")
    p.add_argument("--out", required=True, help="folder for masks.safetensors and masks.json")
    p.add_argument("--overwrite", action="store_true", help="replace masks an earlier call wrote to --out")
    p.set_defaults(func=cmd_masks)


def cmd_masks(args) -> int:
    kind, target = next((k, v) for k in ("macs", "params", "latency")
                        if (v := getattr(args, f"target_{k}")) is not None)
    summary = member_masks(args.run_dir, kind, target, args.out, args.overwrite)
    narrow = summary["narrowest_group"]
    print(f"wrote {args.out}/masks.safetensors: {100 * summary['macs_ratio']:.1f} % of the dense MACs "
          f"(--target-{kind} {target:g}); narrowest group {narrow['name']} keeps {narrow['kept']}/{narrow['total']}")
    return 0


def add_pareto(sub) -> None:
    p = sub.add_parser("pareto", help="top-1 against MACs and measured latency for a family's members",
                       description="Measure every member of FAMILY_DIR (prune --target-macs A B ...) and the "
                       "given baseline runs with ONNX Runtime on this CPU, and write FAMILY_DIR/pareto.json and "
                       "pareto.png: top-1 against MACs kept and against ms per batch, with the dense model.")
    p.add_argument("family_dir", metavar="FAMILY_DIR")
    p.add_argument("--baseline", nargs="+", default=[], metavar="RUN", help="other finished runs to plot beside it")
    _add_timing_flags(p, "--batches")
    p.set_defaults(func=cmd_pareto)


def cmd_pareto(args) -> int:
    doc = family_pareto(args.family_dir, args.baseline, args.batches, args.threads, args.repeats, args.warmup)
    for p in doc["points"]:
        ms = ", ".join(f"{v:.2f} ms @ {b}" for b, v in p["latency_ms"].items())
        print(f"{p['run']}: top-1 {100 * p['top1']:.2f} %, {100 * p['macs_ratio']:.1f} % MACs, {ms}")
    print(f"wrote {args.family_dir}/pareto.json and pareto.png")
    return 0


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="run (or resume) a grid of prune runs from a YAML spec",
                       description="Methods x MACs levels x seeds, each an ordinary prune run under OUT/cells/; "
                       "results.json after every cell (a finished cell reruns only when its settings changed) "
                       "and PNG plots.")
    p.add_argument("spec", metavar="SPEC.yaml")
    p.add_argument("--out", required=True, help="results folder (results.json, plots, cells/)")
    p.add_argument("--only", nargs="+", default=[], metavar="ID", help="run only cells whose id starts with ID")
    p.add_argument("--dry-run", action="store_true", help="list the cells that would run")
    p.add_argument("--rerun", nargs="+", default=[], metavar="ID",
                   help="forget the finished cells whose id starts with ID (record and folder) and run them again, "
                        "e.g. after a code change; resume an interrupted rerun without it")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="run N cells at once, each in its own process (default: 1)")
    p.add_argument("--threads", type=int, default=0, metavar="T",
                   help="torch threads per cell (default: CPU cores / N); set it when other jobs share the CPU")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    doc = run_bench(args.spec, args.out, only=args.only, dry_run=args.dry_run, jobs=args.jobs, threads=args.threads,
                    rerun=args.rerun,
                    log=lambda msg: print(msg, file=sys.stderr))
    if doc["runs"]:
        print(report(doc), end="")
    return 0


def add_check(sub) -> None:
    p = sub.add_parser("check", help="run every stage on a random-init timm model (or --all: a curated sweep)",
                       description="adapter -> 2-step PASS search -> slim (exact MACs) -> masked == slim -> "
                       "export -> strict timm reload -> ONNX parity, on a random-init model at a small input "
                       "size; one line per stage. --all checks a curated list, each model in its own process.")
    p.add_argument("--model", default=None, help="timm model name")
    p.add_argument("--all", action="store_true", help="check the curated list of architectures")
    p.add_argument("--img-size", type=int, default=None,
                   help="input size (default: 64; fixed-size models such as ViT/Swin are created at it)")
    p.add_argument("--sweep", default=None, metavar="JSON",
                   help="check one model per timm family (the first under --max-macs), results in JSON; "
                   "resumes: models already in it are skipped")
    p.add_argument("--max-macs", type=float, default=300, metavar="M",
                   help="with --sweep: the MACs limit (millions) of a family's chosen model (default: %(default)s)")
    p.add_argument("--machine", default="", help="with --sweep: the machine, as the table should name it")
    p.add_argument("--md", default=None, metavar="PATH",
                   help="with --all or --sweep: write the Markdown compatibility table")
    p.add_argument("--timeout", type=float, default=900, help="with --all: seconds per model (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="with --all: torch threads per model (default: %(default)s)")
    p.set_defaults(func=cmd_check)


def cmd_check(args) -> int:
    if sum((args.all, args.sweep is not None, args.model is not None)) != 1:
        raise PassZooError("check needs exactly one of --model NAME, --all or --sweep JSON")
    if args.img_size is not None and args.img_size < 1:
        raise PassZooError(f"--img-size must be at least 1, got {args.img_size}")

    for flag, path in (("--md", args.md), ("--sweep", args.sweep)):
        if path:
            check_output_file(path, flag)
    if args.model:

        _check_name(args.model)
        return 0 if check_tool.run_check(args.model, args.img_size).passed else 1
    if args.sweep is not None:
        if args.img_size is not None:
            raise PassZooError("--sweep picks each model's input size; leave out --img-size")

        command = "pass-zoo " + " ".join(shlex.quote(a) for a in args._argv)
        results = run_sweep(args.sweep, args.md, command, max_macs=args.max_macs * 1e6, timeout=args.timeout,
                            threads=args.threads, machine=args.machine)
        passed = sum(r.passed for r in results)
        print(f"{passed}/{len(results)} architectures pass every stage" + (f"; wrote {args.md}" if args.md else ""))
        return 0 if passed == len(results) else 1
    results = run_all(CURATED, args.img_size, timeout=args.timeout, threads=args.threads)
    passed = sum(r.passed for r in results)
    print(f"{passed}/{len(results)} architectures pass every stage")
    if args.md:

        command = "pass-zoo " + " ".join(shlex.quote(a) for a in args._argv)
        atomic_write_text(args.md, markdown_table(results, command))
        print(f"wrote {args.md}")
    return 0 if passed == len(results) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pass-zoo", description="Visual-prompt pruning for timm models: PASS (channel masks from a visual "
        "prompt and a recurrent hypernetwork, physically slimmed) or VPNs (weight masks learned with a visual "
        "prompt, unstructured), then fine-tune and export.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (e.g. how weights were loaded)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    # each command registers its parser beside its handler; this order is pass-zoo --help's
    for add in (add_prune, add_export, add_eval, add_latency, add_costs, add_transfer, add_masks, add_pareto,
                add_bench, add_card, add_publish, add_zoo, add_check):
        add(sub)
    return parser


def _set_progress(args) -> None:
    """Progress display for this command (prune's flags; the defaults elsewhere; checked by PruneConfig)."""

    d = PruneConfig()
    PROGRESS.update(quiet=getattr(args, "quiet", d.quiet), log_every=max(1, getattr(args, "log_every", d.log_every)))


def _say(line: str) -> None:
    """One line on stderr in a single write: workers of one run share the pipe, and ``print`` writes the
    text and its newline separately, so two workers' errors could otherwise end up on one line."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = argv
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        _set_progress(args)
        return args.func(args)
    except PassZooError as exc:
        _say(f"pass-zoo: error: {one_line(exc)}")
        return 2
    except OSError as exc:  # the environment (disk full, permissions), not a bug: one line too
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        _say(f"pass-zoo: error: {exc.strerror or one_line(exc)}{where}")
        return 2
    except KeyboardInterrupt as exc:
        _say(f"pass-zoo: {one_line(exc)}" if str(exc) else "pass-zoo: interrupted")
        return 130
    except Exception as exc:  # a bug or an unforeseen input: one line, the traceback in a file
        _say(f"pass-zoo: error: {internal_error_line(exc, args)}")
        return 2
    finally:

        unlock_all_run_dirs()


def internal_error_line(exc: BaseException, args) -> str:
    """The one line for an unexpected exception: the stage it escaped from, its message, and where the
    full traceback was written (the run folder's error.log when the folder exists, else a temp file)."""
    import tempfile
    import traceback
    from pathlib import Path


    text = "".join(traceback.format_exception(exc))
    stage = stage_of(exc) or args.command
    run_dir = getattr(args, "_run_dir", None) or getattr(args, "run_dir", None)
    where = None
    if run_dir and Path(run_dir).is_dir() and _is_main_process():
        try:
            atomic_write_text(Path(run_dir) / "error.log", f"pass-zoo {' '.join(args._argv)}\n{text}")
            where = Path(run_dir) / "error.log"
        except PassZooError:
            where = None
    if where is None:
        try:
            fd, name = tempfile.mkstemp(prefix="pass-zoo-error-", suffix=".log")
            with os.fdopen(fd, "w") as fh:
                fh.write(f"pass-zoo {' '.join(args._argv)}\n{text}")
            where = name
        except OSError:
            where = None
    tail = f"; full traceback in {where}" if where else ""
    return f"unexpected error in stage {stage}: {type(exc).__name__}: {one_line(exc)}{tail}"


if __name__ == "__main__":
    sys.exit(main())
