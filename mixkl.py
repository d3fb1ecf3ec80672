"""MIX-KL: fast adversarial training with Mixup and a geometric temperature-scaled KL loss.

The method of METHOD.md and nothing else: the loss pieces, the pieces of the
adversarial example, the teacher, the schedules, and one training step
(``mixkl_step``), with the steps of the baselines beside it (FGSM-RS, N-FGSM,
PGD-AT). Every function
takes plain values in final units (``Hyperparameters``: epsilon is 8/255, not 8).
The run around the step (epochs, evaluation, checkpoints, flags) is training.py.
"""
import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from utils import clamp


@dataclass(frozen=True)
class Hyperparameters:
    """The settings of a training step, in final units. training.py builds it from the flags."""
    num_classes: int      # C: 10, 100 or 200
    epsilon: float        # L-inf radius of the training perturbation (8/255)
    alpha: float          # attack step size (8/255; FGSM-RS: 10/255, PGD-AT: 2/255)
    mixup_alpha: float    # mixup coefficient ~ Beta(mixup_alpha, mixup_alpha); 0: no mixup
    delta_init: str       # 'random': half-radius random-sign start; 'zero': start at xm
    lamda: float          # weight of the consistency term (12)
    tau0: float           # temperature at epoch 0 (2.0)
    gamma: float          # temperature decay per epoch (0.99)
    tau_schedule: str     # 'geometric': tau0 * gamma^epoch; 'constant': tau0
    lambda_kl_base: float  # weight of the KL term at tau0 (1.0)
    ema_value: float      # teacher update when adv/clean accuracy of the batch < this (0.82)
    amp: bool             # bf16 autocast in the forwards; the loss terms stay fp32
    # Where the authors' Tiny-ImageNet script differs from their CIFAR scripts (METHOD.md):
    ema_decay_max: float = 0.999  # the teacher's decay is min(this, (k+1)/(k+10)) (Tiny: 0.55)
    con_reference: str = 'clean'  # consistency denominator mse(xm+delta, xm); 'start': xm+delta0
    attack_iters: int = 10        # PGD-AT's steps


# ---------------------------------------------------------------------------
# Loss pieces

def soft_cross_entropy(logits, target):
    """mean_b( -sum_c target[b, c] * log_softmax(logits)[b, c] )"""
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


def geometric_kl(student_logits, teacher_logits, tau):
    """tau^2 * (1/B) * sum_b sum_c geo(zt) * (log geo(zt) - log(geo(za) + 1e-8)).

    geo(z) = normalise(softmax(z / tau) ** (1 / tau)), which is softmax(z / tau^2).
    """
    t2 = tau ** 2
    log_p_teacher = F.log_softmax(teacher_logits / t2, dim=1)
    p_student = F.softmax(student_logits / t2, dim=1)
    kl = log_p_teacher.exp() * (log_p_teacher - torch.log(p_student + 1e-8))
    return t2 * kl.sum() / len(student_logits)


def consistency_loss(adv_logits, clean_logits, adv_features, start_features, xm, delta,
                     delta0=None):
    """(mse(softmax(za), softmax(zc)) + mse(softmax(fa), softmax(feat0))) / (mse(xm+delta, ref) + 0.125)

    ref = xm, or xm + delta0 when delta0 is given (the authors' Tiny-ImageNet script).
    """
    num = (F.mse_loss(F.softmax(adv_logits, 1), F.softmax(clean_logits, 1))
           + F.mse_loss(F.softmax(adv_features, 1), F.softmax(start_features, 1)))
    reference = xm if delta0 is None else xm + delta0
    return num / (F.mse_loss(xm + delta, reference) + 0.125)


def correct(logits, y):
    """#(argmax logits == y), a tensor: read with the step's other numbers in one host sync."""
    return (logits.argmax(1) == y).sum()


# ---------------------------------------------------------------------------
# Building the adversarial example

def mixup(x, y, num_classes, alpha):
    """xm = lam*x + (1-lam)*x[perm], ym likewise on one-hot labels; returns (xm, ym, lam).

    One lam ~ Beta(alpha, alpha) per batch (numpy's RNG), then perm (torch's);
    alpha = 0 turns mixup off (lam = 1, nothing drawn).
    """
    onehot = F.one_hot(y, num_classes).float()
    if alpha <= 0:
        return x, onehot, 1.0
    lam = float(np.random.beta(alpha, alpha))
    perm = torch.randperm(len(x), device=x.device)
    return lam * x + (1 - lam) * x[perm], lam * onehot + (1 - lam) * onehot[perm], lam


def random_start(xm, epsilon, delta_init='random'):
    """delta0 = (eps/2) * sign(u), u ~ U(-eps, eps) clipped to the box; delta0 clipped again."""
    if delta_init == 'zero':
        return torch.zeros_like(xm)
    u = clamp(torch.empty_like(xm).uniform_(-epsilon, epsilon), -xm, 1 - xm)
    return clamp(epsilon / 2 * u.sign(), -xm, 1 - xm)


