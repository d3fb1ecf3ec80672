"""The baselines' steps (N-FGSM, PGD-AT) against known answers, and the authors' cyclic schedule.

On a linear two-class model z = W x the input gradient of the cross-entropy for
label 0 points along W[1] - W[0] wherever x is, so every attack's answer can be
written down.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mixkl
import training

EPS = 8 / 255


def linear_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2, bias=False))


def settings(method, *flags):
    args, _ = training.parse_args('cifar10', ['--method', method, '--no-amp', *flags])
    return training.hyperparameters(args)


def ascent_direction(model):
    """sign(W[1] - W[0]) as an image: where cross-entropy on label 0 increases."""
    w = model[1].weight.detach()
    return (w[1] - w[0]).sign().view(1, 3, 4, 4)


def run_step(step, model, x, y, hp, seed=0):
    """The step from a fixed RNG state, recording the inputs of every forward."""
    inputs = []
    model.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(seed)
    return step(model, None, optimizer, x, y, hp, epoch=0), inputs


def test_n_fgsm_steps_from_two_eps_noise_and_is_not_projected_to_epsilon():
    hp = settings('n_fgsm')
    assert (hp.epsilon, hp.alpha) == (EPS, EPS), 'N-FGSM: step eps'
    model = linear_model()
    x, y = torch.full((8, 3, 4, 4), 0.5), torch.zeros(8, dtype=torch.long)
    before, ascent = model[1].weight.detach().clone(), ascent_direction(model)
    result, inputs = run_step(mixkl.n_fgsm_step, model, x, y, hp)
    torch.manual_seed(0)
    noise = torch.empty_like(x).uniform_(-2 * EPS, 2 * EPS)
    torch.testing.assert_close(inputs[0] - x, noise, rtol=0, atol=1e-7)
    expected = noise + EPS * ascent
    torch.testing.assert_close(inputs[1] - x, expected, rtol=0, atol=1e-6)
    assert (inputs[1] - x).abs().max() > 1.5 * EPS, 'no projection back to the eps-ball'
    # One SGD step on the cross-entropy at x + delta.
    logits = (inputs[1].flatten(1) @ before.T)
    assert result.loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert not torch.equal(model[1].weight, before)


def test_n_fgsm_keeps_images_in_the_box():
    hp = settings('n_fgsm')
    model = linear_model()
    x = torch.zeros(4, 3, 4, 4)
    x[2:] = 1.0
    _, inputs = run_step(mixkl.n_fgsm_step, model, x, torch.zeros(4, dtype=torch.long), hp)
    assert all(((i >= 0) & (i <= 1)).all() for i in inputs)


def test_pgd_at_reaches_the_corner_of_the_ball_on_a_linear_model():
    hp = settings('pgd_at')
    assert (hp.alpha, hp.attack_iters) == (2 / 255, 10), 'PGD-10 with step 2/255'
    model = linear_model()
    x, y = torch.full((8, 3, 4, 4), 0.5), torch.zeros(8, dtype=torch.long)
    corner = EPS * ascent_direction(model).expand_as(x)  # before the step changes W
    result, inputs = run_step(mixkl.pgd_at_step, model, x, y, hp)
    assert len(inputs) == 11, 'ten attack forwards and the training one'
    # 10 steps of 2/255 cover the 16/255 from any start to the corner eps * sign(W1 - W0).
    torch.testing.assert_close(inputs[-1] - x, corner, rtol=0, atol=1e-6)
    assert result.n == 8


def test_pgd_at_takes_attack_iters_steps_from_a_uniform_start():
    hp = settings('pgd_at', '--attack-iters', '1')
    model = linear_model()
    x, y = torch.full((8, 3, 4, 4), 0.5), torch.zeros(8, dtype=torch.long)
    ascent = ascent_direction(model)
    _, inputs = run_step(mixkl.pgd_at_step, model, x, y, hp)
    torch.manual_seed(0)
    start = torch.empty_like(x).uniform_(-EPS, EPS)
    torch.testing.assert_close(inputs[0] - x, start, rtol=0, atol=1e-7)
    expected = (start + 2 / 255 * ascent).clamp(-EPS, EPS)
    torch.testing.assert_close(inputs[1] - x, expected, rtol=0, atol=1e-6)


def test_pgd_at_trains_with_attack_iters_not_the_evaluations_pgd_iters():
    args, _ = training.parse_args('cifar10', ['--method', 'pgd_at', '--attack-iters', '3',
                                              '--pgd-iters', '7'])
    assert training.hyperparameters(args).attack_iters == 3


def test_cyclic_schedule_peaks_where_asked_and_cycles_momentum_as_cyclic_lr_does():
    total = 110 * 100
    peak = 20 / 110
    factor = [mixkl.lr_factor(i, total, 'cyclic', peak) for i in (0, 1000, 2000, 6500, total)]
    assert factor == pytest.approx([0, 0.5, 1, 0.5, 0])
    # torch's CyclicLR, as the authors' Tiny-ImageNet script builds it, gives the same numbers.
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.2, momentum=0.9)
    cyclic = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.0, max_lr=0.2,
                                               step_size_up=20 * 100, step_size_down=90 * 100)
    for i in range(total):
        if i % 997 == 0:
            group = opt.param_groups[0]
            fraction = mixkl.lr_factor(i, total, 'cyclic', peak)
            assert group['lr'] == pytest.approx(0.2 * fraction, abs=1e-12)
            assert group['momentum'] == pytest.approx(mixkl.momentum_at(fraction, 0.9, 0.8),
                                                      abs=1e-12)
        opt.step()
        cyclic.step()
