"""What the hooks learn about one run, in one object: ``RunState``.

``StarftHooks`` owns it and hands it, by construction, to everything that needs it: the train step
(``StarftStep(args, model, state)``), the epoch loop (through the step) and the checkpoint writer.
Nothing of it is put on upstream's ``args`` (which ``params.txt``, the log and wandb's config
print): ``args`` carries flags, ``RunState`` carries what was learned while starting the run.

A later hook (e.g. evaluation during training) adds its fields here.

The settings a checkpoint was trained with are compared with the resumed run's (``changes``):
the ``--starft-*`` values that change the objective, the global batch (on a mid-epoch checkpoint:
another batch size or --accum-freq skips or repeats samples of that epoch) and the epoch count (the λ and learning
rate schedules span it). Each checkpoint keeps the history of these settings (``history``: the
first entry from step 0, one more from each resume that changed them, with the step it changed at).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# --starft-* settings that do not change what is optimised (only memory, speed or data checks)
NOT_OBJECTIVE = ("starft_teacher_text_cache_mb", "starft_max_skipped_fraction", "starft_csv_label_key",
                 # evaluation during training: what is scored and kept, never what is trained
                 "starft_val", "starft_val_frequency", "starft_val_steps", "starft_val_classnames",
                 "starft_val_templates", "starft_select",
                 # the weights' memory layout: the same numbers up to float summation order
                 "starft_channels_last")
# run settings beside the --starft-* ones that a resumed run must keep: (key, flag, mid-epoch only)
RUN_KEYS = (("batch_size", "--batch-size", True), ("world_size", "processes", True),
            ("accum_freq", "--accum-freq", True), ("epochs", "--epochs", False))


@dataclass
class Resumed:
    """What ``--resume`` loaded: a training checkpoint (``epoch`` = epochs completed, ``batches_done``
    of the next epoch for a mid-epoch one) or ``bare`` model-only weights."""
    path: str
    epoch: int | None = None
    batches_done: int = 0
    bare: bool = False


@dataclass
class RunState:
    """One run's state beside upstream's ``args``.

    ``settings``: this run's ``--starft-*`` values (recorded in every checkpoint's ``"starft"``).
    ``num_classes``: the class names' count. ``resumed``: what ``--resume`` loaded (None without).
    ``history``: the settings history the checkpoints carry (list of dicts, see ``history_entry``).
    ``validation``: the run's evaluation during training (``--starft-val``; an object with ``start``,
    ``after_step`` and ``end_epoch``, ``eval.training_validation.TrainingValidation``), built by the hooks
    through the factory ``main`` gives them; None without ``--starft-val``. ``started``: the run reached its
    epoch loop (its loss is built just before it): a failure after that keeps the run folder
    (``preflight.RunFolderGuard``).
    """
    settings: dict
    num_classes: int = 0
    resumed: Resumed | None = None
    history: list[dict] = field(default_factory=list)
    validation: Any = None
    started: bool = False

    def history_entry(self, args, epoch: int = 0, batches_done: int = 0) -> dict:
        """This run's settings as a history entry, from ``epoch``/``batches_done`` on (``step``:
        the global step it starts at, filled when the epoch's batch count is known)."""
        return {"epoch": epoch, "batches_done": batches_done, "step": 0 if epoch == batches_done == 0 else None,
                "settings": objective(self.settings), **{key: getattr(args, key) for key, _, _ in RUN_KEYS}}

    def start(self, args) -> None:
        """A run from step 0: the history is this run's settings."""
        self.history = [self.history_entry(args)]

    def note_step(self, epoch: int, num_batches: int) -> None:
        """Fill the global step of a resume's history entry once the epoch's batch count is known."""
        for entry in self.history:
            if entry.get("step") is None and entry["epoch"] == epoch:
                entry["step"] = epoch * num_batches + entry["batches_done"]

    def checkpoint_entry(self, batches_done: int | None = None) -> dict:
        """The ``"starft"`` entry of a checkpoint: the settings, the history, ``batches_done`` if mid-epoch."""
        entry = {**self.settings, "history": [dict(h) for h in self.history]}
        if batches_done is not None:
            entry["batches_done"] = batches_done
        return entry


def objective(settings: dict) -> dict:
    """The ``--starft-*`` settings that change what is optimised."""
    return {k: v for k, v in settings.items() if k.startswith("starft_") and k not in NOT_OBJECTIVE}


def recorded_history(entry: dict) -> list[dict]:
    """A checkpoint's settings history; a checkpoint from before histories: its settings from step 0."""
    if entry.get("history"):
        return [dict(h) for h in entry["history"]]
    settings = {k: v for k, v in entry.items() if k.startswith("starft_")}
    return [{"epoch": 0, "batches_done": 0, "step": 0, "settings": objective(settings)}] if settings else []


def changes(old: dict, new: dict, mid_epoch: bool) -> list[str]:
    """``"--flag OLD → NEW"`` for each setting of history entry ``new`` that differs from ``old``
    (the batch size and process count only on a ``mid_epoch`` checkpoint; keys ``old`` lacks are
    not compared: older checkpoints did not record them)."""
    found = []
    old_settings, new_settings = old.get("settings", {}), new.get("settings", {})
    for key in sorted(old_settings.keys() & new_settings.keys()):
        if old_settings[key] != new_settings[key]:
            found.append(f"--{key.replace('_', '-')} {old_settings[key]} → {new_settings[key]}")
    for key, flag, mid_epoch_only in RUN_KEYS:
        if key in old and old[key] != new[key] and (mid_epoch or not mid_epoch_only):
            found.append(f"{flag} {old[key]} → {new[key]}")
    return found