def fgsm_step(model, xm, ym, delta0, epsilon, alpha):
    """delta = clip(delta0 + alpha * sign(d soft_ce(f(xm + delta0), ym) / d delta0)); (delta, feat0).

    Autograd is asked for d loss / d delta0 only (no parameter gradients). The
    graph is kept: feat0, the features of this forward, still receives gradient
    through the consistency term. delta itself is detached.
    """
    delta0 = delta0.requires_grad_(True)
    logits0, feat0 = model(xm + delta0, return_features=True)
    grad, = torch.autograd.grad(soft_cross_entropy(logits0.float(), ym), delta0,
                                retain_graph=True)
    delta = (delta0.detach() + alpha * grad.sign()).clamp(-epsilon, epsilon)
    return clamp(delta, -xm, 1 - xm), feat0


# ---------------------------------------------------------------------------
# The teacher

class ConditionalEMA:
    """MIX-KL's teacher ("auto weight averaging"), METHOD.md step 7.

    An average of the student, updated only on steps where the student's
    adversarial accuracy falls below ``threshold`` times its clean accuracy.
    Floating-point parameters and buffers are averaged; integer buffers (BN's
    batch counter) are copied. ``model`` starts as a copy of the student.
    """

    def __init__(self, student, threshold, max_decay=0.999):
        self.model = copy.deepcopy(student).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.threshold, self.max_decay = threshold, max_decay
        self.updates = 0

    def wants_update(self, clean_ok, adv_ok):
        return adv_ok / (clean_ok + 1e-8) < self.threshold

    def decay(self):
        return min(self.max_decay, (self.updates + 1) / (self.updates + 10))

    def maybe_update(self, student, clean_ok, adv_ok):
        """Update from ``student`` if ``wants_update``; True if it did."""
        if not self.wants_update(clean_ok, adv_ok):
            return False
        self.update(student)
        return True

    @torch.no_grad()
    def update(self, student):
        """t = decay * t + (1 - decay) * s for every float entry of the state; integers copied."""
        decay = self.decay()
        teacher_state, student_state = self.model.state_dict(), student.state_dict()
        averaged = [k for k, v in teacher_state.items() if v.is_floating_point()]
        copied = [k for k in teacher_state if k not in averaged]
        teacher_floats = [teacher_state[k] for k in averaged]
        torch._foreach_mul_(teacher_floats, decay)
        torch._foreach_add_(teacher_floats, [student_state[k] for k in averaged], alpha=1 - decay)
        for k in copied:
            teacher_state[k].copy_(student_state[k])
        self.updates += 1


# ---------------------------------------------------------------------------
# Schedules

def temperature(epoch, tau0, gamma, schedule='geometric'):
    """tau_e = tau0 * gamma^e (0-based epoch), or tau0 throughout."""
    return tau0 * gamma ** epoch if schedule == 'geometric' else tau0


def kl_weight(tau, tau0, lambda_kl_base):
    """w_kl = lambda_kl_base * (tau / tau0)^2"""
    return lambda_kl_base * (tau / tau0) ** 2


def lr_factor(iteration, total_iterations, schedule, peak=0.5):
    """Learning rate at ``iteration`` (0-based), as a fraction of --lr-max.

    multistep: x0.1 after 99/110 and again after 104/110 of all iterations;
    cyclic: linear 0 -> 1 at the fraction ``peak`` of all iterations, then -> 0
    (torch's CyclicLR with one cycle, as the authors ran it).
    """
    if schedule == 'cyclic':
        x = iteration / total_iterations
        return x / peak if x <= peak else (1 - x) / (1 - peak)
    milestones = (math.floor(total_iterations * 99 / 110), math.floor(total_iterations * 104 / 110))
    return 0.1 ** sum(iteration >= m for m in milestones)


def momentum_at(lr_fraction, momentum, momentum_min):
    """The cyclic schedule's momentum: momentum at lr 0, falling linearly to momentum_min at the
    peak lr (CyclicLR's cycle_momentum; the authors' 0.9 -> 0.8)."""
    return momentum - (momentum - momentum_min) * lr_fraction


# ---------------------------------------------------------------------------
# One training step

@dataclass
class StepResult:
    """What a step reports, as Python numbers."""
    loss: float            # the loss minimised, before the SGD step
    correct: int           # adversarial examples classified as their original label
    n: int                 # images in the batch
    teacher_updated: bool


