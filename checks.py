"""Checks that an evaluation is not fooled by gradient masking.

Fast adversarial training fails in one typical way, catastrophic overfitting: the
model learns to mask its gradients, so single-step and weak multi-step attacks stop
finding adversarial examples while the model is not robust. These checks look for
the signs the community's checklist names (Athalye et al. 2018; Carlini et al. 2019;
AutoAttack's own checks): stronger attacks never do worse, single-step accuracy is
not far above multi-step accuracy, accuracy falls as epsilon grows and reaches about
zero at a large epsilon, a black-box attack does not beat the white-box ones, and
gradients are not zero. ``evaluate.py`` runs them after the attacks on the first
``--checks-examples`` test images; the training's overfitting alarm speaks the same
words (``overfitting_warning``). README: "Catastrophic overfitting and gradient masking".

Each check is one entry of a results.json entry's ``checks`` list:
``{"name", "verdict": "pass" | "warn", "numbers": {...}, "meaning": one sentence}``.
Measuring (attacks, in ``Probe``) and judging (``judge_*``: numbers to a verdict) are
separate, so a judgement can be tried on numbers given by hand.
"""
import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from runs import check_warnings
from utils import attack_fgsm, pgd_attack, robust_mask


# ---------------------------------------------------------------------------
# Settings: subset sizes and thresholds, each with its reason (README lists them)

@dataclass(frozen=True)
class Settings:
    # Test images the checks attack (--checks-examples). 500 of the 10,000 keep the
    # checks' 92 gradient steps per image under 6% of a PGD-10/20/50 evaluation's 80 on
    # all images, while one image is 0.2 points: finer than any threshold below.
    examples: int = 500
    # The first of those that the Square attack tries, and its queries (one forward each,
    # on the images PGD-50 left). A masked model falls to Square within a few hundred
    # queries; 100 images x 1,000 forwards cost at most 4% of the evaluation above.
    square_examples: int = 100
    square_queries: int = 1000
    # Every PGD of the checks steps radius / 4: the evaluation's 2/255 at 8/255, scaled
    # so that every radius is crossed in the same number of steps.
    step_fraction: float = 0.25
    # A share of the checked images that is noise, not a sign: 1% is 5 of 500 images,
    # about two standard errors of an accuracy near 1% (floating-point ties, random starts).
    noise: float = 0.01
    # Catastrophic overfitting: PGD accuracy below half the FGSM accuracy, as in the
    # training alarm (the same words), and more than 10 points below it: with less to
    # lose (FGSM 5%, PGD 0%) masking cannot be told from a weak model.
    overfitting_ratio: float = 0.5
    overfitting_gap: float = 0.1
    # The large radius: 8 eps, at least 64/255 (64/255 at the usual 8/255). CIFAR-10 models
    # adversarially trained at 8/255 fall to a few percent by 32/255: at 64/255 more than 2%
    # left means the attack, not the model, failed. 8 eps keeps the radius that far beyond
    # a larger eps (the synthetic data's class colours can be 176/255 apart). The class
    # kept most is not counted: a collapsed model that answers one class nearly everywhere
    # keeps that class's images at any radius without masking anything.
    large_radius_factor: float = 8.0
    large_radius_min_255: float = 64.0
    large_radius_accuracy: float = 0.02
    # Square may break at most 2% of its 100 images (among those PGD-50 left; twice the
    # noise: Square is random, PGD-50 not optimal); AutoAttack's own check allows 0.2% after
    # 5,000 queries and three stronger white-box attacks.
    square_share: float = 0.02
    # All-zero input gradients: a normal fp32 network has none (its softmax saturates only
    # past a logit gap of about 100); AutoAttack warns at one. 1% leaves room for a few
    # saturated images before warning that the evaluation cannot move them.
    zero_gradient_share: float = 0.01


SETTINGS = Settings()


# ---------------------------------------------------------------------------
# Words shared with the training's overfitting alarm

