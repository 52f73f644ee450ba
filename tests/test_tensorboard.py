"""TensorBoard: each validation epoch an image panel per dense task (rows: 4 val samples;
columns: input | ground truth | teacher | student, upscaled, under a row of column titles, with a
legend of what the colours mean), and the run's every setting (nested keys dotted) with its final
test metrics for the HParams view; read back with TensorBoard's own event reader."""

from __future__ import annotations

import io

import numpy as np
import torch
from conftest import FAST, TB, run_kdmtl, show
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

SIZE = 32          # px: the generated data's images (debug=fast keeps the data set's size)


def _events(run_dir):
    out = []
    for path in sorted((run_dir / "tensorboard").glob("events*")):
        acc = EventAccumulator(str(path), size_guidance={"images": 0, "tensors": 0})
        acc.Reload()
        out.append(acc)
    return out


def _pixels(event) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB")).astype(np.int64)


def _colours(region: np.ndarray) -> set:
    return {tuple(px) for px in region.reshape(-1, 3)}


def _palette(n: int) -> set:
    from kdmtl_cli.tasks.segmentation import colour_labels

    rgb = (colour_labels(torch.arange(n).view(1, 1, n))[0, :, 0].T.numpy() * 255).round().astype(np.int64)
    return {tuple(c) for c in rgb}


def test_validation_panel_and_hparams(workdir, shared_cache):
    from kdmtl_cli.engine.panel import GAP, MIN_TILE, line_height

    run_dir = workdir / "tb"
    proc = run_kdmtl(["train", *FAST, TB, "optim.epochs=2", "loss.kd.temperature=3.5", f"hydra.run.dir={run_dir}"],
                     workdir, shared_cache)
    assert proc.returncode == 0, show(proc)
    accs = _events(run_dir)
    images = {tag: acc.Images(tag) for acc in accs for tag in acc.Tags()["images"]}
    assert set(images) == {"val_panel/seg", "val_panel/depth"}          # dense tasks only
    tile = MIN_TILE                                     # 32 px upscaled x6 (nearest) to 192 px
    assert tile % SIZE == 0
    header, grid = line_height(), 4 * tile + 5 * GAP    # title row; 4 samples with gaps around them
    for events in images.values():
        assert len(events) == 2                                         # one per validation epoch
        assert events[-1].width == 4 * tile + 5 * GAP                   # 4 columns with gaps around them
        assert events[-1].height > header + grid                        # a legend below the tiles
    seg = _pixels(images["val_panel/seg"][-1])
    # the title row holds dark text above each of the 4 columns
    for column in range(4):
        x = GAP + column * (tile + GAP)
        assert (seg[:header, x:x + tile].sum(axis=2) < 200).any()
    # the ground-truth tiles are the labels coloured by class, each label a 6 x 6 block of pixels
    for row in range(4):
        y, x = header + GAP + row * (tile + GAP), 2 * GAP + tile
        truth = seg[y:y + tile, x:x + tile]
        assert _colours(truth) <= _palette(5)
        blocks = truth.reshape(SIZE, tile // SIZE, SIZE, tile // SIZE, 3)
        assert (blocks == blocks[:, :1, :, :1]).all()
    # the legend: a swatch of every class's colour
    legend = seg[header + grid:]
    assert _palette(5) <= _colours(legend)
    # HParams: every setting, nested ones by their dotted key, with the command line's value
    start = _session_start(accs)
    assert start["loss.kd.temperature"].number_value == 3.5
    assert start["optim.lr"].number_value > 0 and start["seed"].number_value == 0
    assert start["loss.fitnet.student"].string_value == '["trunk.stages.1"]'     # a list, as JSON text
    assert start["loss.at"].string_value == "null"                                  # None, kept
    assert start["data.generate"].string_value == "true"                             # a bool, as text
    content = b"".join(c for acc in accs for c in _plugin(acc).values())
    assert b"hparam/test/cls/accuracy" in content


def _plugin(acc):
    try:
        return acc.PluginTagToContent("hparams")
    except KeyError:
        return {}


def _session_start(accs):
    """The run's hparams as TensorBoard's HParams plugin reads them: {key: protobuf Value}."""
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    for acc in accs:
        content = _plugin(acc).get(metadata.SESSION_START_INFO_TAG)
        if content is not None:
            return dict(plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams)
    raise AssertionError("no HParams session start info in the event files")


def _tasks(**specs):
    from omegaconf import OmegaConf

    from kdmtl_cli.tasks import build_tasks

    return build_tasks(OmegaConf.create({name: {"kind": spec.kind} for name, spec in specs.items()}), specs)


class _Model(torch.nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.classes = classes

    def forward(self, image):
        n, _, h, w = image.shape
        return {"outputs": {"seg": torch.randn(n, self.classes, h, w), "depth": torch.rand(n, 1, h, w)}}


def test_panel_without_teacher_and_large_images(one_thread):
    """No teacher: 3 columns. Images larger than MIN_TILE are not upscaled. Class names from the
    data set label the legend."""
    from kdmtl_cli.data import TargetSpec
    from kdmtl_cli.engine.panel import (
        GAP,
        MIN_TILE,
        ValidationPanel,
        legend_items,
        line_height,
    )

    names = ["sky", "road", "car"]
    tasks = _tasks(seg=TargetSpec("segmentation", 3, class_names=names), depth=TargetSpec("depth"))
    for size, scale in ((MIN_TILE + 8, 1), (50, 4)):
        batch = {"image": torch.zeros(2, 3, size, size + 10),
                 "targets": {"seg": torch.randint(0, 3, (2, size, size + 10)), "depth": torch.rand(2, size, size + 10)}}
        panel = ValidationPanel(batch, tasks, [0.5] * 3, [0.25] * 3, teacher=None)
        out = panel.render(_Model(3))
        for image in out.values():
            assert image.dtype == torch.float32 and image.min() >= 0 and image.max() <= 1
            assert image.shape[2] == 3 * (size + 10) * scale + 4 * GAP
            assert image.shape[1] > line_height() + 2 * size * scale + 3 * GAP
    assert [item.text for item in legend_items(tasks["seg"])][1:4] == ["0 sky", "1 road", "2 car"]
