"""Writes the inputs of fan_in.yaml as .npy files into the given directory."""

import sys
from pathlib import Path

import numpy as np

out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
np.save(out / "image.npy", rng.standard_normal((1, 3, 32, 32), dtype=np.float32))
np.save(out / "kernel.npy", rng.standard_normal((8, 3, 3, 3), dtype=np.float32))
np.save(out / "a.npy", rng.standard_normal((64, 64), dtype=np.float32))
np.save(out / "b.npy", rng.standard_normal((64, 64), dtype=np.float32))
print(f"wrote image, kernel, a, b (.npy) to {out}")
