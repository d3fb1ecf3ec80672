"""The pieces of METHOD.md, each against a hand computation."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mixkl
from preactresnet import PreActResNet18


def test_geometric_kl_is_tau_squared_kl_of_the_geometric_distributions():
    torch.manual_seed(0)
    student, teacher = torch.randn(16, 10) * 3, torch.randn(16, 10) * 3
    for tau in (0.7, 1.0, 2.0, 3.5):
        def geo(z):  # METHOD.md's form: normalise(softmax(z / tau) ** (1 / tau))
            p = F.softmax(z.double() / tau, 1) ** (1 / tau)
            return p / p.sum(1, keepdim=True)
        p_t, p_s = geo(teacher), geo(student)
        assert torch.allclose(p_t, F.softmax(teacher.double() / tau ** 2, 1))
        expected = tau ** 2 * (p_t * (p_t.log() - (p_s + 1e-8).log())).sum() / 16
        assert mixkl.geometric_kl(student, teacher, tau).item() == pytest.approx(expected.item(),
                                                                                 rel=1e-5)
        assert mixkl.geometric_kl(student, teacher, tau) > 0
        assert abs(mixkl.geometric_kl(teacher, teacher, tau).item()) < 1e-6


def test_soft_cross_entropy_matches_cross_entropy_on_one_hot_targets():
    torch.manual_seed(0)
    logits, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    assert mixkl.soft_cross_entropy(logits, F.one_hot(y, 5).float()).item() == \
        pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)


def test_mixup_is_a_convex_combination_with_matching_soft_labels():
    torch.manual_seed(0)
    np.random.seed(0)
    x, y = torch.rand(32, 3, 4, 4), torch.randint(0, 10, (32,))
    xm, ym, lam = mixkl.mixup(x, y, 10, alpha=0.4)
    assert 0 < lam < 1
    assert torch.allclose(ym.sum(1), torch.ones(32))
    flat = x.flatten(1)
    for b in range(32):
        partner_image = (xm[b].flatten() - lam * flat[b]) / (1 - lam)
        j = (flat - partner_image).abs().amax(1).argmin()
        assert torch.allclose(flat[j], partner_image, atol=1e-4)
        expected = lam * F.one_hot(y[b], 10) + (1 - lam) * F.one_hot(y[j], 10)
        assert torch.allclose(ym[b], expected.float(), atol=1e-6)


def test_mixup_coefficient_follows_beta():
    np.random.seed(1)
    x, y = torch.rand(4, 3, 2, 2), torch.zeros(4, dtype=torch.long)
    lams = np.array([mixkl.mixup(x, y, 10, alpha=0.4)[2] for _ in range(4000)])
    assert abs(lams.mean() - 0.5) < 0.03
    # Beta(0.4, 0.4) is U-shaped: its variance is 1 / (4 * 1.8) = 0.139, above uniform's 0.083.
    assert abs(lams.var() - 1 / 7.2) < 0.01


def test_random_start_is_a_half_radius_corner_inside_the_box():
    torch.manual_seed(0)
    eps = 8 / 255
    xm = torch.rand(16, 3, 8, 8)
    xm[0] = 0.0
    xm[1] = 1.0
    delta0 = mixkl.random_start(xm, eps)
    assert ((xm + delta0) >= 0).all() and ((xm + delta0) <= 1).all()
    interior = (xm >= eps / 2) & (xm <= 1 - eps / 2)
    assert torch.allclose(delta0[interior].abs(), torch.full_like(delta0[interior], eps / 2))
    assert (delta0[interior] > 0).float().mean().item() == pytest.approx(0.5, abs=0.05)
    assert (delta0[0] >= 0).all() and (delta0[1] <= 0).all()


@pytest.mark.parametrize('epsilon,alpha', [(8, 8), (4, 6), (16, 2)])
def test_fgsm_step_stays_in_the_ball_and_box_and_follows_the_gradient_sign(epsilon, alpha):
    args, _ = mixkl.parse_args('cifar10', ['--epsilon', str(epsilon), '--alpha', str(alpha)])
    eps, step = args.epsilon / 255, args.alpha / 255
    torch.manual_seed(0)
    model = PreActResNet18(10, width=4)
    xm = torch.rand(8, 3, 32, 32)
    ym = F.one_hot(torch.randint(0, 10, (8,)), 10).float()
    delta0 = mixkl.random_start(xm, eps)
    delta, features0 = mixkl.fgsm_step(model, xm, ym, delta0.clone(), eps, step)
    assert delta.abs().max() <= eps + 1e-7
    assert ((xm + delta) >= 0).all() and ((xm + delta) <= 1).all()
    assert all(p.grad is None for p in model.parameters()), 'no parameter gradients'
    assert features0.requires_grad, 'the first forward feeds the consistency term'
    # Same step computed with a plain backward.
    d = delta0.clone().requires_grad_(True)
    mixkl.soft_cross_entropy(model(xm + d), ym).backward()
    expected = torch.max(torch.min((delta0 + step * d.grad.sign()).clamp(-eps, eps), 1 - xm), -xm)
    assert torch.allclose(delta, expected)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x):
        return self.bn(self.linear(x))


def fill(model, value):
    with torch.no_grad():
        for t in model.state_dict().values():
            t.fill_(value)


def test_teacher_update_condition_and_decay():
    teacher = mixkl.ConditionalEMA(TinyNet(), threshold=0.82)
    assert teacher.wants_update(clean_correct=100, adv_correct=81)
    # The 1e-8 in the denominator puts an exact 0.82 just below the threshold.
    assert teacher.wants_update(clean_correct=100, adv_correct=82)
    assert not teacher.wants_update(clean_correct=100, adv_correct=83)
    assert teacher.wants_update(clean_correct=0, adv_correct=0)
    assert [teacher.decay()] == [pytest.approx(1 / 10)]
    teacher.updates = 5
    assert teacher.decay() == pytest.approx(6 / 15)
    teacher.updates = 100000
    assert teacher.decay() == 0.999


def test_teacher_update_averages_floats_and_copies_integers():
    student = TinyNet()
    teacher = mixkl.ConditionalEMA(student, threshold=0.82)
    fill(teacher.model, 0)
    fill(student, 1)
    student.bn.num_batches_tracked.fill_(7)
    teacher.update(student)          # decay 1/10
    teacher.update(student)          # decay 2/11
    expected = 2 / 11 * 0.9 + 9 / 11 * 1.0
    for name, t in teacher.model.state_dict().items():
        if name.endswith('num_batches_tracked'):
            assert t.dtype == torch.long and t.item() == 7
        else:
            assert torch.allclose(t, torch.full_like(t, expected)), name
    assert teacher.updates == 2
    assert not teacher.model.training
    assert all(not p.requires_grad for p in teacher.model.parameters())


def test_temperature_and_kl_weight_schedules():
    assert mixkl.temperature(0, 2.0, 0.99) == 2.0
    assert mixkl.temperature(50, 2.0, 0.99) == pytest.approx(2.0 * 0.99 ** 50)
    assert mixkl.temperature(109, 2.0, 0.99) == pytest.approx(0.66875, abs=1e-4)
    assert mixkl.temperature(50, 2.0, 0.99, 'constant') == 2.0
    tau = mixkl.temperature(30, 2.0, 0.99)
    assert mixkl.kl_weight(tau, 2.0, 1.0) == pytest.approx(0.99 ** 60)
    assert mixkl.kl_weight(tau, 2.0, 0.0) == 0.0


def test_learning_rate_milestones():
    per_epoch = 391
    total = 110 * per_epoch
    factor = [mixkl.lr_factor(i, total, 'multistep') for i in
              (0, 99 * per_epoch - 1, 99 * per_epoch, 104 * per_epoch - 1, 104 * per_epoch,
               total - 1)]
    assert factor == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cyclic = [mixkl.lr_factor(i, 1000, 'cyclic') for i in (0, 250, 500, 750, 1000)]
    assert cyclic == pytest.approx([0, 0.5, 1, 0.5, 0])


def test_mixkl_loss_adds_the_three_terms():
    args, _ = mixkl.parse_args('cifar10', [])
    torch.manual_seed(0)
    np.random.seed(0)
    student = PreActResNet18(10, width=4)
    teacher = mixkl.ConditionalEMA(student, 0.82)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    state = (torch.get_rng_state(), np.random.get_state())
    full, _, _ = mixkl.mixkl_loss(args, student, teacher, x, y, 2.0, 1.0, 10)
    torch.set_rng_state(state[0])
    np.random.set_state(state[1])
    args.lamda = 0
    ce_only, _, _ = mixkl.mixkl_loss(args, student, teacher, x, y, 2.0, 0.0, 10)
    assert math.isfinite(full.item()) and full.item() > ce_only.item() > 0


def test_amp_runs_the_student_in_bf16_and_keeps_the_loss_in_fp32():
    """--amp: bf16 autocast around the student's calls (on CPU too); the loss terms are fp32."""
    torch.manual_seed(0)
    student = PreActResNet18(10, width=8)
    teacher = mixkl.ConditionalEMA(student, 0.82)
    output_dtypes = []
    student.linear.register_forward_hook(lambda module, inputs, out:
                                         output_dtypes.append(out.dtype))
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    state = (torch.get_rng_state(), np.random.get_state())
    losses = {}
    for flag in ('--no-amp', '--amp'):
        args, _ = mixkl.parse_args('cifar10', [flag])
        torch.set_rng_state(state[0])
        np.random.set_state(state[1])
        loss, clean_logits, adv_logits = mixkl.mixkl_loss(args, student, teacher, x, y,
                                                          2.0, 1.0, 10)
        assert loss.dtype == clean_logits.dtype == adv_logits.dtype == torch.float32
        loss.backward()
        assert all(p.grad.dtype == torch.float32 for p in student.parameters())
        losses[flag] = loss.item()
    # Three student calls per step: the FGSM step's, the adversarial one, the clean one.
    assert output_dtypes == [torch.float32] * 3 + [torch.bfloat16] * 3
    assert losses['--amp'] != losses['--no-amp']
    assert losses['--amp'] == pytest.approx(losses['--no-amp'], rel=0.05)
