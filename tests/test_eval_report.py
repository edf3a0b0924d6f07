"""Grids, charts and the Markdown / JSON report (pure logic and drawing)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from adt_plugin.eval.chart import bar_chart
from adt_plugin.eval.grid import MIN_CELL, display_zoom, load_font, plan_grid, render_grid, text_width, wrap
from adt_plugin.eval.report import markdown, report_json, win_rate_pairs, write_report
from adt_plugin.eval.scores import ScoreTable
from adt_plugin.eval.suite import EvalResult

COLOURS = [(255, 0, 0), (0, 200, 0), (0, 0, 255)]


def test_plan_grid_places_cells_without_overlap():
    layout = plan_grid(rows=2, cols=3, cell_size=(64, 48), header_lines=2, title_lines=1, line_height=10, gap=4)
    boxes = [layout.cell_box(r, c) for r in range(2) for c in range(3)]
    for i, a in enumerate(boxes):
        assert a[2] - a[0] == 64 and a[3] - a[1] == 48
        assert a[2] <= layout.width and a[3] <= layout.height
        for b in boxes[i + 1 :]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
    assert layout.header_box(1)[0] == layout.cell_box(0, 1)[0]  # headers sit over their column
    assert layout.header_box(0)[3] <= layout.cell_box(0, 0)[1]  # ... above the first row
    assert layout.row_label_box(1)[1] == layout.cell_box(1, 0)[1]  # row labels beside their row
    assert layout.header_box(0)[1] == layout.title_height > 0
    with pytest.raises(IndexError):
        layout.cell_box(2, 0)
    with pytest.raises(ValueError):
        plan_grid(0, 1, (8, 8), 1, 0, 10)


def test_render_grid_puts_each_image_in_its_cell_with_labels():
    cells = [[Image.new("RGB", (64, 64), COLOURS[c]) for c in range(3)] for _ in range(2)]
    cells[1][2] = None
    grid = render_grid(cells, ["A: base", "B: ft.safetensors @1.00", "C: adt"], ["a red barn\nseed 0", "a cat\nseed 1"], title="euler 20 steps")
    shown = 64 * display_zoom((64, 64))  # small images are shown enlarged
    layout = plan_grid(2, 3, (shown, shown), 1, 1, int(max(11, min(22, shown // 20)) * 1.35))
    assert grid.size[0] == layout.width
    for r in range(2):
        for c in range(3):
            x0, y0, x1, y1 = layout.cell_box(r, c)
            centre = grid.getpixel(((x0 + x1) // 2, y0 + 5 + (grid.size[1] - layout.height)))
            assert centre == (COLOURS[c] if (r, c) != (1, 2) else (200, 200, 200))
    header_band = grid.crop((layout.label_width, 0, grid.size[0], layout.cell_box(0, 0)[1] + grid.size[1] - layout.height - 4))
    assert header_band.getextrema()[0][0] < 100  # text was drawn in the header band
    label_band = grid.crop((0, layout.cell_box(0, 0)[1], layout.label_width - 2, grid.size[1]))
    assert label_band.getextrema()[0][0] < 100


def test_small_images_are_enlarged_pixel_by_pixel_so_labels_fit():
    """64 px ComfyUI cells used to cut their headers into fragments ending in '…'."""
    assert display_zoom((16, 16)) == 10 and display_zoom((64, 48)) == 4 and display_zoom((512, 512)) == 1
    tiny = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    header = "B: FT\nbase + adt_tiny_lora.safetensors @ 1.00"
    grid = render_grid([[tiny]], [header], ["seed 42\na photograph of an astronaut riding a horse"])
    size = 16 * display_zoom(tiny.size)
    layout = plan_grid(1, 1, (size, size), 1, 0, 14)
    assert grid.width == layout.width and size >= MIN_CELL
    x0, y1 = layout.cell_box(0, 0)[0], grid.height - layout.gap
    cell = grid.crop((x0, y1 - size, x0 + size, y1))
    assert cell.resize((16, 16), Image.NEAREST).tobytes() == tiny.tobytes()  # whole pixel blocks, nothing blurred
    font = load_font(max(11, min(22, size // 20)))
    lines = wrap(header, font, size - 8)
    assert "adt_tiny_lora.safetensors" in " ".join(lines).split() and not any("…" in line for line in lines)


def test_notes_are_drawn_over_the_bottom_of_a_cell():
    white = [[Image.new("RGB", (80, 80), (255, 255, 255))]]
    plain = render_grid(white, ["A"], ["p"])
    noted = render_grid(white, ["A"], ["p"], notes=[[["CLIP 31.20", "AES 5.41"]]])
    assert plain.size == noted.size
    bottom = noted.crop((plain.size[0] - 60, plain.size[1] - 12, plain.size[0] - 10, plain.size[1] - 6))
    assert max(bottom.getextrema()[0]) < 255  # darkened band


def test_render_grid_checks_its_shape():
    with pytest.raises(ValueError, match="rows x"):
        render_grid([[Image.new("RGB", (8, 8))]], ["A", "B"], ["p"])


def test_wrap_fits_the_width_and_marks_cut_text():
    font = load_font(12)
    lines = wrap("a photograph of an astronaut riding a horse on the moon " * 3, font, 100, max_lines=3)
    assert len(lines) == 3 and lines[-1].endswith("…")
    assert all(text_width(font, line) <= 100 for line in lines[:-1])
    assert wrap("x" * 200, font, 50, max_lines=99)[0] != "x" * 200  # a long word is cut
    assert wrap("one\ntwo", font, 500) == ["one", "two"]


def test_bar_chart_draws_one_panel_per_metric_and_skips_missing_values():
    values = {"fid": {"base": 24.2, "ft": 16.9, "adt": 13.7}, "hps": {"base": 27.4, "ft": math.nan, "adt": 27.6}, "none": {"base": math.nan}}
    image = bar_chart(values, ["base", "ft", "adt"], {"fid": "FID (lower is better)"})
    assert image.size == (2 * 260, 240 + 30)  # "none" has no finite value: no panel
    colours = {c for _, c in image.getcolors(1 << 20)}
    assert (66, 133, 244) in colours and (219, 68, 55) in colours
    with pytest.raises(ValueError):
        bar_chart({"x": {"a": math.nan}}, ["a"], {})


def _result() -> EvalResult:
    table = ScoreTable()
    for prompt in range(3):
        for seed in (0, 1):
            table.add("clip", "base", prompt, seed, 30.0)
            table.add("clip", "ft", prompt, seed, 30.0 + prompt - 1)  # lose, tie, win
            table.add("clip", "adt", prompt, seed, 31.0)
    return EvalResult(
        set_metrics={"fid": {"base": 24.2, "ft": 16.89, "adt": 13.69}, "kid": {"base": 5.0, "ft": 3.0, "adt": 2.0}},
        kid_std={"kid": {"base": 0.5, "ft": 0.4, "adt": 0.3}},
        table=table,
        descriptions={"fid": "Fréchet distance in FID Inception-v3 ... 299x299", "clip": "CLIP score = ..."},
        skipped={"hps": "HPSv2 needs open_clip_torch", "aesthetic": "no file named sac+logos+ava1-l14-linearMSE.pth"},
    )


def test_markdown_report_is_a_table_1_with_win_rates_and_notes():
    text = markdown(_result(), ["base", "ft", "adt"], {"ft": "./sd15 + ft.safetensors @ 1"}, {"sampler": "ddim", "steps": 50})
    assert "| model | FID ↓ | KID x1e3 ↓ | CLIP score ↑ |" in text
    assert "| ft | 16.89 | 3.00 ± 0.40 | 30.00 ± 0.89 |" in text
    assert "| ft over base | 50.0% (1/1/1) |" in text and "| adt over ft | 83.3% (2/1/0) |" in text
    assert "299x299" in text and "## Skipped" in text and "sac+logos" in text
    assert "`./sd15 + ft.safetensors @ 1`" in text and "sampler: ddim" in text


def test_report_files_are_valid_json_and_a_chart(tmp_path):
    result = _result()
    result.set_metrics["fid"]["adt"] = math.nan
    written = write_report(tmp_path, result, ["base", "ft", "adt"], {}, {"steps": 50})
    assert [p.name for p in written] == ["report.md", "report.json", "chart.png"]
    data = json.loads((tmp_path / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert data["table"]["fid"]["adt"] is None and data["table"]["clip"]["adt"] == 31.0
    assert {(w["a"], w["b"]) for w in data["win_rates"]} == {("ft", "base"), ("adt", "base"), ("adt", "ft")}
    assert data["skipped"]["hps"].startswith("HPSv2")
    assert Image.open(tmp_path / "chart.png").size[0] > 0
    assert report_json(result, ["base"], {}, {})["win_rates"] == []


def test_win_rate_pairs_compare_each_later_model_with_each_earlier():
    assert win_rate_pairs(["base", "ft", "adt"]) == [("ft", "base"), ("adt", "base"), ("adt", "ft")]
