"""Faults of the file-writing tools (issues 17 and 18): greenmim-export, greenmim-visualize, the
official-Swin export and greenmim-bench's arguments. Nothing is replaced that the tool did not write,
shared files get the umask's mode, bad input is one line (exit 2) before any work."""
import errno
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from greenmim.cli import bench
from greenmim.cli.export import main as export_main
from greenmim.cli.visualize import main as visualize_main
from greenmim.cli.official_swin import main as official_main
from greenmim.engine.checkpoint import atomic_save
from greenmim.engine.files import temporary_name
from greenmim.models import create_pretrain_model

ENCODER_ARGS = dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=2)
BENCH_RUN = ["--img-size", "64", "--batch-size", "2", "--device", "cpu", "--iters", "1", "--warmup", "0", "--no-flops", "--no-memory"]
BENCH_TINY = ["--embed-dim", "16", "--depths", "1,1,1,1", "--num-heads", "1,1,2,2", *BENCH_RUN]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A greenmim-pretrain checkpoint of a micro Swin at 64 px, with its resolved config (no training)."""
    torch.manual_seed(0)
    model_cfg = dict(name="swin_tiny_patch4_window7_224", method="greenmim", decoder_dim=32, decoder_heads=2,
                     mask_ratio=0.75, encoder_args=ENCODER_ARGS)
    enc = {k: tuple(v) if isinstance(v, list) else v for k, v in ENCODER_ARGS.items()}
    model = create_pretrain_model(model_cfg["name"], img_size=64, decoder_dim=32, decoder_heads=2, **enc)
    path = tmp_path_factory.mktemp("ckpt") / "step-00000001.pt"
    config = {"task": "pretrain", "model": model_cfg, "data": {"img_size": 64}}
    torch.save({"format": "greenmim-checkpoint", "version": 1, "model": model.state_dict(), "step": 1, "config": config}, path)
    return path


def one_error_line(call, capsys, prog):
    """Run ``call()``, which must exit 2 with one ``<prog>: error: ...`` line on stderr; returns that line."""
    with pytest.raises(SystemExit) as exc:
        call()
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2, err
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    return err[0]


def files_in(folder: Path):
    """Every file in ``folder`` (hidden temporary files included) with its bytes."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def export_contents(out: Path):
    """An export's tensors, safetensors metadata and sidecar (the metadata's order in the file varies)."""
    with safe_open(str(out), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    return tensors, metadata, out.with_name(out.name + ".json").read_text()


# ------------------------------------------------------------------ export: never replace what it did not write
def test_export_leaves_an_unrelated_json_of_the_same_stem_alone(checkpoint, tmp_path, capsys):
    coco = tmp_path / "instances_val.json"
    coco.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    before = coco.read_bytes()
    export_main([str(checkpoint), "-o", str(tmp_path / "instances_val.safetensors")])
    assert coco.read_bytes() == before  # it was replaced by the export's description
    info = json.loads((tmp_path / "instances_val.safetensors.json").read_text())
    assert info["timm_name"] == "swin_tiny_patch4_window7_224" and info["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["instances_val.json", "instances_val.safetensors", "instances_val.safetensors.json"]


def test_export_refuses_an_existing_output_unless_force(checkpoint, tmp_path, capsys):
    out = tmp_path / "enc.safetensors"
    export_main([str(checkpoint), "-o", str(out)])
    capsys.readouterr()
    first, exported = files_in(tmp_path), export_contents(out)
    line = one_error_line(lambda: export_main([str(checkpoint), "-o", str(out)]), capsys, "greenmim-export")
    assert re.search(r"enc\.safetensors and .*enc\.safetensors\.json already exist: choose another output file, or pass --force", line), line
    assert files_in(tmp_path) == first
    (tmp_path / "enc.safetensors.json").unlink()  # the output alone is enough to refuse
    line = one_error_line(lambda: export_main([str(checkpoint), "-o", str(out)]), capsys, "greenmim-export")
    assert "enc.safetensors already exists" in line
    os.utime(out, (0, 0))
    export_main([str(checkpoint), "-o", str(out), "--force"])  # a previous export is replaced on request
    assert out.stat().st_mtime > 0 and sorted(files_in(tmp_path)) == sorted(first)
    tensors, metadata, sidecar = export_contents(out)
    assert metadata == exported[1] and sidecar == exported[2]
    assert tensors.keys() == exported[0].keys() and all(torch.equal(tensors[k], exported[0][k]) for k in tensors)


@pytest.mark.parametrize("foreign", ["weights", "sidecar"])
def test_export_force_never_replaces_another_programs_file(checkpoint, tmp_path, capsys, foreign):
    out = tmp_path / "enc.safetensors"
    export_main([str(checkpoint), "-o", str(out)])
    capsys.readouterr()
    if foreign == "weights":
        save_file({"w": torch.zeros(2)}, str(out), metadata={"format": "pt"})  # someone's own safetensors
        victim = out
    else:
        victim = tmp_path / "enc.safetensors.json"
        victim.write_text(json.dumps({"note": "not an export"}))
    before = files_in(tmp_path)
    line = one_error_line(lambda: export_main([str(checkpoint), "-o", str(out), "--force"]), capsys, "greenmim-export")
    assert f"{victim} is not a greenmim export, so --force leaves it alone" in line
    assert files_in(tmp_path) == before


def test_export_onto_a_full_disk_is_one_line_and_leaves_no_file(checkpoint, tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    real_fsync = os.fsync

    def disk_full(fd):  # the bytes did not fit: the file system reports it when they are flushed
        if os.fstat(fd).st_size > 1000:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_full)
    line = one_error_line(lambda: export_main([str(checkpoint), "-o", str(out_dir / "enc.safetensors")]), capsys, "greenmim-export")
    assert f"no space left on {out_dir} while writing enc.safetensors" in line and "run the command again" in line
    assert files_in(out_dir) == {}  # neither a truncated export, nor its description, nor a temporary file


# ------------------------------------------------------------------ shared files get the umask's mode, not 0600
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_exports_checkpoints_and_pictures_respect_the_umask(checkpoint, tmp_path, capsys, umask, mode):
    from greenmim.tasks.pretrain.reconstructions import save_png

    stale = temporary_name(tmp_path / "ckpt.pt")  # a temporary file left by a crashed run, private
    stale.write_bytes(b"")
    stale.chmod(0o600)
    old = os.umask(umask)
    try:
        export_main([str(checkpoint), "-o", str(tmp_path / "enc.safetensors")])
        atomic_save({"step": 1}, tmp_path / "ckpt.pt")
        save_png(np.zeros((8, 8, 3), dtype=np.uint8), tmp_path / "grid.png")
        assert official_main([str(checkpoint), str(tmp_path / "official.pth")]) == 0
    finally:
        os.umask(old)
    names = ["enc.safetensors", "enc.safetensors.json", "ckpt.pt", "grid.png", "official.pth"]
    assert {n: oct((tmp_path / n).stat().st_mode & 0o777) for n in names} == {n: oct(mode) for n in names}
    assert Image.open(tmp_path / "grid.png").format == "PNG"


def test_official_swin_export_replaces_neither_its_source_nor_another_file(checkpoint, tmp_path, capsys):
    source = tmp_path / "source.pth"
    source.write_bytes(checkpoint.read_bytes())
    before = source.read_bytes()
    prog = "python -m greenmim.cli.official_swin"
    line = one_error_line(lambda: official_main([str(source), str(source)]), capsys, prog)
    assert "is the input" in line and "would be replaced" in line
    line = one_error_line(lambda: official_main([str(source), str(tmp_path / "official.json")]), capsys, prog)
    assert "OUT " in line and "must end in .pth or .pt" in line
    assert source.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["source.pth"]
    other = tmp_path / "someone_elses.pth"
    other.write_bytes(b"not ours")
    line = one_error_line(lambda: official_main([str(source), str(other)]), capsys, prog)
    assert "someone_elses.pth already exists: choose another output file, or pass --force to replace it" in line
    assert other.read_bytes() == b"not ours"
    assert official_main([str(source), str(other), "--force"]) == 0
    assert set(torch.load(other)["model"]) >= {"patch_embed.proj.weight", "layers.0.downsample.reduction.weight"}


# ------------------------------------------------------------------ visualize --max-images
def test_visualize_refuses_max_images_below_one(checkpoint, tmp_path, capsys):
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(tmp_path / f"img{i}.png")
    out = tmp_path / "grid.png"
    for value in ("-1", "0"):  # -1 used to show all images but the last
        line = one_error_line(lambda: visualize_main([str(checkpoint), str(tmp_path / "img0.png"), str(tmp_path / "img1.png"),
                                                      "-o", str(out), "--max-images", value]), capsys, "greenmim-visualize")
        assert f"--max-images {value} must be >= 1" in line
    assert not out.exists()


# ------------------------------------------------------------------ bench: arguments checked before running
@pytest.fixture
def no_run(monkeypatch):
    """Fail the test if greenmim-bench gets as far as running anything."""
    def ran(*a, **k):
        raise AssertionError("the benchmark ran despite bad arguments")

    for name in ("run_comparison", "run_sweep", "run_solver_only", "run_calibration"):
        monkeypatch.setattr(bench, name, ran)


@pytest.mark.parametrize("device,message", [
    ("foo", r"--device foo is not a device: use cpu, cuda or cuda:N"),
    ("cuda", r"--device cuda: CUDA is not available on this machine: use --device cpu"),
    ("cuda:1", r"--device cuda:1: CUDA is not available"),
    ("meta", r"--device meta: greenmim-bench runs on cpu or cuda"),
])
def test_bench_bad_device_is_one_line(device, message, capsys, monkeypatch, no_run):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = one_error_line(lambda: bench.main(BENCH_TINY + ["--device", device]), capsys, "greenmim-bench")
    assert re.search(message, line), line


def test_bench_cuda_index_beyond_the_devices_is_one_line(capsys, monkeypatch, no_run):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    line = one_error_line(lambda: bench.main(BENCH_TINY + ["--device", "cuda:3"]), capsys, "greenmim-bench")
    assert "this machine has 1 CUDA device(s): use cuda:0 .. cuda:0" in line


@pytest.mark.parametrize("override,message", [
    ("bogus_key=1", r"--override bogus_key: swin_tiny_patch4_window7_224 has no argument 'bogus_key': valid: .*decoder_dim.*window_size"),
    ("windw_size=4", r"did you mean window_size\?"),
    ("num_classes=10", r"has no argument 'num_classes'"),
    ("dtype=torch.float16", r"has no argument 'dtype'"),
])
def test_bench_unknown_override_names_the_valid_keys(override, message, capsys, no_run):
    line = one_error_line(lambda: bench.main(BENCH_TINY + ["--override", override]), capsys, "greenmim-bench")
    assert re.search(message, line), line


@pytest.mark.parametrize("args,message", [
    # models.check_architecture's messages (stages counted from 0), naming the bench's flags
    (["--depths", "1,1", "--num-heads", "1,2,4,8"], r"--num-heads=\(1, 2, 4, 8\) is invalid: give one value per stage \(2 stages: --depths has 2 entries\)"),
    (["--depths", "1,1,1"], r"--num-heads=\(1, 1, 2, 2\) is invalid: give one value per stage \(3 stages: --depths has 3 entries\)"),
    (["--num-heads", "1,3,2,2"], r"--num-heads=\(1, 3, 2, 2\) is invalid: stage 1 has width 32 and 3 heads: the heads must divide the width"),
    (["--embed-dim", "10", "--num-heads", "1,1,1,3"], r"--num-heads=\(1, 1, 1, 3\) is invalid: stage 3 has width 80 and 3 heads: the heads must divide"),
    (["--num-heads", "1,0,2,2"], r"--num-heads=\(1, 0, 2, 2\) is invalid: set it to a positive integer per stage"),
])
def test_bench_stage_lists_must_agree(args, message, capsys, no_run):
    line = one_error_line(lambda: bench.main(BENCH_TINY + args), capsys, "greenmim-bench")
    assert re.search(message, line), line


@pytest.mark.parametrize("args,message", [
    (["--override", "embed_dims=(16,32,64)"], r"--override embed_dims=\(16, 32, 64\) is invalid: give one value per stage \(4 stages: --depths has 4 entries\)"),
    (["--override", "embed_dims=(16,32,64,100)"], r"--override embed_dims=\(16, 32, 64, 100\) is invalid: stage 3 has width 100 and 16 heads: the heads must divide"),
    (["--embed-dim", "16"], r"twins_svt_small has no argument 'embed_dim': did you mean embed_dims\?"),
])
def test_bench_twins_stage_lists_must_agree(args, message, capsys, no_run):
    line = one_error_line(lambda: bench.main(["--model", "twins_svt_small", *BENCH_RUN, *args]), capsys, "greenmim-bench")
    assert re.search(message, line), line


def test_bench_unwritable_out_is_refused_before_running(tmp_path, capsys, no_run):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    line = one_error_line(lambda: bench.main(BENCH_TINY + ["--out", str(blocker / "sub" / "result")]), capsys, "greenmim-bench")
    assert re.search(r"--out .*result\.json: cannot create .*a_file/sub .*choose another output file", line), line


@pytest.mark.parametrize("error", ["cpu", "cuda"])
def test_bench_out_of_memory_names_a_smaller_batch(error, capsys, monkeypatch):
    def allocate(cfg):
        if error == "cpu":  # torch's CPU allocator refusing an allocation
            torch.empty(2 ** 62, dtype=torch.uint8)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(bench, "run_comparison", allocate)
    line = one_error_line(lambda: bench.main(BENCH_TINY + ["--batch-size", "100000"]), capsys, "greenmim-bench")
    assert line == "greenmim-bench: error: out of memory at --batch-size 100000 on cpu: use a smaller --batch-size"


def test_bench_other_runtime_errors_keep_their_traceback(monkeypatch):
    def broken(cfg):
        raise RuntimeError("a bug")

    monkeypatch.setattr(bench, "run_comparison", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        bench.main(BENCH_TINY)