CATASTROPHIC_OVERFITTING = 'catastrophic overfitting?'
MASKING = ('the single-step attack no longer finds the adversarial examples PGD finds '
           '(gradient masking), so the model is less robust than single-step attacks show')


def overfitting_warning(images, fgsm, pgd, best_pgd=None):
    """The sentence the training alarm and the evaluation's check both print.

    ``images`` says which, e.g. '512 training images'; ``best_pgd`` (training) says
    that PGD accuracy fell from there.
    """
    pgd_words = f'fell to {pgd:.4f} (best {best_pgd:.4f})' if best_pgd is not None \
        else f'is {pgd:.4f}'
    return (f'{CATASTROPHIC_OVERFITTING} On {images} PGD accuracy {pgd_words} while FGSM '
            f'accuracy is {fgsm:.4f}: {MASKING}')


# ---------------------------------------------------------------------------
# Running the checks

def run_checks(model, x, y, epsilon, seed, batch_size, settings=SETTINGS,
               autoattack_messages=None):
    """The checks' list for one model, on the first ``settings.examples`` of (x, y).

    ``epsilon`` is in [0, 1] units; ``autoattack_messages`` (see ``AutoAttackMessages``)
    is None when AutoAttack did not run. The model is put in eval mode and run in fp32.
    """
    probe = Probe(model, x[:settings.examples], y[:settings.examples], epsilon, seed,
                  batch_size, settings)
    found = []
    with torch.autocast(x.device.type, enabled=False):
        for name, measure, judge in CHECKS:
            torch.manual_seed(seed)  # and again before each attack (Probe.robust)
            found.append(entry(name, *judge(measure(probe), settings)))
    if autoattack_messages is not None:
        found += autoattack_checks(autoattack_messages)
    return found


def entry(name, verdict, numbers, meaning):
    return dict(name=name, verdict=verdict, numbers=numbers, meaning=meaning)


class Probe:
    """The checked images and the per-example results of the attacks the checks share.

    Each attack reseeds the RNG with ``seed`` first, so a result does not depend on which
    checks ran before it, and PGD-10 and PGD-50 at one radius share their random start.
    """

    def __init__(self, model, x, y, epsilon, seed, batch_size, settings):
        self.model, self.x, self.y = model.eval(), x.float(), y
        self.epsilon, self.seed, self.batch_size, self.settings = epsilon, seed, batch_size, settings
        self.cache = {}

    @property
    def n(self):
        return len(self.y)

    def batches(self, x=None, y=None):
        x, y = (self.x, self.y) if x is None else (x, y)
        return [(x[i:i + self.batch_size], y[i:i + self.batch_size])
                for i in range(0, len(y), self.batch_size)]

    def robust(self, attack, radius=None, iterations=None):
        """Per example: correct after ``attack`` ('clean', 'fgsm' or 'pgd' at ``radius``)."""
        key = (attack, radius, iterations)
        if key not in self.cache:
            torch.manual_seed(self.seed)
            self.cache[key] = robust_mask(self.model, self.batches(),
                                          self.attack(attack, radius, iterations))
        return self.cache[key]

    def attack(self, name, radius, iterations):
        if name == 'clean':
            return None
        if name == 'fgsm':
            return lambda model, X, y: attack_fgsm(model, X, y, radius)
        return pgd_attack(radius, self.settings.step_fraction * radius, iterations, 1)

    def accuracy(self, *args):
        return self.robust(*args).float().mean().item() if self.n else 0.0


# ---------------------------------------------------------------------------
# Stronger attacks never do worse

def measure_stronger_attacks(probe):
    eps = probe.epsilon
    fgsm, pgd10, pgd50 = (probe.robust('fgsm', eps), probe.robust('pgd', eps, 10),
                          probe.robust('pgd', eps, 50))
    return dict(examples=probe.n, fgsm_accuracy=probe.accuracy('fgsm', eps),
                pgd10_accuracy=probe.accuracy('pgd', eps, 10),
                pgd50_accuracy=probe.accuracy('pgd', eps, 50),
                broken_by_pgd10_not_pgd50=int((~pgd10 & pgd50).sum()),
                fgsm_correct=int(fgsm.sum()), pgd10_correct=int(pgd10.sum()))


