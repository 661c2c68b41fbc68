"""``pass-zoo-train TRAIN_PY [train.py arguments]``: fine-tune a slim export with timm's own train.py.

timm has no plugin entry point and its pip package does not ship ``train.py`` (it lives in the
pytorch-image-models repository). This wrapper imports pass_zoo -- which registers the ``pass_pruned``
architecture -- and then runs the given ``train.py`` as ``__main__`` with the remaining arguments, so::

    pass-zoo-train path/to/pytorch-image-models/train.py --model local-dir:RUN --pretrained \\
        --num-classes 37 --data-dir DATA --layer-decay 0.75 --grad-checkpointing ...

behaves exactly like ``python train.py ...`` with a pruned model. The same without this entry point::

    python -c "import pass_zoo, runpy, sys; sys.argv = sys.argv[1:]; \\
               runpy.run_path(sys.argv[0], run_name='__main__')" train.py --model local-dir:RUN ...

``PASS_ZOO_TIMM_TRAIN`` may name train.py instead of the first argument.
"""
from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path
from typing import List, Optional

USAGE = ("usage: pass-zoo-train TRAIN_PY [train.py arguments]  (TRAIN_PY: timm's train.py from "
         "github.com/huggingface/pytorch-image-models; or set PASS_ZOO_TIMM_TRAIN)")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help") and not os.environ.get("PASS_ZOO_TIMM_TRAIN"):
        print(USAGE)
        print(__doc__)
        return 0
    if argv and argv[0].endswith(".py"):
        script, rest = argv[0], argv[1:]
    elif os.environ.get("PASS_ZOO_TIMM_TRAIN"):
        script, rest = os.environ["PASS_ZOO_TIMM_TRAIN"], argv
    else:
        print(USAGE, file=sys.stderr)
        return 2
    path = Path(script)
    if not path.is_file():
        print(f"pass-zoo-train: {path} does not exist ({USAGE})", file=sys.stderr)
        return 2
    # importing this module ran pass_zoo/__init__, which registers timm's 'pass_pruned' architecture
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(path)] + rest
    sys.path.insert(0, str(path.resolve().parent))  # as `python train.py` would
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return 0


if __name__ == "__main__":
    sys.exit(main())
