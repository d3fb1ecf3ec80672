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
    fig = curves_figure(rows)
    image = io.BytesIO()
    fig.savefig(image, format='png')
    atomic_write_bytes(path, image.getvalue())
    return [ax.get_title() for ax in fig.axes]


def curves_figure(rows):
    """The 2x2 matplotlib Figure of ``plot_curves``, not yet drawn."""
    # Imported here so that starting a training run does not pay for matplotlib.
    # Figure without pyplot renders with Agg and needs no display.
    from matplotlib.figure import Figure

    epochs = [int(row['epoch']) for row in rows]
    validation = 'val_pgd_acc' in rows[0]  # --val-examples: evaluated on held-out images
    fig = Figure(figsize=(10, 7), dpi=100, layout='constrained')
    axes = fig.subplots(2, 2).flatten()
    for ax, (title, ylabel, curves) in zip(axes, PANELS):
        for column, label in curves:
            if validation:
                column = column.replace('test_', 'val_')
            ax.plot(epochs, [float(row[column]) for row in rows], marker='.', label=label)
        ax.set_title(title.replace('Test', 'Validation') if validation else title)
        ax.set_xlabel('epoch')
        whole_epoch_ticks(ax)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def whole_epoch_ticks(ax):
    """Ticks on the x axis only at whole epochs, even for a run of one epoch.

    (MaxNLocator's default min_n_ticks=2 would fall back to ticks such as
    0.99 and 1.005 when only one integer is in view.)
    """
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
