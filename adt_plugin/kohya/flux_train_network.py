"""`accelerate launch -m adt_plugin.kohya.flux_train_network --sd_scripts PATH [flux_train_network.py options] [--adt_* options]`

sd-scripts' flux_train_network.py (FLUX.1 dev and schnell) with ADT's loss (see adt_plugin.kohya.launch)."""

import sys

from .launch import main

if __name__ == "__main__":
    sys.exit(main(script="flux_train_network.py"))
