import pytest

from moekit.viz import read_panels, save_figure
from moekit.viz.style import colorbar, new_figure, panel_titles, styled, text_overlaps


def test_colour_bars_must_say_what_the_colour_means():
    fig, axes = new_figure(1, 1)
    im = axes[0, 0].imshow([[0.0, 1.0]])
    with pytest.raises(ValueError, match="label"):
        colorbar(fig, im, axes[0, 0], "")
    assert colorbar(fig, im, axes[0, 0], "share").ax.get_ylabel() == "share"


def test_overlapping_texts_are_found():
    fig, axes = new_figure(1, 2)
    axes[0, 0].set_title("left")
    axes[0, 1].set_title("right")
    assert text_overlaps(fig) == []
    axes[0, 0].text(0.5, 0.5, "one note", transform=axes[0, 0].transAxes)
    axes[0, 0].text(0.5, 0.5, "another note", transform=axes[0, 0].transAxes)
    assert ("one note", "another note") in text_overlaps(fig)


def test_saved_png_carries_the_panel_titles(tmp_path):
    @styled
    def draw():
        fig, axes = new_figure(1, 2, title="whole figure")
        axes[0, 0].set_title("first")
        axes[0, 1].set_title("second")
        return fig

    fig = draw()
    assert panel_titles(fig) == ["first", "second"]
    assert read_panels(save_figure(fig, tmp_path / "x.png")) == ["first", "second"]
