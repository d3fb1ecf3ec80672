"""The figures: a run's curves.png (its panels follow its method, its legends name the
attacks) and the grid's accuracy per epoch (seeds' mean and min-max per configuration).

Rows and series are built by hand; the numbers are read back from the Figure's artists.
"""
import csv
import os

import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_rgb
from PIL import Image

import plots
import runs as run_files

BASELINES = ['fgsm_rs', 'n_fgsm', 'pgd_at']
ALL_PANELS = ['Test accuracy', 'Training loss', 'Temperature and KL weight',
              'Overfitting alarm: student on training images']
BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's first two line colours


def metric_rows(epochs, val_examples=0):
    """Metrics rows as the trainer writes them, every column a different curve."""
    rows = []
    for i in range(epochs):
        row = dict(zip(run_files.METRIC_FIELDS, [0.0] * len(run_files.METRIC_FIELDS)))
        row.update(epoch=i + 1, test_clean_acc=0.5 + 0.1 * i, test_pgd_acc=0.2 + 0.05 * i,
                   train_loss=2.0 - 0.3 * i, tau=2 * 0.99 ** i, kl_weight=0.99 ** (2 * i),
                   alarm_fgsm_acc=0.4 + 0.1 * i, alarm_pgd_acc=0.3 - 0.1 * i)
        rows.append(dict(zip(run_files.metric_fields(val_examples), row.values())))
    return rows


def colour_pixels(path, rgb):
    pixels = np.asarray(Image.open(path).convert('RGB')).reshape(-1, 3)
    return int((pixels == rgb).all(1).sum())


def legends(fig):
    """{panel title: [legend labels]}."""
    return {ax.get_title(): [t.get_text() for t in ax.get_legend().get_texts()]
            for ax in fig.axes}


# ---------------------------------------------------------------------------
# curves.png

def test_plot_curves_writes_mixkl_panels_from_metrics_csv(tmp_path):
    # As read back from metrics.csv: every number a string.
    run_files.write_metrics(str(tmp_path / 'metrics.csv'), metric_rows(3))
    with open(tmp_path / 'metrics.csv', newline='') as f:
        rows_from_csv = list(csv.DictReader(f))
    path = str(tmp_path / 'curves.png')

    titles = plots.plot_curves(rows_from_csv, path, 'mixkl', 8.0, 10)

    assert titles == ALL_PANELS
    assert Image.open(path).size == (1000, 700)
    assert sorted(os.listdir(tmp_path)) == ['curves.png', 'metrics.csv']  # no temporary left
    assert colour_pixels(path, BLUE) > 1000 and colour_pixels(path, ORANGE) > 1000


@pytest.mark.parametrize('method', BASELINES)
def test_baseline_curves_have_no_temperature_panel(tmp_path, method):
    path = str(tmp_path / 'curves.png')

    titles = plots.plot_curves(metric_rows(3), path, method, 8.0, 10)

    assert titles == [t for t in ALL_PANELS if t != 'Temperature and KL weight']
    assert Image.open(path).size == (1500, 350)  # one row of three panels


# Each panel's curves, in legend order, and the metrics.csv column each one plots.
PANEL_COLUMNS = {'Test accuracy': ['test_clean_acc', 'test_pgd_acc'],
                 'Training loss': ['train_loss'],
                 'Temperature and KL weight': ['tau', 'kl_weight'],
                 'Overfitting alarm: student on training images': ['alarm_fgsm_acc',
                                                                   'alarm_pgd_acc']}


@pytest.mark.parametrize('method', ['mixkl', 'fgsm_rs'])
def test_each_curve_plots_its_own_metrics_column_over_the_epochs(method):
    rows = metric_rows(3)  # every column a different curve
    fig = plots.curves_figure(rows, method, 8.0, 10)
    for ax in fig.axes:
        lines = ax.get_lines()
        assert len(lines) == len(PANEL_COLUMNS[ax.get_title()])
        for line, column in zip(lines, PANEL_COLUMNS[ax.get_title()]):
            assert list(line.get_xdata()) == [1, 2, 3]
            assert list(line.get_ydata()) == [r[column] for r in rows], column


@pytest.mark.parametrize('method', ['mixkl', 'pgd_at'])
def test_curves_label_each_accuracy_with_its_attack_and_epsilon(method):
    labels = legends(plots.curves_figure(metric_rows(2), method, 8.0, 10))
    assert labels['Test accuracy'] == ['clean', 'PGD-10, 8/255']
    assert labels['Overfitting alarm: student on training images'] == ['FGSM, 8/255',
                                                                      'PGD-10, 8/255']

    labels = legends(plots.curves_figure(metric_rows(2), method, 4.5, 20))
    assert labels['Test accuracy'] == ['clean', 'PGD-20, 4.5/255']
    assert labels['Overfitting alarm: student on training images'] == ['FGSM, 4.5/255',
                                                                      'PGD-20, 4.5/255']


