"""Write a small fabricated COCO 2017 directory in the real on-disk format, for trying
`kdmtl train +experiment=coco_cls_seg` without the real data (nothing is downloaded):

    python scripts/fake_coco.py OUT [--train 48] [--val 16] [--seed 0]

OUT/{train2017,val2017}/<id:012d>.jpg (random sizes 160-320 px, random backgrounds with shapes) and
OUT/annotations/instances_{train,val}2017.json with five categories (non-contiguous ids), polygon
instances, compressed-RLE instances and crowd regions (uncompressed RLE), as pycocotools reads them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

CATEGORIES = [{"id": 1, "name": "person", "supercategory": "person"},
              {"id": 3, "name": "car", "supercategory": "vehicle"},
              {"id": 18, "name": "dog", "supercategory": "animal"},
              {"id": 44, "name": "bottle", "supercategory": "kitchen"},
              {"id": 62, "name": "chair", "supercategory": "furniture"}]


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major flattening, starting with zeros."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, value, run = [], 0, 0
    for pixel in flat:
        if pixel == value:
            run += 1
        else:
            counts.append(run)
            value, run = pixel, 1
    counts.append(run)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def write(out: Path, n_train: int, n_val: int, seed: int) -> None:
    from PIL import Image, ImageDraw
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    ann_id = 1
    for split, count, first_id in (("train2017", n_train, 1), ("val2017", n_val, 100_000)):
        (out / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for k in range(count):
            image_id = first_id + k
            h, w = int(rng.integers(160, 321)), int(rng.integers(160, 321))
            image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8) // 4 + 96)
            draw = ImageDraw.Draw(image)
            for _ in range(int(rng.integers(1, 4))):
                category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
                x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
                x1, y1 = int(rng.integers(x0 + 20, min(w, x0 + 160))), int(rng.integers(y0 + 20, min(h, y0 + 160)))
                colour = tuple(int(c) for c in (category["id"] * 37 % 256, category["id"] * 91 % 256, 200))
                kind = rng.integers(3)
                if kind == 0:   # a polygon (a quadrilateral inside the box)
                    points = [x0, y0, x1, y0 + (y1 - y0) // 3, x1 - (x1 - x0) // 4, y1, x0, y1]
                    draw.polygon(points, fill=colour)
                    segmentation, area = [[float(v) for v in points]], float((x1 - x0) * (y1 - y0)) * 0.7
                else:           # an ellipse as a mask: compressed RLE (instance) or uncompressed RLE (crowd)
                    draw.ellipse([x0, y0, x1, y1], fill=colour)
                    canvas = Image.new("L", (w, h), 0)
                    ImageDraw.Draw(canvas).ellipse([x0, y0, x1, y1], fill=1)
                    mask = np.asarray(canvas, dtype=np.uint8)
                    area = float(mask.sum())
                    if kind == 1:
                        rle = mask_utils.encode(np.asfortranarray(mask))
                        segmentation = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
                    else:
                        segmentation = uncompressed_rle(mask)
                annotations.append({"id": ann_id, "image_id": image_id, "category_id": category["id"],
                                    "segmentation": segmentation, "area": area, "iscrowd": int(kind == 2),
                                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]})
                ann_id += 1
            name = f"{image_id:012d}.jpg"
            image.save(out / split / name, quality=90)
            images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        (out / "annotations").mkdir(parents=True, exist_ok=True)
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": images, "annotations": annotations, "categories": CATEGORIES}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=48)
    parser.add_argument("--val", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write(args.out, args.train, args.val, args.seed)
    print(f"fabricated COCO 2017 layout at {args.out}: {args.train} train2017 + {args.val} val2017 images")


if __name__ == "__main__":
    main()
