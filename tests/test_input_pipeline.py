"""The pretraining input pipeline (issue 17): uint8 crops normalised on the device, DCT-scaled JPEG
decode, data.decode=device (batched decode in the main process), greenmim-bench --loader."""
import json
import math
import random
import sys

import numpy as np

import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from conftest import yaml_node
from greenmim.bench.loader import write_photos
from greenmim.data import DataError, build_pretrain_dataset, build_train_loader, load_rgb
from greenmim.data.device_decode import DeviceCrop, EncodedBatch
from greenmim.data import images as images_module
from greenmim.data.images import CorruptImageError, decode_rgb, open_image
from greenmim.plan.collate import MaskCollator
from greenmim.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PretrainCrop,
    apply_crop,
    crop_box,
    draft_for_crop,
    draw_crop,
    normalize,
    rgb_pixels,
)
from greenmim.engine import DistInfo, OptimConfig, Trainer, TrainerConfig
from greenmim.plan.masking import unit_grid
from greenmim.tasks.pretrain.task import PretrainTask

STD_LEVELS = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255  # one normalised unit, in 8-bit levels


@pytest.fixture(autouse=True)
def keep_mode_reports():
    """Converting palette/grey files here must not use up the once-per-process mode warnings that
    other tests check (greenmim.data.images reports each mode once)."""
    saved = set(images_module._reported_modes)
    yield
    images_module._reported_modes.clear()
    images_module._reported_modes.update(saved)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


@pytest.fixture(scope="module")
def small_files(tmp_path_factory):
    """Six photo-like JPEGs (100-160 px), a greyscale JPEG, an RGB PNG and a palette GIF with transparency."""
    root = tmp_path_factory.mktemp("small")
    paths = write_photos(str(root), 6, (120, 160))
    rgb = Image.open(paths[0]).convert("RGB")
    rgb.convert("L").save(root / "grey.jpg")
    rgb.save(root / "rgb.png")
    pal = rgb.convert("P")
    pal.save(root / "palette.gif", transparency=0)
    return root, paths + [str(root / n) for n in ("grey.jpg", "rgb.png", "palette.gif")]


@pytest.fixture(scope="module")
def large_jpeg(tmp_path_factory):
    """One 900x1200 JPEG: big enough for 1/4 and 1/8 DCT-scaled decodes of 64 px crops."""
    return write_photos(str(tmp_path_factory.mktemp("large")), 1, (900, 1200))[0]


def old_pipeline(plan, size):
    """The pre-issue-17 fp32 transform (what the workers returned before) at the given crop."""
    def run(img):
        img = TF.resized_crop(img, plan.top, plan.left, plan.height, plan.width, [size, size], T.InterpolationMode.BICUBIC)
        return T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(TF.hflip(img) if plan.flip else img))
    return run


def seeded(seed, fn, *args):
    random.seed(seed)  # what SeededDataset does per sample (with torch's RNG)
    return fn(*args)


def test_normalize_is_the_fp32_to_tensor_normalize_and_stays_fp32_under_autocast():
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    want = torch.stack([T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(p.float() / 255) for p in pixels])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = normalize(pixels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="uint8"):
        normalize(want)


def test_crops_follow_random_resized_crop_and_are_seeded():
    """draw_crop is RandomResizedCrop(0.2-1, 3/4-4/3) + flip 0.5 in distribution, a function of the seed."""
    img = Image.new("RGB", (500, 375))
    ours = [seeded(i, draw_crop, img, (0.2, 1.0), 0.5) for i in range(3000)]
    torch.manual_seed(0)
    theirs = [T.RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(3000)]
    for stat in (lambda h, w: h * w / (375 * 500), lambda h, w: math.log(w / h)):
        a = np.array([stat(p.height, p.width) for p in ours])
        b = np.array([stat(h, w) for _, _, h, w in theirs])
        assert abs(a.mean() - b.mean()) < 0.02 and abs(a.std() - b.std()) < 0.02
    assert all(0 <= p.top <= 375 - p.height and 0 <= p.left <= 500 - p.width for p in ours)
    assert 0.45 < np.mean([p.flip for p in ours]) < 0.55
    assert seeded(7, draw_crop, img, (0.2, 1.0), 0.5) == ours[7]
    assert draw_crop(Image.new("RGB", (2000, 10)), (0.2, 1.0), 0.0) == draw_crop(Image.new("RGB", (2000, 10)), (0.9, 1.0), 0.0)


