"""The ComfyUI nodes' logic without ComfyUI: grid layout and labels, seed matching,
score aggregation, provenance, path validation, the workflows, and the nodes'
V1 form and metric functions against minimal stand-ins of ComfyUI's modules."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from comfy_workflows import spec_widgets, ui_to_api
from comfyui_nodes import core
from comfyui_nodes.core import BASE_CHOICE, SKIP_CHOICE, ColumnChoice, Comparison, PathRefused, Variant

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"sampler_name": "euler", "scheduler": "normal", "steps": 20, "cfg": 7.0, "width": 32, "height": 32, "negative": ""}


def test_prompts_and_seeds():
    assert core.parse_prompts("# comment\na cat\n\n  a dog \n") == ["a cat", "a dog"]
    with pytest.raises(ValueError, match="empty"):
        core.parse_prompts("\n# only a comment\n")
    assert core.seeds_from(5, 3) == [5, 6, 7]
    assert core.seeds_from(core.MAX_SEED, 2) == [core.MAX_SEED, 0]
    with pytest.raises(ValueError):
        core.seeds_from(0, 0)


def test_every_column_of_a_row_uses_the_rows_seed():
    rows = core.plan_rows(["a cat", "a dog"], [7, 8])
    assert [(r.prompt, r.seed) for r in rows] == [("a cat", 7), ("a cat", 8), ("a dog", 7), ("a dog", 8)]
    variants = core.variants_from([ColumnChoice("A", BASE_CHOICE), ColumnChoice("B", "ft.safetensors"), ColumnChoice("C", "adt.safetensors", 0.5)])
    jobs = core.plan_jobs(rows, variants)
    assert len(jobs) == 12 and len({(j.row_index, j.column) for j in jobs}) == 12
    assert all(j.seed == rows[j.row_index].seed for j in jobs)
    assert [j.column for j in jobs] == [0] * 4 + [1] * 4 + [2] * 4  # variant-major: each model patched once


def test_variants_skip_label_and_headers():
    variants = core.variants_from([
        ColumnChoice("A", BASE_CHOICE),
        ColumnChoice("B", SKIP_CHOICE),
        ColumnChoice("C", "sub/my_adt.safetensors", 0.8, " ADT ", model=object()),
    ])
    assert [v.slot for v in variants] == ["A", "C"]
    assert variants[0].header == "A: base" and variants[0].lora is None
    assert variants[1].header == "C: ADT\nmodel_c + my_adt.safetensors @ 0.80"
    assert Variant("B", "ft.safetensors", 1.0).header == "B: base\nbase + ft.safetensors @ 1.00"
    marked = Variant("B", "ft.safetensors", 1.0, warning="2 bundled embedding keys not loaded")
    assert marked.header.endswith("\n(2 bundled embedding keys not loaded)")
    with pytest.raises(ValueError, match="enable at least one"):
        core.variants_from([ColumnChoice("A", SKIP_CHOICE)])


def test_the_nodes_flat_inputs_become_three_records():
    inputs = {f"{k}_{s}": v for s, values in (("a", (BASE_CHOICE, 1, "")), ("b", ("ft.safetensors", 0.5, "FT")), ("c", (SKIP_CHOICE, 1, "")))
              for k, v in zip(("lora", "strength", "label"), values)}
    own = object()
    columns = core.columns_from_inputs({**inputs, "model_b": own})
    assert columns[1] == ColumnChoice("B", "ft.safetensors", 0.5, "FT", model=own) and columns[2].skipped
    prompts = core.PromptSet.parse("a cat\n# no\na dog", seed=7, seeds_per_prompt=2)
    assert prompts.prompts == ("a cat", "a dog") and prompts.seeds == (7, 8) and len(prompts.rows()) == 4
    sampling = core.Sampling("euler", "normal", 20, 7.0, 32, 32)
    assert sampling.to_dict() == SETTINGS and core.settings_title(sampling.to_dict()) == core.settings_title(SETTINGS)


def _comparison(rows=2, colours=((1.0, 0, 0), (0, 1.0, 0))):
    variants = [Variant("A", None), Variant("B", "ft.safetensors", 0.5, "FT")]
    plan = core.plan_rows(["a cat", "a dog"][:rows], [3])
    images = [torch.tensor(c).view(1, 1, 1, 3).expand(len(plan), 32, 32, 3).clone() for c in colours]
    return Comparison(variants, plan, images, dict(SETTINGS))


def test_comparison_grid_has_a_cell_per_row_and_variant_with_headers():
    comparison = _comparison()
    grid = comparison.grid()
    assert comparison.headers() == ["A: base", "B: FT\nbase + ft.safetensors @ 0.50"]
    from adt_plugin.eval.grid import display_zoom, plan_grid

    shown = 32 * display_zoom((32, 32))  # small cells are shown enlarged so their labels fit
    probe = plan_grid(2, 2, (shown, shown), 1, 0, 14)
    assert grid.width == probe.width  # label column + 2 cells
    right = grid.getpixel((grid.width - 16, grid.height - 16))
    left = grid.getpixel((grid.width - 16 - shown - 4, grid.height - 16))
    assert right == (0, 255, 0) and left == (255, 0, 0)  # column B is green, A red, bottom row
    with pytest.raises(ValueError, match="images for"):
        Comparison(comparison.variants, comparison.rows[:1], comparison.images, SETTINGS)
    assert "euler / normal, 20 steps, CFG 7, 32x32" == core.settings_title(SETTINGS)


def test_scores_aggregate_into_notes_headers_and_a_table():
    comparison = _comparison()
    scored = comparison.with_scores("clip", [torch.tensor([30.0, 20.0]), torch.tensor([31.0, 20.0])], "CLIP (tiny)")
    assert comparison.scores.metrics() == []  # the input comparison is not changed
    assert scored.cell_notes() == [[["CLIP 30.00"], ["CLIP 31.00"]], [["CLIP 20.00"], ["CLIP 20.00"]]]
    assert scored.headers()[1].endswith("mean CLIP 25.50")
    table = scored.table_text()
    assert "| B: FT | 25.50 ± 7.78 |" in table
    assert "B over A: CLIP score 75% (1 won, 1 tied, 0 lost of 2 prompts)" in table  # prompt 0 won, prompt 1 tied
    assert "| a dog | 3 | B | 20.00 |" in table and "CLIP (tiny)" in table
    close = comparison.with_scores("clip", [torch.tensor([30.0, 30.002]), torch.tensor([30.0, 30.0])])
    assert "| A: base | 30.0010 ± 0.0014 |" in close.table_text()  # the spread shows (was "30.00 ± 0.00")
    assert "| B: FT | 30.00 ± 0 |" in close.table_text()
    noted = scored.with_note("HPSv2 skipped: needs open_clip")
    assert "- HPSv2 skipped: needs open_clip" in noted.table_text()
    plain, overlaid = comparison.grid(), scored.grid()
    assert plain.width == overlaid.width and plain.tobytes() != overlaid.tobytes()  # the headers gain a line of means


def test_c_over_b_beside_the_win_rates_over_a():
    plan = core.plan_rows(["a cat", "a dog"], [3])
    variants = [Variant("A", None), Variant("B", "ft.safetensors", 1.0, "FT"), Variant("C", "adt.safetensors", 1.0, "ADT")]
    comparison = Comparison(variants, plan, [torch.zeros(2, 8, 8, 3)] * 3, dict(SETTINGS))
    scored = comparison.with_scores("aesthetic", [torch.tensor([5.0, 5.0]), torch.tensor([6.0, 4.0]), torch.tensor([7.0, 5.0])])
    assert comparison.win_rate_pairs() == [("B", "A"), ("C", "A"), ("C", "B")]
    table = scored.table_text()
    assert "- C over B: Aesthetic 100% (2 won, 0 tied, 0 lost of 2 prompts)" in table  # ADT over FT
    assert "- C over A: Aesthetic 75% (1 won, 1 tied, 0 lost of 2 prompts)" in table


def test_a_skipped_column_outputs_one_labelled_image():
    """Save / Preview Image read images[0]: an empty batch made them fail with IndexError."""
    image = core.skipped_column_image("B", 64, 48)
    assert image.shape == (1, 64, 48, 3) and 0 <= image.min() and image.max() <= 1
    assert image.std() > 0  # the grey carries its "column B skipped" text


def test_lora_fit_says_what_did_not_load_and_what_to_do():
    fine = core.LoraFit("ft.safetensors", "/m/loras/ft.safetensors", 12)
    assert fine.problem() is None and fine.warning == "" and fine.record() == {"keys": 12, "keys_loaded": 12, "not_loaded": []}
    other = core.LoraFit("xl.safetensors", "/m/loras/xl.safetensors", 12, ("lora_unet_a.lora_up.weight", "lora_unet_a.lora_down.weight", "lora_unet_a.alpha", "lora_unet_b.alpha"))
    message = other.problem()
    assert message.startswith("LoRA 'xl.safetensors' (/m/loras/xl.safetensors) does not fit this model: ComfyUI loaded 8 of its 12 keys")
    assert "lora_unet_a.lora_up.weight, " in message and ", ..." in message and "the checkpoint it was trained for" in message
    shapes = core.LoraFit("xl.safetensors", "/m/x", 3, wrong_shape=("diffusion_model.w",))
    assert "another shape than 1 of the weights" in shapes.problem()
    bundled = core.LoraFit("ti.safetensors", "/m/ti", 5, ("bundle_emb.cat.string_to_param.*",))
    assert bundled.problem() is None and bundled.warning == "1 bundled embedding keys not loaded"
    assert bundled.record()["keys_loaded"] == 4


class LoRAAdapter:  # the attributes of comfy.weight_adapter.lora.LoRAAdapter the check reads
    def __init__(self, up, down):
        self.weights = (up, down, None, None, None, None)


def test_wrong_shapes_finds_updates_that_do_not_fit_their_weight():
    weights = {"w": torch.zeros(8, 6), "conv": torch.zeros(8, 4, 3, 3), "qkv": torch.zeros(12, 6)}
    before = {"w": [("old",)]}
    after = {
        "w": [("old",), (1.0, LoRAAdapter(torch.zeros(8, 2), torch.zeros(2, 6)), 1.0, None, None)],
        "conv": [(1.0, LoRAAdapter(torch.zeros(8, 2, 1, 1), torch.zeros(2, 4, 3, 3)), 1.0, None, None)],
        "qkv": [(1.0, LoRAAdapter(torch.zeros(4, 2), torch.zeros(2, 6)), 1.0, (0, 4, 4), None)],  # SD3: a third of qkv
    }
    assert core.wrong_shapes(before, after, weights) == []
    after["w"].append((1.0, LoRAAdapter(torch.zeros(16, 2), torch.zeros(2, 6)), 1.0, None, None))  # another model's width
    after["qkv"].append((1.0, ("diff", (torch.zeros(12, 5),)), 1.0, None, None))
    assert core.wrong_shapes(before, after, weights) == ["w", "qkv"]
    assert core.update_fits(object(), [1]) is None  # kinds it does not know are left to ComfyUI


def test_file_stamp_changes_when_a_file_is_rewritten(tmp_path):
    f = tmp_path / "lora.safetensors"
    f.write_bytes(b"abc")
    first = core.file_stamp(f)
    os.utime(f, ns=(1, 1))
    assert core.file_stamp(f) != first
    folder = tmp_path / "dinov2-small"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    stamp = core.file_stamp(folder)
    (folder / "model.safetensors").write_bytes(b"x")
    assert core.file_stamp(folder) != stamp and core.file_stamp(tmp_path / "gone") == [str(tmp_path / "gone"), None]


def test_paths_outside_the_model_folders_are_refused(tmp_path):
    loras = tmp_path / "models" / "loras"
    (loras / "sub").mkdir(parents=True)
    (loras / "sub" / "ft.safetensors").write_bytes(b"x")
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"x")
    os.symlink(outside, loras / "link.safetensors")  # a link the user put in the folder is followed, as ComfyUI does
    assert core.resolve_inside([str(loras)], "sub/ft.safetensors", "LoRA") == loras / "sub" / "ft.safetensors"
    assert core.resolve_inside([str(tmp_path / "other"), str(loras)], "link.safetensors", "LoRA") == loras / "link.safetensors"
    for bad in (str(outside), "../../secret.safetensors", "sub/../../../secret.safetensors", "sub\\..\\..\\x", ""):
        with pytest.raises(PathRefused, match="LoRA .* is not a name inside ComfyUI's model folders"):
            core.resolve_inside([str(loras)], bad, "LoRA")
    with pytest.raises(core.NotInFolders, match="'nope.safetensors' is not in"):
        core.resolve_inside([str(loras)], "nope.safetensors", "LoRA")


def test_file_hash_is_sha256_and_follows_changes(tmp_path):
    f = tmp_path / "a.safetensors"
    f.write_bytes(b"abc")
    assert core.file_sha256(f) == hashlib.sha256(b"abc").hexdigest()
    f.write_bytes(b"abcd")
    assert core.file_sha256(f) == hashlib.sha256(b"abcd").hexdigest()


def test_trace_sources_follows_the_model_chain_to_its_files():
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": "style.safetensors", "strength_model": 0.7, "strength_clip": 1.0}},
        "3": {"class_type": "ADTCompareABC", "inputs": {"model": ["2", 0], "model_b": ["1", 0]}},
        "4": {"class_type": "Loop", "inputs": {"model": ["5", 0]}},
        "5": {"class_type": "Loop", "inputs": {"model": ["4", 0]}},
        "6": {"class_type": "ADTCompareABC", "inputs": {"model": ["4", 0]}},
    }
    chain = core.trace_sources(prompt, "3", "model")
    assert [c["class_type"] for c in chain] == ["LoraLoader", "CheckpointLoaderSimple"]
    assert chain[0]["lora_name"] == "style.safetensors" and chain[0]["strength_model"] == 0.7
    assert chain[1]["ckpt_name"] == "sd15.safetensors"
    assert [c["node"] for c in core.trace_sources(prompt, "3", "model_b")] == ["1"]
    assert len(core.trace_sources(prompt, "6", "model")) == 2  # a cycle ends the walk
    assert core.trace_sources({}, "9", "model") == []


def test_provenance_records_settings_seeds_and_hashes():
    variants = [Variant("A", None), Variant("B", "ft.safetensors", 0.8, "FT")]
    record = core.provenance_record(
        variants, SETTINGS, ["a cat"], [3, 4],
        {"A": {"input": "model", "loaded_by": [{"class_type": "CheckpointLoaderSimple", "ckpt_name": "sd15.safetensors", "ckpt_name_sha256": "ab"}]}},
        {"ft.safetensors": "cd"}, {"adt_plugin": "0.1.0"},
    )
    data = json.loads(core.provenance_text(record))
    assert data["seeds"] == [3, 4] and data["settings"]["sampler_name"] == "euler"
    assert data["variants"][1]["lora"] == {"name": "ft.safetensors", "strength": 0.8, "sha256": "cd"}
    assert data["variants"][0]["model"]["loaded_by"][0]["ckpt_name_sha256"] == "ab"
    assert data["variants"][0]["lora"] is None and "identical in every column" in data["noise"]


def test_example_workflow_and_its_api_twin_are_the_same_graph():
    ui = json.loads((REPO / "comfyui_nodes" / "example_workflows" / "adt_abc_compare_metrics.json").read_text())
    api = json.loads((REPO / "tests" / "comfyui" / "adt_compare_abc_api.json").read_text())
    assert ui_to_api(ui, spec_widgets) == api
    assert {n["type"] for n in ui["nodes"]} >= {"ADTCompareABC", "ADTClipScore", "ADTAestheticScore", "ADTHPSv2Score", "ADTDiscriminatorScore"}
    for link_id, source, slot, target, target_slot, kind in ui["links"]:  # links agree with both ends
        src = next(n for n in ui["nodes"] if n["id"] == source)
        dst = next(n for n in ui["nodes"] if n["id"] == target)
        assert link_id in src["outputs"][slot]["links"] and dst["inputs"][target_slot]["link"] == link_id
        assert src["outputs"][slot]["type"] == dst["inputs"][target_slot]["type"] == kind


# ---- the nodes against stand-ins of ComfyUI's modules ---------------------------------


@pytest.fixture
def comfy_standins(tmp_path, monkeypatch):
    """Minimal stand-ins mirroring the functions the nodes call in ComfyUI a125cd84
    (folder_paths.py, comfy/samplers.py, comfy/model_management.py)."""
    models = tmp_path / "models"
    folders = {"loras": [str(models / "loras")], "adt_metrics": []}
    (models / "loras").mkdir(parents=True)
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(models)
    fp.get_folder_paths = lambda name: list(folders[name])
    fp.add_model_folder_path = lambda name, path, is_default=False: folders.setdefault(name, []).append(path)

    def get_filename_list(name):
        out = []
        for folder in folders[name]:
            for root, _, files in os.walk(folder):
                out += [os.path.relpath(os.path.join(root, f), folder) for f in files]
        return sorted(out)

    fp.get_filename_list = get_filename_list
    fp.get_full_path = lambda name, f: next((os.path.join(d, f) for d in folders[name] if os.path.isfile(os.path.join(d, f))), None)
    samplers = types.ModuleType("comfy.samplers")
    samplers.KSampler = types.SimpleNamespace(SAMPLERS=["euler", "dpmpp_2m"], SCHEDULERS=["normal", "karras"])
    mm = types.ModuleType("comfy.model_management")
    mm.get_torch_device = lambda: torch.device("cpu")
    comfy = types.ModuleType("comfy")
    comfy.samplers, comfy.model_management = samplers, mm
    for name, module in {"folder_paths": fp, "comfy": comfy, "comfy.samplers": samplers, "comfy.model_management": mm}.items():
        monkeypatch.setitem(sys.modules, name, module)
    from comfyui_nodes import nodes

    nodes.register_metrics_folder()
    nodes._CACHE.clear()
    return models


def test_v1_nodes_list_loras_and_validate_names(comfy_standins):
    from comfyui_nodes.nodes import COMPARE, NODE_SPECS
    from comfyui_nodes.spec import build_v1

    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(comfy_standins / "loras" / "ft.safetensors"))
    (comfy_standins / "loras" / "ft.adt_disc.safetensors").write_bytes(b"x")
    (comfy_standins / "loras" / "cut.safetensors").write_bytes((comfy_standins / "loras" / "ft.safetensors").read_bytes()[:20])
    cls = build_v1(COMPARE)
    types_ = cls.INPUT_TYPES()
    assert types_["required"]["model"] == ("MODEL", {"tooltip": COMPARE.inputs[0].tooltip})
    assert types_["required"]["lora_b"][0] == [BASE_CHOICE, SKIP_CHOICE, "cut.safetensors", "ft.safetensors"]  # no discriminator files
    assert types_["required"]["seed"][1]["control_after_generate"] is True
    assert set(types_["optional"]) == {"model_b", "clip_b", "model_c", "clip_c"}
    assert types_["hidden"] == {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"}
    assert cls.RETURN_TYPES == ("IMAGE", "IMAGE", "IMAGE", "IMAGE", "ADT_COMPARISON", "STRING")
    check = lambda **kw: cls.VALIDATE_INPUTS(**{"lora_a": BASE_CHOICE, "lora_b": SKIP_CHOICE, "lora_c": SKIP_CHOICE, "sampler_name": "euler", "scheduler": "normal", **kw})  # noqa: E731
    assert check(lora_b="ft.safetensors") is True
    assert check(lora_b="../../etc/passwd").startswith("lora_b: LoRA '../../etc/passwd' is not a name inside ComfyUI's model folders")
    assert check(lora_c=str(comfy_standins / "loras" / "ft.safetensors")).startswith("lora_c: LoRA")
    assert "is not in" in check(lora_b="deleted.safetensors")
    assert "discriminator" in check(lora_b="ft.adt_disc.safetensors")
    assert "unknown sampler" in check(sampler_name="nope")
    assert "enable at least one" in check(lora_a=SKIP_CHOICE)
    cut = check(lora_c="cut.safetensors")  # a cut-off download is refused before anything is queued, by name
    assert cut.startswith(f"lora_c: LoRA 'cut.safetensors' ({comfy_standins / 'loras' / 'cut.safetensors'}) cannot be read")
    assert cut.endswith("save or download it again")
    assert len({s.node_id for s in NODE_SPECS}) == 5


def test_requeueing_after_a_lora_was_rewritten_is_a_change(comfy_standins):
    """ComfyUI reruns a node only when its inputs or IS_CHANGED / fingerprint_inputs change;
    a LoRA retrained under the same name used to give the cached grid and the old sha256."""
    from comfyui_nodes.nodes import COMPARE, DISC_SCORE
    from comfyui_nodes.spec import build_v1

    lora = comfy_standins / "loras" / "ft.safetensors"
    lora.write_bytes(b"first")
    cls = build_v1(COMPARE)
    inputs = {"lora_a": BASE_CHOICE, "lora_b": "ft.safetensors", "lora_c": SKIP_CHOICE, "seed": 0, "prompt": {}, "unique_id": "2"}
    first = cls.IS_CHANGED(**inputs)
    assert cls.IS_CHANGED(**inputs) == first
    lora.write_bytes(b"second, retrained")
    assert cls.IS_CHANGED(**inputs) != first
    disc = build_v1(DISC_SCORE)
    (comfy_standins / "loras" / "ft.adt_disc.safetensors").write_bytes(b"d")
    stamp = disc.IS_CHANGED(discriminator="ft.adt_disc.safetensors", dinov2="dinov2-small")
    os.utime(comfy_standins / "loras" / "ft.adt_disc.safetensors", ns=(1, 1))
    assert disc.IS_CHANGED(discriminator="ft.adt_disc.safetensors", dinov2="dinov2-small") != stamp


def test_metric_nodes_score_and_say_what_is_missing(comfy_standins, tmp_path):
    from tiny_eval import tiny_clip_folder

    from adt_plugin.eval.aesthetic import AestheticHead
    from comfyui_nodes import nodes
    from comfyui_nodes.spec import Hidden

    comparison = _comparison()
    missing = nodes._metric_choices("clip")
    assert missing == ["openai/clip-vit-large-patch14"]  # no folder: the hub id (offline here, not cached)
    out, grid, table = nodes.run_clip_score(Hidden(), comparison, missing[0])
    assert out.scores.metrics() == [] and "CLIP score skipped" in table and "downloads are off" in table
    assert "hf download openai/clip-vit-large-patch14" in table
    assert nodes._metric_choices("aesthetic") == ["(missing: put sac+logos+ava1-l14-linearMSE.pth in models/adt_metrics)"]
    assert grid.shape[0] == 1 and grid.shape[-1] == 3

    metrics = comfy_standins / "adt_metrics"
    tiny_clip_folder(metrics / "clip-vit-large-patch14")
    torch.save(AestheticHead(embed_dim=8).state_dict(), metrics / "sac+logos+ava1-l14-linearMSE.pth")
    assert nodes._metric_choices("clip") == ["clip-vit-large-patch14", "openai/clip-vit-large-patch14"]
    assert nodes._metric_choices("dinov2") == ["facebook/dinov2-small"]  # a CLIP folder is not a DINOv2
    assert nodes._metric_choices("aesthetic") == ["sac+logos+ava1-l14-linearMSE.pth"]
    assert nodes.validate_clip_score(None, "openai/clip-vit-large-patch14") is True  # validation never downloads
    assert nodes.validate_clip_score(None, "../clip-vit-large-patch14").startswith("clip_model: ")
    assert nodes.validate_clip_score(None, "clip-vit-base-patch32") is True  # missing: a note at run time
    _, _, table = nodes.run_clip_score(Hidden(), comparison, "clip-vit-base-patch32")
    assert "'clip-vit-base-patch32' is not in" in table and "Get it with" in table
    scored, grid, table = nodes.run_clip_score(Hidden(), comparison, "clip-vit-large-patch14")
    scored, grid, table = nodes.run_aesthetic(Hidden(), scored, "clip-vit-large-patch14", "sac+logos+ava1-l14-linearMSE.pth")
    assert scored.scores.metrics() == ["clip", "aesthetic"]
    assert len(scored.scores.get("clip", "B")) == 2 and "| A: base |" in table and "Aesthetic" in table
    _, _, table = nodes.run_hps(Hidden(), scored, nodes._metric_choices("hps")[0])
    assert "HPSv2 skipped" in table


def test_discriminator_node_scores_with_the_checkpoint_beside_the_lora(comfy_standins):
    from tiny import DDPM_CONFIG
    from tiny_eval import tiny_dinov2_folder

    from adt_plugin import AdtSettings, build_strategy
    from adt_plugin.backbones import load_dinov2
    from adt_plugin.checkpoint import save_discriminator
    from comfyui_nodes import nodes
    from comfyui_nodes.spec import Hidden

    folder = tiny_dinov2_folder(comfy_standins / "adt_metrics" / "dinov2-small")
    settings = AdtSettings(taps=(0, 1), head_channels=8, backbone_path=str(folder))
    strategy = build_strategy(settings, DDPM_CONFIG, backbone=load_dinov2(str(folder), taps=(0, 1), input_size=28))
    save_discriminator(comfy_standins / "loras" / "adt.adt_disc.safetensors", strategy)
    assert nodes.disc_choices() == ["adt.adt_disc.safetensors"]
    scored, grid, table = nodes.run_disc_score(Hidden(), _comparison(), "adt.adt_disc.safetensors", "dinov2-small")
    assert scored.scores.metrics() == ["disc"] and "self-reference" in table
    values = list(scored.scores.get("disc", "A").values())
    assert len(values) == 2 and all(-1 <= v <= 1 for v in values)
    _, _, table = nodes.run_disc_score(Hidden(), _comparison(), "adt.adt_disc.safetensors", "dinov2-small", reference_images=torch.rand(2, 32, 32, 3))
    assert "against 2 reference images" in table
    assert "is not an ADT discriminator" in nodes.validate_disc(None, "ft.safetensors", "dinov2-small")
    assert nodes.validate_disc(None, "gone.adt_disc.safetensors", "dinov2-small") is True
    _, _, table = nodes.run_disc_score(Hidden(), _comparison(), "gone.adt_disc.safetensors", "dinov2-small")
    assert "ADT discriminator score skipped" in table
    # a missing DINOv2: the note names the one this discriminator was trained with (not dinov2-large)
    _, _, table = nodes.run_disc_score(Hidden(), _comparison(), "adt.adt_disc.safetensors", nodes.DISC_DINOV2_MISSING)
    assert f"adt.adt_disc.safetensors was trained with DINOv2 '{folder}' (width 32): put it in models/adt_metrics as dinov2-small/" in table
    assert "dinov2-large" not in table
    assert "dinov2-small" in nodes.DISC_DINOV2_MISSING and "large" not in nodes.DISC_DINOV2_MISSING
    (comfy_standins / "loras" / "cut.adt_disc.safetensors").write_bytes(b"\x00" * 10)
    _, _, table = nodes.run_disc_score(Hidden(), _comparison(), "cut.adt_disc.safetensors", "dinov2-small")
    assert "discriminator 'cut.adt_disc.safetensors' (" in table and "save or download it again" in table


def test_the_dinov2_hint_names_what_the_discriminator_was_trained_with(tmp_path):
    from safetensors.torch import save_file

    from comfyui_nodes.nodes import trained_backbone

    def disc_file(backbone_path, width):
        path = tmp_path / f"{width}.adt_disc.safetensors"
        meta = {"discriminator_config": json.dumps({"backbone_path": backbone_path}), "fingerprint": json.dumps({"feature_channels": [width] * 4})}
        save_file({"disc.x": torch.zeros(1)}, str(path), meta)
        return str(path)

    hint = trained_backbone(disc_file("facebook/dinov2-small", 384))
    assert "trained with DINOv2 'facebook/dinov2-small' (width 384): put it in models/adt_metrics as dinov2-small/" in hint
    assert hint.endswith("hf download facebook/dinov2-small --local-dir dinov2-small")
    hint = trained_backbone(disc_file("/home/me/models/my-dinov2", 768))  # a local folder: the Hub id from the width
    assert "as dinov2-base/; get it with: hf download facebook/dinov2-base" in hint


def test_discriminator_node_takes_the_backbone_by_hub_id_from_the_cache(comfy_standins, tmp_path, monkeypatch):
    """A hub id offered in the node's list is read from the Hugging Face cache (offline
    here: a missing one is a note naming the command that fetches it)."""
    import huggingface_hub.constants
    from tiny import DDPM_CONFIG
    from tiny_eval import tiny_dinov2_folder

    from adt_plugin import AdtSettings, build_strategy
    from adt_plugin.backbones import load_dinov2
    from adt_plugin.checkpoint import save_discriminator
    from comfyui_nodes import nodes
    from comfyui_nodes.spec import Hidden

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    folder = tiny_dinov2_folder(tmp_path / "trained-with")
    settings = AdtSettings(taps=(0, 1), head_channels=8)
    strategy = build_strategy(settings, DDPM_CONFIG, backbone=load_dinov2(str(folder), taps=(0, 1), input_size=28))
    save_discriminator(comfy_standins / "loras" / "adt.adt_disc.safetensors", strategy)
    _, _, table = nodes.run_disc_score(Hidden(), _comparison(), "adt.adt_disc.safetensors", "facebook/dinov2-small")
    assert "ADT discriminator score skipped" in table and "hf download facebook/dinov2-small" in table
    snapshot = cache / "models--facebook--dinov2-small" / "snapshots" / ("0" * 40)
    snapshot.parent.parent.joinpath("refs").mkdir(parents=True)
    snapshot.parent.parent.joinpath("refs", "main").write_text("0" * 40)
    tiny_dinov2_folder(snapshot)
    assert nodes.validate_disc(None, "adt.adt_disc.safetensors", "facebook/dinov2-small") is True
    assert "facebook/dinov2-small" in nodes._metric_choices("dinov2")
    scored, _, table = nodes.run_disc_score(Hidden(), _comparison(), "adt.adt_disc.safetensors", "facebook/dinov2-small")
    assert scored.scores.metrics() == ["disc"] and "self-reference" in table
