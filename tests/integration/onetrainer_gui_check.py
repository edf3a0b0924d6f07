"""Drive OneTrainer's Qt window with the ADT tab, offscreen, as a user would.

Run by tests/integration/test_real_trainers.py in a OneTrainer checkout (the shim
placed by install.py) with a Python that has OneTrainer's requirements and PySide6:

    QT_QPA_PLATFORM=offscreen python onetrainer_gui_check.py SCREENSHOT.png

Prints one JSON line with what it saw. Presets are loaded through the top bar's own
loader (the code the preset menu runs), entries are typed into and committed like
keystrokes followed by Enter, switches are clicked.
"""

import json
import os
import sys

sys.path.insert(0, "scripts")
sys.path.insert(0, ".")

import matplotlib.pyplot  # noqa: E402,F401  (as scripts/train_ui_qt.py, before PySide6)
import pydantic._internal._validators  # noqa: E402,F401

from modules.ui.PySide6TrainUIView import PySide6TrainView  # noqa: E402
from modules.util.ui.pyside6_util import create_application  # noqa: E402
from modules.util.ui.validation import flush_and_validate_all  # noqa: E402

from PySide6.QtWidgets import QApplication  # noqa: E402

ADT_PRESET = "training_presets/SD1.5/#sd 1.5 LoRA ADT.json"
STOCK_PRESET = "training_presets/SD1.5/#sd 1.5 LoRA.json"


def main(screenshot: str) -> None:
    if os.path.exists("training_presets/#.json"):  # the last session's state: start as a first start does
        os.remove("training_presets/#.json")
    app = create_application()
    window = PySide6TrainView()
    window.resize(1100, 800)
    window.show()
    tabs = window.tabview
    tab = window.adt_tab
    config = window.controller.train_config
    load = window.top_bar_component._BaseTopBarView__load_current_config  # what "Load Preset" runs
    seen: dict = {"tabs": [tabs.tabText(i) for i in range(tabs.count())]}

    def state(label):
        QApplication.processEvents()
        seen[label] = {
            "title": tabs.tabText(tabs.indexOf(tab.page)),
            "status": tab.status.text(),
            "enabled": config.adt.enabled,
            "switch": tab.widgets["enabled"].isChecked(),
            "g_every": config.adt.g_every,
            "g_every_text": tab.widgets["g_every"].text(),
            "sampler": tab.widgets["sampler"].currentText(),
        }

    state("start")
    load(ADT_PRESET)
    state("adt_preset")
    tabs.setCurrentIndex(tabs.indexOf(tab.page))
    QApplication.processEvents()
    window.grab().save(screenshot)

    entry = tab.widgets["g_every"]
    entry.setText("3")
    entry.editingFinished.emit()
    state("typed_3")
    entry.setText("0")
    entry.editingFinished.emit()
    seen["errors_at_0"] = [e for e in flush_and_validate_all() if e.startswith("adt.")]
    entry.setText("4")
    entry.editingFinished.emit()
    seen["errors_at_4"] = [e for e in flush_and_validate_all() if e.startswith("adt.")]
    state("typed_4")
    seen["saved_section"] = config.to_settings_dict(secrets=False)["adt"]

    bad = "training_configs/adt-misspelt.json"  # a config file of the user's, with a misspelt adt key
    os.makedirs("training_configs", exist_ok=True)
    with open(bad, "w") as f:
        json.dump({"learning_rate": 0.5, "adt": {"enabled": True, "g_evry": 2}}, f)
    load(bad)
    state("bad_config")
    seen["bad_config"]["learning_rate"] = config.learning_rate

    load(STOCK_PRESET)
    state("stock_preset")
    tab.widgets["enabled"].click()
    state("switched_on")
    window.close()
    print(json.dumps(seen), flush=True)
    os._exit(0)  # skip Qt's teardown of a window that never ran an event loop


if __name__ == "__main__":
    main(sys.argv[1])
