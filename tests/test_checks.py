"""The evaluation's checks for gradient masking (checks.py).

Masked models (an 8-bit input rounding with a zero gradient, logits scaled until the
softmax saturates, a randomised model) make the checks warn; a normal adversarially
trained model passes them; each judgement warns on numbers that must warn; the checks
do not depend on what ran before them; the evaluation script reports them.
"""
import json
import logging
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import checks
import evaluate
import runs
import training
from conftest import adversarially_trained_mlp, coloured_images, evaluate_in_process
from preactresnet import PreActResNet18
from synthetic import write_synthetic_cifar
from utils import attack_fgsm, attack_pgd, robust_mask

EPS = 16 / 255
# FGSM training without a random start at 64/255, past the 44/255 any model resists on
# coloured_images: its radius, training images, learning rate and most epochs.
CO_EPS, CO_TRAIN, CO_LR, CO_EPOCHS = 64 / 255, 2000, 0.05, 30
# Small enough for a CPU test, large enough that one image is under the noise share.
SMALL = checks.Settings(examples=128, square_examples=128, square_queries=300)


# ---------------------------------------------------------------------------
# Models

@pytest.fixture(scope='module')
def trained():
    """An MLP PGD-trained at 16/255 on class-coloured 8x8 images (2 s), and 128 test images."""
    return adversarially_trained_mlp(EPS, 128)


