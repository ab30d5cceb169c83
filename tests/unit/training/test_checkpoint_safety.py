"""Resume checkpoints are read with ``torch.load(weights_only=True)``: a checkpoint round-trips (tensors and plain
values only), and one that holds a pickled object is refused before anything in it runs."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from visionloop.errors import TrainingError
from visionloop.training.train import train


class Hostile:
    """Unpickling this calls ``open(marker, "w")``: with weights_only=False, code from the file runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_round_trips_under_weights_only(tiny_dataset, tiny_settings, tmp_path):
    out_dir = tmp_path / "run"
    train(tiny_dataset, out_dir, tiny_settings(epochs=1), show_progress=False)
    # what the resume reads: only tensors and plain values, so the safe loader takes every part of it
    ckpt = torch.load(out_dir / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and isinstance(ckpt["model"], dict) and isinstance(ckpt["torch_rng"], torch.Tensor)
    again = train(tiny_dataset, out_dir, tiny_settings(epochs=1), resume=True, show_progress=False)
    assert again.resumed_from_epoch == 1 and again.epochs_run == 1


def test_a_resume_from_a_checkpoint_holding_a_pickled_object_is_refused(tiny_dataset, tiny_settings, tmp_path):
    out_dir = tmp_path / "run"
    train(tiny_dataset, out_dir, tiny_settings(epochs=1), show_progress=False)
    ckpt = torch.load(out_dir / "last.pt", map_location="cpu", weights_only=True)
    marker = tmp_path / "executed"
    ckpt["history"] = Hostile(marker)
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    (out_dir / "last.pt").write_bytes(buffer.getvalue())
    with pytest.raises(TrainingError, match="refused") as caught:
        train(tiny_dataset, out_dir, tiny_settings(epochs=1), resume=True, show_progress=False)
    assert "\n" not in str(caught.value)  # one line, not torch's page of advice
    assert not marker.exists()  # nothing in the file ran
