"""pass-zoo costs: the measurement harness (keys, ratios, files), not the numbers themselves."""
import json

from pass_zoo.cli import main


def test_costs_writes_step_times_memory_and_plot(tmp_path, capsys):
    out = tmp_path / "costs"
    assert main(["costs", "--model", "mobilenetv3_small_050", "--pretrained", "none", "--img-size", "32",
                 "--batch", "4", "--target-macs", "0.5", "--steps", "2", "--warmup", "1", "--out", str(out)]) == 0
    report = json.loads((out / "costs.json").read_text())
    assert set(report["results"]) == {"search", "fixed_masks", "finetune"}
    for r in report["results"].values():
        assert r["steps"] == 2 and r["step_ms_median"] > 0
        assert r["peak_rss_mib"] >= r["rss_before_mib"] > 0
    ratio = report["search_step_with_over_without_hypernet"]
    paired = report["paired"]  # the ratio comes from both steps timed in turns in one process
    assert paired["steps"] == 2 and paired["search_cpu_ms_median"] > 0 and paired["fixed_masks_cpu_ms_median"] > 0
    assert ratio == paired["ratio_median"] > 0
    assert (out / "costs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "with / without hypernetwork" in capsys.readouterr().out


def test_costs_refuses_bad_arguments(tmp_path, capsys):
    assert main(["costs", "--steps", "0", "--out", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "--steps >= 1" in err and "Traceback" not in err
