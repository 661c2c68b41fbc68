"""Progress on a terminal is a bar; on a log file or pipe it is one readable line every N steps."""
from __future__ import annotations

import io
import re

from pass_zoo.train.loop import PROGRESS, LogLines, progress


class _Acc:
    is_local_main_process = True


def test_log_lines_every_n_steps_with_loss_lr_elapsed_and_eta():
    out = io.StringIO()
    bar = LogLines(total=10, desc="search", every=4, stream=out)
    for step in range(10):
        bar.set_postfix(loss=f"{2.0 - 0.1 * step:.3f}", lr="0.002")
        bar.update(1)
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["4/10", "8/10", "10/10"]  # every 4th step and the last
    assert re.fullmatch(r"search 4/10  loss 1\.700  lr 0\.002  elapsed \d+s  eta \d+s", lines[0])
    assert "\r" not in out.getvalue()


def test_a_resumed_loop_counts_from_where_it_stopped():
    out = io.StringIO()
    bar = LogLines(total=6, desc="finetune", initial=4, every=2, stream=out)
    bar.update(1)
    bar.update(1)
    assert out.getvalue().split()[:2] == ["finetune", "6/6"]


def test_progress_picks_lines_off_a_terminal_and_nothing_when_quiet(monkeypatch, capsys):
    saved = dict(PROGRESS)
    try:
        bar = progress(_Acc(), 3, "search")  # pytest's captured stderr is not a terminal
        assert isinstance(bar, LogLines)
        PROGRESS["quiet"] = True
        bar = progress(_Acc(), 3, "search")
        assert not isinstance(bar, LogLines)
        for _ in range(3):
            bar.update(1)
        bar.close()
        assert capsys.readouterr().err == ""
    finally:
        PROGRESS.update(saved)


def test_bad_log_every_is_one_line(capsys):
    from pass_zoo.cli import main

    assert main(["prune", "--log-every", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["pass-zoo: error: --log-every must be >= 1, got 0"]