def judge_stronger_attacks(numbers, settings=SETTINGS):
    n = numbers['examples']
    unnested = numbers['broken_by_pgd10_not_pgd50']
    fgsm_short = numbers['pgd10_correct'] - numbers['fgsm_correct']
    if unnested > settings.noise * n or fgsm_short > settings.noise * n:
        return 'warn', numbers, (
            f'a stronger attack did worse: {unnested} of {n} examples broken by PGD-10 survive '
            f'PGD-50 (which continues the same run), and FGSM leaves {fgsm_short} fewer '
            'correct than PGD-10; the attacks follow a misleading gradient (gradient masking, '
            'or a randomised model), so the PGD numbers may be inflated')
    every = 'every example' if unnested == 0 else f'all but {unnested} of the examples'
    return 'pass', numbers, (
        f'PGD-50 broke {every} PGD-10 broke and FGSM (accuracy {numbers["fgsm_accuracy"]:.4f}) '
        f'was not stronger than PGD-10 ({numbers["pgd10_accuracy"]:.4f}): the attacks are '
        'ordered by strength, as they must be')


# ---------------------------------------------------------------------------
# Single-step accuracy far above multi-step accuracy: catastrophic overfitting

def measure_catastrophic_overfitting(probe):
    return dict(examples=probe.n, fgsm_accuracy=probe.accuracy('fgsm', probe.epsilon),
                pgd50_accuracy=probe.accuracy('pgd', probe.epsilon, 50))


def judge_catastrophic_overfitting(numbers, settings=SETTINGS):
    fgsm, pgd = numbers['fgsm_accuracy'], numbers['pgd50_accuracy']
    if pgd < settings.overfitting_ratio * fgsm and fgsm - pgd > settings.overfitting_gap:
        return 'warn', numbers, overfitting_warning(f'{numbers["examples"]} test images', fgsm,
                                                    pgd)
    return 'pass', numbers, (f'PGD-50 accuracy {pgd:.4f} is not far below FGSM accuracy '
                             f'{fgsm:.4f}: no sign of catastrophic overfitting')


# ---------------------------------------------------------------------------
# Accuracy falls as epsilon grows

def measure_accuracy_falls_with_epsilon(probe):
    eps = probe.epsilon
    half, full, double = (probe.robust('pgd', r, 10) for r in (eps / 2, eps, 2 * eps))
    return dict(examples=probe.n, epsilon_255=round(255 * eps, 4),
                clean_accuracy=probe.accuracy('clean'),
                accuracy_half_eps=probe.accuracy('pgd', eps / 2, 10),
                accuracy_eps=probe.accuracy('pgd', eps, 10),
                accuracy_double_eps=probe.accuracy('pgd', 2 * eps, 10),
                broken_at_smaller_not_larger=int((~half & (full | double)).sum()
                                                 + (~full & double).sum()))


def judge_accuracy_falls_with_epsilon(numbers, settings=SETTINGS):
    """Warn when accuracy rises with the radius, or stays flat after the attack began to bite.

    Flat at the clean accuracy (nothing found at any radius) is left to the large-radius
    and gradient checks: a model can be that robust (this repository's synthetic data).
    """
    clean = numbers['clean_accuracy']
    accs = [numbers['accuracy_half_eps'], numbers['accuracy_eps'], numbers['accuracy_double_eps']]
    rises = any(b > a + settings.noise for a, b in zip(accs, accs[1:]))
    flat = accs[2] > accs[0] - settings.noise and \
        settings.large_radius_accuracy < accs[0] < clean - settings.noise
    words = ', '.join(f'{a:.4f}' for a in accs)
    if rises or flat:
        return 'warn', numbers, (
            f'PGD-10 accuracy at eps/2, eps, 2 eps is {words}: it does not fall as the radius '
            'grows, though a larger ball holds every adversarial example of a smaller one, '
            'so the attack is failing (gradient masking) and the numbers may be inflated')
    return 'pass', numbers, f'PGD-10 accuracy at eps/2, eps, 2 eps is {words}: it falls as it must'


