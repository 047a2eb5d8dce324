"""Smoke test of ``greenmim-bench`` at a tiny size on CPU (not a timed test: no speed assertions)."""
import argparse
import json
import logging
import re

import pytest
import torch

from greenmim.cli.bench import attention_supported, main, parse_override
from greenmim.models import list_encoders

TINY = ["--embed-dim", "16", "--depths", "1,1,1,1", "--num-heads", "1,1,2,2", "--override", "decoder_dim=32",
        "--override", "decoder_heads=2", "--img-size", "64", "--batch-size", "2", "--device", "cpu", "--threads", "1"]


@pytest.fixture(autouse=True)
def restore_threads():
    """``--threads`` sets torch's global thread count: give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_cli_reports_both_methods(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(TINY + ["--warmup", "1", "--iters", "1", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    stdout = captured.out
    assert "greenmim" in stdout and "simmim" in stdout and "speedup" in stdout
    assert "[bench] timing: 2 steps per method in " in captured.err
    result = json.loads((tmp_path / "bench.json").read_text())
    for method in ("greenmim", "simmim"):
        figures = result["methods"][method]
        assert figures["img_per_s"] > 0
        assert figures["flops"] > 0
        assert figures["memory"]["peak_bytes"] >= figures["memory"]["resident_bytes"] > 0
    assert 0 < result["methods"]["greenmim"]["packing_efficiency"] <= 1
    assert result["methods"]["greenmim"]["grouping_ms"] >= 0
    # greenmim runs the encoder on a quarter of the tokens: fewer FLOPs is a property, not a timing
    assert result["ratios"]["flops_ratio"] < 1
    assert result["config"]["model_kwargs"]["window_size"] == 2  # 64 px: 2x2 units, window = unit grid


def test_bench_one_method_alone(tmp_path, capsys):
    """``--method``: that method's figures and profile (the GPU check's per-method stages), no ratios."""
    assert main(TINY + ["--method", "greenmim", "--no-flops", "--no-memory", "--warmup", "0", "--iters", "1", "--profile", "1",
                        "--out", str(tmp_path / "g")]) == 0
    assert "greenmim alone: no ratios" in capsys.readouterr().out
    result = json.loads((tmp_path / "g.json").read_text())
    assert set(result["methods"]) == {"greenmim"} and set(result["profile"]) == {"greenmim"} and result["ratios"] == {}
    assert len(result["profile"]["greenmim"]["top"]) == 20


def test_interleaved_timing_shows_the_engines_progress_off_a_terminal(monkeypatch):
    """The timing phase reports through the engine's one progress (a line every ``LOG_EVERY_S``, 0
    here, on the ``greenmim`` logger), and alternates the methods' order: A B, B A, A B."""
    from greenmim.bench.step import time_interleaved
    from greenmim.engine import progress as engine_progress

    monkeypatch.setattr(engine_progress, "LOG_EVERY_S", 0.0)
    monkeypatch.setattr(engine_progress, "interactive", lambda: False)
    calls = []

    class Step:
        device, planning, plan_thread_ms, grouping = torch.device("cpu"), "workers", 0.0, {}

        def __init__(self, name):
            self.name = name

        def __call__(self, batch):
            calls.append((self.name, batch))

    class Batches:
        def next_batches(self):
            return {"greenmim": len(calls) // 2, "simmim": len(calls) // 2}

    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("greenmim")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        times = time_interleaved({m: Step(m) for m in ("greenmim", "simmim")}, Batches(), 1, 2, what="[bench] timing")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [line.split(",")[0] for line in lines] == ["[bench] timing: 1/3 steps per method (33%)", "[bench] timing: 2/3 steps per method (67%)"]
    assert calls == [("greenmim", 0), ("simmim", 0), ("simmim", 1), ("greenmim", 1), ("greenmim", 2), ("simmim", 2)]
    assert [len(times[m].seconds) for m in ("greenmim", "simmim")] == [2, 2]  # the warm-up step is not timed


def test_bench_solver_only(capsys):
    assert main(TINY + ["--solver-only", "--iters", "2"]) == 0
    stdout = capsys.readouterr().out
    assert "solver per step" in stdout and "packing" in stdout


def test_bench_calibrate(capsys):
    assert main(TINY + ["--calibrate"]) == 0
    assert "CostModel(a=1.0" in capsys.readouterr().out


@pytest.mark.skipif("twins_svt_small" not in list_encoders(), reason="Twins encoder not registered")
def test_bench_twins_by_name(tmp_path, capsys):
    twins = ["--model", "twins_svt_small", "--override", "embed_dims=(16,32,32,32)", "--override", "depths=(2,2,2,2)",
             "--num-heads", "1,1,1,1", "--override", "decoder_dim=32", "--override", "decoder_heads=2",
             "--img-size", "64", "--batch-size", "2", "--device", "cpu", "--no-flops", "--no-memory"]
    assert main(twins + ["--warmup", "0", "--iters", "1", "--out", str(tmp_path / "twins")]) == 0
    result = json.loads((tmp_path / "twins.json").read_text())
    assert set(result["methods"]) == {"greenmim", "simmim"}
    assert result["config"]["model_kwargs"]["wss"] == [2, 2, 2, 2]  # 64 px: 2x2 units, windows = unit grid


def test_parse_override():
    assert parse_override("window_size=12") == ("window_size", 12)
    assert parse_override("depths=(2,2,6,2)") == ("depths", (2, 2, 6, 2))
    assert parse_override("sparse-backend=native") == ("sparse_backend", "native")
    with pytest.raises(argparse.ArgumentTypeError, match=r"override 'window_size' is not of the form key=value"):
        parse_override("window_size")


@pytest.mark.parametrize("args,message", [
    (["--model", "swin_bsae_patch4_window7_224"], "unknown model 'swin_bsae_patch4_window7_224': did you mean swin_base"),
    (["--mask-ratio", "1.0"], r"--mask-ratio 1.0 is outside \(0, 1\)"),
    (["--batch-size", "0"], "--batch-size 0 must be >= 1"),
    (["--img-size", "100"], "image size 100x100 is not a multiple of the mask unit"),
    (["--method", "greenmim", "--sweep"], "--method times one method of a comparison: drop it for --sweep"),
    pytest.param(["--attention", "flex"], "--attention flex: this checkout's create_encoder has no attention= argument",
                 marks=pytest.mark.skipif(attention_supported("swin_tiny_patch4_window7_224"), reason="FlexAttention is there")),
])
def test_bad_input_is_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(TINY + args + ["--no-flops", "--no-memory", "--iters", "1", "--warmup", "0"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("[bench]")]  # progress
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("greenmim-bench: error: ")
    assert re.search(message, err[0]), err[0]


def test_swin_head_dim_frees_the_heads_from_the_width():
    """``--override head_dim=N`` (Swin's per-head width): heads need not divide the stage width."""
    from greenmim.models import check_architecture

    check_architecture("swin_tiny_patch4_window7_224", {"embed_dim": 16, "num_heads": (1, 3, 2, 2), "head_dim": 8})
    with pytest.raises(ValueError, match="stage 1 has width 32 and 3 heads"):
        check_architecture("swin_tiny_patch4_window7_224", {"embed_dim": 16, "num_heads": (1, 3, 2, 2)})
