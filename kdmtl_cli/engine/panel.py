"""A fixed panel of validation images for TensorBoard: per dense task, one image whose rows are
samples and whose columns are input | ground truth | teacher | student (segmentation coloured
by class, depth as a colour ramp, normals as RGB: each task kind's `show`). The teacher's
column is computed once, at the first render (it is frozen); the student's every validation epoch.

Readable at a glance: small images are upscaled (nearest neighbour, whole factors, so a pixel
stays a sharp block) until a tile's shorter side is at least MIN_TILE px; a title row names the
columns; a legend below says what the colours mean (segmentation: class -> colour; depth: the
ramp; normals: the axes). Titles and legends are drawn once per task (Pillow) into a template
image; each render only pastes the tiles into a copy of it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdmtl_cli.tasks import LegendItem

MIN_TILE = 192          # px: a tile's shorter side after upscaling (32 px images -> x6)
GAP = 4                 # px of background between tiles and around them
PAD = 6                 # px above and below a line of text
FONT_SIZE = 15
SWATCH = 14             # px: a legend colour square
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
COLUMN_TITLES = ("input", "ground truth", "teacher", "student")


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=FONT_SIZE)    # a scalable font (Pillow >= 10.1 with FreeType)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()                  # the small bitmap font


def _text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom - top


def line_height(font=None) -> int:
    """Height of one line of text with its padding: the title row, and each legend row."""
    font = font or _font()
    return max(_text_size(font, "Ag")[1], SWATCH) + 2 * PAD


def upscale_factor(height: int, width: int) -> int:
    """The whole factor that brings the shorter side to at least MIN_TILE (1 for large images)."""
    return max(1, math.ceil(MIN_TILE / max(1, min(height, width))))


@dataclass
class Layout:
    """Where everything sits in one task's panel image."""

    tile_h: int
    tile_w: int
    rows: int
    columns: int
    header: int        # px of the column-title row
    footer: int        # px of the legend (0: none)

    @property
    def width(self) -> int:
        return self.columns * self.tile_w + (self.columns + 1) * GAP

    @property
    def grid_height(self) -> int:
        return self.rows * self.tile_h + (self.rows + 1) * GAP

    @property
    def height(self) -> int:
        return self.header + self.grid_height + self.footer

    def tile_origin(self, row: int, column: int) -> tuple[int, int]:
        """(y, x) of a tile's top-left pixel."""
        return self.header + GAP + row * (self.tile_h + GAP), GAP + column * (self.tile_w + GAP)


# ---- legends: each task kind's `legend` entries (tasks/__init__.py LegendItem), laid out left to right ---

def legend_items(task) -> list[LegendItem]:
    """What the task's colours mean (its kind says: classes for segmentation, the ramp for depth,
    the axes for normals; nothing for kinds whose `show` explains itself)."""
    return task.kind.legend(task.spec)


def _item_width(font, item: LegendItem) -> int:
    mark = 0
    if item.colour is not None:
        mark = SWATCH + 4
    elif item.ramp is not None:
        mark = 6 * SWATCH + 6
    return mark + _text_size(font, item.text)[0]


def _legend_rows(font, items: list[LegendItem], width: int) -> list[list[LegendItem]]:
    """Items flowed into rows that fit `width` (a new row when the next item does not fit)."""
    rows: list[list[LegendItem]] = [[]]
    used = 0
    for item in items:
        need = _item_width(font, item) + 3 * GAP
        if rows[-1] and used + need > width - 2 * GAP:
            rows.append([])
            used = 0
        rows[-1].append(item)
        used += need
    return rows if rows[0] else []


