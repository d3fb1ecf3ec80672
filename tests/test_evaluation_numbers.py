"""The evaluation's numbers pinned down: known answers, what ran, eval mode, forward passes.

Linear models on [0, 1] inputs have a computable L-inf worst case: for classes y
and j the margin z_y - z_j can fall by at most eps * ||w_y - w_j||_1, and PGD on
a two-class linear model moves every pixel by alpha towards that corner at each
step. So the number each attack should report is known exactly, and so is the
number of forward passes PGD needs when broken examples stop being attacked.
The models are run through ``evaluate.evaluate_checkpoint`` (what the test
scripts call) with flags parsed by the scripts' own parser.
"""
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import evaluate
import models
from synthetic import write_synthetic_cifar, write_synthetic_tiny_imagenet
from utils import attack_fgsm, attack_pgd, batch_rng, evaluate_robustness

EPS = 8 / 255
PGD_NAMES = ['pgd10', 'pgd20', 'pgd50', 'cw20']
ITERATIONS = {'pgd10': 10, 'pgd20': 20, 'pgd50': 50, 'cw20': 20}


def eval_args(*flags):
    """The test scripts' flags as their parser makes them (every default included)."""
    return evaluate.parse_args('cifar10', ['--model_path', 'unused.pth', *map(str, flags)])


class Probe(nn.Module):
    """A model that fails any forward in train mode and records the rows (and, with
    ``keep_inputs``, the images) of each forward."""

    def __init__(self, inner, keep_inputs=False):
        super().__init__()
        self.inner, self.keep_inputs = inner, keep_inputs
        self.rows, self.inputs = [], []

    def forward(self, x):
        assert not self.training, 'an attack ran the model in train mode'
        self.rows.append(len(x))
        if self.keep_inputs:
            self.inputs.append(x.detach().clone())
        return self.inner(x)


def linear(weight, bias):
    model = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0]))
    with torch.no_grad():
        model[1].weight.copy_(weight)
        model[1].bias.copy_(bias)
    return model


