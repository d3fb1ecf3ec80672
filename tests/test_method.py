"""The pieces of METHOD.md against hand computations, and one whole step against a straight line.

``test_one_step_equals_method_md_written_out`` is the golden test of the method:
it writes METHOD.md steps 1-7 out in plain torch (no loss piece of mixkl.py),
from the same weights and random draws, and compares the loss, the perturbation,
the gradients and the teacher with those of mixkl.mixkl_step.
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mixkl
import training
from preactresnet import PreActResNet18


def flag_hyperparameters(*flags):
    """The step's settings as the training script makes them from these flags (fp32)."""
    return training.hyperparameters(training.parse_args('cifar10', ['--no-amp', *flags])[0])


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
    hp = flag_hyperparameters('--epsilon', str(epsilon), '--alpha', str(alpha))
    eps, step = hp.epsilon, hp.alpha
    assert (eps, step) == (epsilon / 255, alpha / 255), 'the flags are in /255'
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


def test_the_step_starts_half_epsilon_away_and_steps_alpha_from_there():
    """Away from 0 and 1, without mixup: the first forward sees x +- eps/2, the second
    x +- (eps/2 +- alpha): 4/255 and 2/255 or 6/255 at eps 8/255 and alpha 2/255."""
    hp = flag_hyperparameters('--epsilon', '8', '--alpha', '2', '--mixup-alpha', '0')
    torch.manual_seed(0)
    student = PreActResNet18(10, width=4).train()
    teacher = mixkl.ConditionalEMA(student, hp.ema_value)
    x, y = 0.25 + 0.5 * torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    inputs = []
    student.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach()))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    mixkl.mixkl_step(student, teacher, optimizer, x, y, hp, epoch=0)
    delta0, delta = ((inputs[i] - x).abs().mul(255).round() for i in (0, 1))
    assert set(delta0.unique().tolist()) == {4.0}
    assert set(delta.unique().tolist()) == {2.0, 6.0}


def test_consistency_term_by_hand():
    # Two examples, two classes, features of size 2; xm + delta differs from xm by 0.5 in
    # one of four pixels: mse = 0.25 / 4 = 0.0625, so the denominator is 0.1875.
    adv, clean = torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    # softmax([1, 0]) = (e / (e + 1), 1 / (e + 1)) = (0.731059, 0.268941); softmax([0, 0]) = 0.5s.
    # Logits: squared differences 0, 0, 0.231059^2, 0.231059^2 -> mean 0.026694.
    adv_features = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    start_features = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    # softmax([2, 0]) = (0.880797, 0.119203): squared differences 2 * 0.380797^2 -> mean 0.072503.
    xm = torch.zeros(1, 4)
    delta = torch.tensor([[0.5, 0.0, 0.0, 0.0]])
    value = mixkl.consistency_loss(adv, clean, adv_features, start_features, xm, delta)
    expected = (2 * 0.231059 ** 2 / 4 + 2 * 0.380797 ** 2 / 4) / (0.0625 + 0.125)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(0.52906, rel=1e-4)
    # No perturbation: the denominator is 0.125 alone.
    assert mixkl.consistency_loss(adv, clean, adv_features, start_features, xm, 0 * delta).item() \
        == pytest.approx(expected * 0.1875 / 0.125, rel=1e-5)
    # From the start (Tiny-ImageNet): delta0 = 0.25 in the same pixel leaves 0.25^2 / 4 in the
    # denominator; delta0 = delta leaves 0.125 alone.
    from_start = mixkl.consistency_loss(adv, clean, adv_features, start_features, xm, delta,
                                        delta / 2)
    assert from_start.item() == pytest.approx(expected * 0.1875 / (0.015625 + 0.125), rel=1e-5)
    assert mixkl.consistency_loss(adv, clean, adv_features, start_features, xm, delta,
                                  delta).item() == pytest.approx(expected * 0.1875 / 0.125, rel=1e-5)


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


def test_teacher_rule_by_hand():
    """Update when adv_ok / (clean_ok + 1e-8) < 0.82, the --ema-value default; decay (k+1)/(k+10)."""
    threshold = flag_hyperparameters().ema_value
    student = TinyNet()
    teacher = mixkl.ConditionalEMA(student, threshold)
    fill(teacher.model, 0)
    fill(student, 1)
    # 81/100 and 82/100 are below 0.82 (the 1e-8 puts an exact 0.82 just below); 83/100 is not.
    assert [teacher.maybe_update(student, clean_ok=100, adv_ok=a) for a in (83, 81, 82)] == \
        [False, True, True]
    assert teacher.maybe_update(student, clean_ok=0, adv_ok=0), 'no clean hit: 0 < 0.82'
    assert not teacher.maybe_update(student, clean_ok=10, adv_ok=9)
    assert teacher.updates == 3
    # Three updates towards 1 with decays 1/10, 2/11, 3/12.
    expected = 1 - (1 / 10) * (2 / 11) * (3 / 12)
    weight = teacher.model.linear.weight
    assert torch.allclose(weight, torch.full_like(weight, expected))
    assert teacher.decay() == pytest.approx(4 / 13)
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