def autocast(device, enabled):
    """bf16 autocast for the forwards (--amp); a no-op when not enabled."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def mixkl_step(student, teacher, optimizer, x, y, hp, epoch):
    """One MIX-KL step on the batch (x in [0, 1], labels y): METHOD.md steps 1-7.

    ``student`` is in train mode, ``teacher`` a ConditionalEMA of it; under
    torchrun they are the DDP-wrapped student and ddp.SyncedTeacher, and nothing
    here changes. Random draws, in order: lam (numpy), perm, the start (torch).
    """
    tau = temperature(epoch, hp.tau0, hp.gamma, hp.tau_schedule)
    w_kl = kl_weight(tau, hp.tau0, hp.lambda_kl_base)
    xm, ym, _ = mixup(x, y, hp.num_classes, hp.mixup_alpha)                     # 1. mixup
    delta0 = random_start(xm, hp.epsilon, hp.delta_init)                        # 2. random start
    with autocast(x.device, hp.amp):
        delta, feat0 = fgsm_step(student, xm, ym, delta0, hp.epsilon, hp.alpha)  # 3. FGSM step
        za, fa = student(xm + delta, return_features=True)                      # 4. forwards
        zc = student(xm)
        if w_kl:  # the teacher enters the loss only through the KL term
            with torch.no_grad():
                zt = teacher.model(xm + delta)
    za, zc = za.float(), zc.float()
    ce = soft_cross_entropy(za, ym)                                             # 5. loss
    start = delta0.detach() if hp.con_reference == 'start' else None
    con = consistency_loss(za, zc, fa.float(), feat0.float(), xm, delta, start) if hp.lamda else 0.0
    kl = geometric_kl(za, zt.float(), tau) if w_kl else 0.0
    loss = ce + hp.lamda * con + w_kl * kl
    optimizer.zero_grad(set_to_none=True)                                       # 6. SGD step
    loss.backward()
    optimizer.step()
    loss, clean_ok, adv_ok = torch.stack([loss.detach(), correct(zc, y), correct(za, y)]).tolist()
    updated = teacher.maybe_update(student, clean_ok, adv_ok)                   # 7. teacher
    return StepResult(loss, int(adv_ok), len(y), updated)


def fgsm_rs_step(student, teacher, optimizer, x, y, hp, epoch):
    """FGSM-RS (Wong et al. 2020): one FGSM step from a uniform start, cross-entropy on y.

    The same shape as mixkl_step; there is no teacher (``teacher`` is None) and no schedule.
    """
    eps = hp.epsilon
    delta = clamp(torch.empty_like(x).uniform_(-eps, eps), -x, 1 - x).requires_grad_(True)
    with autocast(x.device, hp.amp):
        grad, = torch.autograd.grad(F.cross_entropy(student(x + delta).float(), y), delta)
        delta = clamp((delta.detach() + hp.alpha * grad.sign()).clamp(-eps, eps), -x, 1 - x)
        za = student(x + delta).float()
    return _cross_entropy_update(optimizer, za, y)


def n_fgsm_step(student, teacher, optimizer, x, y, hp, epoch):
    """N-FGSM (de Jorge et al. 2022): noise U(-2eps, 2eps), one FGSM step, no projection to eps.

    The perturbation may end up to 2*eps + alpha from x (only the [0, 1] box is
    enforced): the stronger noise is what keeps single-step training from
    catastrophic overfitting without clipping. Cross-entropy on y; no teacher.
    """
    noise = clamp(torch.empty_like(x).uniform_(-2 * hp.epsilon, 2 * hp.epsilon), -x, 1 - x)
    delta = noise.requires_grad_(True)
    with autocast(x.device, hp.amp):
        grad, = torch.autograd.grad(F.cross_entropy(student(x + delta).float(), y), delta)
        delta = clamp(delta.detach() + hp.alpha * grad.sign(), -x, 1 - x)
        za = student(x + delta).float()
    return _cross_entropy_update(optimizer, za, y)


def pgd_at_step(student, teacher, optimizer, x, y, hp, epoch):
    """PGD-AT (Madry et al. 2018): hp.attack_iters signed steps of hp.alpha from a uniform start.

    Each step is projected back to the eps-ball and the [0, 1] box; cross-entropy
    on y at the result. The model stays in train mode during the attack, as in
    the fast adversarial training literature. No teacher.
    """
    eps = hp.epsilon
    delta = clamp(torch.empty_like(x).uniform_(-eps, eps), -x, 1 - x)
    with autocast(x.device, hp.amp):
        for _ in range(hp.attack_iters):
            delta.requires_grad_(True)
            grad, = torch.autograd.grad(F.cross_entropy(student(x + delta).float(), y), delta)
            delta = clamp((delta.detach() + hp.alpha * grad.sign()).clamp(-eps, eps), -x, 1 - x)
        za = student(x + delta).float()
    return _cross_entropy_update(optimizer, za, y)


def _cross_entropy_update(optimizer, za, y):
    """The baselines' update: one SGD step on cross-entropy at the adversarial logits ``za``."""
    loss = F.cross_entropy(za, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    loss, adv_ok = torch.stack([loss.detach(), correct(za, y)]).tolist()
    return StepResult(loss, int(adv_ok), len(y), teacher_updated=False)


# --method: the step of each training method.
STEPS = {'mixkl': mixkl_step, 'fgsm_rs': fgsm_rs_step, 'n_fgsm': n_fgsm_step,
         'pgd_at': pgd_at_step}
