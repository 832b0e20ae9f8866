"""Figures the notebooks show; each returns a matplotlib Figure so tests can build them headless."""
from __future__ import annotations

import textwrap

import numpy as np


def image_grid(images: list[np.ndarray], titles: list[str], columns: int = 3, title_width: int = 32):
    """Images in a grid with wrapped captions underneath."""
    import matplotlib.pyplot as plt

    count = max(len(images), 1)
    columns = max(1, min(columns, count))
    rows = (count + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(image)
        ax.set_title("\n".join(textwrap.wrap(title, title_width)[:3]), fontsize=8)
    fig.tight_layout()
    return fig
