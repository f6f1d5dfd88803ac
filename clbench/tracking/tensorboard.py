"""TensorBoard tracker: event files under ``<run_dir>/tensorboard/`` (``tensorboard --logdir <output>``).

Resume safety: a writer reopened on a folder that already holds event files starts with
``purge_step = last logged step + 1`` (a SessionLog START event), so readers discard anything a
killed process logged after the last step recorded in trackers.json; that step is then logged
again, once. Every step is flushed before trackers.json records it, so a recorded step is on disk.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from clbench.engine.rundir import TENSORBOARD, RunFolder
from clbench.tracking import Tracker

EVENTS_GLOB = "events.out.tfevents.*"


class TensorBoardTracker(Tracker):
    """One run folder's TensorBoard event files."""

    name = "tensorboard"

    def __init__(self, folder: RunFolder, state: dict[str, Any], *, group: str | None, tracking_uri: str | None) -> None:
        super().__init__(folder, state, group=group, tracking_uri=tracking_uri)
        from torch.utils.tensorboard import SummaryWriter  # lazily: the tensorboard extra

        self.log_dir = folder.path / TENSORBOARD
        earlier = self.log_dir.is_dir() and any(self.log_dir.glob(EVENTS_GLOB))
        if self.last_step >= 0 and not earlier:  # the event files were removed: log every step again
            self.state["last_step"] = -1
        # purge_step also when no step was recorded yet but files exist (killed between log and record)
        purge = self.last_step + 1 if earlier else None
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge)
        self._closed = False

    def log_step(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()  # on disk before trackers.json says the step is logged

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        """config.yaml and summary.json as text (in a code block: TensorBoard renders Markdown), the
        PNG plots as images; all at the last logged step."""
        import numpy as np
        from PIL import Image

        step = max(self.last_step, 0)
        for path in paths:
            if path.suffix.lower() == ".png":
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
                self.writer.add_image(f"plots/{path.stem}", pixels, global_step=step, dataformats="HWC")
            elif path.suffix.lower() in (".yaml", ".yml", ".json"):
                text = path.read_text(encoding="utf-8")
                self.writer.add_text(f"files/{path.name}", "    " + text.replace("\n", "\n    "), global_step=step)
        self.writer.flush()

    def close(self) -> None:
        if not self._closed:
            self.writer.close()
            self._closed = True
