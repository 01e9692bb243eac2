"""The PNG of a run's training curves."""
import matplotlib

matplotlib.use("Agg")  # no display on servers
import matplotlib.pyplot as plt  # noqa: E402

from bireal_tf.utils import save_figure_atomic  # noqa: E402


def _floats(rows, key):
    return [float(r[key]) if r.get(key) not in (None, "") else float("nan") for r in rows]


def plot_curves(rows, path):
    """Loss and top-1 per epoch, stages one after another, written atomically to `path`."""
    x = list(range(1, len(rows) + 1))
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for key, style in (("loss", "-"), ("val_loss", "--")):
        ax_loss.plot(x, _floats(rows, key), style, marker="o", ms=3, label=key)
    for key, style in (("top1", "-"), ("val_top1", "--"), ("val_top5", ":")):
        ax_acc.plot(x, _floats(rows, key), style, marker="o", ms=3, label=key)
    stages = [r["stage"] for r in rows]
    for i in range(1, len(stages)):
        if stages[i] != stages[i - 1]:
            for ax in (ax_loss, ax_acc):
                ax.axvline(i + 0.5, color="grey", lw=0.8)
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch (all stages)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(" -> ".join(dict.fromkeys(stages)))
    fig.tight_layout()
    try:
        save_figure_atomic(fig, path, dpi=100)
    finally:
        plt.close(fig)