def test_uint8_crops_normalised_equal_the_old_fp32_path(small_files):
    """At the same crop, pixels within one 8-bit level of the old PIL resize + ToTensor + Normalize
    on photos (torch's antialiased bicubic vs PIL's: rounding); on the hard edges of palette/greyscale
    files a few pixels differ more (PIL clamps to 8 bits between its two passes)."""
    _, paths = small_files
    new = PretrainCrop(64)
    levels = {}
    for seed, path in enumerate(paths * 3):
        got = normalize(seeded(seed, new.from_file, path))
        want = old_pipeline(seeded(seed, draw_crop, open_image(path), (0.2, 1.0), 0.5), 64)(load_rgb(path))
        assert got.shape == want.shape == (3, 64, 64)
        levels.setdefault("photo" in path, []).append(((got - want) * STD_LEVELS).abs().flatten())
    photos, others = torch.cat(levels[True]), torch.cat(levels[False])
    assert photos.mean() < 0.05 and photos.max() < 1.01
    assert others.mean() < 0.1 and torch.quantile(others, 0.99) < 1.01 and others.max() < 16


def test_draft_decodes_a_reduced_image_whose_crop_still_covers_the_output(large_jpeg):
    scales = set()
    for seed in range(12):
        img = open_image(large_jpeg)
        plan = seeded(seed, draw_crop, img, (0.2, 1.0), 0.5)
        s = draft_for_crop(img, plan, (64, 64))
        drafted = rgb_pixels(decode_rgb(img, large_jpeg))
        assert tuple(drafted.shape[-2:]) == (math.ceil(900 / s), math.ceil(1200 / s))
        top, left, bottom, right = crop_box(plan, tuple(drafted.shape[-2:]))
        assert bottom - top >= 64 and right - left >= 64  # the crop, scaled, still covers the output
        full = rgb_pixels(decode_rgb(open_image(large_jpeg)))
        assert psnr(apply_crop(drafted, plan, (64, 64)), apply_crop(full, plan, (64, 64))) > 35
        scales.add(s)
    assert scales & {4, 8}  # 64 px out of >= 180 px crops: reduced decodes happen
    img = open_image(large_jpeg)
    plan = draw_crop(img, (0.2, 1.0), 0.0)
    assert draft_for_crop(img, plan, (plan.height, plan.width)) == 1  # no room: full size


def test_fp32_resize_of_the_cuda_path_matches_the_uint8_one(small_files, large_jpeg):
    """apply_crop's fp32 branch (what CUDA runs) on the CPU: within rounding of the uint8 kernel (two
    levels at the palette file's hard edges, where the uint8 kernel clamps between its passes)."""
    _, paths = small_files
    for seed, path in enumerate(paths + [large_jpeg]):
        pixels = rgb_pixels(load_rgb(path))
        plan = seeded(seed, draw_crop, open_image(path), (0.2, 1.0), 0.5)
        fp32, uint8 = apply_crop(pixels, plan, (64, 48), uint8_resize=False), apply_crop(pixels, plan, (64, 48))
        assert fp32.dtype == uint8.dtype == torch.uint8 and fp32.shape == (3, 64, 48)
        diff = (fp32.int() - uint8.int()).abs()
        assert diff.float().mean() < 0.3 and diff.max() <= 2, path  # the uint8 kernel uses fixed-point weights


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG)")
def test_cuda_decode_matches_the_cpu_path_through_the_prefetcher(small_files):
    from greenmim.data.prefetch import DevicePrefetcher

    root, _ = small_files
    dataset = build_pretrain_dataset(yaml_node("pretrain", "data", "data=folder", root=str(root), img_size=64, decode="device"))
    loader = build_train_loader(dataset, 4, DistInfo(device=torch.device("cuda")), seed=3, num_workers=1,
                                collate_fn=MaskCollator(unit_grid((64, 64), 32), 0.75))
    on_cuda = [b.images for b in DevicePrefetcher(loader, torch.device("cuda"))]
    on_cpu = [b.images.to("cpu") for b in loader]
    assert len(on_cuda) == len(on_cpu) == 2 and all(x.is_cuda and x.dtype == torch.uint8 for x in on_cuda)
    for x, y in zip(on_cuda, on_cpu):
        assert psnr(x.cpu(), y) > 35  # nvJPEG's IDCT/upsampling differ slightly from libjpeg's


