"""Labelled comparison grids: rows = prompts (x seeds), columns = models.

`plan_grid` is pure arithmetic (where every header, row label and cell goes), so
the layout is testable without drawing; `render_grid` draws it with Pillow.
Optional per-cell notes (metric values) are drawn over the bottom of each cell
on a dark band, so the grid keeps its size when scores are added. Images smaller
than `MIN_CELL` pixels are shown enlarged by a whole factor (each pixel a square
block, nothing interpolated), so headers, row labels and scores fit beside them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

MIN_CELL = 160  # px: below this, cells are enlarged by a whole factor so their labels fit
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MISSING = (200, 200, 200)


def load_font(size: int):
    """Pillow's bundled font at `size` (Pillow >= 10.1), else its small bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow 10.0: no size argument
        return ImageFont.load_default()


def text_width(font, text: str) -> float:
    return font.getlength(text) if hasattr(font, "getlength") else len(text) * 6


def wrap(text: str, font, max_width: float, max_lines: int = 6) -> list[str]:
    """Greedy word wrap to `max_width` pixels; explicit newlines are kept; a word
    longer than the width is cut; more than `max_lines` lines end with '…'."""
    lines: list[str] = []
    for paragraph in str(text).split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if text_width(font, candidate) <= max_width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while text_width(font, word) > max_width and len(word) > 1:
                cut = max(1, int(len(word) * max_width / max(text_width(font, word), 1)))
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [lines[max_lines - 1].rstrip() + "…"]
    return lines


@dataclass(frozen=True)
class GridLayout:
    rows: int
    cols: int
    cell_width: int
    cell_height: int
    label_width: int
    title_height: int
    header_height: int
    gap: int

    @property
    def width(self) -> int:
        return self.label_width + self.cols * (self.cell_width + self.gap) + self.gap

    @property
    def height(self) -> int:
        return self.title_height + self.header_height + self.rows * (self.cell_height + self.gap) + self.gap

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        if not (0 <= row < self.rows and 0 <= col < self.cols):
            raise IndexError(f"cell ({row}, {col}) is outside a {self.rows}x{self.cols} grid")
        x = self.label_width + self.gap + col * (self.cell_width + self.gap)
        y = self.title_height + self.header_height + self.gap + row * (self.cell_height + self.gap)
        return x, y, x + self.cell_width, y + self.cell_height

    def header_box(self, col: int) -> tuple[int, int, int, int]:
        x0, _, x1, _ = self.cell_box(0, col)
        return x0, self.title_height, x1, self.title_height + self.header_height

    def row_label_box(self, row: int) -> tuple[int, int, int, int]:
        _, y0, _, y1 = self.cell_box(row, 0)
        return 0, y0, self.label_width, y1


def display_zoom(image_size: tuple[int, int]) -> int:
    """The whole factor that brings the smaller side of an image to at least MIN_CELL."""
    return max(1, math.ceil(MIN_CELL / max(1, min(image_size))))


def plan_grid(
    rows: int,
    cols: int,
    cell_size: tuple[int, int],
    header_lines: int,
    title_lines: int,
    line_height: int,
    label_width: Optional[int] = None,
    gap: int = 4,
) -> GridLayout:
    if rows < 1 or cols < 1:
        raise ValueError(f"a grid needs at least one row and one column, got {rows}x{cols}")
    width, height = cell_size
    label = max(120, min(320, width)) if label_width is None else label_width
    pad = line_height // 2
    title = title_lines * line_height + 2 * pad if title_lines else 0
    header = max(1, header_lines) * line_height + 2 * pad
    return GridLayout(rows, cols, width, height, label, title, header, gap)


def render_grid(
    cells: Sequence[Sequence[Optional[Image.Image]]],
    column_headers: Sequence[str],
    row_labels: Sequence[str],
    title: str = "",
    notes: Optional[Sequence[Sequence[Sequence[str]]]] = None,
    font_size: Optional[int] = None,
) -> Image.Image:
    """`cells[row][col]` (None: a grey "missing" cell). Cells are shown at the size
    of the first present image (enlarged when small, see `display_zoom`); others are
    resized to it."""
    rows, cols = len(cells), len(column_headers)
    if any(len(r) != cols for r in cells) or len(row_labels) != rows:
        raise ValueError(f"cells must be {len(row_labels)} rows x {cols} columns (one per header and row label)")
    first = next((c for r in cells for c in r if c is not None), None)
    image_size = first.size if first is not None else (256, 256)
    zoom = display_zoom(image_size)
    cell_size = (image_size[0] * zoom, image_size[1] * zoom)
    size = font_size or max(11, min(22, cell_size[0] // 20))
    font = load_font(size)
    line_height = int(size * 1.35)
    header_wrapped = [wrap(h, font, cell_size[0] - 8) for h in column_headers]
    probe = plan_grid(rows, cols, cell_size, 1, 0, line_height)
    title_wrapped = wrap(title, font, probe.width - 16, max_lines=4) if title else []
    layout = plan_grid(rows, cols, cell_size, max(len(h) for h in header_wrapped), len(title_wrapped), line_height)

    canvas = Image.new("RGB", (layout.width, layout.height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    pad = line_height // 2
    for i, line in enumerate(title_wrapped):
        draw.text((8, pad + i * line_height), line, fill=INK, font=font)
    for col, lines in enumerate(header_wrapped):
        x0, y0, x1, _ = layout.header_box(col)
        for i, line in enumerate(lines):
            draw.text(((x0 + x1 - text_width(font, line)) / 2, y0 + pad + i * line_height), line, fill=INK, font=font)
    max_label_lines = max(1, (layout.cell_height - 2 * pad) // line_height)
    for row, label in enumerate(row_labels):
        x0, y0, x1, _ = layout.row_label_box(row)
        for i, line in enumerate(wrap(label, font, layout.label_width - 12, max_lines=max_label_lines)):
            draw.text((x0 + 6, y0 + pad + i * line_height), line, fill=INK, font=font)
    for row in range(rows):
        for col in range(cols):
            box = layout.cell_box(row, col)
            image = cells[row][col]
            if image is None:
                draw.rectangle(box, fill=MISSING)
                draw.text((box[0] + 6, box[1] + 6), "missing", fill=INK, font=font)
            else:
                if image.size != cell_size:  # enlarged pixel by pixel, or another size fitted to the first
                    image = image.resize(cell_size, Image.NEAREST if image.size == image_size else Image.BICUBIC)
                canvas.paste(image.convert("RGB"), box[:2])
            if notes is not None and notes[row][col]:
                _draw_notes(canvas, box, notes[row][col], font, line_height)
    return canvas


def _draw_notes(canvas: Image.Image, box, lines: Sequence[str], font, line_height: int) -> None:
    x0, y0, x1, y1 = box
    band = min(y1 - y0, len(lines) * line_height + line_height // 2)
    overlay = Image.new("RGBA", (x1 - x0, band), (0, 0, 0, 160))
    draw = ImageDraw.Draw(overlay)
    for i, line in enumerate(lines):
        draw.text((4, line_height // 4 + i * line_height), line, fill=(255, 255, 255, 255), font=font)
    region = canvas.crop((x0, y1 - band, x1, y1)).convert("RGBA")
    canvas.paste(Image.alpha_composite(region, overlay).convert("RGB"), (x0, y1 - band))
