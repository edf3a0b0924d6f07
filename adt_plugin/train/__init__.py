"""`adt train`: the embedded trainer (SD1.x/2.x, SDXL, SD3; LoRA and full fine-tune).

Modules, one concept each:
  config      the run's TOML: sections as dataclasses, presets, `key=value` overrides
  presets     `adt presets`: the paper's settings as TOML files in `adt_plugin/presets/`
  data        kohya-layout image folders, aspect-ratio buckets, batches, caches
  loading     diffusers folders and single-file checkpoints, offline
  models      per-family model adapters (the core's `ModelAdapter`)
  keymap      diffusers <-> original (LDM / MMDiT) parameter names
  lora        peft LoRA, saved with kohya keys (ComfyUI, A1111, sd-scripts)
  setup       checks before loading; the model, data and optimisation bundles
  saving      a save: checked finite, model and discriminator as a pair, the state
  state       resumable training state (checks, restore), output names, keep-last-N
  sampling    fixed-seed sample grids with the rollout's sampler
  monitor     progress bar, TensorBoard, scalars.jsonl
  loop        the training loop, one function
  command     the `adt train` command line
  bench       `adt bench`: FT vs ADT cost on random weights
"""
