"""Training curves of one run, from its per-epoch metrics rows.

The trainer calls ``plot_curves(history, path, method, epsilon_255, pgd_iters)`` at
the end of training; the rows may also come from a run's metrics.csv, where every
number is a string.

It builds a matplotlib Figure without pyplot (it renders with Agg and needs no
display) and imports matplotlib only when called, so that starting a training run
does not pay for it.
"""
import io
import math

from utils import atomic_write_bytes

# ---------------------------------------------------------------------------
# Settings

# The methods with a teacher, hence a temperature and a KL weight worth plotting;
# the baselines (fgsm_rs, n_fgsm, pgd_at) train the student alone.
TEACHER_METHODS = ('mixkl',)
# Inches per panel of curves.png (2x2 panels: 1000x700 pixels at DPI).
CURVE_PANEL_SIZE = (5.0, 3.5)
DPI = 100


def epsilon_text(epsilon_255):
    """An L-inf radius in /255 as the papers write it: 8 -> '8/255', 4.5 -> '4.5/255'."""
    return f'{float(epsilon_255):g}/255'


# ---------------------------------------------------------------------------
# curves.png: one run

def plot_curves(rows, path, method, epsilon_255, pgd_iters):
    """Write the run's curves to ``path`` (PNG, atomically); returns the panel titles.

    ``method`` decides the panels (a baseline has no temperature or KL weight);
    ``epsilon_255`` and ``pgd_iters`` name the attacks in the legends. A collapse
    of the alarm's PGD curve while its FGSM curve stays up is catastrophic
    overfitting.
    """
    fig = curves_figure(rows, method, epsilon_255, pgd_iters)
    save_png(fig, path)
    return [ax.get_title() for ax in fig.axes]


def curve_panels(method, epsilon_255, pgd_iters, validation):
    """The panels of a run: (title, y-axis label, [(metrics column, legend label), ...]) each.

    With --val-examples (``validation``) the per-epoch accuracies are the val_* columns.
    """
    eps = epsilon_text(epsilon_255)
    pgd = f'PGD-{pgd_iters}, {eps}'
    split, prefix = ('Validation', 'val') if validation else ('Test', 'test')
    panels = [
        (f'{split} accuracy', 'accuracy',
         [(f'{prefix}_clean_acc', 'clean'), (f'{prefix}_pgd_acc', pgd)]),
        ('Training loss', 'loss', [('train_loss', 'train loss')]),
        ('Temperature and KL weight', 'value', [('tau', 'tau'), ('kl_weight', 'KL weight')]),
        ('Overfitting alarm: student on training images', 'accuracy',
         [('alarm_fgsm_acc', f'FGSM, {eps}'), ('alarm_pgd_acc', pgd)]),
    ]
    if method not in TEACHER_METHODS:
        panels = [p for p in panels if p[0] != 'Temperature and KL weight']
    return panels


def curves_figure(rows, method, epsilon_255, pgd_iters):
    """The matplotlib Figure of ``plot_curves``, not yet drawn: 2x2 panels for MIX-KL,
    a row of three for a baseline."""
    from matplotlib.figure import Figure

    epochs = [int(row['epoch']) for row in rows]
    validation = 'val_pgd_acc' in rows[0]  # --val-examples: evaluated on held-out images
    panels = curve_panels(method, epsilon_255, pgd_iters, validation)
    columns = 2 if len(panels) == 4 else len(panels)
    fig, axes = panel_grid(Figure, len(panels), columns, CURVE_PANEL_SIZE)
    for ax, (title, ylabel, curves) in zip(axes, panels):
        for column, label in curves:
            ax.plot(epochs, [float(row[column]) for row in rows], marker='.', label=label)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        epoch_axis(ax)
        ax.legend()
    return fig


# ---------------------------------------------------------------------------
# Shared

def panel_grid(Figure, n, columns, panel_size):
    """A Figure sized for ``n`` panels in rows of ``columns``; returns (fig, the n axes)."""
    rows = math.ceil(n / columns)
    fig = Figure(figsize=(panel_size[0] * columns, panel_size[1] * rows), dpi=DPI,
                 layout='constrained')
    axes = fig.subplots(rows, columns, squeeze=False).flatten()
    for ax in axes[n:]:
        fig.delaxes(ax)  # the last row's empty places
    return fig, list(axes[:n])


def epoch_axis(ax):
    """An x axis of epochs with ticks at whole epochs only, and a light grid."""
    ax.set_xlabel('epoch')
    whole_epoch_ticks(ax)
    ax.grid(alpha=0.3)


def whole_epoch_ticks(ax):
    """Ticks on the x axis only at whole epochs, even for a run of one epoch.

    (MaxNLocator's default min_n_ticks=2 would fall back to ticks such as
    0.99 and 1.005 when only one integer is in view.)
    """
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def save_png(fig, path):
    """Render ``fig`` as PNG and write it atomically: a reader never sees half an image."""
    image = io.BytesIO()
    fig.savefig(image, format='png')
    atomic_write_bytes(path, image.getvalue())