def test_same_seed_same_crop_for_cpu_and_device_decode(small_files):
    _, paths = small_files
    plans = [seeded(0, draw_crop, open_image(p), (0.2, 1.0), 0.5) for p in paths]
    device_items = [seeded(0, DeviceCrop(64).from_file, p) for p in paths]
    for item, plan, path in zip(device_items, plans, paths):
        if item.data is not None:
            assert item.plan == plan and path.endswith(".jpg")
        else:  # PNG, GIF: cropped in the worker
            assert path.endswith((".png", ".gif")) and item.pixels.shape == (3, 64, 64)


def test_device_decode_equals_the_cpu_path_on_jpegs_and_takes_png_and_gif(small_files, large_jpeg):
    _, paths = small_files
    paths = paths + [large_jpeg]
    items = [seeded(i, DeviceCrop(64).from_file, p) for i, p in enumerate(paths)]
    assert sum(item.data is not None for item in items) == 8  # 7 JPEGs (grey included) + the large one
    batch = EncodedBatch(items).to("cpu")
    cpu = torch.stack([seeded(i, PretrainCrop(64).from_file, p) for i, p in enumerate(paths)])
    assert batch.dtype == torch.uint8 and batch.shape == (len(paths), 3, 64, 64)
    for got, want, path in zip(batch, cpu, paths):
        if path == large_jpeg:  # full decode + antialiased downscale vs DCT-scaled decode
            assert psnr(got, want) > 35
        else:
            assert (got.int() - want.int()).abs().max() <= 2, path


