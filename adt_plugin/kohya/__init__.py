"""ADT for kohya-ss sd-scripts' LoRA trainers (SD1.x/2.x, SDXL, SD3, FLUX.1 dev / schnell).

    accelerate launch -m adt_plugin.kohya.launch /path/to/sd-scripts/train_network.py --config_file my.toml [--adt_* ...]

`launch` runs sd-scripts' own parser, config file and trainer; `trainer.AdtTrainerMixin`
replaces the per-batch loss; `args` generates the `--adt_*` options from `AdtSettings`;
`families` maps sd-scripts' trainer classes onto the model families (`adt_plugin.families`).
"""
