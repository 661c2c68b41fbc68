"""Does stage 1 learn? Run one method's stage 1 on B2's setting and print, as one JSON line, its loss curve
(means of 20 steps), the top-1 of the slim network on held-out training images right after slimming, and
the groups cut to their 8-channel floor.

    python scripts/diagnose_search.py --tag pass-digits \
        --over '{"dataset": "sklearn-digits", "train_subset": null, "holdout": 300}'

``--over`` overrides B2's settings (any PruneConfig field; ``search`` merges into B2's). Lines are also
appended to ``--log``.
"""
import argparse, json, sys, time, math
import torch
from pass_zoo.config import PruneConfig, apply_overrides
from pass_zoo import pipeline as P
from pass_zoo.methods import get_method, MethodContext
from pass_zoo.train.loop import make_accelerator, PROGRESS
from pass_zoo.train.finetune import evaluate
from accelerate.utils import set_seed

ap = argparse.ArgumentParser()
ap.add_argument("--over", default="{}")
ap.add_argument("--tag", default="")
ap.add_argument("--log", default="search_diagnosis.jsonl")
a = ap.parse_args()
torch.set_num_threads(1)
base = dict(model="tf_efficientnet_lite0", pretrained="bundled", dataset="fashion-mnist", img_size=64,
            train_subset=10000, holdout=2000, head="new", batch_size=64, onnx=False, adapt_bn=True, quiet=True,
            target_macs=0.1, search={"steps": 160}, diagnostic_images=0)
over = json.loads(a.over)
for k in ("search",):
    if k in over: base[k] = {**base[k], **over.pop(k)}
base.update(over)
cfg = apply_overrides(PruneConfig(), base, "diag")
cfg.validate()
PROGRESS.update(quiet=True)
acc = make_accelerator()
set_seed(cfg.seed)
t0 = time.time()
method = get_method(cfg.method)
bb = P.load_backbone(cfg)
prompt = P.make_prompt(P.prompt_kind(cfg, method), bb.spec.img_size, cfg.prompt_size)
task = P.load_task(cfg, bb.spec)
data = P.load_data(cfg, task, acc)
head, _ = P.attach_head(cfg, bb.model, prompt, data, acc, {})
seq = P.layer_sequence(bb.model, bb.spec.img_size)
budget = P.run_budget(cfg, bb.model, seq, acc, bb.model_kwargs)
res = method.produce(MethodContext(bb.model, seq, prompt, data.train_loader, cfg, acc, None, head, budget))
from pass_zoo.graph.masks import to_unit_masks
kept = [int(u.sum()) for u in to_unit_masks(res.masks, seq)]
floors = [g.name for g, k in zip(seq.groups, kept) if k <= 8 // max(1, g.unit_width) and g.units > 8]
prompted, _ = P.slim_stage(bb.model, res.masks, prompt, seq.example_input,
                           P._calibration_loader(cfg, data, acc, cfg.seed + 3), cfg.bn_calibration_batches)
top1 = evaluate(prompted, data.val_loader, acc)
L = res.record.get("search_losses", [])
def avg(xs): return sum(xs) / max(1, len(xs))
out = {"tag": a.tag, "over": a.over, "first10": avg(L[:10]), "last20": avg(L[-20:]),
       "curve": [round(avg(L[i:i+20]), 3) for i in range(0, len(L), 20)],
       "top1_after_search_holdout": top1, "macs": seq.macs(kept) / seq.dense_macs, "floors": floors,
       "kept": kept, "secs": round(time.time() - t0, 1)}
print(json.dumps(out))
with open(a.log, "a") as f:
    f.write(json.dumps(out) + "\n")