def test_curves_with_val_examples_plot_the_val_columns():
    rows = metric_rows(3, val_examples=100)
    assert 'test_pgd_acc' not in rows[0]
    fig = plots.curves_figure(rows, 'n_fgsm', 8.0, 10)
    ax = fig.axes[0]
    assert ax.get_title() == 'Validation accuracy'
    clean, pgd = ax.get_lines()
    assert list(pgd.get_ydata()) == [r['val_pgd_acc'] for r in rows]


# ---------------------------------------------------------------------------
# The grid

def one_series(runs, dataset='CIFAR-10', epsilon_255=8.0, label='method=mixkl', **entries):
    return dict(dict(panel=(dataset, epsilon_255), label=label, attack='PGD-10', split='test',
                     runs=runs), **entries)


def mean_line_and_band(ax, label):
    """The (Line2D, PolyCollection) of the configuration whose legend label is ``label``."""
    line, = [line for line in ax.get_lines() if line.get_label() == label]
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    band, = [b for b in bands if np.allclose(b.get_facecolor()[0][:3], to_rgb(line.get_color()))]
    return line, band


def band_range(band, epoch):
    """(lowest, highest) y of the band's outline at x = ``epoch``."""
    vertices = band.get_paths()[0].vertices
    ys = vertices[np.isclose(vertices[:, 0], epoch), 1]
    return ys.min(), ys.max()


def test_grid_draws_one_panel_per_dataset_and_epsilon_sorted():
    series = [one_series([[0.3]], 'CIFAR-100', 8.0),
              one_series([[0.2]], 'CIFAR-10', 16.0),
              one_series([[0.4]], 'CIFAR-10', 8),
              one_series([[0.5]], 'CIFAR-10', 8.0, label='method=pgd_at'),
              one_series([[0.1]], 'CIFAR-10', 4.5, split='validation', attack='PGD-20')]

    fig = plots.grid_figure(series)

    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ['CIFAR-10, eps 4.5/255', 'CIFAR-10, eps 8/255', 'CIFAR-10, eps 16/255',
                      'CIFAR-100, eps 8/255']
    assert [ax.get_ylabel() for ax in fig.axes] == [
        'validation PGD-20 accuracy (4.5/255)', 'test PGD-10 accuracy (8/255)',
        'test PGD-10 accuracy (16/255)', 'test PGD-10 accuracy (8/255)']
    assert [len(ax.get_lines()) for ax in fig.axes] == [1, 2, 1, 1]
    assert legends(fig)['CIFAR-10, eps 8/255'] == ['method=mixkl (1 seed)',
                                                  'method=pgd_at (1 seed)']
    # Three columns at most: four panels take two rows.
    assert fig.get_size_inches()[0] == pytest.approx(3 * plots.GRID_PANEL_SIZE[0])
    rows = {ax.get_subplotspec().rowspan.start for ax in fig.axes}
    assert rows == {0, 1}


def test_grid_line_is_the_seed_mean_and_band_spans_min_to_max():
    mixkl = [[0.30, 0.40, 0.45], [0.34, 0.38, 0.47], [0.29, 0.43, 0.44]]
    baseline = [[0.20, 0.25, 0.10], [0.24, 0.21, 0.30]]
    fig = plots.grid_figure([one_series(mixkl),
                             one_series(baseline, label='method=fgsm_rs')])
    ax, = fig.axes

    for runs, label in [(mixkl, 'method=mixkl (3 seeds)'), (baseline, 'method=fgsm_rs (2 seeds)')]:
        line, band = mean_line_and_band(ax, label)
        assert list(line.get_xdata()) == [1, 2, 3]
        np.testing.assert_allclose(line.get_ydata(), np.mean(runs, axis=0))
        for epoch, accs in enumerate(zip(*runs), start=1):
            assert band_range(band, epoch) == pytest.approx((min(accs), max(accs)))
        assert band.get_alpha() == pytest.approx(0.2)


def test_grid_ragged_runs_use_the_seeds_that_reached_each_epoch():
    runs = [[0.1, 0.2, 0.6], [0.3, 0.5], [0.8]]  # two seeds still training

    ax, = plots.grid_figure([one_series(runs)]).axes

    line, band = mean_line_and_band(ax, 'method=mixkl (3 seeds, 1 to epoch 3)')
    np.testing.assert_allclose(line.get_ydata(), [0.4, 0.35, 0.6])
    assert band_range(band, 1) == pytest.approx((0.1, 0.8))
    assert band_range(band, 2) == pytest.approx((0.2, 0.5))
    assert band_range(band, 3) == pytest.approx((0.6, 0.6))


