"""TensorBoard: each validation epoch an image panel per dense task (rows: 4 val samples;
columns: input | ground truth | teacher | student), and the run's hparams with its final test
metrics for the HParams view; read back with TensorBoard's own event reader."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import FAST, run_kdmtl, show


def _events(run_dir):
    out = []
    for path in sorted((run_dir / "tensorboard").glob("events*")):
        acc = EventAccumulator(str(path), size_guidance={"images": 0, "tensors": 0})
        acc.Reload()
        out.append(acc)
    return out


def test_validation_panel_and_hparams(workdir, shared_cache):
    run_dir = workdir / "tb"
    proc = run_kdmtl(["train", *FAST, "optim.epochs=2", f"hydra.run.dir={run_dir}"], workdir, shared_cache)
    assert proc.returncode == 0, show(proc)
    accs = _events(run_dir)
    images = {tag: acc.Images(tag) for acc in accs for tag in acc.Tags()["images"]}
    assert set(images) == {"val_panel/seg", "val_panel/depth"}          # dense tasks only
    for events in images.values():
        assert len(events) == 2                                         # one per validation epoch
        assert (events[-1].width, events[-1].height) == (4 * 32, 4 * 32)   # 4 columns x 4 samples of 32 px
    # the ground-truth column of the segmentation panel is the labels coloured by class
    from kdmtl_cli.tasks.segmentation import colour_labels
    seg = np.asarray(Image.open(io.BytesIO(images["val_panel/seg"][-1].encoded_image_string)).convert("RGB"))
    column = seg[:, 32:64].astype(np.int64)
    palette = (colour_labels(torch.arange(5).view(1, 1, 5))[0, :, 0].T.numpy() * 255).round().astype(np.int64)
    assert {tuple(px) for px in column.reshape(-1, 3)} <= {tuple(c) for c in palette}
    content = b"".join(c for acc in accs for c in _plugin(acc).values())
    assert b"optim.lr" in content and b"seed" in content and b"hparam/test/cls/accuracy" in content


def _plugin(acc):
    try:
        return acc.PluginTagToContent("hparams")
    except KeyError:
        return {}
