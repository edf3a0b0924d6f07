"""`accelerate launch -m adt_plugin.kohya.train_network --sd_scripts PATH [train_network.py options] [--adt_* options]`

sd-scripts' train_network.py with ADT's loss (see adt_plugin.kohya.launch)."""

import sys

from .launch import main

if __name__ == "__main__":
    sys.exit(main(script="train_network.py"))