def test_grid_gives_a_configuration_one_colour_in_every_panel():
    fig = plots.grid_figure([one_series([[0.3]], 'CIFAR-10', label='method=mixkl'),
                             one_series([[0.2]], 'CIFAR-10', label='method=pgd_at'),
                             one_series([[0.1]], 'CIFAR-100', label='method=pgd_at')])
    both, alone = fig.axes
    assert to_rgb(both.get_lines()[1].get_color()) == to_rgb(alone.get_lines()[0].get_color())
    for ax in (both, alone):  # each band in its line's colour
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert [tuple(b.get_facecolor()[0][:3]) for b in bands] == \
            [to_rgb(line.get_color()) for line in ax.get_lines()]
    assert to_rgb(both.get_lines()[0].get_color()) != to_rgb(both.get_lines()[1].get_color())


def test_the_eleventh_configuration_takes_the_first_colour_with_another_dash():
    styles = plots.configuration_styles([one_series([[0.1]], label=f'c{i}') for i in range(12)])
    assert styles['c10'] == {'color': 'C0', 'linestyle': '--'}
    assert len({tuple(style.values()) for style in styles.values()}) == 12


def test_grid_skips_configurations_without_runs():
    fig = plots.grid_figure([one_series([]), one_series([[]], label='method=n_fgsm'),
                             one_series([[], [0.3]], label='method=pgd_at')])
    assert legends(fig) == {'CIFAR-10, eps 8/255': ['method=pgd_at (1 seed)']}


@pytest.mark.parametrize('series', [[], [one_series([])], [one_series([[], []])]])
def test_grid_without_finished_epochs_says_so(tmp_path, series):
    path = str(tmp_path / 'grid.png')
    assert plots.plot_grid(series, path) == ['no finished epochs yet']
    assert Image.open(path).size == (550, 360)


def test_plot_grid_writes_a_png(tmp_path):
    series = [one_series([[0.3, 0.4], [0.35, 0.42]], 'CIFAR-10'),
              one_series([[0.2, 0.3]], 'CIFAR-10', label='method=pgd_at'),
              one_series([[0.1, 0.2]], 'CIFAR-100')]
    path = str(tmp_path / 'grid.png')

    titles = plots.plot_grid(series, path)

    assert titles == ['CIFAR-10, eps 8/255', 'CIFAR-100, eps 8/255']
    assert os.listdir(tmp_path) == ['grid.png']  # no temporary left
    import matplotlib.image
    image = matplotlib.image.imread(path)
    legend_rows = 3  # two entries and a spare
    height = round(100 * (plots.GRID_PANEL_SIZE[1] + plots.GRID_LEGEND_ROW * legend_rows))
    assert image.shape[:2] == (height, 2 * 550)
    assert colour_pixels(path, BLUE) > 200 and colour_pixels(path, ORANGE) > 200


# ---------------------------------------------------------------------------
# Both: ticks at whole epochs

@pytest.mark.parametrize('epochs', [1, 3, 110])
@pytest.mark.parametrize('figure', ['mixkl', 'pgd_at', 'grid'])
def test_figures_mark_only_whole_epochs(epochs, figure):
    if figure == 'grid':
        fig = plots.grid_figure([one_series([[0.3] * epochs, [0.4] * epochs])])
    else:
        fig = plots.curves_figure(metric_rows(epochs), figure, 8.0, 10)
    fig.draw_without_rendering()  # sets the tick labels as they are drawn
    for ax in fig.axes:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        labels = [t.get_text() for t in ax.get_xticklabels() if low <= t.get_position()[0] <= high]
        assert ticks and all(t == int(t) for t in ticks), (ax.get_title(), ticks)
        assert all(label.lstrip('\N{MINUS SIGN}-').isdigit() for label in labels), labels
        if epochs <= 3:
            assert ticks == list(range(1, epochs + 1))


@pytest.mark.parametrize('epochs, marker', [(1, '.'), (30, '.'), (31, 'None'), (110, 'None')])
def test_a_grid_line_marks_its_epochs_only_while_they_are_few(epochs, marker):
    fig = plots.grid_figure([one_series([[0.3] * epochs, [0.4] * epochs])])
    assert [line.get_marker() for line in fig.axes[0].get_lines()] == [marker]


@pytest.mark.parametrize('method', ['mixkl', *BASELINES])
def test_each_curve_panel_names_its_unit_on_the_y_axis(method):
    fig = plots.curves_figure(metric_rows(3), method, 8.0, 10)
    units = {'Test accuracy': 'accuracy', 'Training loss': 'loss',
             'Temperature and KL weight': 'value',
             'Overfitting alarm: student on training images': 'accuracy'}
    assert [ax.get_ylabel() for ax in fig.axes] == [units[ax.get_title()] for ax in fig.axes]