@pytest.fixture(scope='module')
def overfitted():
    """A small CNN FGSM-trained from the image itself (no random start) at 64/255, stopped
    once it overfits catastrophically on its training images (FGSM accuracy at least 30
    points above and twice PGD-10's, the training alarm's sign): about 10 s."""
    X, y = coloured_images(CO_TRAIN + 200)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=CO_LR, momentum=0.9)
    watched = (X[:200], y[:200])
    for epoch in range(CO_EPOCHS):
        for i in range(0, CO_TRAIN, 64):
            xb, yb = X[i:i + 64], y[i:i + 64]
            model.eval()
            delta = attack_fgsm(model, xb, yb, CO_EPS)
            model.train()
            loss = F.cross_entropy(model(xb + delta), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        fgsm = robust_mask(model, [watched], lambda m, X_, y_: attack_fgsm(m, X_, y_, CO_EPS))
        torch.manual_seed(0)
        pgd = robust_mask(model, [watched], lambda m, X_, y_: attack_pgd(m, X_, y_, CO_EPS,
                                                                           CO_EPS / 4, 10, 1))
        if fgsm.float().mean() - pgd.float().mean() > 0.3 and pgd.sum() < 0.5 * fgsm.sum():
            return model, X[CO_TRAIN:], y[CO_TRAIN:]
    pytest.fail(f'no catastrophic overfitting in {CO_EPOCHS} epochs')


class Quantised(nn.Module):
    """Rounds its input to 8 bits first: torch.round has a zero gradient everywhere."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 255) / 255)


class Saturated(nn.Module):
    """Logits times 1e4: the softmax saturates, the loss's gradient is exactly zero."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x) * 1e4


class Randomised(nn.Module):
    """Gaussian noise on the input at every forward: the attacks see another model each time."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x + 0.1 * torch.randn_like(x))


class Flickering(nn.Module):
    """Saturates the logits of a random half of the examples at every forward (see Saturated)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        z = self.model(x)
        return z * torch.where(torch.rand(len(z), 1) < 0.5, 1e4, 1.0)


def verdicts(found):
    return {c['name']: c['verdict'] for c in found}


def warned(found):
    return {c['name'] for c in found if c['verdict'] == 'warn'}


def run(model, X, y, seed=0, **kw):
    return checks.run_checks(model, X, y, EPS, seed, 64, SMALL, **kw)


# ---------------------------------------------------------------------------
# Models that must warn, and one that must pass

def test_a_normal_adversarially_trained_model_passes_every_check(trained):
    model, X, y = trained
    found = run(model, X, y)
    assert verdicts(found) == {name: 'pass' for name, _, _ in checks.CHECKS}
    numbers = {c['name']: c['numbers'] for c in found}
    # Not a trivial pass: the model is robust, and the attacks do break it where they must.
    assert numbers['stronger_attacks']['pgd50_accuracy'] > 0.6
    assert numbers['large_epsilon']['accuracy'] == 0
    assert numbers['black_box']['left_by_pgd50'] > 60
    assert runs.check_warnings({'checks': found}) == 0


@pytest.mark.parametrize('mask', [Quantised, Saturated])
def test_masked_gradients_make_the_checks_warn(trained, mask):
    model, X, y = trained
    found = run(mask(model), X, y)
    # PGD cannot move the examples: they seem robust even at 64/255, Square breaks some,
    # accuracy does not fall with epsilon, and the gradients are zero.
    assert warned(found) == {'gradients_alive', 'large_epsilon', 'black_box',
                             'accuracy_falls_with_epsilon'}
    assert runs.check_warnings({'checks': found}) == 4
    numbers = {c['name']: c['numbers'] for c in found}
    assert numbers['gradients_alive']['zero_gradient_share'] > 0.9
    assert numbers['large_epsilon']['accuracy_other_classes'] > 0.8


class Collapsed(nn.Module):
    """Answers class 0 whatever the input: its class-0 images are robust at any radius."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x) * 0 + torch.arange(10.0, 0, -1)


def test_a_collapsed_model_keeps_one_class_at_a_large_radius_without_a_warning(trained):
    model, X, y = trained
    found = {c['name']: c for c in run(Collapsed(model), X, y)}
    numbers = found['large_epsilon']['numbers']
    assert numbers['accuracy'] == (y[:128] == 0).float().mean().item() > 0.05
    assert numbers['class_kept_most'] == 0 and numbers['accuracy_other_classes'] == 0
    assert found['large_epsilon']['verdict'] == 'pass'


def test_a_randomised_model_makes_stronger_attacks_do_worse(trained):
    model, X, y = trained
    found = run(Randomised(model), X, y)
    assert 'stronger_attacks' in warned(found)
    assert {c['name']: c['numbers'] for c in found}[
        'stronger_attacks']['broken_by_pgd10_not_pgd50'] > 0.01 * len(y)


def test_catastrophic_overfitting_warns_in_the_training_alarms_words(overfitted):
    model, X, y = overfitted  # on its test images now
    found = checks.run_checks(model, X, y, CO_EPS, 0, 100, SMALL)
    check = next(c for c in found if c['name'] == 'catastrophic_overfitting')
    assert check['verdict'] == 'warn', check
    assert check['meaning'] == checks.overfitting_warning(
        '128 test images', check['numbers']['fgsm_accuracy'], check['numbers']['pgd50_accuracy'])


# ---------------------------------------------------------------------------
# Each judgement, on numbers given by hand

def stronger(unnested=0, fgsm=60, pgd10=50):
    return dict(examples=100, fgsm_accuracy=fgsm / 100, pgd10_accuracy=pgd10 / 100,
                pgd50_accuracy=(pgd10 - 2) / 100, broken_by_pgd10_not_pgd50=unnested,
                fgsm_correct=fgsm, pgd10_correct=pgd10)


def falls(half, eps, double, clean=0.8):
    return dict(examples=100, epsilon_255=8, clean_accuracy=clean, accuracy_half_eps=half,
                accuracy_eps=eps, accuracy_double_eps=double, broken_at_smaller_not_larger=0)


JUDGEMENTS = [
    # (judge, numbers, verdict)
    (checks.judge_stronger_attacks, stronger(), 'pass'),
    (checks.judge_stronger_attacks, stronger(unnested=1), 'pass'),  # within the noise share
    (checks.judge_stronger_attacks, stronger(unnested=2), 'warn'),
    (checks.judge_stronger_attacks, stronger(fgsm=49, pgd10=50), 'pass'),
    (checks.judge_stronger_attacks, stronger(fgsm=40, pgd10=50), 'warn'),
    (checks.judge_catastrophic_overfitting,
     dict(examples=100, fgsm_accuracy=0.55, pgd50_accuracy=0.47), 'pass'),
    (checks.judge_catastrophic_overfitting,  # too little to lose to tell
     dict(examples=100, fgsm_accuracy=0.08, pgd50_accuracy=0.0), 'pass'),
    (checks.judge_catastrophic_overfitting,  # Madry et al.'s undefended CIFAR-10 network
     dict(examples=100, fgsm_accuracy=0.327, pgd50_accuracy=0.035), 'warn'),
    (checks.judge_catastrophic_overfitting,
     dict(examples=100, fgsm_accuracy=0.85, pgd50_accuracy=0.02), 'warn'),
    (checks.judge_catastrophic_overfitting,
     dict(examples=100, fgsm_accuracy=0.6, pgd50_accuracy=0.25), 'warn'),
    (checks.judge_catastrophic_overfitting,  # more than 10 points and more than half lost
     dict(examples=100, fgsm_accuracy=0.30, pgd50_accuracy=0.12), 'warn'),
    (checks.judge_catastrophic_overfitting,  # exactly half: not below it
     dict(examples=100, fgsm_accuracy=0.5, pgd50_accuracy=0.25), 'pass'),
    (checks.judge_accuracy_falls_with_epsilon, falls(0.7, 0.5, 0.2), 'pass'),
    (checks.judge_accuracy_falls_with_epsilon, falls(0.0, 0.0, 0.0), 'pass'),  # nothing left
    (checks.judge_accuracy_falls_with_epsilon, falls(0.8, 0.8, 0.8), 'pass'),  # nothing found
    (checks.judge_accuracy_falls_with_epsilon, falls(0.5, 0.4, 0.45), 'warn'),  # rises
    (checks.judge_accuracy_falls_with_epsilon, falls(0.4, 0.5, 0.3), 'warn'),  # rises first
    (checks.judge_accuracy_falls_with_epsilon, falls(0.5, 0.4, 0.41), 'pass'),  # within noise
    (checks.judge_accuracy_falls_with_epsilon, falls(0.5, 0.5, 0.5), 'warn'),  # flat, bitten
    # Flat from eps/2 to eps, then falling at 2 eps: it falls, over the whole range.
    (checks.judge_accuracy_falls_with_epsilon, falls(0.5, 0.5, 0.2), 'pass'),
    # Flat at the large radius's 2% (nothing left to fall) or within the noise of the clean
    # accuracy (nothing found): left to the other checks. Just past either, a warning.
    (checks.judge_accuracy_falls_with_epsilon, falls(0.02, 0.02, 0.02), 'pass'),
    (checks.judge_accuracy_falls_with_epsilon, falls(0.03, 0.03, 0.03), 'warn'),
    (checks.judge_accuracy_falls_with_epsilon, falls(0.75, 0.75, 0.75, clean=0.76), 'pass'),
    (checks.judge_accuracy_falls_with_epsilon, falls(0.75, 0.75, 0.75, clean=0.77), 'warn'),
    (checks.judge_large_epsilon, dict(examples=100, epsilon_255=64, accuracy=0.02,
                                      class_kept_most=3, accuracy_other_classes=0.01), 'pass'),
    (checks.judge_large_epsilon, dict(examples=100, epsilon_255=64, accuracy=0.1,  # collapsed
                                      class_kept_most=3, accuracy_other_classes=0.0), 'pass'),
    (checks.judge_large_epsilon, dict(examples=100, epsilon_255=64, accuracy=0.05,
                                      class_kept_most=3, accuracy_other_classes=0.03), 'warn'),
    (checks.judge_large_epsilon, dict(examples=100, epsilon_255=64, accuracy=0.1,
                                      class_kept_most=3, accuracy_other_classes=0.02), 'pass'),
    (checks.judge_black_box,
     dict(examples=100, queries=1000, left_by_pgd50=50, broken_by_square=2), 'pass'),
    (checks.judge_black_box,
     dict(examples=100, queries=1000, left_by_pgd50=50, broken_by_square=3), 'warn'),
    (checks.judge_gradients_alive,
     dict(examples=100, zero_gradient=1, zero_gradient_share=0.01), 'pass'),
    (checks.judge_gradients_alive,
     dict(examples=100, zero_gradient=2, zero_gradient_share=0.02), 'warn'),
]


class AlwaysClassZero(nn.Module):
    def forward(self, x):
        return torch.tensor([1.0, 0.0]).expand(len(x), 2) + 0 * x.flatten(1)[:, :1]


def test_square_tries_its_share_of_the_images_with_the_queries_it_is_given(monkeypatch):
    import pyautoattack.square
    made = []

    class RecordedSquare(pyautoattack.square.SquareAttack):
        def __init__(self, *args, **kwargs):
            made.append(kwargs)
            super().__init__(*args, **kwargs)
    monkeypatch.setattr(pyautoattack.square, 'SquareAttack', RecordedSquare)
    x, y = torch.rand(6, 3, 4, 4), torch.zeros(6, dtype=torch.long)
    settings = checks.Settings(examples=6, square_examples=2, square_queries=5)
    probe = checks.Probe(AlwaysClassZero(), x, y, 8 / 255, 7, 4, settings)
    numbers = checks.measure_black_box(probe)
    # PGD-50 leaves all six: Square tries the first two, with 5 queries, drawn from the seed.
    assert numbers == dict(examples=2, queries=5, left_by_pgd50=2, broken_by_square=0)
    assert [(kwargs['n_queries'], kwargs['eps'], kwargs['seed']) for kwargs in made] == \
        [(5, 8 / 255, 7)]


def test_the_checks_defaults_are_the_ones_their_comments_justify():
    assert checks.SETTINGS == checks.Settings(
        examples=500, square_examples=100, square_queries=1000, step_fraction=0.25, noise=0.01,
        overfitting_ratio=0.5, overfitting_gap=0.1, large_radius_factor=8.0,
        large_radius_min_255=64.0, large_radius_accuracy=0.02, square_share=0.02,
        zero_gradient_share=0.01)


def test_the_console_lines_of_the_checks_count_the_warnings_and_name_each_check():
    warned = [dict(name='a', verdict='warn', meaning='A.'), dict(name='b', verdict='pass',
                                                                  meaning='B.'),
              dict(name='c', verdict='warn', meaning='C.')]
    assert checks.format_checks(warned, 1.25).splitlines() == [
        '  checks: 2 warnings (1.2 s)', '    WARNING a: A.', '    pass    b: B.',
        '    WARNING c: C.']
    assert checks.format_checks(warned[1:2]).splitlines()[0] == '  checks: 0 warnings'
    assert checks.format_checks(warned[:1]).splitlines()[0] == '  checks: 1 warning'


@pytest.mark.parametrize('judge,numbers,verdict', JUDGEMENTS,
                         ids=[f'{j.__name__[6:]}-{i}' for i, (j, _, _) in enumerate(JUDGEMENTS)])
def test_each_judgement_warns_on_numbers_that_must_warn(judge, numbers, verdict):
    found, kept, meaning = judge(numbers)
    assert found == verdict and kept == numbers
    assert meaning and '\n' not in meaning


def test_the_checks_attack_their_examples_and_square_only_the_first_of_them():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 10))
    X = torch.rand(40, 3, 4, 4, generator=g)
    y = torch.randint(0, 10, (40,), generator=g)
    settings = checks.Settings(examples=24, square_examples=8, square_queries=10)
    found = checks.run_checks(model, X, y, EPS, 0, 16, settings)
    examples = {c['name']: c['numbers']['examples'] for c in found}
    assert examples.pop('black_box') == 8
    assert len(examples) == len(checks.CHECKS) - 1 and set(examples.values()) == {24}


@pytest.mark.parametrize('kept,accuracy,other,says', [
    (0, 0.1, 0.0, '0.1000 correct, 0.0000 outside class 0 (a model that answers one class'),
    (4, 0.02, 0.01, '0.0200 correct, 0.0100 outside class 4 (a model that answers one class'),
    (-1, 0.0, 0.0, 'nothing correct'),
])
def test_the_large_radius_check_says_which_class_it_kept_class_0_included(kept, accuracy,
                                                                           other, says):
    verdict, _, meaning = checks.judge_large_epsilon(dict(
        examples=100, epsilon_255=64, accuracy=accuracy, class_kept_most=kept,
        accuracy_other_classes=other))
    assert verdict == 'pass' and f'PGD-10 at 64/255 leaves {says}' in meaning


def test_the_console_table_cell_names_each_warning_once_and_dashes_an_unchecked_entry():
    def check(name, verdict):
        return dict(name=name, verdict=verdict, meaning='...')
    assert checks.table_cell(dict(accuracy=0.5)) == '-', 'checks were not run'
    assert checks.table_cell(dict(checks=[])) == 'pass'
    assert checks.table_cell(dict(checks=[check('a', 'pass'), check('b', 'pass')])) == 'pass'
    assert checks.table_cell(dict(checks=[
        check('b', 'warn'), check('a', 'pass'), check('c', 'warn'), check('b', 'warn')])) \
        == '3 warn: b, c'


def test_each_checks_numbers_are_counted_from_the_attacks_per_example_results():
    """Per-example results given by hand (True: still correct), in the probe's cache of
    attacks, so every count the checks report is known."""
    y = torch.tensor([0, 0, 0, 1, 2, 1])
    probe = checks.Probe(nn.Identity(), torch.zeros(6, 3, 2, 2), y, 8 / 255, 0, 6, SMALL)
    eps, large = 8 / 255, checks.large_radius(8 / 255)
    given = {('clean', None, None): [1, 1, 1, 1, 1, 0],
             ('fgsm', eps, None): [1, 1, 0, 1, 1, 0],
             ('pgd', eps, 10): [1, 0, 0, 1, 1, 0],
             ('pgd', eps, 50): [1, 1, 1, 0, 1, 0],  # two broken by PGD-10 that PGD-50 keeps
             ('pgd', eps / 2, 10): [1, 1, 0, 1, 1, 0],
             ('pgd', 2 * eps, 10): [1, 0, 1, 0, 0, 0],  # one kept that eps broke
             ('pgd', large, 10): [1, 1, 0, 1, 0, 0]}  # class 0 twice, class 1 once
    probe.cache = {key: torch.tensor(v, dtype=torch.bool) for key, v in given.items()}
    assert checks.measure_stronger_attacks(probe) == pytest.approx(dict(
        examples=6, fgsm_accuracy=4 / 6, pgd10_accuracy=3 / 6, pgd50_accuracy=4 / 6,
        broken_by_pgd10_not_pgd50=2, fgsm_correct=4, pgd10_correct=3))
    assert checks.measure_catastrophic_overfitting(probe) == pytest.approx(dict(
        examples=6, fgsm_accuracy=4 / 6, pgd50_accuracy=4 / 6))
    assert checks.measure_accuracy_falls_with_epsilon(probe) == pytest.approx(dict(
        examples=6, epsilon_255=8.0, clean_accuracy=5 / 6, accuracy_half_eps=4 / 6,
        accuracy_eps=3 / 6, accuracy_double_eps=2 / 6,
        # The third image, broken at eps/2 and at eps, is kept at 2 eps: counted twice.
        broken_at_smaller_not_larger=2))
    # Square tries the first square_examples images that PGD-50 (not PGD-10) left correct;
    # at radius 0 it has nothing to do, and the count is all that is left to check.
    still = checks.Probe(nn.Identity(), torch.zeros(6, 3, 2, 2), y, 0.0, 0, 6, SMALL)
    still.cache = {('pgd', 0.0, 50): torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool),
                   ('pgd', 0.0, 10): torch.tensor([1, 0, 0, 0, 0, 0], dtype=torch.bool)}
    assert checks.measure_black_box(still) == dict(examples=6, queries=SMALL.square_queries,
                                                   left_by_pgd50=4, broken_by_square=0)
    assert checks.measure_large_epsilon(probe) == pytest.approx(dict(
        examples=6, epsilon_255=64.0, accuracy=3 / 6, class_kept_most=0,
        accuracy_other_classes=1 / 6))


def test_each_check_is_judged_on_numbers_that_warn_and_numbers_that_pass():
    judged = {(judge, verdict) for judge, _, verdict in JUDGEMENTS}
    assert judged == {(judge, v) for _, _, judge in checks.CHECKS for v in ('pass', 'warn')}


# ---------------------------------------------------------------------------
# Catastrophic overfitting: the training alarm's words

def test_the_training_alarm_and_the_evaluation_check_say_the_same_words():
    numbers = dict(examples=500, fgsm_accuracy=0.85, pgd50_accuracy=0.0)
    verdict, _, meaning = checks.judge_catastrophic_overfitting(numbers)
    assert verdict == 'warn'
    assert meaning == ('catastrophic overfitting? On 500 test images PGD accuracy is 0.0000 '
                       'while FGSM accuracy is 0.8500: ' + checks.MASKING)
    alarm = checks.overfitting_warning('512 training images', 0.9, 0.01, best_pgd=0.4)
    assert alarm == ('catastrophic overfitting? On 512 training images PGD accuracy fell to '
                     '0.0100 (best 0.4000) while FGSM accuracy is 0.9000: ' + checks.MASKING)


def test_the_training_alarm_fires_when_pgd_collapses_while_fgsm_holds_in_the_shared_words(
        tmp_path, monkeypatch):
    write_synthetic_cifar(str(tmp_path / 'data'), 'cifar10', n_train=32, n_test=16, seed=2)
    # (FGSM, PGD) accuracy on the alarm's images after epochs 1 and 2: PGD falls from 0.3 to
    # 0.02, below half its best, while FGSM rises.
    scripted = iter([(0.4, 0.3), (0.9, 0.02)])
    monkeypatch.setattr(training.Trainer, '_alarm_accuracies', lambda self: next(scripted))
    with pytest.raises(SystemExit) as exit_info:
        training.main('cifar10', ['--data-dir', str(tmp_path / 'data'), '--out_dir',
                                  str(tmp_path / 'output'), '--epochs', '2', '--batch-size',
                                  '16', '--width', '8', '--alarm-examples', '8'])
    assert exit_info.value.code == 0
    run_dir, = (tmp_path / 'output').iterdir()
    lines = [line.split('] ', 1)[-1] for line in (run_dir / 'train.log').read_text().splitlines()]
    warning = 'WARNING: ' + checks.overfitting_warning('8 training images', 0.9, 0.02,
                                                       best_pgd=0.3)
    assert [line for line in lines if line.startswith('WARNING')] == [warning]
    assert lines.index(warning) > next(i for i, line in enumerate(lines)
                                       if line.startswith('epoch 2/2'))


# ---------------------------------------------------------------------------
# Determinism

def test_checks_are_deterministic_under_the_seed(trained):
    model, X, y = trained
    noisy = Randomised(model)  # every forward draws from the RNG: the hardest case
    first = run(noisy, X, y, seed=3)
    torch.rand(1000)  # whatever ran before must not matter
    again = run(noisy, X, y, seed=3)
    assert again == first
    assert run(noisy, X, y, seed=4) != first


def test_each_check_gives_the_same_numbers_alone_as_after_the_others(trained):
    model, X, y = trained
    flickering = Flickering(model)  # which examples have a zero gradient is up to the RNG
    together = {c['name']: c['numbers'] for c in run(flickering, X, y, seed=5)}
    assert 0 < together['gradients_alive']['zero_gradient'] < len(y)
    for name, measure, _ in checks.CHECKS:
        torch.manual_seed(5)
        alone = measure(checks.Probe(flickering, X, y, EPS, 5, 64, SMALL))
        assert alone == together[name], name


def test_accuracy_falls_with_epsilon_counts_examples_a_larger_radius_gave_back(trained):
    """Known masks per radius: example 0 is broken at eps but not at 2 eps, and example 3
    at eps/2 but not at eps: the two examples a larger ball gave back; example 1 is broken at
    every radius."""
    model, X, y = trained
    probe = checks.Probe(model, X[:4], y[:4], EPS, 0, 64, SMALL)
    masks = {EPS / 2: [True, False, True, False], EPS: [False, False, True, True],
             2 * EPS: [True, False, True, False]}
    probe.robust = lambda attack, radius=None, iterations=None: torch.tensor(
        masks[radius] if attack == 'pgd' else [True] * 4)
    numbers = checks.measure_accuracy_falls_with_epsilon(probe)
    assert numbers['broken_at_smaller_not_larger'] == 2
    assert (numbers['accuracy_half_eps'], numbers['accuracy_eps'],
            numbers['accuracy_double_eps']) == pytest.approx((2 / 4, 2 / 4, 2 / 4))
    assert checks.judge_accuracy_falls_with_epsilon(numbers, SMALL)[0] == 'warn'


@pytest.mark.parametrize('epsilon_255, radius_255', [(4, 64), (8, 64), (16, 128), (40, 255)])
def test_the_large_radius_is_eight_eps_at_least_64_and_at_most_255(trained, epsilon_255,
                                                                    radius_255):
    model, X, y = trained
    probe = checks.Probe(model, X[:8], y[:8], epsilon_255 / 255, 0, 64, SMALL)
    numbers = checks.measure_large_epsilon(probe)
    assert numbers['epsilon_255'] == radius_255
    torch.manual_seed(0)
    attacked = robust_mask(model, [(X[:8], y[:8])], lambda m, X_, y_: attack_pgd(
        m, X_, y_, radius_255 / 255, radius_255 / 255 / 4, 10, 1))
    assert numbers['accuracy'] == attacked.float().mean().item()


def test_the_checks_fgsm_steps_the_whole_radius():
    """On a two-class linear model one signed step of eps from the image is the worst case:
    an example stays correct exactly when its margin exceeds eps * ||w_1 - w_0||_1."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(2, 48, generator=g) * 0.1)
        model[1].bias.zero_()
    X = 0.1 + 0.8 * torch.rand(200, 3, 4, 4, generator=g)
    with torch.no_grad():
        logits = model(X)
    y = logits.argmax(1)
    margin = (logits[:, 0] - logits[:, 1]).abs()
    exact = margin > EPS * (model[1].weight[1] - model[1].weight[0]).abs().sum()
    assert 20 < exact.sum() < 180
    probe = checks.Probe(model, X, y, EPS, 0, 64, SMALL)
    assert torch.equal(probe.robust('fgsm', EPS), exact)


def test_an_input_gradient_is_dead_only_when_zero_at_every_pixel():
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2)).eval()
    with torch.no_grad():
        model[1].weight[:, :24] = 0  # half the pixels never matter
    X, y = torch.rand(8, 3, 4, 4), torch.zeros(8, dtype=torch.long)
    assert checks.measure_gradients_alive(checks.Probe(model, X, y, EPS, 0, 64, SMALL)) == \
        dict(examples=8, zero_gradient=0, zero_gradient_share=0.0)
    with torch.no_grad():
        model[1].weight.zero_()
    assert checks.measure_gradients_alive(checks.Probe(model, X, y, EPS, 0, 64, SMALL)) == \
        dict(examples=8, zero_gradient=8, zero_gradient_share=1.0)


