"""Write trainer/scoring/meanface68.npy from insightface's ``data/objects/meanshape_68.pkl``.

The file ships inside the insightface wheel (MIT licence) as a pickled float32 (68, 3) array:
the mean 3D face of its 68-point landmark model (x right, y down, z towards the viewer; about
unit half-width). The project keeps no pickle: this script reads it once with an unpickler that
admits numpy's array reconstruction and nothing else, and saves a plain .npy
(``allow_pickle=False``). Usage: ``python scripts/extract_meanface.py``.
"""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import numpy as np

ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class ArrayOnly(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"refused {module}.{name}: only a numpy array is expected")
        return super().find_class(module, name)


def main() -> Path:
    spec = importlib.util.find_spec("insightface")
    source = Path(spec.submodule_search_locations[0]) / "data" / "objects" / "meanshape_68.pkl"
    with open(source, "rb") as f:
        shape = np.asarray(ArrayOnly(f).load(), dtype=np.float32)
    assert shape.shape == (68, 3), shape.shape
    out = Path(__file__).resolve().parent.parent / "trainer" / "scoring" / "meanface68.npy"
    np.save(out, shape, allow_pickle=False)
    print(f"wrote {out} from {source}")
    return out


if __name__ == "__main__":
    main()
