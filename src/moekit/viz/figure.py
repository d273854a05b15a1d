"""The one way plots are written: laid out, saved as PNG (parent dirs made), closed.

The PNG carries its panel titles as text metadata (key "Panels", a JSON list), which
`read_panels` returns: what a figure shows can be checked from the file alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from moekit.viz.style import panel_titles  # noqa: E402

PANELS_KEY = "Panels"
DPI = 110


def settle(fig: Figure, dpi: int = DPI) -> Figure:
    """Lay the figure out at `dpi` as `save_figure` writes it (what a test measures)."""
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.set_dpi(dpi)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = DPI) -> Path:
    settle(fig, dpi)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {PANELS_KEY: json.dumps(panel_titles(fig)), "Software": "moekit"}
    fig.savefig(path, dpi=dpi, metadata=metadata)
    plt.close(fig)
    return path


def read_panels(path: str | Path) -> list[str]:
    """The panel titles a moekit PNG was saved with ([] for a PNG without them)."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return json.loads(image.info.get(PANELS_KEY, "[]"))