def test_a_large_radius_leaving_nothing_correct_names_no_class():
    probe = checks.Probe(nn.Identity(), torch.zeros(6, 3, 2, 2), torch.arange(6) % 3, EPS, 0,
                         64, SMALL)
    probe.cache[('pgd', checks.large_radius(EPS, SMALL), 10)] = torch.zeros(6, dtype=torch.bool)
    numbers = checks.measure_large_epsilon(probe)
    assert numbers == dict(examples=6, epsilon_255=128.0, accuracy=0.0, class_kept_most=-1,
                           accuracy_other_classes=0.0)
    assert 'leaves nothing correct' in checks.judge_large_epsilon(numbers, SMALL)[2]


def test_the_checks_share_their_attacks_example_by_example(trained):
    model, X, y = trained
    probe = checks.Probe(model, X, y, EPS, 0, 64, SMALL)
    pgd10 = probe.robust('pgd', EPS, 10)
    torch.manual_seed(0)
    by_hand = robust_mask(model, [(X, y)], lambda m, X_, y_: attack_pgd(m, X_, y_, EPS, EPS / 4,
                                                                          10, 1))
    assert torch.equal(pgd10, by_hand)
    assert (probe.robust('pgd', EPS, 50) <= pgd10).all()


# ---------------------------------------------------------------------------
# AutoAttack's own checks