# ---------------------------------------------------------------------------
# A large epsilon breaks everything

def large_radius(epsilon, settings=SETTINGS):
    return min(1.0, max(settings.large_radius_factor * epsilon,
                        settings.large_radius_min_255 / 255))


def measure_large_epsilon(probe):
    radius = large_radius(probe.epsilon, probe.settings)
    kept = probe.y[probe.robust('pgd', radius, 10)]
    counts = torch.bincount(kept) if len(kept) else torch.zeros(1, dtype=torch.long)
    return dict(examples=probe.n, epsilon_255=round(255 * radius, 4),
                accuracy=probe.accuracy('pgd', radius, 10),
                class_kept_most=int(counts.argmax()) if len(kept) else -1,
                accuracy_other_classes=(len(kept) - int(counts.max())) / probe.n if probe.n
                else 0.0)


def judge_large_epsilon(numbers, settings=SETTINGS):
    radius, acc = numbers['epsilon_255'], numbers['accuracy']
    other, kept = numbers['accuracy_other_classes'], numbers['class_kept_most']
    if other > settings.large_radius_accuracy:
        return 'warn', numbers, (
            f'PGD-10 at {radius:g}/255 still leaves {acc:.4f} correct ({other:.4f} outside '
            f'class {kept}, the class kept most), a radius no model resists: the attack, not '
            'the model, fails there (gradient masking), so the robust accuracies may be '
            'inflated')
    if kept < 0:
        return 'pass', numbers, (f'PGD-10 at {radius:g}/255 leaves nothing correct: a large '
                                 'radius breaks everything, as it must')
    return 'pass', numbers, (
        f'PGD-10 at {radius:g}/255 leaves {acc:.4f} correct, {other:.4f} outside class {kept} '
        '(a model that answers one class nearly everywhere keeps it at any radius): a large '
        'radius breaks nearly everything, as it must')


# ---------------------------------------------------------------------------
# A black-box attack does not beat the white-box ones

def measure_black_box(probe):
    """Square (pyautoattack, no gradients) on the first images that PGD-50 leaves correct."""
    s = probe.settings
    n = min(probe.n, s.square_examples)
    left = probe.robust('pgd', probe.epsilon, 50)[:n].nonzero().flatten()
    broken = 0
    if len(left) and probe.epsilon > 0:
        from pyautoattack.square import SquareAttack
        square = SquareAttack(probe.model, norm='Linf', eps=probe.epsilon,
                              n_queries=s.square_queries, n_restarts=1, seed=probe.seed,
                              loss='margin', device=probe.x.device)
        torch.manual_seed(probe.seed)
        with torch.no_grad():
            for X, y in probe.batches(probe.x[left], probe.y[left]):
                x_adv = square.perturb(X, y)
                broken += int((probe.model(x_adv).argmax(1) != y).sum())
    return dict(examples=n, queries=s.square_queries, left_by_pgd50=len(left),
                broken_by_square=broken)


def judge_black_box(numbers, settings=SETTINGS):
    n, left, broken = numbers['examples'], numbers['left_by_pgd50'], numbers['broken_by_square']
    if broken > settings.square_share * n:
        return 'warn', numbers, (
            f'Square, a black-box attack, broke {broken} of the {left} examples PGD-50 left '
            f'(of {n}): the gradients mislead PGD (gradient masking), so the PGD numbers are '
            'inflated')
    return 'pass', numbers, (f'Square, a black-box attack, broke {broken} of the {left} examples '
                             f'PGD-50 left (of {n}): it does not beat the white-box attacks')


