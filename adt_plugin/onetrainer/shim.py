"""adt-plugin for OneTrainer.

install.py copies this file into OneTrainer's modules/modelSetup/ folder, whose
modules OneTrainer imports at start; `python install.py --onetrainer PATH
--uninstall` removes it. It gives OneTrainer's config an `adt` section and ADT
model setups and savers for SD1.x/2.x, SDXL and SD3 (they act only when
adt.enabled is true, as in the "... ADT" presets).
"""

try:
    from adt_plugin.onetrainer.plugin import install
except ImportError as err:  # the shim is here but the package is not in this environment
    raise ImportError(
        "adt-plugin's OneTrainer shim (modules/modelSetup/adt_plugin_shim.py) is installed, but the adt_plugin "
        f"package cannot be imported in this Python environment ({err}). Install it into OneTrainer's venv "
        "(python install.py --onetrainer <OneTrainer folder>) or remove the shim "
        "(python install.py --onetrainer <OneTrainer folder> --uninstall)."
    ) from err

install()