# ---------------------------------------------------------------------------
# One whole step, written out

# METHOD.md's numbers, typed here rather than read from the project.
EPS, ALPHA, LAMDA, TAU0, GAMMA, KL_BASE, EMA_VALUE, MIXUP = 8 / 255, 8 / 255, 12, 2.0, 0.99, 1.0, \
    0.82, 0.4


def method_md_step(student, teacher, updates, optimizer, x, y, lam, perm, u, epoch,
                   lamda=LAMDA, decay_max=0.999, from_start=False):
    """METHOD.md steps 1-7, line by line. Returns (loss, delta, adv_ok, teacher updated).

    ``from_start``, ``decay_max``: the Tiny-ImageNet script's consistency denominator
    mse(xm+delta, xm+delta0) and its teacher decay cap (METHOD.md, Tiny-ImageNet).
    """
    tau = TAU0 * GAMMA ** epoch
    w_kl = KL_BASE * (tau / TAU0) ** 2
    # 1. mixup
    onehot = F.one_hot(y, 10).float()
    xm = lam * x + (1 - lam) * x[perm]
    ym = lam * onehot + (1 - lam) * onehot[perm]
    # 2. random start: u clipped so that xm + u is in [0, 1]; a half-radius corner, clipped again
    u = torch.max(torch.min(u, 1 - xm), -xm)
    delta0 = torch.max(torch.min(EPS / 2 * torch.sign(u), 1 - xm), -xm).requires_grad_(True)
    # 3. FGSM step
    logits0, feat0 = student(xm + delta0, return_features=True)
    loss0 = -(ym * torch.log_softmax(logits0, 1)).sum(1).mean()
    g, = torch.autograd.grad(loss0, delta0, retain_graph=True)
    delta = (delta0.detach() + ALPHA * torch.sign(g)).clamp(-EPS, EPS)
    delta = torch.max(torch.min(delta, 1 - xm), -xm)
    # 4. forwards
    za, fa = student(xm + delta, return_features=True)
    zc = student(xm)
    with torch.no_grad():
        zt = teacher(xm + delta)
    # 5. loss
    ce = -(ym * torch.log_softmax(za, 1)).sum(1).mean()

    def mse(a, b):
        return ((a - b) ** 2).mean()

    reference = xm + delta0.detach() if from_start else xm
    con = (mse(torch.softmax(za, 1), torch.softmax(zc, 1))
           + mse(torch.softmax(fa, 1), torch.softmax(feat0, 1))) / (mse(xm + delta, reference) + 0.125)

    def geo(z):
        p = torch.softmax(z / tau, 1) ** (1 / tau)
        return p / p.sum(1, keepdim=True)

    pt, ps = geo(zt), geo(za)
    kl = tau ** 2 * (pt * (torch.log(pt) - torch.log(ps + 1e-8))).sum() / len(x)
    loss = ce + lamda * con + w_kl * kl
    # 6. SGD step
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    # 7. conditional teacher update, on the original labels
    clean_ok = (zc.argmax(1) == y).sum().item()
    adv_ok = (za.argmax(1) == y).sum().item()
    update = adv_ok / (clean_ok + 1e-8) < EMA_VALUE
    if update:
        decay = min(decay_max, (updates + 1) / (updates + 10))
        with torch.no_grad():
            s = student.state_dict()
            for name, t in teacher.state_dict().items():
                t.copy_(decay * t + (1 - decay) * s[name] if t.is_floating_point() else s[name])
    return loss.item(), delta, adv_ok, update


# Two batches from the same weights: on the first, adversarial/clean correct = 4/5 = 0.8 (the
# teacher is updated); on the second 7/8 = 0.875 (it is not). Between them lies 0.82.
# The third case is the first batch with the Tiny-ImageNet script's step: lamda 42, the
# denominator from xm + delta0, and the decay capped at 0.55 (k = 20: 21/30 = 0.7 > 0.55).
TINY_STEP = ['--lamda', '42', '--con-reference', 'start', '--ema-decay-max', '0.55']