def random_linear_problem(classes=2, n=400, seed=0):
    """A random linear model and points in [0.1, 0.9] (the box never binds at eps 8/255)."""
    g = torch.Generator().manual_seed(seed)
    model = linear(torch.randn(classes, 48, generator=g) * 0.1, torch.zeros(classes))
    X = 0.1 + 0.8 * torch.rand(n, 3, 4, 4, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return model.eval(), X, y


def exact_robust(model, X, y, eps):
    """Which points keep their class everywhere in the eps-ball (any number of classes)."""
    w, b = model[1].weight, model[1].bias
    z = X.flatten(1) @ w.T + b
    margins = z.gather(1, y[:, None]) - z                       # z_y - z_j
    reach = eps * (w[y][:, None, :] - w[None, :, :]).abs().sum(2)  # eps * ||w_y - w_j||_1
    others = torch.ones_like(margins, dtype=torch.bool).scatter(1, y[:, None], False)
    return ((margins > reach) | ~others).all(1)


def split_problem(n=8, robust=4, seed=0):
    """Two classes, label 0 everywhere: ``robust`` points keep it anywhere in the 8/255 ball,
    the others are misclassified anywhere in it (their margin is 0.1 * ||w_0 - w_1||_1,
    more than three times what the ball can move it)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(2, 48, generator=g) * 0.1
    diff = weight[0] - weight[1]
    bias = torch.tensor([-0.5 * diff.sum().item(), 0.0])
    side = torch.tensor([1.0] * robust + [-1.0] * (n - robust))
    X = (0.5 + 0.1 * side[:, None] * diff.sign()).view(n, 3, 4, 4)
    return linear(weight, bias).eval(), X, torch.zeros(n, dtype=torch.long)


# ---------------------------------------------------------------------------
# Known answers

def test_the_attack_step_is_a_quarter_of_epsilon_unless_given():
    assert (eval_args().alpha, eval_args('--epsilon', 16).alpha) == (2, 4)
    assert eval_args('--epsilon', 4).alpha == 1
    assert eval_args('--epsilon', 16, '--alpha', 3).alpha == 3


def test_every_pgd_attack_reaches_the_exact_worst_case_of_a_two_class_linear_model():
    model, X, y = random_linear_problem()
    exact = exact_robust(model, X, y, EPS).sum().item()
    clean = (model(X).argmax(1) == y).sum().item()
    assert 40 < exact < clean - 40, 'the problem separates clean and robust accuracy'
    # 10 steps of 2/255 cross the whole ball (16/255) from any start: every attack lands
    # on the worst-case corner.
    # In batches of 7: the counts of the 58 batches add up.
    args = eval_args('--alpha', 2, '--batch_size', 7, '--attacks', 'clean,' + ','.join(PGD_NAMES))
    results = evaluate.evaluate_checkpoint(model, X, y, args, 'unused')
    assert results['clean']['correct'] == clean
    assert {name: results[name]['correct'] for name in PGD_NAMES} == dict.fromkeys(PGD_NAMES, exact)


class RunnerUpIsStuck(nn.Module):
    """Three classes on one pixel x: z = (1, 0.9, 5.4 - 10 x). Class 1, the runner-up where
    class 0 is right, can never win; class 2 wins for x < 0.44."""

    def forward(self, x):
        x = x.flatten(1)[:, 0]
        return torch.stack([torch.ones_like(x), torch.full_like(x, 0.9), 5.4 - 10 * x], 1)


def test_cw20_follows_the_margin_to_the_runner_up_and_pgd20_the_cross_entropy():
    """Cross-entropy always pulls x down (only z_2 depends on it): PGD-20 breaks exactly the
    x within eps of 0.44. The C&W margin max_j z_j - z_0 has no gradient while the runner-up
    is class 1 (x > 0.45): from such a start it is stuck, so it breaks fewer."""
    X = torch.linspace(0.45, 0.49, 64).view(-1, 1, 1, 1)
    y = torch.zeros(64, dtype=torch.long)
    results = evaluate.evaluate_checkpoint(RunnerUpIsStuck().eval(), X, y,
                                           eval_args('--attacks', 'pgd20,cw20'), 'unused')
    assert results['pgd20']['correct'] == (X.flatten() >= 0.44 + EPS).sum().item()
    assert results['cw20']['correct'] > results['pgd20']['correct'] + 10


def test_only_enough_iterations_of_a_small_step_reach_the_worst_case():
    """Step 0.4/255: 50 steps cross the ball (20/255 >= 16/255), 20 steps (8/255) cannot."""
    model, X, y = random_linear_problem(seed=1)
    exact = exact_robust(model, X, y, EPS).sum().item()
    results = evaluate.evaluate_checkpoint(model, X, y, eval_args(
        '--alpha', 0.4, '--attacks', 'pgd10,pgd20,pgd50'), 'unused')
    pgd10, pgd20, pgd50 = (results[name]['correct'] for name in ('pgd10', 'pgd20', 'pgd50'))
    assert pgd50 == exact
    assert pgd10 > pgd20 > pgd50, 'fewer steps of 0.4/255 stop short of the corner'


def test_autoattack_finds_the_exact_worst_case_of_a_ten_class_linear_model(tmp_path):
    model, X, y = random_linear_problem(classes=10, n=16, seed=3)
    # Labels: the model's own predictions, so every point starts correct.
    y = model(X).argmax(1)
    exact = exact_robust(model, X, y, EPS).sum().item()
    assert 0 < exact < 16
    results = evaluate.evaluate_checkpoint(model, X, y, eval_args('--attacks', 'aa',
                                                                  '--batch_size', 16),
                                           str(tmp_path / 'linear'))
    assert results['aa']['correct'] == exact
    # At half the radius more points survive: the radius AutoAttack used is the flag's.
    assert exact_robust(model, X, y, EPS / 2).sum().item() > exact


def test_fgsm_steps_epsilon_along_the_gradient_sign_from_the_image_itself():
    """The overfitting alarm's attack: no random start, one step of eps, inside the box."""
    model, X, y = random_linear_problem(n=64, seed=2)
    X[:4], X[4:8] = 0.0, 1.0  # on the box's faces the step is cut to stay in [0, 1]
    w = model[1].weight.detach()
    ascent = torch.where(y[:, None] == 0, w[1] - w[0], w[0] - w[1]).sign().view(-1, 3, 4, 4)
    expected = torch.max(torch.min(EPS * ascent, 1 - X), -X)
    assert torch.equal(attack_fgsm(model, X, y, EPS), expected)
    assert (expected[:8] == 0).any() and (expected[8:].abs() == EPS).all()


def restart_outcomes(model, X, y, alpha, iters, restarts, seed):
    """Per restart: (fooled, final loss) of single-restart PGD runs on one random stream,
    the stream a ``restarts``-restart attack draws its starts from."""
    torch.manual_seed(seed)
    outcomes = []
    for _ in range(restarts):
        delta = attack_pgd(model, X, y, EPS, alpha, iters, 1)
        with torch.no_grad():
            logits = model(X + delta)
        outcomes.append((logits.argmax(1) != y, F.cross_entropy(logits, y, reduction='none')))
    return outcomes


def test_pgd_starts_uniformly_anywhere_in_the_ball():
    """No step taken (0 iterations): the start itself, on pixels far from 0 and 1, spread
    evenly over [-eps, eps] (mean 0, variance eps^2 / 3)."""
    model, _, _ = random_linear_problem()
    X, y = torch.full((256, 3, 4, 4), 0.5), torch.zeros(256, dtype=torch.long)
    torch.manual_seed(0)
    delta = attack_pgd(model, X, y, EPS, EPS / 4, 0, 1)
    assert -EPS <= delta.min() < -0.99 * EPS and EPS * 0.99 < delta.max() <= EPS
    assert abs(delta.mean()) < 0.03 * EPS  # 6 standard errors of 12,288 draws
    assert delta.pow(2).mean() == pytest.approx(EPS ** 2 / 3, rel=0.05)


def test_an_example_broken_by_any_restart_counts_as_broken():
    """Not the restart with the highest loss: with three or more classes that one can be a
    restart that left the example correct, while another broke it."""
    model, X, y = random_linear_problem(classes=3, n=300, seed=5)
    args = eval_args('--alpha', 0.2, '--attacks', 'pgd10', '--restarts', 4, '--seed', 7)
    result = evaluate.evaluate_checkpoint(model, X, y, args, 'unused')['pgd10']

    outcomes = restart_outcomes(model, X, y, 0.2 / 255, 10, 4, seed=7)
    broken_by_any = torch.stack([fooled for fooled, _ in outcomes]).any(0)
    assert result['correct'] == (~broken_by_any).sum().item()
    # The problem tells the rules apart: keeping the highest-loss restart would count
    # more examples as robust, and one restart alone breaks fewer.
    losses = torch.stack([loss for _, loss in outcomes])
    fooled = torch.stack([fooled for fooled, _ in outcomes])
    by_loss = fooled.gather(0, losses.argmax(0)[None])[0]
    assert (~by_loss).sum() > (~broken_by_any).sum()
    assert (~outcomes[0][0]).sum() > (~broken_by_any).sum()


# ---------------------------------------------------------------------------
# What each attack ran with, recorded and used

def forward_rows(model, X, y, name, *flags):
    """The rows of each forward pass one attack makes, through evaluate_checkpoint."""
    probe = Probe(model)
    evaluate.evaluate_checkpoint(probe, X, y, eval_args('--attacks', name, *flags), 'unused')
    return probe.rows


def test_pgd_forwards_only_the_examples_it_has_not_broken_yet():
    """Half the points are broken from the start: after the first step only the other half
    is forwarded. Per restart: 1 forward of all 8, k - 1 of the 4 left, 1 final of all 8;
    then evaluate_batches' forward of the result. A deterministic speed guard."""
    model, X, y = split_problem(n=8, robust=4)
    for name, k in ITERATIONS.items():
        for restarts in (1, 3):
            rows = forward_rows(model, X, y, name, '--restarts', restarts, '--alpha', 2)
            assert rows == ([8] + [4] * (k - 1) + [8]) * restarts + [8], (name, restarts)
    assert forward_rows(model, X, y, 'clean') == [8]


def test_each_attack_forwards_batches_of_batch_size():
    model, X, y = split_problem(n=8, robust=8)  # none broken: every pass sees whole batches
    assert forward_rows(model, X, y, 'clean', '--batch_size', 3) == [3, 3, 2]
    rows = forward_rows(model, X, y, 'pgd10', '--batch_size', 3)
    assert rows == ([3] * 11 + [3]) * 2 + [2] * 11 + [2]


def test_the_per_epoch_evaluation_is_a_clean_pass_then_pgd_with_its_iterations():
    model, X, y = split_problem(n=8, robust=4)
    probe = Probe(model)
    clean, pgd = evaluate_robustness(probe, [(X, y)], EPS, 2 / 255, 3)
    # Clean: 8. PGD-3: 8, then the 4 unbroken twice, the attack's final 8, the count's 8.
    assert probe.rows == [8, 8, 4, 4, 8, 8]
    assert (clean, pgd) == (0.5, 0.5)


def test_pgd_stops_at_once_when_every_example_is_broken():
    model, X, y = split_problem(n=8, robust=0)
    for name in ITERATIONS:
        assert forward_rows(model, X, y, name, '--restarts', 2) == [8, 8, 8, 8, 8], name


# ---------------------------------------------------------------------------
# Eval mode and the order of the attacks

def test_every_attack_sees_the_model_in_eval_mode_and_the_order_changes_no_number(tmp_path):
    """The model arrives in train mode; AutoAttack, first in one order, must not see it so.
    Each attack draws its random starts from the seed alone: in either order it forwards
    the very same images, bitwise, and so reports the same numbers."""
    model, X, y = random_linear_problem(classes=10, n=16, seed=3)
    y = model(X).argmax(1)
    orders = [['aa', 'cw20', 'pgd50', 'pgd20', 'pgd10', 'clean'],
              ['clean', 'pgd10', 'pgd20', 'pgd50', 'cw20', 'aa']]
    flags = ['--epsilon', 6, '--alpha', 0.1, '--restarts', 2, '--batch_size', 16]
    runs, forwarded = [], []
    for order in orders:
        probe = Probe(model, keep_inputs=True).train()
        ends = {}  # attack -> how many forwards had run when it ended
        args = eval_args(*flags, '--attacks', ','.join(order))
        runs.append(evaluate.evaluate_checkpoint(
            probe, X, y, args, str(tmp_path / 'linear'),
            after_each=lambda results: ends.setdefault(list(results)[-1], len(probe.inputs))))
        starts = dict(zip(order, [0] + [ends[name] for name in order[:-1]]))
        forwarded.append({name: probe.inputs[starts[name]:ends[name]] for name in order})
    numbers = [{name: results[name]['correct'] for name in orders[1]} for results in runs]
    assert numbers[0] == numbers[1]
    for name in orders[1]:
        first, second = forwarded[0][name], forwarded[1][name]
        assert len(first) == len(second) > 0, name
        assert all(torch.equal(a, b) for a, b in zip(first, second)), name
    # Another seed gives other random starts.
    probe = Probe(model, keep_inputs=True)
    evaluate.evaluate_checkpoint(probe, X, y, eval_args(*flags, '--attacks', 'pgd10', '--seed', 1),
                                 'unused')
    assert not torch.equal(probe.inputs[0], forwarded[0]['pgd10'][0])
    check_recorded_settings(runs[0])


def check_recorded_settings(results):
    """results.json's entries say what each attack ran with: radius 6/255, step 0.1/255,
    2 restarts, the iterations its name says; AutoAttack's standard settings."""
    recorded = ['epsilon', 'epsilon_255', 'iterations', 'step_size', 'step_size_255', 'restarts']
    assert {k: results['clean'][k] for k in recorded} == dict.fromkeys(recorded, 0)
    for name in PGD_NAMES:
        assert {k: results[name][k] for k in recorded + ['loss']} == dict(
            epsilon=6 / 255, epsilon_255=6, iterations=ITERATIONS[name], step_size=0.1 / 255,
            step_size_255=0.1, restarts=2, loss='cw' if name == 'cw20' else 'ce')
    aa = results['aa']
    assert aa['epsilon'] == 6 / 255 and aa['epsilon_255'] == 6 and aa['version'] == 'standard'
    assert aa['components'] == {
        'apgd-ce': dict(iterations=100, restarts=1, epsilon=6 / 255),
        'apgd-t': dict(iterations=100, restarts=1, target_classes=9, epsilon=6 / 255),
        'fab-t': dict(iterations=100, restarts=1, target_classes=9, epsilon=6 / 255),
        'square': dict(queries=5000, restarts=1, epsilon=6 / 255)}
    assert 0 < aa['max_perturbation'] <= 6 / 255 + 1e-6
    for name, result in results.items():
        assert result['n'] == 16 and result['accuracy'] == result['correct'] / 16, name


# ---------------------------------------------------------------------------
# Pixels: from the file on disk to the tensor the attacked model receives

def model_inputs_of(run):
    """The input of every forward of a whole network (a model built by models.build_model)
    while ``run()`` runs."""
    inputs = []

    def record(module, args):
        if type(module).__name__ in ('PreActResNet', 'ResNet', 'WideResNet'):
            inputs.append(args[0].detach().clone())
    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        run()
    finally:
        handle.remove()
    return inputs


def evaluate_clean(dataset, checkpoint, data_dir, out_dir, n):
    """The evaluation script's main for ``dataset``, clean accuracy of the first n images."""
    try:
        evaluate.main(dataset, ['--model_path', str(checkpoint), '--data-dir', str(data_dir),
                                '--out_dir', str(out_dir), '--n_ex', str(n), '--attacks', 'clean',
                                '--device', 'cpu', '--no-checks'])
    except SystemExit as exit:
        assert exit.code in (0, None)


def test_cifar_pixels_reach_the_model_as_the_file_bytes_over_255(tmp_path):
    write_synthetic_cifar(str(tmp_path / 'data'), 'cifar10', n_train=10, n_test=12)
    path = tmp_path / 'data' / 'cifar-10-batches-py' / 'test_batch'
    batch = pickle.load(open(path, 'rb'))
    batch['data'][0, :3] = [0, 255, 128]  # the extremes and a middle value, in the red plane
    pickle.dump(batch, open(path, 'wb'), protocol=2)
    torch.manual_seed(0)
    checkpoint = tmp_path / 'model.pth'
    torch.save(models.build_model('preactresnet18', 10, 4).state_dict(), checkpoint)

    inputs = model_inputs_of(lambda: evaluate_clean('cifar10', checkpoint, tmp_path / 'data',
                                                    tmp_path / 'out', 8))
    expected = torch.from_numpy(batch['data'][:8]).float().view(8, 3, 32, 32) / 255
    # The first-batch check of the logits and the clean pass: both see the file's pixels.
    assert len(inputs) == 2 and all(torch.equal(i, expected) for i in inputs)
    assert torch.equal(inputs[0][0, 0, 0, :3], torch.tensor([0.0, 255.0, 128.0]) / 255)


def test_tiny_imagenet_pixels_reach_the_model_as_the_decoded_jpeg_over_255(tmp_path):
    data = write_synthetic_tiny_imagenet(str(tmp_path / 'data'), num_classes=3, per_class=2,
                                         n_val=5)
    torch.manual_seed(0)
    checkpoint = tmp_path / 'model.pth'
    torch.save(models.build_model('preactresnet18', 200, 4, 64).state_dict(), checkpoint)

    inputs = model_inputs_of(lambda: evaluate_clean('tinyimagenet', checkpoint, data,
                                                    tmp_path / 'out', 5))
    folder = os.path.join(data, 'tiny-imagenet-200', 'val', 'images')
    expected = []
    for name in sorted(os.listdir(folder)):
        with Image.open(os.path.join(folder, name)) as image:
            expected.append(torch.from_numpy(np.array(image.convert('RGB'))).permute(2, 0, 1))
    assert len(inputs) == 2 and all(torch.equal(i, torch.stack(expected).float() / 255)
                                   for i in inputs)


@pytest.mark.parametrize('seed', [0, 5])
def test_a_seeded_batch_draws_from_its_seed_and_index_and_leaves_the_global_rng(seed):
    """Seed 0 (torchrun's --seed 0, epoch 0) is a seed like any other."""
    torch.manual_seed(1)
    before = torch.get_rng_state()
    with batch_rng(seed, 3, torch.device('cpu')):
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(2)
    with batch_rng(seed, 3, torch.device('cpu')):
        again = torch.rand(4)
    with batch_rng(seed, 4, torch.device('cpu')):
        other = torch.rand(4)
    assert torch.equal(first, again) and not torch.equal(first, other)
