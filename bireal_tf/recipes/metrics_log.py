"""metrics.csv: one row per epoch of every stage.

Keras' `CSVLogger` appends through an open file, so a resumed run would write the
epochs it repeats twice and a kill could leave half a row. This log rewrites the whole
(small) file atomically after each epoch and replaces the rows of epochs run again.
"""
import csv
import io
import os

from bireal_tf.utils import atomic_write_text

COLUMNS = ("stage", "epoch", "loss", "top1", "top5", "val_loss", "val_top1", "val_top5",
           "lr", "seconds", "images_per_second")  # fmt: skip
LOGGED = ("loss", "top1", "top5", "val_loss", "val_top1", "val_top5")


class MetricsLog:
    """The rows of `path`, read from the file each time (it is the state)."""

    def __init__(self, path):
        self.path = path

    def rows(self) -> list:
        if not os.path.exists(self.path):
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def add(self, stage, epoch, logs, lr, seconds, images_per_second) -> list:
        """Record `stage`'s `epoch` (1-based) from Keras' epoch-end `logs`; rows of this
        stage from this epoch on (a run resumed before them) are replaced."""
        row = {"stage": stage, "epoch": epoch, "lr": f"{lr:.6g}", "seconds": f"{seconds:.2f}",
               "images_per_second": f"{images_per_second:.1f}"}
        for key in LOGGED:
            row[key] = f"{logs[key]:.6f}" if key in logs else ""
        rows = [r for r in self.rows() if not (r["stage"] == stage and int(r["epoch"]) >= epoch)]
        rows.append(row)
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, out.getvalue())
        return rows