class Probabilities(nn.Module):
    """A softmax on the logits: AutoAttack warns that it was given probabilities."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return F.softmax(self.model(x), 1)


def test_autoattack_warnings_become_checks(trained, tmp_path):
    model, X, y = trained
    import argparse
    args = argparse.Namespace(attacks=['aa'], epsilon=16.0, alpha=2.0, restarts=1, seed=0,
                              batch_size=16)
    with checks.autoattack_messages() as messages:
        evaluate.evaluate_checkpoint(Probabilities(model), X[:16], y[:16], args,
                                     str(tmp_path / 'prob'))
    found = run(Probabilities(model), X[:16], y[:16], autoattack_messages=messages)
    aa = [c for c in found if c['name'] == 'autoattack']
    assert aa and all(c['verdict'] == 'warn' for c in aa)
    assert any('output is a probability distribution' in c['meaning'] for c in aa)
    assert 'probability distribution' in (tmp_path / 'prob_autoattack.log').read_text()
    # Without warnings: one passing entry; without AutoAttack: none.
    assert verdicts(run(model, X[:16], y[:16], autoattack_messages=[]))['autoattack'] == 'pass'
    assert 'autoattack' not in verdicts(run(model, X[:16], y[:16]))


def test_each_distinct_autoattack_warning_is_one_check_with_its_own_count():
    logger = logging.getLogger('auto-attack')
    level = logger.level
    logger.setLevel(logging.DEBUG)  # as run_autoattack sets it: its progress lines pass too
    try:
        with checks.autoattack_messages() as messages:
            for text in ('zero gradients', 'Square  beat\n  APGD', 'zero gradients'):
                logger.warning(text)
            logger.info('apgd-ce - 1/1 - 3 out of 16 successfully perturbed')  # progress
            logger.debug('using standard version')
        logger.warning('after the evaluation')  # no longer collected
    finally:
        logger.setLevel(level)
    assert messages == ['zero gradients', 'Square beat APGD', 'zero gradients']
    found = checks.autoattack_checks(messages)
    assert [(c['verdict'], c['numbers']['warnings'], c['meaning']) for c in found] == [
        ('warn', 2, 'AutoAttack warned: zero gradients'),
        ('warn', 1, 'AutoAttack warned: Square beat APGD')]
    assert runs.check_warnings({'checks': found}) == 2  # distinct warnings, not messages


# ---------------------------------------------------------------------------
# The evaluation script

def write_test_set(root, images, labels):
    """A synthetic CIFAR-10 whose test batch holds ``images`` (N, 3072 uint8) and ``labels``."""
    write_synthetic_cifar(str(root), 'cifar10', n_train=10, n_test=len(labels))
    with open(root / 'cifar-10-batches-py' / 'test_batch', 'wb') as f:
        pickle.dump({'batch_label': 'synthetic', 'data': images, 'labels': labels}, f, protocol=2)


@pytest.fixture(scope='module')
def saturated_run(tmp_path_factory):
    """A run directory whose best and final models are the same saturated PreActResNet, and
    a test set labelled with its own predictions (clean accuracy 100%)."""
    root = tmp_path_factory.mktemp('saturated')
    torch.manual_seed(0)
    model = PreActResNet18(10, width=8).eval()
    with torch.no_grad():
        model.linear.weight.mul_(1e4)
        model.linear.bias.mul_(1e4)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(16, 3072), dtype=np.uint8)
    with torch.no_grad():
        labels = model(torch.from_numpy(images).view(-1, 3, 32, 32).float() / 255).argmax(1)
    write_test_set(root / 'data', images, labels.tolist())
    run_dir = root / 'run'
    run_dir.mkdir()
    torch.save(model.state_dict(), run_dir / 'best_model.pth')
    (run_dir / 'final_model.pth').write_bytes((run_dir / 'best_model.pth').read_bytes())
    return root


def test_autoattacks_own_warnings_reach_results_json_as_checks(saturated_run, capsys,
                                                                monkeypatch):
    root = saturated_run

    def warning_autoattack(model, x, y, epsilon, args, log_path):  # AutoAttack takes minutes
        logging.getLogger('auto-attack').warning('zero gradients')
        return len(y), {}
    monkeypatch.setattr(evaluate, 'run_autoattack', warning_autoattack)
    code, out, err = evaluate_in_process(capsys, '--model_path', root / 'run' / 'best_model.pth',
                                         '--out_dir', root / 'aa', '--data-dir', root / 'data',
                                         '--n_ex', 4, '--attacks', 'aa', '--checks-examples', 4)
    assert code == 0, err
    entry, = json.loads((root / 'aa' / 'results.json').read_text())['results']
    assert [(c['verdict'], c['meaning']) for c in entry['checks'] if c['name'] == 'autoattack'] \
        == [('warn', 'AutoAttack warned: zero gradients')]


def test_the_evaluation_script_reports_the_checks(saturated_run, capsys):
    root = saturated_run
    code, out, err = evaluate_in_process(capsys, '--model_path', root / 'run', '--out_dir',
                                         root / 'out', '--data-dir', root / 'data', '--n_ex', 16,
                                         '--attacks', 'clean,pgd10', '--checks-examples', 16)
    assert code == 0, err
    report = json.loads((root / 'out' / 'results.json').read_text())
    best, final = report['results']
    assert best['attacks']['clean']['accuracy'] == 1
    assert [c['name'] for c in best['checks']] == [name for name, _, _ in checks.CHECKS]
    for check in best['checks']:
        assert set(check) == {'name', 'verdict', 'numbers', 'meaning'}
        assert check['verdict'] in ('pass', 'warn')
        assert all(isinstance(v, (int, float)) for v in check['numbers'].values())
        assert isinstance(check['meaning'], str) and '\n' not in check['meaning']
    assert best['checks'][-1]['numbers']['examples'] == 16
    assert 'gradients_alive' in warned(best['checks'])
    # The checks attack at the script's radius (8/255; 64/255 for the large one), and their
    # PGD-10 at eps is the evaluation's own: same images, step, start and seed.
    numbers = {c['name']: c['numbers'] for c in best['checks']}
    assert numbers['accuracy_falls_with_epsilon']['epsilon_255'] == 8
    assert numbers['large_epsilon']['epsilon_255'] == 64
    assert numbers['stronger_attacks']['pgd10_accuracy'] == best['attacks']['pgd10']['accuracy']
    assert final['checks'] == best['checks'], 'same file content, same checks'
    # The console: a line per check, and the count in the table.
    assert f'    WARNING gradients_alive: {best["checks"][-1]["meaning"]}' in out.splitlines()
    cell = f'{runs.check_warnings(best)} warn: {", ".join(sorted(warned(best["checks"]), key=list(verdicts(best["checks"])).index))}'
    row = next(line for line in out.splitlines() if line.startswith('| checks |'))
    assert row == f'| checks | {cell} | {cell} |'


def test_the_checks_attack_only_their_checks_examples_of_the_evaluated_images(saturated_run,
                                                                             capsys):
    root = saturated_run
    code, out, err = evaluate_in_process(capsys, '--model_path', root / 'run' / 'best_model.pth',
                                         '--out_dir', root / 'out-8', '--data-dir', root / 'data',
                                         '--n_ex', 16, '--attacks', 'clean',
                                         '--checks-examples', 8)
    assert code == 0, err
    entry, = json.loads((root / 'out-8' / 'results.json').read_text())['results']
    assert entry['attacks']['clean']['n'] == 16
    assert {c['name']: c['numbers']['examples'] for c in entry['checks']} == \
        {name: 8 for name, _, _ in checks.CHECKS}


def test_no_checks_leaves_them_out(saturated_run, capsys):
    root = saturated_run
    code, out, err = evaluate_in_process(capsys, '--model_path', root / 'run' / 'best_model.pth',
                                         '--out_dir', root / 'out-none', '--data-dir',
                                         root / 'data', '--n_ex', 4, '--attacks', 'clean',
                                         '--no-checks')
    assert code == 0, err
    entry, = json.loads((root / 'out-none' / 'results.json').read_text())['results']
    assert 'checks' not in entry and runs.check_warnings(entry) == 0
    assert '| checks |' not in out and 'WARNING' not in out


@pytest.mark.parametrize('value', ['0', '-1', 'nan', 'inf', '2.5'])
def test_bad_checks_examples_are_refused_in_one_argparse_line(capsys, value):
    code, out, err = evaluate_in_process(capsys, '--model_path', 'model.pth',
                                         '--checks-examples', value)
    errors = [line for line in err.splitlines() if 'error' in line]
    assert code == 2 and out == '' and len(errors) == 1
    assert 'error: argument --checks-examples/--checks_examples: ' in errors[0]
