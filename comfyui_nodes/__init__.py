"""ADT comparison nodes for ComfyUI: A/B/C sampling with identical noise per seed,
and CLIP / aesthetic / HPSv2 / ADT-discriminator scores drawn on the grid.

Put this folder (or a link to it) in ComfyUI/custom_nodes/. It uses ComfyUI's V3
node API (`comfy_entrypoint`) and falls back to V1 `NODE_CLASS_MAPPINGS` on
ComfyUI versions without it. Metric weights go in ComfyUI/models/adt_metrics.
"""

from __future__ import annotations

import logging
import os
import sys


def _import_adt_plugin() -> None:
    """adt_plugin installed in ComfyUI's Python, or (a link to) this folder inside the repo."""
    try:
        import adt_plugin  # noqa: F401
    except ImportError:
        repo = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
        if not os.path.isdir(os.path.join(repo, "adt_plugin")):
            raise ImportError(
                "the ADT nodes need the adt_plugin package: run `python -m pip install -e <adt-plugin repo>` with "
                "ComfyUI's Python (or link this folder from the repo instead of copying it)"
            ) from None
        sys.path.insert(0, repo)


_import_adt_plugin()

from .nodes import NODE_SPECS, register_metrics_folder  # noqa: E402
from .spec import build_v1, build_v3  # noqa: E402

try:
    from comfy_api.latest import ComfyExtension, io
except Exception:  # noqa: BLE001 - no ComfyUI, or one from before the V3 API
    ComfyExtension = io = None
if os.environ.get("ADT_COMFYUI_NODE_API", "").lower() == "v1":  # to test the fallback in a current ComfyUI
    ComfyExtension = io = None

try:
    import folder_paths  # noqa: F401 - present whenever ComfyUI loads us

    register_metrics_folder()
except ImportError:
    pass
except Exception as err:  # noqa: BLE001 - a read-only models folder must not stop the nodes loading
    logging.getLogger("adt_comfyui").warning("ADT: could not create models/adt_metrics: %s", err)

if io is not None:
    NODES = [build_v3(spec, io) for spec in NODE_SPECS]

    class AdtExtension(ComfyExtension):
        async def get_node_list(self):
            return NODES

    async def comfy_entrypoint() -> AdtExtension:
        return AdtExtension()

    # ComfyUI loads V1 mappings in preference to the entrypoint: publish only one of the two.
    NODE_CLASS_MAPPINGS = None
else:
    NODE_CLASS_MAPPINGS = {spec.node_id: build_v1(spec) for spec in NODE_SPECS}
    NODE_DISPLAY_NAME_MAPPINGS = {spec.node_id: spec.display_name for spec in NODE_SPECS}
