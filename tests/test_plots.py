"""PNG charts: valid images, written atomically, nothing left behind."""

from __future__ import annotations

import matplotlib.image as mpimg
import pytest

from llmos_cli.core.eval.plots import save_confusion_matrix_png, save_histogram_png, save_loss_curves_png

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_confusion_matrix_png(tmp_path):
    path = save_confusion_matrix_png(
        [[5, 1, 0], [2, 3, 1], [0, 0, 4]], ["pos", "neg", "neu"], tmp_path / "a" / "cm.png"
    )
    assert path == tmp_path / "a" / "cm.png"
    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width, _ = mpimg.imread(path).shape
    assert height > 100 and width > 100
    assert [p.name for p in path.parent.iterdir()] == ["cm.png"]


def test_histogram_png_replaces_an_existing_file(tmp_path):
    path = tmp_path / "lengths.png"
    path.write_bytes(b"old")
    save_histogram_png([1, 2, 2, 3, 3, 3, 10], path, title="lengths", xlabel="tokens")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in tmp_path.iterdir()] == ["lengths.png"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def half_write(self, f, **kwargs):
        f.write(PNG_MAGIC)
        raise OSError("disk full")

    path = tmp_path / "cm.png"
    path.write_bytes(b"old")
    monkeypatch.setattr(Figure, "savefig", half_write)
    with pytest.raises(OSError, match="disk full"):
        save_confusion_matrix_png([[1, 2], [3, 4]], ["a", "b"], path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["cm.png"]


def test_loss_curves_plot_train_and_validation(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    plotted = []
    real = Axes.plot
    monkeypatch.setattr(
        Axes,
        "plot",
        lambda self, x, y, *a, **k: (
            plotted.append((k["label"], list(x), list(y))) or real(self, x, y, *a, **k)
        ),
    )
    rows = [
        {"step": 5, "loss": 3.0, "lr": 0.1},
        {"step": 10, "loss": 2.5, "lr": 0.1},
        {"step": 10, "split": "validation", "loss": 2.7, "perplexity": 14.9},
    ]
    path = save_loss_curves_png(rows, tmp_path / "loss.png", title="run: loss")
    assert plotted == [("train", [5, 10], [3.0, 2.5]), ("validation", [10], [2.7])]
    assert path.read_bytes()[:8] == PNG_MAGIC and [p.name for p in tmp_path.iterdir()] == ["loss.png"]