@pytest.mark.parametrize('seed, ratio, flags, updates', [(27, 0.8, [], 5), (215, 0.875, [], 5),
                                                         (27, 0.8, TINY_STEP, 20)])
def test_one_step_equals_method_md_written_out(seed, ratio, flags, updates, monkeypatch):
    hp = flag_hyperparameters(*flags)  # the training script's defaults
    tiny = dict(lamda=42, decay_max=0.55, from_start=True) if flags else {}
    epoch = 30                   # tau = 2 * 0.99^30: tau != tau0, so both tau factors matter
    torch.manual_seed(0)
    student = PreActResNet18(10, width=4).train()
    teacher = mixkl.ConditionalEMA(student, hp.ema_value, hp.ema_decay_max)
    torch.manual_seed(1)  # a teacher unlike the student, so the KL term is large
    teacher.model.load_state_dict(PreActResNet18(10, width=4).state_dict())
    teacher.updates = updates  # decay 6/15, or 0.55 for k = 20
    g = torch.Generator().manual_seed(1000 + seed)
    x, y = torch.rand(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)

    ours = copy.deepcopy(student), copy.deepcopy(teacher.model)
    ours_opt = torch.optim.SGD(ours[0].parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    # The draws, in mixkl_step's order: lam (numpy), then perm and u (torch).
    np.random.seed(seed)
    torch.manual_seed(seed)
    lam = float(np.random.beta(MIXUP, MIXUP))
    perm = torch.randperm(32)
    u = torch.empty_like(x).uniform_(-EPS, EPS)
    loss, delta, adv_ok, updated = method_md_step(*ours, updates, ours_opt, x, y, lam, perm, u,
                                                  epoch, **tiny)

    inputs = []  # of every forward of the student
    student.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))
    # The two denominators agree in expectation (delta - delta0 and delta take the values
    # eps/2 and eps equally often), so the numbers alone barely tell them apart: record delta0.
    references = []
    consistency = mixkl.consistency_loss
    monkeypatch.setattr(mixkl, 'consistency_loss', lambda *args: references.append(args[6])
                        or consistency(*args))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    np.random.seed(seed)
    torch.manual_seed(seed)
    result = mixkl.mixkl_step(student, teacher, optimizer, x, y, hp, epoch)

    xm = lam * x + (1 - lam) * x[perm]
    assert torch.allclose(inputs[2], xm, atol=1e-6), 'the third forward is the clean one'
    torch.testing.assert_close(inputs[1] - xm, delta, rtol=0, atol=1e-6)
    if flags:
        torch.testing.assert_close(references[0], inputs[0] - xm, rtol=0, atol=1e-6)
    else:
        assert references == [None]
    assert result.loss == pytest.approx(loss, rel=1e-5, abs=1e-5)
    for (name, p), q in zip(student.named_parameters(), ours[0].parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=name)
    assert (result.teacher_updated, updated) == (ratio < 0.82, ratio < 0.82)
    assert teacher.updates == updates + updated
    assert (result.correct, result.n) == (adv_ok, 32)
    for (name, t), r in zip(teacher.model.state_dict().items(), ours[1].state_dict().values()):
        torch.testing.assert_close(t, r, rtol=1e-5, atol=1e-5, msg=name)
    if updated:  # the update moved the teacher, so the comparison above compared something
        assert not torch.equal(teacher.model.linear.weight,
                               PreActResNet18(10, width=4).linear.weight)


def test_amp_runs_the_student_in_bf16_and_keeps_the_loss_in_fp32():
    """--amp: bf16 autocast around the student's calls (on CPU too); the loss terms are fp32."""
    torch.manual_seed(0)
    model = PreActResNet18(10, width=8)
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    results = {}
    for flag in ('--no-amp', '--amp'):
        student = copy.deepcopy(model).train()
        teacher = mixkl.ConditionalEMA(student, 0.82)
        dtypes = []
        student.linear.register_forward_hook(lambda module, inputs, out: dtypes.append(out.dtype))
        optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
        np.random.seed(0)
        torch.manual_seed(0)
        hp = training.hyperparameters(training.parse_args('cifar10', [flag])[0])
        result = mixkl.mixkl_step(student, teacher, optimizer, x, y, hp, epoch=0)
        assert all(p.grad.dtype == torch.float32 for p in student.parameters())
        # Three student calls per step: the FGSM step's, the adversarial one, the clean one.
        assert dtypes == [torch.bfloat16 if flag == '--amp' else torch.float32] * 3
        results[flag] = result.loss
    assert results['--amp'] != results['--no-amp']
    assert results['--amp'] == pytest.approx(results['--no-amp'], rel=0.05)
