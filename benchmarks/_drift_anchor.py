"""Run alibi-detect's MMDDrift (the usual anchor) on arrays that benchmarks/drift.py left in a folder.

Runs in its own virtualenv (alibi-detect pins numpy<2): ``python _drift_anchor.py FOLDER``. FOLDER holds
``x_ref.npy``, ``windows.npz`` (one array per window, keys w0000, w0001, ...) and ``config.json``
({"p_val": ..., "n_permutations": ...}); the answer goes to ``FOLDER/anchor.json``: the version, the
construction time, and per window the p-value, the verdict and the predict time.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


def main(folder: Path) -> None:
    import alibi_detect
    import torch
    from alibi_detect.cd import MMDDrift

    torch.set_num_threads(max(1, torch.get_num_threads()))
    config = json.loads((folder / "config.json").read_text())
    x_ref = np.load(folder / "x_ref.npy").astype(np.float32)
    windows = np.load(folder / "windows.npz")
    start = time.perf_counter()
    detector = MMDDrift(
        x_ref, backend="pytorch", p_val=config["p_val"], n_permutations=config["n_permutations"], device="cpu"
    )
    built = time.perf_counter() - start
    results = []
    for key in sorted(windows.files):
        window = windows[key].astype(np.float32)
        start = time.perf_counter()
        answer = detector.predict(window)["data"]
        results.append(
            {
                "key": key,
                "seconds": time.perf_counter() - start,
                "p_value": float(answer["p_val"]),
                "drifted": bool(answer["is_drift"]),
                "mmd2": float(answer["distance"]),
            }
        )
    out = {"version": alibi_detect.__version__, "build_seconds": built, "windows": results}
    (folder / "anchor.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
