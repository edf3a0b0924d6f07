"""Judging generated images: the metrics `adt eval` and the ComfyUI nodes share.

Set distances against real images (`frechet`: FD and KID on any features;
`inception`: the FID network; `features`: Inception and DINOv2 extractors),
per-image scores (`clip`: CLIP score; `aesthetic`: LAION aesthetic v2; `hps`:
HPSv2 via the optional open_clip; `disc_score`: the ADT discriminator), their
aggregation and win rates (`scores`), grids, charts and reports. Every network
loads from a local path (`weights` names the files and where to get them).
Heavy imports happen inside the functions that need them.
"""