# ---------------------------------------------------------------------------
# Gradients are alive

def measure_gradients_alive(probe):
    zero = 0
    for X, y in probe.batches():
        X = X.clone().requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(probe.model(X), y, reduction='sum'), X)
        zero += int((grad.flatten(1).abs().amax(1) == 0).sum())
    return dict(examples=probe.n, zero_gradient=zero,
                zero_gradient_share=zero / probe.n if probe.n else 0.0)


def judge_gradients_alive(numbers, settings=SETTINGS):
    n, zero = numbers['examples'], numbers['zero_gradient']
    if numbers['zero_gradient_share'] > settings.zero_gradient_share:
        return 'warn', numbers, (
            f'{zero} of {n} examples have an all-zero input gradient of the loss (a saturated '
            'softmax, a quantised or non-differentiable input): gradient attacks cannot move '
            'them, so their robustness is not measured')
    return 'pass', numbers, (f'{zero} of {n} examples have an all-zero input gradient of the '
                             'loss: the gradient attacks have something to follow')


CHECKS = [
    ('stronger_attacks', measure_stronger_attacks, judge_stronger_attacks),
    ('catastrophic_overfitting', measure_catastrophic_overfitting,
     judge_catastrophic_overfitting),
    ('accuracy_falls_with_epsilon', measure_accuracy_falls_with_epsilon,
     judge_accuracy_falls_with_epsilon),
    ('large_epsilon', measure_large_epsilon, judge_large_epsilon),
    ('black_box', measure_black_box, judge_black_box),
    ('gradients_alive', measure_gradients_alive, judge_gradients_alive),
]


# ---------------------------------------------------------------------------
# AutoAttack's own checks

class AutoAttackMessages(logging.Handler):
    """Collects the warnings pyautoattack logs (its checks.py: randomised or dynamic
    model, probabilities for logits, zero gradients, Square beating the white-box attacks).

    They otherwise reach only its log file and the console; ``autoattack_checks`` turns
    them into checks.
    """

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(' '.join(record.getMessage().split()))


@contextlib.contextmanager
def autoattack_messages():
    """Inside, AutoAttack's warnings are collected; yields their list."""
    handler = AutoAttackMessages()
    logger = logging.getLogger('auto-attack')
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def autoattack_checks(messages):
    """One warning per distinct AutoAttack message (with its count), or one pass."""
    if not messages:
        return [entry('autoattack', 'pass', dict(warnings=0),
                      'AutoAttack\'s own checks (randomised or dynamic model, probabilities '
                      'for logits, zero gradients, Square beating the gradient attacks) found '
                      'nothing')]
    distinct = list(dict.fromkeys(messages))
    return [entry('autoattack', 'warn', dict(warnings=messages.count(m)),
                  f'AutoAttack warned: {m}') for m in distinct]


# ---------------------------------------------------------------------------
# Console

def format_checks(checks, seconds=None):
    """The console lines of one model's checks: a summary, then one line per check."""
    count = sum(c['verdict'] == 'warn' for c in checks)
    took = f' ({seconds:.1f} s)' if seconds is not None else ''
    lines = [f'  checks: {count} warning{"s" if count != 1 else ""}{took}']
    for c in checks:
        mark = 'WARNING' if c['verdict'] == 'warn' else 'pass'
        lines.append(f'    {mark:<7} {c["name"]}: {c["meaning"]}')
    return '\n'.join(lines)


def table_cell(entry):
    """An entry's checks in the console table: 'pass', '2 warn: name, name', or '-'."""
    if 'checks' not in entry:
        return '-'
    warned = list(dict.fromkeys(c['name'] for c in entry['checks'] if c['verdict'] == 'warn'))
    return f'{check_warnings(entry)} warn: {", ".join(warned)}' if warned else 'pass'
