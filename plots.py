"""Figures: the training curves of one run, and a grid's accuracy per epoch across seeds.

The trainer calls ``plot_curves(history, path, method, epsilon_255, pgd_iters)`` at
the end of training; the rows may also come from a run's metrics.csv, where every
number is a string. ``plot_grid(series, path)`` draws several configurations, each
as its seeds' mean and min-max band, one panel per dataset and epsilon.

Both build a matplotlib Figure without pyplot (it renders with Agg and needs no
display) and import matplotlib only when called, so that starting a training run
does not pay for it.
"""
import io
import math

import numpy as np

from utils import atomic_write_bytes

# ---------------------------------------------------------------------------
# Settings

# The methods with a teacher, hence a temperature and a KL weight worth plotting;
# the baselines (fgsm_rs, n_fgsm, pgd_at) train the student alone.
TEACHER_METHODS = ('mixkl',)
# Inches per panel of curves.png (2x2 panels: 1000x700 pixels at DPI).
CURVE_PANEL_SIZE = (5.0, 3.5)
# Inches per panel of the grid's figure, before its legend.
GRID_PANEL_SIZE = (5.5, 3.6)
# Inches of height per legend line (title or entry) under a grid panel.
GRID_LEGEND_ROW = 0.22
# Inches between a grid panel's lower edge and its legend: room for tick labels and x label.
LEGEND_DROP = 0.45
# Most panels in a row of the grid's figure.
GRID_COLUMNS = 3
# Opacity of the band between the seeds' lowest and highest accuracy.
BAND_ALPHA = 0.2
# Curves of at most this many epochs mark each epoch with a dot.
MARKED_EPOCHS = 30
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
# The grid: configurations x seeds

def plot_grid(series, path):
    """Write ``grid_figure(series)`` to ``path`` (PNG, atomically); returns the panel titles."""
    fig = grid_figure(series)
    save_png(fig, path)
    return [ax.get_title() for ax in fig.axes]


def grid_figure(series):
    """Accuracy per epoch of each configuration: its seeds' mean as a line, their
    min-max as a band of the same colour; one panel per (dataset, epsilon).

    ``series``: one dict per configuration (every flag but the seed):
    ``panel`` (dataset display name, epsilon in /255), ``label`` (the flags that
    vary, as text), ``attack`` (e.g. 'PGD-10'), ``split`` ('test', 'validation',
    'val') and ``runs`` (per seed, the accuracy after epoch 1, 2, ...). A seed
    still training has a shorter run: each epoch is summarised over the seeds that
    reached it. A configuration without runs is left out; with none left the
    figure is one panel saying 'no finished epochs yet'.
    """
    from matplotlib.figure import Figure

    series = [s for s in series if any(len(run) for run in s['runs'])]
    if not series:
        return empty_grid_figure(Figure)
    panels = sorted({(s['panel'][0], float(s['panel'][1])) for s in series})
    styles = configuration_styles(series)
    legend_lines = 1 + max(sum(panel_of(s) == p for s in series) for p in panels)  # title, entries
    width, height = GRID_PANEL_SIZE
    columns = min(GRID_COLUMNS, len(panels))
    fig, axes = panel_grid(Figure, len(panels), columns,
                           (width, height + GRID_LEGEND_ROW * legend_lines))
    for ax, panel in zip(axes, panels):
        draw_grid_panel(ax, panel, [s for s in series if panel_of(s) == panel], styles)
    return fig


def panel_of(one_series):
    """The panel a configuration belongs to: (dataset, epsilon as a float)."""
    dataset, epsilon_255 = one_series['panel']
    return dataset, float(epsilon_255)


def configuration_styles(series):
    """{label: matplotlib line style} so that a label has the same look in every panel.

    Ten colours; after them the colours repeat with another dash pattern.
    """
    labels = list(dict.fromkeys(s['label'] for s in series))
    dashes = ['-', '--', ':', '-.']
    return {label: dict(color=f'C{i % 10}', linestyle=dashes[i // 10 % len(dashes)])
            for i, label in enumerate(labels)}


def draw_grid_panel(ax, panel, series, styles):
    """One (dataset, epsilon) panel: each configuration's mean line and min-max band."""
    dataset, epsilon_255 = panel
    eps = epsilon_text(epsilon_255)
    for s in series:
        epochs, mean, low, high, label = seed_summary(s)
        style = styles[s['label']]
        ax.plot(epochs, mean, label=label, marker='.' if len(epochs) <= MARKED_EPOCHS else None,
                **style)
        ax.fill_between(epochs, low, high, color=style['color'], alpha=BAND_ALPHA, linewidth=0)
    measures = list(dict.fromkeys(f"{s['split']} {s['attack']}" for s in series))
    ax.set_title(f'{dataset}, eps {eps}')
    ax.set_ylabel(f"{' / '.join(measures)} accuracy ({eps})")
    epoch_axis(ax)
    legend_under(ax)


def legend_under(ax):
    """The panel's legend under its x-axis label, so that it never hides a curve."""
    from matplotlib.transforms import ScaledTranslation
    below = ScaledTranslation(0, -LEGEND_DROP, ax.figure.dpi_scale_trans)
    ax.legend(loc='upper center', bbox_to_anchor=(0.5, 0), bbox_transform=ax.transAxes + below,
              title='line: mean over seeds; band: lowest to highest',
              fontsize='small', title_fontsize='small', frameon=False)


def seed_summary(one_series):
    """(epochs, mean, min, max, legend label) of one configuration over its seeds.

    At each epoch only the seeds that reached it count; the label says how many
    seeds there are and, when some are behind, how many reached the last epoch.
    """
    runs = [[float(acc) for acc in run] for run in one_series['runs'] if len(run)]
    length = max(len(run) for run in runs)
    at_epoch = [np.array([run[e] for run in runs if len(run) > e]) for e in range(length)]
    epochs = list(range(1, length + 1))
    label = f"{one_series['label']} ({len(runs)} seed{'s' if len(runs) > 1 else ''}"
    if len(at_epoch[-1]) < len(runs):
        label += f', {len(at_epoch[-1])} to epoch {length}'
    return (epochs, [a.mean() for a in at_epoch], [a.min() for a in at_epoch],
            [a.max() for a in at_epoch], label + ')')


def empty_grid_figure(Figure):
    """The grid's figure before any epoch has finished: one panel that says so."""
    fig, (ax,) = panel_grid(Figure, 1, 1, GRID_PANEL_SIZE)
    ax.set_title('no finished epochs yet', y=0.5)  # in the middle of the empty panel
    ax.set_axis_off()
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