def test_device_decode_names_a_jpeg_that_does_not_decode(small_files, tmp_path):
    _, paths = small_files
    data = open(paths[0], "rb").read()
    broken = tmp_path / "truncated.jpg"
    broken.write_bytes(data[: len(data) // 2])  # the header reads: the worker accepts it
    items = [DeviceCrop(64).from_file(p) for p in (paths[1], str(broken))]
    with pytest.raises(CorruptImageError, match=r"cannot read image .*truncated\.jpg .*remove or replace the file, or use data\.decode=cpu"):
        EncodedBatch(items).to("cpu")


def loader_batches(root, decode):
    dataset = build_pretrain_dataset(yaml_node("pretrain", "data", "data=folder", root=str(root), img_size=64, decode=decode))
    collate = MaskCollator(unit_grid((64, 64), 32), 0.75)
    return list(build_train_loader(dataset, 4, DistInfo(), seed=3, num_workers=0, collate_fn=collate))


def test_pretraining_loader_gives_the_same_uint8_batches_and_masks_either_way(small_files):
    root, _ = small_files
    cpu, device = loader_batches(root, "cpu"), loader_batches(root, "device")
    assert len(cpu) == len(device) == 2
    for a, b in zip(cpu, device):
        assert isinstance(b.images, EncodedBatch) and len(b) == 4
        images = b.to(torch.device("cpu")).images
        assert a.images.dtype == images.dtype == torch.uint8 and a.images.shape == images.shape == (4, 3, 64, 64)
        assert (a.images.int() - images.int()).abs().max() <= 2
        assert torch.equal(a.mask, b.mask)
    with pytest.raises(DataError, match=r"data.decode='gpu' is not one of cpu, device"):
        loader_batches(root, "gpu")


MICRO = dict(name="swin_tiny_patch4_window7_224", method="greenmim", mask_ratio=0.75, decoder_dim=32, decoder_heads=2,
             encoder_args=dict(embed_dim=16, window_size=4, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], drop_path_rate=0.1))


def fit(out, root, decode, **kw):
    task = PretrainTask(MICRO, yaml_node("pretrain", "data", "data=folder", root=str(root), img_size=64, batch_size=4, num_workers=0,
                                         decode=decode), 0)
    cfg = TrainerConfig.from_yaml(output_dir=str(out), epochs=1, log_every=1, tensorboard=False, seed=1, **kw)
    Trainer(task, cfg, OptimConfig.from_yaml(blr=1e-3), {"name": "cosine", "warmup_steps": 1}).fit()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_device_decode_trains_like_cpu_decode_and_resumes_exactly(small_files, tmp_path):
    root, _ = small_files
    cpu = fit(tmp_path / "cpu", root, "cpu")
    device = fit(tmp_path / "device", root, "device")
    assert sorted(device) == [1, 2] and device == pytest.approx(cpu, rel=1e-3)
    fit(tmp_path / "part", root, "device", stop_at_step=1)
    assert fit(tmp_path / "part", root, "device", resume="auto") == device  # bit-identical after the resume


def test_bench_loader_writes_the_json_keys(small_files, tmp_path, capsys):
    from greenmim.cli.bench import main

    root, _ = small_files
    assert main(["--loader", str(root), "--img-size", "64", "--loader-images", "4", "--batch-size", "2",
                 "--device", "cpu", "--out", str(tmp_path / "loader")]) == 0
    result = json.loads((tmp_path / "loader.json").read_text())
    assert result["images"] == 4 and result["reference_ms_per_image"] > 0
    for path in ("cpu", "device"):
        assert result["decode"][path]["worker_ms_per_image"] > 0
    assert result["decode"]["device"]["main_ms_per_image"] > 0
    assert set(result["workers_needed"]) == {"1000", "2000", "3400"}
    assert all(n >= 1 for need in result["workers_needed"].values() for n in need.values())
    out = capsys.readouterr().out
    assert "workers needed per step rate" in out and "3400 img/s" in out


@pytest.mark.parametrize("args, message", [((), "does not exist"), (("--loader-images", "0"), "--loader-images 0 must be >= 1")])
def test_bench_loader_bad_input_is_one_error_line(small_files, tmp_path, capsys, args, message):
    from greenmim.cli.bench import main

    root = tmp_path / "nope" if not args else small_files[0]
    with pytest.raises(SystemExit) as exc:
        main(["--loader", str(root), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and message in err[0]


def test_pretrain_cli_refuses_an_unknown_decode_mode(monkeypatch, capsys, tmp_path):
    from conftest import TINY_PRETRAIN_ARGS
    from greenmim.cli.pretrain import main

    monkeypatch.setattr(sys, "argv", ["greenmim-pretrain", *TINY_PRETRAIN_ARGS, "data=synthetic", "data.decode=gpu", f"output_dir={tmp_path}"])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "data.decode='gpu' is not one of cpu, device" in err[0]
    assert not (tmp_path / "checkpoints").exists()


def test_real_photos_and_the_palette_gif_decode_alike_on_both_paths(hymenoptera):
    from greenmim.data import list_imagefolder

    paths = list_imagefolder(str(hymenoptera), "train")
    paths = [p for p in paths if p.endswith(".gif")] + paths[::40]
    items = [seeded(i, DeviceCrop(224).from_file, p) for i, p in enumerate(paths)]
    batch = EncodedBatch(items).to("cpu")
    cpu = torch.stack([seeded(i, PretrainCrop(224).from_file, p) for i, p in enumerate(paths)])
    assert items[0].pixels is not None and all(item.data is not None for item in items[1:])
    assert (batch.int() - cpu.int()).abs().max() <= 2
