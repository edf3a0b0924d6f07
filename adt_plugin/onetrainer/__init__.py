"""ADT for OneTrainer (SD1.x/2.x, SDXL, SD3; LoRA and fine-tune).

install.py places `shim.py` in OneTrainer's modules/modelSetup/ (auto-imported at
start); it calls `plugin.install()`: an `adt` config section (`config.py`), ADT
model setups and savers (`setup.py`); `families.py` holds what differs per model.
"""