def _text(draw, font, x: int, middle: int, text: str, centred: bool = False) -> None:
    """Text vertically centred on `middle` (by the box of "Ag", so that every label shares a
    baseline), starting at x or centred on it. Placed from bounding boxes rather than with
    `anchor`, which Pillow's bitmap fallback font lacks."""
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    _, top, _, bottom = draw.textbbox((0, 0), "Ag", font=font)
    start = x - (right - left) // 2 if centred else x
    draw.text((start - left, middle - (top + bottom) // 2), text, fill=INK, font=font)


def _draw_item(draw, font, item: LegendItem, x: int, y: int, height: int) -> int:
    """Draw one legend item with its left edge at x in a row starting at y; return its width."""
    middle = y + height // 2
    mark = 0
    if item.colour is not None:
        draw.rectangle([x, middle - SWATCH // 2, x + SWATCH - 1, middle + SWATCH // 2 - 1],
                       fill=tuple(item.colour), outline=(120, 120, 120))
        mark = SWATCH + 4
    elif item.ramp is not None:           # the bar before its text, e.g. "near [bar] far"
        bar = 6 * SWATCH
        for i in range(bar):
            draw.line([x + i, middle - SWATCH // 2, x + i, middle + SWATCH // 2 - 1], fill=_ramp_at(item.ramp, i / (bar - 1)))
        mark = bar + 6
    _text(draw, font, x + mark, middle, item.text)
    return _item_width(font, item)


def _ramp_at(stops, t: float) -> tuple[int, int, int]:
    pos = t * (len(stops) - 1)
    low = min(int(pos), len(stops) - 2)
    frac = pos - low
    return tuple(round(255 * (a * (1 - frac) + b * frac)) for a, b in zip(stops[low], stops[low + 1]))


def template(layout: Layout, titles: list[str], legend: list[list[LegendItem]], font) -> torch.Tensor:
    """The panel's background, column titles and legend as a float [3, H, W] image in [0, 1];
    the tiles are pasted in at each render."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (layout.width, layout.height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for column, title in enumerate(titles):
        x = layout.tile_origin(0, column)[1] + layout.tile_w // 2
        _text(draw, font, x, layout.header // 2, title, centred=True)
    row_height = line_height(font)
    y = layout.header + layout.grid_height
    for row in legend:
        x = 2 * GAP
        for item in row:
            x += _draw_item(draw, font, item, x, y, row_height) + 3 * GAP
        y += row_height
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(layout.height, layout.width, 3).permute(2, 0, 1).float() / 255.0


class ValidationPanel:
    def __init__(self, batch: dict, tasks, mean, std, teacher: torch.nn.Module | None, size: int = 4):
        self.image = batch["image"][:size]
        self.targets = {name: t[:size] for name, t in batch["targets"].items()}
        self.tasks = {name: task for name, task in tasks.items() if task.kind.dense}
        view = (1, -1, 1, 1)
        mean = torch.tensor(mean, device=self.image.device).view(view)
        std = torch.tensor(std, device=self.image.device).view(view)
        rgb = (self.image.float() * std + mean).clamp(0, 1)[:, :3]
        self.input = rgb.expand(-1, 3, -1, -1) if rgb.shape[1] == 1 else rgb    # grey images as RGB
        self.teacher = teacher
        self.teacher_rgb: dict[str, torch.Tensor] | None = None    # at the first render, not at start-up
        self.scale = upscale_factor(*self.image.shape[-2:])
        self._templates: dict[str, tuple[Layout, torch.Tensor]] = {}   # per task, made at its first render

    def _show(self, name: str, value: torch.Tensor) -> torch.Tensor:
        task = self.tasks[name]
        return task.kind.show(value, task.spec).float().clamp(0, 1)

    def _frame(self, name: str, columns: int) -> tuple[Layout, torch.Tensor]:
        """The task's layout and template (titles, legend), made once."""
        if name not in self._templates:
            font = _font()
            titles = [t for t in COLUMN_TITLES if t != "teacher" or columns == len(COLUMN_TITLES)]
            h, w = self.image.shape[-2:]
            tile_h, tile_w = h * self.scale, w * self.scale
            width = columns * tile_w + (columns + 1) * GAP
            legend = _legend_rows(font, legend_items(self.tasks[name]), width)
            layout = Layout(tile_h, tile_w, rows=self.image.shape[0], columns=columns,
                            header=line_height(font), footer=len(legend) * line_height(font) + (GAP if legend else 0))
            self._templates[name] = (layout, template(layout, titles, legend, font))
        return self._templates[name]

    def _compose(self, name: str, columns: list[torch.Tensor]) -> torch.Tensor:
        layout, canvas = self._frame(name, len(columns))
        canvas = canvas.clone()
        for column, tiles in enumerate(columns):
            tiles = tiles.cpu().float()
            if self.scale > 1:
                tiles = F.interpolate(tiles, scale_factor=self.scale, mode="nearest")
            for row, tile in enumerate(tiles):
                y, x = layout.tile_origin(row, column)
                canvas[:, y:y + layout.tile_h, x:x + layout.tile_w] = tile
        return canvas

    @torch.no_grad()
    def render(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """{task: [3, H, W] in [0, 1]} for the model as it is now (layout: `Layout`)."""
        was_training = model.training
        model.eval()
        out = model(self.image)["outputs"]
        model.train(was_training)
        if self.teacher_rgb is None:
            self.teacher_rgb = {}
            if self.teacher is not None:
                teacher_out = self.teacher(self.image)["outputs"]
                self.teacher_rgb = {n: self._show(n, teacher_out[n]) for n in self.tasks if n in teacher_out}
        panels = {}
        for name, task in self.tasks.items():
            columns = [self.input, self._show(name, self.targets[task.target])]
            if name in self.teacher_rgb:
                columns.append(self.teacher_rgb[name])
            columns.append(self._show(name, out[name]))
            panels[name] = self._compose(name, columns)
        return panels
