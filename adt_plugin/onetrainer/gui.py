"""An "ADT" tab in OneTrainer's Qt GUI (scripts/train_ui_qt.py, start-ui.sh).

The tab shows whether ADT is on (in its title, "ADT: on" / "ADT: off", and in a line
at its top), and edits the main settings of the config's `adt` section with
OneTrainer's own widgets, bound to its own UI state: what is typed there is what the
config holds, what a saved preset or config keeps, and what a loaded preset shows
(an ADT preset turns the tab to "on", a stock preset to "off", and the console
says so). Settings the tab does not show (taps, head size, augmentation, ...) are
kept as the preset or config has them; edit them in its `adt` section.

Built against OneTrainer master @ 23df3832 (modules/ui/PySide6TrainUIView.py: the
window's `tabview`, `_tab_widgets`, `_create_scrollable_tab`, `load_preset`;
modules/util/ui/pyside6_components.py; modules/util/ui/UIState.py: a nested config
is a nested state, traced per key). `internals.extend_train_window` calls
`extend_train_window` on each window; the legacy customtkinter window
(scripts/train_ui_ctk.py) gets no tab.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, Optional

from ..samplers import SAMPLERS
from ..settings import AdtSettings, SettingsError
from ..strategies import STRATEGIES
from .config import ENABLED, SECTION, value_from_text
from .families import FAMILIES, TRAINING_METHODS, family_of

TITLE = "ADT"

# (field, label, tooltip, choices): the settings the tab edits, in this order
FIELDS: tuple[tuple[str, str, str, Optional[tuple[str, ...]]], ...] = (
    ("strategy", "Strategy", "adt: Adversarial Diffusion Tuning; ft: plain diffusion loss through the same path "
     "(the baseline); ip / at: input-perturbation baselines", tuple(STRATEGIES)),
    ("backbone_path", "DINOv2 backbone", "Folder of a downloaded DINOv2 (e.g. dinov2-small) or its Hugging Face id; "
     "the discriminator's frozen feature network", None),
    ("sampler", "Rollout sampler", "The sampler you will generate with; ADT trains through its steps", tuple(sorted(SAMPLERS))),
    ("num_inference_steps", "Rollout steps", "Steps of that sampler (as at inference)", None),
    ("guidance_scale", "CFG scale", "Classifier-free guidance during the rollout (1 = off)", None),
    ("g_every", "Generator update every", "H: the LoRA / model gets an optimizer step every H-th iteration; the "
     "discriminator trains every iteration", None),
    ("adt_every", "ADT step every", "Every n-th generator update has the adversarial term (rollout + discriminator); "
     "the ones between are plain fine-tuning steps (1: every update, the paper)", None),
    ("rollout_share", "Rollout share", "Share of the batch that rolls out on an ADT step (at least one image); the "
     "diffusion term keeps the whole batch (1: the paper)", None),
    ("lambda_diff", "Diffusion loss weight", "lambda: weight of the plain diffusion term in the generator loss", None),
    ("k_graph_steps", "Graph steps", "Rollout steps the gradient flows through (the rest run without a graph)", None),
    ("gradient_checkpointing", "Rollout checkpointing", "Recompute the rollout's graph steps in backward (less memory)", None),
    ("decoder_path", "Tiny decoder", "Optional: a local TAESD / TAESDXL / TAESD3 folder to decode rollouts for the "
     "discriminator instead of the model's VAE (less memory); empty: the VAE", None),
    ("d_lr", "Discriminator LR", "Learning rate of the discriminator's AdamW", None),
    ("g_warmup_steps", "Generator warm-up", "Optimizer steps over which ADT ramps the generator's learning rate up", None),
    ("d_warmup_steps", "Discriminator warm-up", "Steps over which the discriminator's learning rate ramps up", None),
    ("adv_ratio", "Adversarial ratio", "Adversarial gradient as a fraction of the diffusion gradient", None),
    ("seed", "ADT seed", "Seed of ADT's own draws (rollout start steps, noise, augmentation)", None),
)


def extend_train_window(view: Any) -> None:
    """Give a train window an ADT tab after its own tabs (the Qt window only)."""
    if not all(hasattr(view, name) for name in ("_create_tabs", "_create_scrollable_tab", "load_preset")):
        return
    create_tabs, load_preset = view._create_tabs, view.load_preset

    def _create_tabs():
        create_tabs()
        view.adt_tab = AdtTab(view)

    def _load_preset():
        load_preset()
        if getattr(view, "adt_tab", None) is not None:
            view.adt_tab.refresh()

    view._create_tabs = _create_tabs
    view.load_preset = _load_preset


class AdtTab:
    def __init__(self, view: Any):
        self.view = view
        self.components = view.components
        self.ui_state = view.ui_state
        self.status = None
        self.widgets: dict[str, Any] = {}  # setting -> its widget
        self.page = view._create_scrollable_tab(self._build)
        view.tabview.addTab(self.page, TITLE)
        view._tab_widgets[TITLE] = self.page
        section_state = self.ui_state.get_var(SECTION)
        section_state.add_var_trace(ENABLED, self._enabled_changed)
        for name, *_ in FIELDS:
            section_state.add_var_trace(name, self.refresh)
        for name in ("model_type", "training_method"):
            self.ui_state.add_var_trace(name, self.refresh)
        self._shown_enabled = self.section.enabled
        self.refresh()

    @property
    def section(self) -> Any:
        return self.view.controller.train_config.adt

    # -- building -------------------------------------------------------------------------
    def _build(self, frame: Any) -> None:
        c = self.components
        layout = c._layout(frame)
        layout.setColumnStretch(1, 1)
        c.label(frame, 0, 0, "ADT", tooltip="Train with Adversarial Diffusion Tuning (adt-plugin) instead of "
                "OneTrainer's own loss; off: OneTrainer trains as usual")
        self.widgets[ENABLED] = c.switch(frame, 0, 1, self.ui_state, f"{SECTION}.{ENABLED}")
        self.status = c.label(frame, 1, 1, "")
        for row, (name, label, tooltip, choices) in enumerate(FIELDS, start=2):
            c.label(frame, row, 0, label, tooltip=tooltip)
            var = f"{SECTION}.{name}"
            if choices is not None:
                widget = c.options(frame, row, 1, list(choices), self.ui_state, var)
            elif isinstance(getattr(self.section, name), bool):
                widget = c.switch(frame, row, 1, self.ui_state, var)
            else:
                widget = c.entry(frame, row, 1, self.ui_state, var, tooltip=tooltip, extra_validate=self._validator(name))
            self.widgets[name] = widget
        c.label(frame, len(FIELDS) + 2, 1, "Everything else (taps, head channels, augmentation, ...): the adt "
                "section of the saved config or preset.")
        c._pack_form(frame)

    def _validator(self, name: str) -> Callable[[str], Optional[str]]:
        """The text typed for `name`, checked with the other settings as they are now (only
        while ADT is on: a setting of a switched-off ADT must not stop a plain run)."""

        def validate(text: str) -> Optional[str]:
            if not self.section.enabled:
                return None
            values = {f.name: getattr(self.section, f.name) for f in dataclasses.fields(AdtSettings)}
            values[name] = value_from_text(text, typing.get_type_hints(AdtSettings)[name])
            try:
                AdtSettings.from_mapping(values, source="ADT tab")
            except SettingsError as err:
                return str(err).replace("ADT tab: ", "")
            return None

        return validate

    # -- showing the state ------------------------------------------------------------------
    def _enabled_changed(self) -> None:
        enabled = bool(self.section.enabled)
        if enabled != self._shown_enabled:
            print(f"ADT: {'on' if enabled else 'off'} ({self.summary()})")
            self._shown_enabled = enabled
        self.refresh()

    def summary(self) -> str:
        config = self.view.controller.train_config
        section = self.section
        if not section.enabled:
            return "OneTrainer trains with its own loss"
        model_type, method = config.model_type, config.training_method
        if family_of(model_type) is None or getattr(method, "name", None) not in TRAINING_METHODS:
            supported = ", ".join(f.label for f in FAMILIES.values())
            return (f"but not for {getattr(model_type, 'name', model_type)} {getattr(method, 'name', method)}: "
                    f"training stops with an error (ADT trains {supported}, LoRA or fine-tune)")
        if section.strategy == "adt":
            return (f"strategy adt, rollout {section.sampler} x {section.num_inference_steps}, CFG {section.guidance_scale}, "
                    f"generator update every {section.g_every}, an ADT step every {section.adt_every}")
        return f"strategy {section.strategy}: {getattr(STRATEGIES.get(section.strategy), 'description', '')}"

    def refresh(self) -> None:
        on = bool(self.section.enabled)
        tabview = self.view.tabview
        tabview.setTabText(tabview.indexOf(self.page), f"{TITLE}: {'on' if on else 'off'}")
        if self.status is not None:
            self.components.set_label_text(self.status, f"ADT is {'on' if on else 'off'}: {self.summary()}")


__all__ = ["AdtTab", "FIELDS", "TITLE", "extend_train_window"]
