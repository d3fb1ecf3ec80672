"""A run's curves.png: its panels follow its method, its legends name the attacks.

Rows are built by hand; the numbers are read back from the Figure's artists.
"""
import csv
import os

import numpy as np
import pytest
from PIL import Image

import plots
import training

BASELINES = ['fgsm_rs', 'n_fgsm', 'pgd_at']
ALL_PANELS = ['Test accuracy', 'Training loss', 'Temperature and KL weight',
              'Overfitting alarm: student on training images']
BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's first two line colours


def metric_rows(epochs, val_examples=0):
    """Metrics rows as the trainer writes them, every column a different curve."""
    rows = []
    for i in range(epochs):
        row = dict(zip(training.METRIC_FIELDS, [0.0] * len(training.METRIC_FIELDS)))
        row.update(epoch=i + 1, test_clean_acc=0.5 + 0.1 * i, test_pgd_acc=0.2 + 0.05 * i,
                   train_loss=2.0 - 0.3 * i, tau=2 * 0.99 ** i, kl_weight=0.99 ** (2 * i),
                   alarm_fgsm_acc=0.4 + 0.1 * i, alarm_pgd_acc=0.3 - 0.1 * i)
        rows.append(dict(zip(training.metric_fields(val_examples), row.values())))
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
    training.write_metrics(str(tmp_path / 'metrics.csv'), metric_rows(3))
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


def test_mixkl_curves_plot_temperature_and_kl_weight():
    rows = metric_rows(3)
    fig = plots.curves_figure(rows, 'mixkl', 8.0, 10)
    ax = fig.axes[ALL_PANELS.index('Temperature and KL weight')]
    tau, kl = ax.get_lines()
    assert list(tau.get_ydata()) == [r['tau'] for r in rows]
    assert list(kl.get_ydata()) == [r['kl_weight'] for r in rows]


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
# Ticks at whole epochs

@pytest.mark.parametrize('epochs', [1, 3, 110])
@pytest.mark.parametrize('figure', ['mixkl', 'pgd_at'])
def test_figures_mark_only_whole_epochs(epochs, figure):
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
