"""Training curves of one run, from its per-epoch metrics rows.

The trainer calls ``plot_curves(history, path)`` at the end of training; the
rows may also come from a run's metrics.csv, where every number is a string.
"""
import io

from utils import atomic_write_bytes

# Each panel: (title, y-axis label, [(metrics column, legend label), ...]).
PANELS = [
    ('Test accuracy', 'accuracy',
     [('test_clean_acc', 'clean'), ('test_pgd_acc', 'PGD')]),
    ('Training loss', 'loss', [('train_loss', 'train loss')]),
    ('Temperature and KL weight', 'value', [('tau', 'tau'), ('kl_weight', 'KL weight')]),
    ('Overfitting alarm: student on training images', 'accuracy',
     [('alarm_fgsm_acc', 'FGSM'), ('alarm_pgd_acc', 'PGD')]),
]


def plot_curves(rows, path):
    """Write a 2x2 figure of the run's curves to ``path`` (PNG); returns the panel titles.

    A collapse of the alarm's PGD curve while its FGSM curve stays up is
    catastrophic overfitting.
    """
    # Imported here so that starting a training run does not pay for matplotlib.
    # Figure without pyplot renders with Agg and needs no display.
    from matplotlib.figure import Figure

    epochs = [int(row['epoch']) for row in rows]
    fig = Figure(figsize=(10, 7), dpi=100, layout='constrained')
    axes = fig.subplots(2, 2).flatten()
    for ax, (title, ylabel, curves) in zip(axes, PANELS):
        for column, label in curves:
            ax.plot(epochs, [float(row[column]) for row in rows], marker='.', label=label)
        ax.set_title(title)
        ax.set_xlabel('epoch')
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    image = io.BytesIO()
    fig.savefig(image, format='png')
    atomic_write_bytes(path, image.getvalue())
    return [ax.get_title() for ax in axes]
