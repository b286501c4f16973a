"""loss_curve.py: the axes a reader sees and a legend that no line runs through."""
import xml.etree.ElementTree as ET

import pytest

from loss_curve import LEFT, RIGHT, TOP, WIDTH, nice_ticks, write_loss_svg

NS = "{http://www.w3.org/2000/svg}"


@pytest.mark.parametrize("low, high, whole, ticks", [
    (1, 3, True, [1, 2, 3]),  # epochs: whole numbers, ending at the last one
    (0, 80, True, [0, 20, 40, 60, 80]),  # a run that ends on a round step ends its axis there
    (0, 81, True, [0, 20, 40, 60, 80, 100]),
    (7.4, 10.8, False, [7, 8, 9, 10, 11]),
    (0.31, 0.44, False, [0.30, 0.35, 0.40, 0.45]),
])
def test_ticks_are_round_and_cover_the_values(low, high, whole, ticks):
    assert nice_ticks(low, high, whole=whole) == pytest.approx(ticks)


def test_epochs_get_whole_ticks_and_the_legend_sits_beside_the_plot(tmp_path):
    records = [{"epoch": e, "train_loss": 0.5 / e, "val_accuracy": 0.8 + 0.05 * e} for e in (1, 2, 3)]
    root = ET.parse(write_loss_svg(tmp_path / "loss.svg", records, x="epoch", top_x=None,
                                   series=(("train_loss", "training loss"), ("val_accuracy", "validation accuracy"))))
    texts = {t.text: t for t in root.iter(f"{NS}text")}
    assert {"1", "2", "3"} <= set(texts) and "1.5" not in texts and "4" not in texts
    plot_right = WIDTH - RIGHT
    for legend in ("training loss", "validation accuracy"):
        assert float(texts[legend].get("x")) > plot_right  # outside the plot area: no data point can hide it
    plot = next(r for r in root.iter(f"{NS}rect") if r.get("x") == str(LEFT) and r.get("y") == str(TOP))
    assert float(plot.get("x")) + float(plot.get("width")) == plot_right
