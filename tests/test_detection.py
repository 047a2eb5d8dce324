"""Detection transfer: backbone geometry, COCO data handling and evaluation, pretrained loading."""
import json

import pytest
import torch

from greenmim.tasks.detect import (
    CocoDetection,
    CocoEvaluator,
    CocoFileNotFoundError,
    CocoFormatError,
    TimmTrunk,
    build_backbone,
    build_maskrcnn,
    ground_truth_as_predictions,
    hflip,
)
from greenmim.tasks.detect.synthetic import CATEGORY_IDS, write_synthetic_coco
from greenmim.tasks.detect.task import detection_param_groups
from greenmim.engine.errors import UserError

SWIN = "swin_tiny_patch4_window7_224"
TINY_SWIN = dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))
TWINS = "twins_svt_small"
TINY_TWINS = dict(embed_dims=(16, 32, 32, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), wss=(7, 7, 7, 7))


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    img_dir, ann = write_synthetic_coco(str(root), num_images=6, size=(96, 128), seed=3, empty_images=1)
    return img_dir, ann


# -- backbone ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kw,channels", [
    (SWIN, TINY_SWIN, [32, 64, 128, 256]),
    (TWINS, TINY_TWINS, [16, 32, 32, 64]),
])
def test_trunk_gives_four_maps_at_strides_4_to_32(name, kw, channels):
    trunk = TimmTrunk(name, **kw).eval()
    assert trunk.channels == channels and trunk.strides == [4, 8, 16, 32]
    for h, w in ((128, 160), (96, 224)):  # not multiples of the window: padded inside the blocks
        feats = trunk(torch.randn(1, 3, h, w))
        assert [tuple(f.shape) for f in feats] == [(1, c, h // s, w // s) for c, s in zip(channels, (4, 8, 16, 32))]
    backbone = build_backbone(name, fpn_channels=16, **kw).eval()
    out = backbone(torch.randn(1, 3, 128, 160))
    assert list(out) == ["0", "1", "2", "3", "pool"]
    assert [tuple(v.shape[1:]) for v in out.values()] == [(16, 32, 40), (16, 16, 20), (16, 8, 10), (16, 4, 5), (16, 2, 3)]


def test_swin_trunk_keeps_window_and_shift_on_small_maps():
    trunk = TimmTrunk(SWIN, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))
    for stage in trunk.model.layers:  # always_partition: the official detection behaviour
        assert stage.blocks[0].window_size == (7, 7) and stage.blocks[1].shift_size == (3, 3)


def test_unsupported_backbone_names_the_fix():
    with pytest.raises(UserError, match="swin_\\*"):
        TimmTrunk("resnet50")
    with pytest.raises(UserError, match="did you mean"):
        TimmTrunk("swin_tiny_patch4_window7_22")


# -- data ----------------------------------------------------------------------------------------
def test_category_ids_map_to_contiguous_labels_and_back(coco):
    ds = CocoDetection(*coco, train=False, filter_empty=False)
    assert ds.cat_ids == list(CATEGORY_IDS) == [1, 3, 7]
    assert ds.cat_to_label == {1: 1, 3: 2, 7: 3} and ds.label_to_cat == {1: 1, 2: 3, 3: 7}
    assert ds.num_classes == 3 and len(ds) == 7  # the empty image is kept when filter_empty=False
    image, target = ds[0]
    assert image.shape == (3, 96, 128) and image.dtype == torch.float32
    assert target["masks"].shape[1:] == (96, 128) and target["labels"].min() >= 1
    assert ds.report.crowd_annotations == 1  # the crowd region is left out of the training targets
    assert len(CocoDetection(*coco, train=True, filter_empty=True)) == 6


def test_horizontal_flip_moves_boxes_and_masks_together(coco):
    ds = CocoDetection(*coco, train=False)
    image, target = ds[1]
    fimage, ftarget = hflip(image, target)
    assert torch.equal(fimage.flip(-1), image)
    for box, mask in zip(ftarget["boxes"], ftarget["masks"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        # the flipped mask's extent matches the flipped box (to the rasterisation pixel)
        assert abs(xs.min().item() - box[0].item()) <= 1 and abs(xs.max().item() + 1 - box[2].item()) <= 1
        assert abs(ys.min().item() - box[1].item()) <= 1
    assert torch.allclose(hflip(fimage, ftarget)[1]["boxes"], target["boxes"])


def test_ground_truth_as_predictions_scores_ap_one(coco, tmp_path):
    ds = CocoDetection(*coco, train=False, filter_empty=False)
    ev = CocoEvaluator(ds.coco, ds.label_to_cat)
    for i in range(len(ds)):
        ev.update([ground_truth_as_predictions(ds, i)], [ds.ids[i]])
    metrics = ev.evaluate(str(tmp_path), prefix="gt_")
    for t in ("bbox", "segm"):
        assert metrics[f"{t}_AP"] == pytest.approx(1.0) and metrics[f"{t}_AP50"] == pytest.approx(1.0)
        assert metrics[f"{t}_AP75"] == pytest.approx(1.0)
    results = json.loads((tmp_path / "gt_results_segm.json").read_text())
    assert results and isinstance(results[0]["segmentation"]["counts"], str)
    assert {r["category_id"] for r in results} <= set(CATEGORY_IDS)
    bbox = json.loads((tmp_path / "gt_results_bbox.json").read_text())
    assert set(bbox[0]) == {"image_id", "category_id", "bbox", "score"}


def test_wrong_labels_lower_the_ap(coco):
    ds = CocoDetection(*coco, train=False)
    ev = CocoEvaluator(ds.coco, ds.label_to_cat, iou_types=("bbox",))
    for i in range(len(ds)):
        pred = ground_truth_as_predictions(ds, i)
        pred["labels"] = pred["labels"] % 3 + 1  # every label shifted: every detection is a false positive
        ev.update([pred], [ds.ids[i]])
    assert ev.evaluate()["bbox_AP"] == pytest.approx(0.0)


def _write(tmp_path, data, name="ann.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def _valid(coco):
    return json.loads(open(coco[1]).read())


@pytest.mark.parametrize("mutate,exc,message", [
    (lambda d: "{not json", CocoFormatError, "not valid JSON"),
    (lambda d: {k: v for k, v in d.items() if k != "annotations"}, CocoFormatError, "no 'annotations' list"),
    (lambda d: {**d, "categories": []}, CocoFormatError, "defines no categories"),
    (lambda d: {**d, "annotations": [{**d["annotations"][0], "image_id": 999999}]}, CocoFormatError, "unknown image_id 999999"),
    (lambda d: {**d, "annotations": [{**d["annotations"][0], "category_id": 42}]}, CocoFormatError, "unknown category_id 42"),
    (lambda d: {**d, "images": d["images"] + d["images"][:1]}, CocoFormatError, "duplicate image id"),
    (lambda d: {**d, "images": [{"id": 1, "file_name": "a.png"}]}, CocoFormatError, "lacks height, width"),
])
def test_bad_annotation_files_give_their_message(coco, tmp_path, mutate, exc, message):
    ann = _write(tmp_path, mutate(_valid(coco)))
    with pytest.raises(exc, match=message):
        CocoDetection(coco[0], ann)


def test_missing_annotation_file_and_folder(coco, tmp_path):
    with pytest.raises(CocoFileNotFoundError, match="annotation file not found.*data.root="):
        CocoDetection(coco[0], str(tmp_path / "nope.json"))
    with pytest.raises(CocoFileNotFoundError, match="image folder not found"):
        CocoDetection(str(tmp_path / "nope"), coco[1])


def test_image_listed_but_absent_errors_or_is_skipped(coco, tmp_path):
    data = _valid(coco)
    data["images"].append({"id": 5, "file_name": "ghost.png", "height": 10, "width": 10})
    ann = _write(tmp_path, data)
    with pytest.raises(CocoFileNotFoundError, match="1 image\\(s\\) listed.*ghost.png.*missing_images=skip"):
        CocoDetection(coco[0], ann, filter_empty=False)
    ds = CocoDetection(coco[0], ann, filter_empty=False, missing_images="skip")
    assert ds.report.missing_images == 1 and 5 not in ds.ids


def test_malformed_boxes_are_skipped_with_a_count_or_raise(coco, tmp_path):
    data = _valid(coco)
    first = data["annotations"][0]
    data["annotations"].append({**first, "id": 9001, "bbox": [10, 10, 0, 5]})  # zero width
    data["annotations"].append({**first, "id": 9002, "bbox": [10, 10, 5]})  # not 4 numbers
    data["annotations"].append({**first, "id": 9003, "bbox": [10, 10, 5, 5], "segmentation": []})
    ann = _write(tmp_path, data)
    ds = CocoDetection(coco[0], ann)
    assert ds.report.bad_annotations == 3
    assert "zero or negative size" in " ".join(ds.report.examples)
    with pytest.raises(CocoFormatError, match="annotation 9001 .*zero or negative size.*bad_boxes=skip"):
        CocoDetection(coco[0], ann, bad_boxes="error")


def test_image_size_mismatch_names_the_file(coco, tmp_path):
    data = _valid(coco)
    data["images"][0]["height"] += 1
    ds = CocoDetection(coco[0], _write(tmp_path, data), train=False)
    with pytest.raises(CocoFormatError, match="says"):
        ds[0]


# -- model, weights, optimizer --------------------------------------------------------------------
def test_maskrcnn_trains_and_predicts_on_a_tiny_batch(coco):
    ds = CocoDetection(*coco, train=True)
    torch.manual_seed(0)
    model = build_maskrcnn(SWIN, ds.num_classes, min_size=96, max_size=160, fpn_channels=32, **TINY_SWIN)
    images, targets = zip(*[ds[0], ds[1]])
    losses = model(list(images), list(targets))
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    assert model.backbone.trunk.model.patch_embed.proj.weight.grad is not None
    model.eval()
    with torch.no_grad():
        out = model([images[0]])[0]
    assert out["masks"].shape[1:] == (1, *images[0].shape[1:])


def test_greenmim_checkpoint_initialises_the_trunk(tmp_path):
    from greenmim.models import create_pretrain_model

    torch.manual_seed(0)
    pre = create_pretrain_model(SWIN, img_size=64, window_size=2, decoder_dim=32, decoder_heads=2, **TINY_SWIN)
    path = tmp_path / "pretrain.pt"
    torch.save({"format": "greenmim-checkpoint", "version": 1, "model": pre.state_dict(), "epoch": 1, "step": 1}, path)
    model = build_maskrcnn(SWIN, 3, pretrained=str(path), window_size=2, min_size=64, max_size=96, **TINY_SWIN)
    trunk = model.backbone.trunk
    report = trunk.load_report
    assert report.kind == "greenmim-pretrain" and any(k.startswith("decoder.") for k in report.ignored)
    own = trunk.model.state_dict()
    encoder = pre.encoder.state_dict()
    assert {k for k in encoder if k not in own} == {"norm.weight", "norm.bias"}  # the pruned final norm only
    assert all(torch.equal(own[k], encoder[k]) for k in own)
    # a detection window other than the pretraining one: the relative-position tables are resized
    model = build_maskrcnn(SWIN, 3, pretrained=str(path), window_size=4, min_size=64, max_size=96, **TINY_SWIN)
    assert any("relative_position_bias_table" in k for k in model.backbone.trunk.load_report.resized)


def test_greenmim_twins_checkpoint_initialises_the_trunk(tmp_path):
    from greenmim.models import create_pretrain_model, list_encoders

    if TWINS not in list_encoders("twins"):
        pytest.skip("greenmim.models has no Twins encoders registered")
    kw = dict(embed_dims=(16, 32, 32, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), wss=(2, 2, 2, 2))
    pre = create_pretrain_model(TWINS, img_size=64, decoder_dim=32, decoder_heads=2, **kw)
    path = tmp_path / "twins.pt"
    torch.save({"format": "greenmim-checkpoint", "version": 1, "model": pre.state_dict()}, path)
    trunk = TimmTrunk(TWINS, pretrained=str(path), **kw)
    assert trunk.load_report.kind == "greenmim-pretrain" and trunk.out_norms is None
    encoder = pre.encoder.state_dict()
    assert all(torch.equal(v, encoder[k]) for k, v in trunk.model.state_dict().items())
    assert [tuple(f.shape[1:]) for f in trunk.eval()(torch.randn(1, 3, 96, 128))] == [
        (16, 24, 32), (32, 12, 16), (32, 6, 8), (64, 3, 4)]


def test_layer_decay_groups_scale_the_trunk_only():
    model = build_maskrcnn(SWIN, 3, min_size=64, max_size=96, fpn_channels=16, **TINY_SWIN)
    groups = detection_param_groups(model, 0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale[id(named["roi_heads.box_head.fc6.weight"])] == 1.0
    assert scale[id(named["backbone.fpn.inner_blocks.0.0.weight"])] == 1.0
    assert scale[id(named["backbone.trunk.model.patch_embed.proj.weight"])] == 0.5 ** 5  # L = 4 blocks: depth 0 of 0..5
    assert scale[id(named["backbone.trunk.model.layers.3.blocks.0.mlp.fc1.weight"])] == 0.5
    table = "backbone.trunk.model.layers.0.blocks.0.attn.relative_position_bias_table"
    assert wd[id(named[table])] == 0.0 and wd[id(named["roi_heads.box_head.fc6.weight"])] == 0.05
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_engine_grad_checkpointing_reaches_the_swin_trunk():
    from greenmim.engine.trainer import enable_grad_checkpointing

    model = build_maskrcnn(SWIN, 3, min_size=64, max_size=96, fpn_channels=16, **TINY_SWIN)
    enable_grad_checkpointing(model, [0, 2])  # trainer.grad_checkpointing=[0,2]
    assert [stage.grad_checkpointing for stage in model.backbone.trunk.model.layers] == [True, False, True, False]
    enable_grad_checkpointing(model, True)
    assert all(stage.grad_checkpointing for stage in model.backbone.trunk.model.layers)
    assert "encoder" not in dict(model.named_children())  # a property: the state dict keeps one copy
    twins = build_maskrcnn(TWINS, 3, min_size=64, max_size=96, fpn_channels=16, **TINY_TWINS)
    with pytest.raises(UserError, match="not available"):
        enable_grad_checkpointing(twins, True)
