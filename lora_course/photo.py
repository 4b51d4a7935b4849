"""A real photograph to compress, from the sample data that ships with matplotlib (no download).

matplotlib installs `grace_hopper.jpg` (a 600 x 512 portrait of Rear Admiral Grace
Hopper, U.S. Navy photo, public domain) under `mpl-data/sample_data`.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["load_photo"]

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B


def load_photo(name: str = "grace_hopper.jpg", gray: bool = True) -> torch.Tensor:
    """A matplotlib sample image as float64 in [0, 1]: (H, W) if gray else (H, W, 3)."""
    import matplotlib.cbook as cbook
    import matplotlib.pyplot as plt

    try:
        with cbook.get_sample_data(name, asfileobj=True) as f:
            image = plt.imread(f, format=name.rsplit(".", 1)[-1])
    except (FileNotFoundError, OSError, ValueError) as e:
        raise FileNotFoundError(
            f"matplotlib's sample data has no readable image {name!r} ({e}); "
            "use the default 'grace_hopper.jpg', which matplotlib ships"
        ) from e
    image = np.asarray(image, dtype=np.float64)
    if image.max() > 1.0:  # 8-bit JPEG/PNG values
        image = image / 255.0
    if image.ndim == 3:
        image = image[..., :3]
        if gray:
            image = image @ np.array(_LUMA)
    return torch.from_numpy(np.ascontiguousarray(image))
