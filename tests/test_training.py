"""The training scripts end to end: outputs, learning, resuming, signals and bad input."""
import concurrent.futures
import errno
import json
import os
import shutil
import signal
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

import ddp
import flags
import mixkl
import runs
import training
from conftest import backend_flags, load_weights, read_metrics, run_script, same_weights
from conftest import run_dirs as run_dirs_in
from preactresnet import PreActResNet18
from synthetic import write_synthetic_cifar
from utils import InputError, attack_fgsm, load_cifar, load_model_weights

TINY = ['--train-examples', '256', '--eval-examples', '64', '--batch-size', '64', '--width', '8',
        '--alarm-examples', '32', '--eval-batch-size', '64']


def train(dataset, cwd, *args, wait=True):
    """The training script of ``dataset`` in ``cwd``, on cwd/data, writing to cwd/output."""
    return run_script(dataset, '--out_dir', 'output', '--data-dir', 'data', *args, cwd=cwd,
                      wait=wait)


def run_dirs(cwd):
    return run_dirs_in(os.path.join(cwd, 'output'))


@pytest.fixture(scope='module', params=['cifar10', 'cifar100'])
def finished_run(request, tmp_path_factory):
    """One finished one-epoch run per dataset, shared by the tests that read it."""
    dataset = request.param
    cwd = tmp_path_factory.mktemp(dataset)
    write_synthetic_cifar(str(cwd / 'data'), dataset, n_train=300, n_test=80, seed=1)
    proc = train(dataset, cwd, '--epochs', '1', *TINY)
    assert proc.returncode == 0, proc.stderr
    run_dir, = run_dirs(cwd)
    return dataset, cwd, run_dir, proc


def test_a_run_writes_reloadable_checkpoints_and_one_sane_metrics_row(finished_run):
    dataset, cwd, run_dir, proc = finished_run
    classes = 10 if dataset == 'cifar10' else 100
    assert f'run directory: {run_dir}' in proc.stdout
    assert proc.stdout.strip().endswith(run_dir), 'the run directory is printed at the end'
    for name in ('best_model.pth', 'final_model.pth'):
        model = PreActResNet18(classes, width=8)
        model.load_state_dict(load_weights(os.path.join(run_dir, name)))
    row, = read_metrics(run_dir)
    assert set(row) == set(runs.METRIC_FIELDS)
    assert row['epoch'] == '1'
    assert float(row['tau']) == 2.0 and float(row['kl_weight']) == 1.0
    checkpoint = load_weights(os.path.join(run_dir, 'checkpoint.pth'))
    assert int(row['teacher_updates']) == checkpoint['teacher_updates'], 'one epoch: all of them'
    # 4 steps of 64: both multistep milestones (floor(4 * 99/110) = floor(4 * 104/110) = 3) passed.
    assert float(row['lr']) == pytest.approx(0.1 * 0.1 * 0.1)
    assert (float(row['train_acc']) * 256).is_integer(), 'a count over the 256 training images'
    # The accuracies, recomputed from the saved models and the images in the data files.
    x_test, y_test = load_cifar(dataset, str(cwd / 'data'), train=False, quiet=True)
    x_train, y_train = load_cifar(dataset, str(cwd / 'data'), train=True, quiet=True)
    best = load_model_weights(os.path.join(run_dir, 'best_model.pth'), dataset).eval()
    x, y = x_test[:64].float() / 255, y_test[:64]
    with torch.no_grad():
        assert float(row['test_clean_acc']) == (best(x).argmax(1) == y).float().mean().item()
    student = PreActResNet18(classes, width=8).eval()
    student.load_state_dict(load_weights(os.path.join(run_dir, 'checkpoint.pth'))['student'])
    x, y = x_train[:32].float() / 255, y_train[:32]
    fgsm = student(x + attack_fgsm(student, x, y, 8 / 255)).argmax(1) == y
    assert float(row['alarm_fgsm_acc']) == fgsm.float().mean().item()
    assert float(row['test_pgd_acc']) <= float(row['test_clean_acc'])
    assert float(row['train_loss']) > 0 and float(row['seconds']) > 0
    config = json.load(open(os.path.join(run_dir, 'config.json')))
    assert config['dataset'] == dataset and config['lamda'] == 12.0 and config['ema_value'] == 0.82
    assert config['amp'] is False, 'bf16 autocast is off by default on CPU'
    # Every flag as the script's parser made it, and what the run ran on and read.
    args = vars(training.parse_args(dataset, ['--out_dir', 'output', '--data-dir', 'data',
                                              '--epochs', '1', *TINY])[0])
    assert {k: config[k] for k in args} == dict(args, amp=False, channels_last=False)
    assert (config['device_used'], config['world_size'], config['torch']) == \
        ('cpu', 1, torch.__version__)
    assert config['data_sha256'] == training.data_digest(x_train, y_train, x_test, y_test)
    assert config['command'] == ' '.join([flags.TRAINING_SCRIPTS[dataset], '--out_dir', 'output',
                                          '--data-dir', 'data', '--epochs', '1', *TINY])
    log = open(os.path.join(run_dir, 'train.log')).read()
    assert 'device cpu, epochs 1..1\n' in log
    number = lambda key, spec='.4f': format(float(row[key]), spec)
    assert (f"epoch 1/1  {number('seconds', '.1f')}s+{number('eval_seconds', '.1f')}s  "
            f"lr {number('lr', '.4g')}  loss {number('train_loss')}  "
            f"train acc {number('train_acc')}  tau {number('tau')}  "
            f"teacher updates {row['teacher_updates']}  test clean {number('test_clean_acc')}  "
            f"PGD-10 {number('test_pgd_acc')}\n") in log
    assert f"done: best test PGD accuracy {number('test_pgd_acc')}; " in log


def test_the_best_checkpoint_is_the_teacher_at_its_best_epoch(finished_run):
    _, _, run_dir, _ = finished_run
    best, final = (load_weights(os.path.join(run_dir, n)) for n in ('best_model.pth', 'final_model.pth'))
    checkpoint = load_weights(os.path.join(run_dir, 'checkpoint.pth'))
    assert all(torch.equal(best[k], final[k]) for k in best), 'one epoch: best is final'
    assert all(torch.equal(final[k], checkpoint['teacher'][k]) for k in final)
    assert not all(torch.equal(final[k], checkpoint['student'][k]) for k in final)


def test_resume_refuses_a_run_of_the_other_dataset_or_width(finished_run):
    dataset, cwd, run_dir, _ = finished_run
    other = 'cifar100' if dataset == 'cifar10' else 'cifar10'
    proc = train(other, cwd, '--resume', run_dir)
    assert proc.returncode == 2 and 'resume it with MIX_KL_CIFAR' in proc.stderr
    proc = train(dataset, cwd, '--resume', run_dir, '--width', '16')
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith('the run was trained with --width 8, not 16')


def test_training_learns_a_learnable_task(tmp_path):
    write_synthetic_cifar(str(tmp_path / 'data'), 'cifar10', n_train=512, n_test=128, seed=2,
                          learnable=True)
    proc = train('cifar10', tmp_path, '--epochs', '4', '--batch-size', '32', '--width', '8',
                 '--alarm-examples', '16', '--lr-max', '0.02')
    assert proc.returncode == 0, proc.stderr
    rows = read_metrics(run_dirs(tmp_path)[0])
    assert len(rows) == 4
    assert float(rows[-1]['test_clean_acc']) > 0.3, 'chance is 0.1'
    assert float(rows[-1]['test_pgd_acc']) > 0.2


def test_the_per_epoch_evaluation_runs_in_full_fp32_without_cudnn_autotuning(
        tmp_path, monkeypatch, backend_flags_on):
    """PGD's batches shrink as it breaks examples: autotuning would time every size anew.
    Attacks run in fp32, TF32 off, though training steps use it on CUDA."""
    write_synthetic_cifar(str(tmp_path / 'data'), 'cifar10', n_train=32, n_test=16, seed=2)
    seen = []
    evaluate = training.evaluate_robustness

    def recording(*args, **kwargs):
        seen.append(backend_flags())
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(training, 'evaluate_robustness', recording)
    args, parser = training.parse_args('cifar10', [
        '--data-dir', str(tmp_path / 'data'), '--out_dir', str(tmp_path / 'output'),
        '--epochs', '2', '--batch-size', '16', '--width', '8', '--alarm-examples', '8'])
    assert training.Trainer(args, parser).fit() == 0
    assert seen == [(False, False, False)] * 2
    assert backend_flags() == (True, True, True), 'training steps keep them'


def test_what_a_gpu_run_does_runs_on_cpu(tmp_path, monkeypatch):
    """CUDA's defaults, apart from the backend switches: bf16 autocast in the training forwards,
    channels_last models, and an fp32 evaluation of models in eval mode after each epoch."""
    write_synthetic_cifar(str(tmp_path / 'data'), 'cifar10', n_train=32, n_test=16, seed=2)
    args, parser = training.parse_args('cifar10', [
        '--data-dir', str(tmp_path / 'data'), '--out_dir', str(tmp_path / 'output'),
        '--epochs', '1', '--batch-size', '16', '--width', '8', '--alarm-examples', '8',
        '--amp', '--channels-last'])
    trainer = training.Trainer(args, parser)
    for model in (trainer.student, trainer.teacher.model):
        convs = [p for p in model.parameters() if p.dim() == 4]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    phase, seen = ['train'], []
    for name, model in (('student', trainer.student), ('teacher', trainer.teacher.model)):
        model.linear.register_forward_hook(lambda module, inputs, out, name=name: seen.append(
            (phase[0], name, module.training, out.dtype)))
    end_epoch = trainer.end_epoch

    def evaluating(epoch, stop):
        phase[0] = 'eval'
        done = end_epoch(epoch, stop)
        phase[0] = 'train'
        return done

    monkeypatch.setattr(trainer, 'end_epoch', evaluating)
    assert trainer.fit() == 0
    train_calls = {(name, mode, dtype) for p, name, mode, dtype in seen if p == 'train'}
    assert train_calls == {('student', True, torch.bfloat16), ('teacher', False, torch.bfloat16)}
    eval_calls = {(name, mode, dtype) for p, name, mode, dtype in seen if p == 'eval'}
    # The teacher on the test set, the student on the overfitting alarm's training images.
    assert eval_calls == {('student', False, torch.float32), ('teacher', False, torch.float32)}
    config = json.load(open(os.path.join(trainer.run_dir, 'config.json')))
    assert config['amp'] is True and config['channels_last'] is True


def wait_for(exists, proc, timeout=300):
    start = time.time()
    while not exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - start < timeout
        time.sleep(0.02)


def wait_for_file(cwd, name, proc):
    """Wait until the (only) run directory under cwd/output holds ``name``; return its path."""
    def found():
        out = os.path.join(cwd, 'output')
        return os.path.isdir(out) and any(os.path.exists(os.path.join(d, name))
                                          for d in run_dirs(cwd))
    wait_for(found, proc)
    return os.path.join(run_dirs(cwd)[0], name)


def test_an_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    write_synthetic_cifar(str(tmp_path / 'data'), 'cifar10', n_train=128, n_test=64, seed=3)
    # 16 steps an epoch: the signal, sent when epoch 1 is written, lands inside epoch 2.
    # --amp and --channels-last (CUDA's defaults, off on CPU): the resumed run must keep them.
    args = ['--epochs', '2', '--seed', '5', *TINY, '--train-examples', '128', '--batch-size', '8',
            '--amp', '--channels-last']
    whole = tmp_path / 'whole'
    os.makedirs(whole)
    os.symlink(tmp_path / 'data', whole / 'data')
    assert train('cifar10', whole, *args).returncode == 0
    reference = run_dirs(whole)[0]

    proc = train('cifar10', tmp_path, *args, wait=False)
    wait_for_file(tmp_path, 'metrics.csv', proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    run_dir = run_dirs(tmp_path)[0]
    assert proc.returncode == 128 + signal.SIGINT, err
    assert f'--resume {run_dir}' in out
    assert not os.path.exists(os.path.join(run_dir, 'final_model.pth'))
    stopped = load_weights(os.path.join(run_dir, 'checkpoint.pth'))
    assert stopped['epoch'] == 1 and 0 <= stopped['step'] < 16
    assert stopped['stats']['seconds'] > 0, 'the time trained before the stop is kept'
    assert f"stopped at epoch 2, step {stopped['step']}; checkpoint saved." in out

    resumed = train('cifar10', tmp_path, '--resume', run_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {run_dir}/checkpoint.pth at epoch 2, step {stopped['step']}\n" in \
        resumed.stdout and 'epochs 2..2\n' in resumed.stdout
    a = load_weights(os.path.join(reference, 'final_model.pth'))
    b = load_weights(os.path.join(run_dir, 'final_model.pth'))
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) < 1e-6
    assert read_metrics(run_dir, times=False) == read_metrics(reference, times=False)
    log = open(os.path.join(run_dir, 'train.log')).read()
    assert log.count('run directory:') == 2, 'the log is appended to'


def test_sigterm_saves_a_resumable_checkpoint(tmp_path):
    write_synthetic_cifar(str(tmp_path / 'data'), 'cifar10', n_train=512, n_test=32, seed=4)
    proc = train('cifar10', tmp_path, '--epochs', '3', *TINY, '--train-examples', '512',
                 '--batch-size', '16', wait=False)
    log = wait_for_file(tmp_path, 'train.log', proc)
    wait_for(lambda: open(log).read().count('\n') >= 2, proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert 'SIGTERM' in err and 'Resume with: python MIX_KL_CIFAR10.py --resume' in out
    checkpoint = load_weights(os.path.join(run_dirs(tmp_path)[0], 'checkpoint.pth'))
    assert checkpoint['epoch'] == 0 and 0 <= checkpoint['step'] < 32


def test_a_second_signal_quits_at_once_without_a_checkpoint(capsys):
    # As they were: Python's own, or SIG_IGN in a process started in the background.
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stop = training.StopSignal()
    with stop:
        os.kill(os.getpid(), signal.SIGTERM)  # the first asks for a checkpoint
        assert stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler interrupts this at once
    assert 'SIGTERM: saving a checkpoint after this step' in capsys.readouterr().err
    assert {s: signal.getsignal(s) for s in before} == before, 'handlers restored'


@pytest.mark.parametrize('too_much, epoch, kept', [
    (['--lamda', '1e6'], 1, []),  # a non-finite loss at the second step
    ([], 2, ['checkpoint.pth', 'best_model.pth']),  # weights past the limit in epoch 2
])
def test_a_diverged_run_stops_with_status_1_and_saves_no_diverged_weights(tmp_path, too_much,
                                                                          epoch, kept):
    """Diverged: a non-finite loss, or a weight not finite or beyond training.WEIGHT_LIMIT."""
    write_synthetic_cifar(str(tmp_path / 'data'), 'cifar10', n_train=64, n_test=16, seed=5)
    proc = train('cifar10', tmp_path, '--epochs', '12', '--lr-max', '10', *too_much,
                 '--train-examples', '64', '--batch-size', '32', '--width', '8',
                 '--alarm-examples', '16', '--eval-examples', '16')
    assert proc.returncode == 1, proc.stderr
    run_dir = run_dirs(tmp_path)[0]
    message = proc.stdout.strip().splitlines()[-1]
    assert message.startswith('error: the run diverged: ') and f'epoch {epoch}, step' in message
    assert runs.diverged(run_dir) == message, 'train.log ends with it: the grid reads it there'
    assert sorted(n for n in os.listdir(run_dir) if n.endswith('.pth')) == sorted(kept)
    if kept:
        assert message.endswith(f'Kept in {run_dir}, from before it diverged: {", ".join(kept)}.')
        checkpoint = load_weights(os.path.join(run_dir, 'checkpoint.pth'))
        assert checkpoint['epoch'] == epoch - 1 and len(read_metrics(run_dir)) == epoch - 1
        for state in (checkpoint['student'], checkpoint['teacher'],
                      load_weights(os.path.join(run_dir, 'best_model.pth'))):
            assert all(v.abs().max() <= training.WEIGHT_LIMIT for v in state.values()
                       if v.is_floating_point())
    else:
        assert message.endswith(f'Nothing was saved in {run_dir} before it diverged.')


def test_weights_beyond_the_limit_or_not_finite_are_named():
    student, teacher = PreActResNet18(10, 4), PreActResNet18(10, 4)
    assert training.weights_diverged({'student': student, 'teacher': teacher}) is None
    with torch.no_grad():
        teacher.layer2[0].bn1.running_var[3] = float('nan')
    assert training.weights_diverged({'student': student, 'teacher': teacher}) == \
        'teacher layer2.0.bn1.running_var'
    with torch.no_grad():
        student.linear.bias[0] = 2 * training.WEIGHT_LIMIT
    assert training.weights_diverged({'student': student}) == 'student linear.bias'


@pytest.mark.parametrize('flags,message', [
    (['--epochs', '0'], 'argument --epochs: 0 must be >= 1'),
    (['--batch-size', '0'], 'argument --batch-size: 0 must be >= 1'),
    (['--epsilon', '-1'], 'argument --epsilon: -1.0 must be >= 0'),
    (['--ema-value', '0'], 'argument --ema-value: 0.0 must be > 0'),
    (['--ema-value', '1.5'], 'argument --ema-value: 1.5 must be <= 1'),
    (['--lr-schedule', 'cosine'], "argument --lr-schedule: invalid choice: 'cosine'"),
    (['--epochs', 'ten'], "argument --epochs: 'ten' is not an int"),
    (['--momentum', 'nan'], "argument --momentum: 'nan' is not a finite number"),
    (['--ema-value', 'nan'], "argument --ema-value: 'nan' is not a finite number"),
    (['--lr-max', 'inf'], "argument --lr-max: 'inf' is not a finite number"),
    (['--alpha=-inf'], "argument --alpha: '-inf' is not a finite number"),
    (['--epsilon', '256'], 'argument --epsilon: 256.0 must be <= 255'),
    (['--pgd-alpha', 'nan'], "argument --pgd-alpha: 'nan' is not a finite number"),
    (['--tau0', '0'], 'argument --tau0: 0.0 must be > 0'),
    (['--gamma', '1.5'], 'argument --gamma: 1.5 must be <= 1'),
    (['--lamda', 'nan'], "argument --lamda: 'nan' is not a finite number"),
    (['--lambda-kl-base', 'inf'], "argument --lambda-kl-base: 'inf' is not a finite number"),
    (['--mixup-alpha', '-1'], 'argument --mixup-alpha: -1.0 must be >= 0'),
    (['--weight-decay', 'nan'], "argument --weight-decay: 'nan' is not a finite number"),
    (['--lr-max', '10.5'], 'argument --lr-max: 10.5 must be <= 10'),
    (['--weight-decay', '1.01'], 'argument --weight-decay: 1.01 must be <= 1'),
    (['--seed', '1e20'], "argument --seed: '1e20' is not an int"),
    (['--seed', str(2 ** 40)], f'argument --seed: {2 ** 40} must be <= {2 ** 31 - 1}'),
    (['--seed', '-1'], 'argument --seed: -1 must be >= 0'),
    (['--width', str(10 ** 20)], f'argument --width: {10 ** 20} must be <= 1024'),
])
def test_nonsense_flags_are_argument_errors(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        training.parse_args('cifar10', flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_data_and_output_give_one_line_errors_before_training(tmp_path):
    write_synthetic_cifar(str(tmp_path / 'data'), 'cifar10', n_train=50, n_test=10)
    batch = tmp_path / 'data' / 'cifar-10-batches-py' / 'data_batch_3'
    batch.write_bytes(batch.read_bytes()[:300])
    proc = train('cifar10', tmp_path, '--epochs', '1')
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith('error: data/cifar-10-batches-py/data_batch_3: not a '
                                          'readable CIFAR batch file')
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not os.listdir(tmp_path / 'output'), 'no run directory for a run that never started'

    proc = train('cifar10', tmp_path, '--epochs', '1', '--sync-bn')
    assert proc.returncode == 2 and 'this run has one process' in proc.stderr

    (tmp_path / 'a-file').write_text('')
    proc = run_script('cifar10', '--out_dir', 'a-file/runs', '--data-dir', 'data', cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith('error: --out_dir a-file/runs: cannot write there')


# ---------------------------------------------------------------------------
# Runs and resume, in process: the data, the flags, the lock, leftovers, threads, signals

def tiny_args(tmp, *flags, data='data'):
    return training.parse_args('cifar10', [
        '--data-dir', str(tmp / data), '--out_dir', str(tmp / 'output'), '--epochs', '2',
        '--batch-size', '16', '--width', '8', '--alarm-examples', '8', *flags])


def test_the_cuda_random_state_is_saved_and_restored_with_the_others(monkeypatch):
    cuda_state, restored = [torch.tensor([1, 2], dtype=torch.uint8)], []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_rng_state_all', lambda: cuda_state)
    monkeypatch.setattr(torch.cuda, 'set_rng_state_all', restored.append)
    state = training.rng_state()
    assert state['cuda'] is cuda_state
    training.set_rng_state(state)
    assert restored == [cuda_state]


def test_numpys_cached_gaussian_is_part_of_the_random_state():
    """np.random.beta (mixup) draws Gaussians for alpha > 1: the cached one resumes too."""
    np.random.seed(0)
    np.random.standard_normal()  # leaves the second of a pair cached
    state = training.rng_state()
    following = np.random.standard_normal()
    training.set_rng_state(state)
    assert np.random.standard_normal() == following


def test_amp_and_channels_last_default_to_what_the_runs_device_takes(tmp_path, monkeypatch):
    write_synthetic_cifar(str(tmp_path / 'data'), 'cifar10', n_train=32, n_test=16, seed=2)
    seen = []
    monkeypatch.setattr(training, 'cuda_default', lambda device: seen.append(device) or True)
    trainer = training.Trainer(*tiny_args(tmp_path))
    assert seen == [torch.device('cpu')] * 2
    assert (trainer.args.amp, trainer.args.channels_last, trainer.hp.amp) == (True, True, True)


class FirstOfTwoProcesses(ddp.Distributed):
    """Rank 0 of two as the trainer sees it, the other rank stood in for by this one."""

    def __init__(self):
        super().__init__(0, 2, 0, torch.device('cpu'))

    def barrier(self):
        pass

    def all_sum(self, values):
        return values

    def broadcast_object(self, obj):
        return obj

    def gather_objects(self, obj):
        return [obj, obj]

    def broadcast_(self, tensors):
        pass

    def identical(self, tensors):
        return True


class AsWrapped(nn.Module):
    """DistributedDataParallel's shape without its collectives: the model as ``module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_a_torchrun_run_whose_last_batch_leaves_a_process_no_image_is_refused(tmp_path):
    write_synthetic_cifar(str(tmp_path / 'data'), 'cifar10', n_train=40, n_test=8, seed=2)
    args, parser = tiny_args(tmp_path, '--train-examples', '33')  # batches of 16, 16 and 1
    with pytest.raises(InputError, match=r'^a batch of 1 training image\(s\) cannot be shared '
                                         'by 2 processes'):
        training.Trainer(args, parser, FirstOfTwoProcesses())


def test_sync_bn_turns_the_torchrun_students_batchnorms_into_syncbatchnorms(tmp_path,
                                                                           monkeypatch):
    """Built as under torchrun (the collectives and DDP stood in for): the student the step
    trains and the optimizer steps has SyncBatchNorm layers; the teacher keeps BatchNorm."""
    monkeypatch.setattr(training, 'wrap_ddp', lambda model, device: AsWrapped(model))
    args, _ = tiny_args(tmp_path, '--sync-bn')
    args.amp = args.channels_last = False
    trainer = SimpleNamespace(args=args, dist=FirstOfTwoProcesses(),
                              device=torch.device('cpu'), hp=training.hyperparameters(args),
                              train_loader=[None] * 2, _cycle_momentum=lambda: None)
    training.Trainer._build_models(trainer)
    kinds = lambda model: {type(m) for m in model.modules()} & {nn.BatchNorm2d, nn.SyncBatchNorm}
    assert kinds(trainer.student) == kinds(trainer.trained) == {nn.SyncBatchNorm}
    assert kinds(trainer.teacher.model) == {nn.BatchNorm2d}
    stepped = {id(p) for group in trainer.optimizer.param_groups for p in group['params']}
    assert stepped == {id(p) for p in trainer.student.parameters()}


def test_a_new_run_holds_its_directorys_lock_from_the_start(tmp_path):
    write_synthetic_cifar(str(tmp_path / 'data'), 'cifar10', n_train=32, n_test=16, seed=2)
    trainer = training.Trainer(*tiny_args(tmp_path))
    assert runs.in_use(trainer.run_dir)
    with pytest.raises(InputError, match='is in use'):
        runs.lock_run_dir(trainer.run_dir)
    trainer.release()
    assert not runs.in_use(trainer.run_dir)


def test_a_stop_requested_before_the_evaluation_skips_it():
    stop = training.StopSignal()
    stop.signum = signal.SIGTERM
    with pytest.raises(training.Interrupted):
        with stop.interrupting():
            pytest.fail('evaluated after the signal')


def test_the_temporaries_of_every_file_of_a_run_a_kill_left_are_removed(tmp_path):
    for name in ('checkpoint.pth', 'best_model.pth', 'final_model.pth', 'metrics.csv',
                 'config.json', 'curves.png', 'results.json'):
        (tmp_path / f'.{name}.abcdefgh').write_text('half written')
    runs.remove_leftover_temporaries(str(tmp_path))
    assert os.listdir(tmp_path) == ['.results.json.abcdefgh'], 'not a file training writes'


def test_replicas_that_differ_between_torchrun_processes_stop_the_run(tmp_path):
    looks = []
    trainer = SimpleNamespace(dist=SimpleNamespace(enabled=True, world_size=2,
                                                   identical=lambda tensors: looks.pop(0)),
                              student=PreActResNet18(10, 4),
                              teacher=SimpleNamespace(model=PreActResNet18(10, 4)))
    for seen, differs in (([False], 'student'), ([True, False], 'teacher')):
        looks[:] = seen
        with pytest.raises(RuntimeError, match=f'after epoch 3 the {differs} differs between '
                                               'the 2 processes'):
            training.Trainer._check_replicas(trainer, 2)
    looks[:] = [True, True]
    training.Trainer._check_replicas(trainer, 2)
    assert looks == []


def test_sync_bn_on_cpu_processes_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(InputError, match='--sync-bn needs CUDA'):
        training.Trainer(*tiny_args(tmp_path, '--sync-bn'),
                         ddp.Distributed(0, 2, 0, torch.device('cpu')))


@pytest.fixture
def tiny_run(tmp_path):
    """A finished 2-epoch run trained with --lr-max 0.05: its run directory."""
    write_synthetic_cifar(str(tmp_path / 'data'), 'cifar10', n_train=32, n_test=16, seed=2)
    trainer = training.Trainer(*tiny_args(tmp_path, '--lr-max', '0.05'))
    assert trainer.fit() == 0
    return tmp_path, trainer.run_dir


def resume(tmp, run_dir, *flags, data='data'):
    return training.Trainer(*tiny_args(tmp, '--resume', run_dir, *flags, data=data))


def test_a_resumed_trainer_holds_everything_its_checkpoint_saved(tiny_run):
    """Best accuracy so far, history, epoch statistics, position, teacher updates, weights,
    optimiser: a resume that forgot one (best_pgd: a worse epoch would overwrite
    best_model.pth) would not continue the run."""
    tmp, run_dir = tiny_run
    saved = load_weights(os.path.join(run_dir, 'checkpoint.pth'))
    assert saved['best_pgd'] >= 0 and len(saved['history']) == 2
    trainer = resume(tmp, run_dir)
    try:
        assert (trainer.best_pgd, trainer.history, trainer.stats, trainer.epoch, trainer.step,
                trainer.teacher.updates) == (saved['best_pgd'], saved['history'], saved['stats'],
                                             saved['epoch'], saved['step'],
                                             saved['teacher_updates'])
        for model, key in ((trainer.student, 'student'), (trainer.teacher.model, 'teacher')):
            assert all(torch.equal(v, saved[key][k]) for k, v in model.state_dict().items())
        assert trainer.optimizer.state_dict()['param_groups'] == \
            saved['optimizer']['param_groups']
        assert trainer.scheduler.state_dict() == saved['scheduler']
    finally:
        trainer.release()
    # --resume may name the checkpoint file itself: the run goes on in its directory.
    trainer = resume(tmp, os.path.join(run_dir, 'checkpoint.pth'))
    trainer.release()
    assert (trainer.run_dir, trainer.epoch) == (run_dir, saved['epoch'])


def test_a_resume_takes_the_cpu_thread_count_the_run_saved(tiny_run, monkeypatch):
    tmp, run_dir = tiny_run
    threads = load_weights(os.path.join(run_dir, 'checkpoint.pth'))['threads']
    assert threads == torch.get_num_threads()
    chosen = []  # resumed on a process with one thread more than the run had
    monkeypatch.setattr(torch, 'get_num_threads', lambda: threads + 1)
    monkeypatch.setattr(torch, 'set_num_threads', chosen.append)
    resume(tmp, run_dir).release()
    assert chosen == [threads]


def test_the_learning_rate_schedule_spans_every_step_the_partial_batch_included(tmp_path):
    """36 images in batches of 16: 3 steps an epoch (the last of 4 images), 6 in 2 epochs."""
    write_synthetic_cifar(str(tmp_path / 'data'), 'cifar10', n_train=36, n_test=16, seed=2)
    trainer = training.Trainer(*tiny_args(tmp_path))
    trainer.release()
    assert len(trainer.train_loader) == 3
    # Multistep: x0.1 after floor(6 * 99/110) = 5 steps and again after floor(6 * 104/110) = 5.
    assert [trainer.lr_at(i) for i in range(6)] == pytest.approx([1, 1, 1, 1, 1, 0.01])
    trainer = training.Trainer(*tiny_args(tmp_path, '--lr-schedule', 'cyclic'))
    trainer.release()
    # Cyclic: up from 0 to the peak at half of the 6 steps, then down to 0 at the end.
    assert [trainer.lr_at(i) for i in range(7)] == pytest.approx([0, 1 / 3, 2 / 3, 1, 2 / 3,
                                                                  1 / 3, 0])


@pytest.mark.parametrize('momenta', [[], ['--momentum', '0.95', '--momentum-min', '0.65']])
def test_the_cyclic_momentum_falls_as_the_learning_rate_rises_at_every_step(tmp_path, momenta):
    """6 steps of the cyclic schedule: lr factors 0, 1/3, 2/3, 1, 2/3, 1/3, and the momentum
    top - (top - bottom) * factor that each optimizer step uses (0.9 and 0.8 by default)."""
    write_synthetic_cifar(str(tmp_path / 'data'), 'cifar10', n_train=36, n_test=8, seed=2)
    trainer = training.Trainer(*tiny_args(tmp_path, '--lr-schedule', 'cyclic', *momenta))
    used = []
    trainer.optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: used.append(optimizer.param_groups[0]['momentum']))
    assert trainer.fit() == 0
    top, bottom = (0.95, 0.65) if momenta else (0.9, 0.8)
    assert used == pytest.approx([top - (top - bottom) * f for f in (0, 1 / 3, 2 / 3, 1, 2 / 3,
                                                                      1 / 3)])


def test_the_trainer_takes_every_flag_of_the_step_optimizer_loaders_and_teacher(tmp_path):
    write_synthetic_cifar(str(tmp_path / 'data'), 'cifar10', n_train=16, n_test=8, seed=2)
    flags = ['--lr-max', '0.05', '--momentum', '0.85', '--weight-decay', '0.001', '--seed', '7',
             '--epsilon', '6', '--alpha', '5', '--mixup-alpha', '0.5', '--delta-init', 'zero',
             '--lamda', '3', '--tau0', '4', '--gamma', '0.5', '--tau-schedule', 'constant',
             '--lambda-kl-base', '0.25', '--ema-value', '0.7', '--ema-decay-max', '0.6',
             '--con-reference', 'start', '--pgd-alpha', '1.5', '--no-augment',
             '--eval-batch-size', '4', '--no-amp']
    trainer = training.Trainer(*tiny_args(tmp_path, *flags))
    trainer.release()
    assert trainer.hp == mixkl.Hyperparameters(
        num_classes=10, epsilon=6 / 255, alpha=5 / 255, mixup_alpha=0.5, delta_init='zero',
        lamda=3.0, tau0=4.0, gamma=0.5, tau_schedule='constant', lambda_kl_base=0.25,
        ema_value=0.7, amp=False, ema_decay_max=0.6, con_reference='start', attack_iters=10)
    assert (trainer.teacher.threshold, trainer.teacher.max_decay) == (0.7, 0.6)
    assert trainer.pgd_alpha == 1.5 / 255
    group, = trainer.optimizer.param_groups
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    # The multistep schedule's momentum is --momentum (--momentum-min is the cyclic one's).
    assert (group['initial_lr'], group['momentum'], group['weight_decay']) == (0.05, 0.85, 0.001)
    assert group['params'] == list(trainer.student.parameters())
    loader = trainer.train_loader
    assert (loader.batch_size, loader.augment, loader.seed, loader.train) == (16, False, 7, True)
    assert (trainer.eval_loader.batch_size, trainer.eval_loader.train) == (4, False)
    assert os.path.basename(trainer.run_dir).startswith('cifar10-mixkl-seed7-')
    torch.manual_seed(7)  # the student's initial weights are drawn from --seed
    fresh = training.build_model('preactresnet18', 'cifar10', 8, torch.device('cpu'), False)
    assert same_weights(trainer.student.state_dict(), fresh.state_dict())


def test_the_per_epoch_evaluation_the_alarm_and_the_curves_use_pgd_alpha_and_pgd_iters(
        tmp_path, monkeypatch):
    write_synthetic_cifar(str(tmp_path / 'data'), 'cifar10', n_train=16, n_test=8, seed=2)
    trainer = training.Trainer(*tiny_args(tmp_path, '--epochs', '1', '--epsilon', '6',
                                          '--alpha', '5', '--pgd-alpha', '1.5', '--pgd-iters',
                                          '3'))
    evaluations, alarms = [], []
    real_evaluate, real_pgd = training.evaluate_robustness, training.pgd_attack

    def evaluate_robustness(model, batches, epsilon, alpha, iters, **kwargs):
        evaluations.append((epsilon, alpha, iters))
        return real_evaluate(model, batches, epsilon, alpha, iters, **kwargs)

    def pgd_attack(epsilon, alpha, iters, restarts, *args):
        alarms.append((epsilon, alpha, iters, restarts))
        return real_pgd(epsilon, alpha, iters, restarts, *args)
    monkeypatch.setattr(training, 'evaluate_robustness', evaluate_robustness)
    monkeypatch.setattr(training, 'pgd_attack', pgd_attack)
    plotted = []  # curves.png names the evaluation's radius and steps in its legends
    monkeypatch.setattr(training.plots, 'plot_curves', lambda *args: plotted.append(args))
    assert trainer.fit() == 0
    assert evaluations == [(6 / 255, 1.5 / 255, 3)]
    assert alarms == [(6 / 255, 1.5 / 255, 3, 1)]
    assert plotted == [(trainer.history, os.path.join(trainer.run_dir, 'curves.png'), 'mixkl',
                        6.0, 3)]


def test_val_examples_must_leave_at_least_one_training_image(tmp_path):
    write_synthetic_cifar(str(tmp_path / 'data'), 'cifar10', n_train=32, n_test=16, seed=2)
    with pytest.raises(InputError, match='--val-examples 32 leaves no training images '
                                         r'\(there are 32\)'):
        training.Trainer(*tiny_args(tmp_path, '--val-examples', '32'))
    assert not os.listdir(tmp_path / 'output'), 'refused before a run directory is made'
    trainer = training.Trainer(*tiny_args(tmp_path, '--val-examples', '31'))
    trainer.release()
    assert (len(trainer.train_loader.labels), len(trainer.eval_loader.labels)) == (1, 31)


def test_the_validation_images_are_held_out_of_the_whole_set_before_train_examples_cuts_it(
        tmp_path):
    write_synthetic_cifar(str(tmp_path / 'data'), 'cifar10', n_train=40, n_test=16, seed=2)
    X, y = load_cifar('cifar10', str(tmp_path / 'data'), train=True, quiet=True)
    trainer = training.Trainer(*tiny_args(tmp_path, '--val-examples', '12',
                                          '--train-examples', '16', '--eval-examples', '10'))
    trainer.release()
    train, held_out = trainer.train_loader, trainer.eval_loader
    assert torch.equal(train.images, X[:16]) and torch.equal(train.labels, y[:16])
    # The last 12 of all 40 images, of which the per-epoch evaluation takes the first 10.
    assert torch.equal(held_out.images, X[28:38]) and torch.equal(held_out.labels, y[28:38])


def test_a_resume_refuses_a_given_flag_that_differs_even_when_it_is_the_default(tiny_run):
    tmp, run_dir = tiny_run
    with pytest.raises(InputError, match='the run was trained with --lr-max 0.05, not 0.1'):
        resume(tmp, run_dir, '--lr-max', '0.1')
    resume(tmp, run_dir, '--lr-max', '0.05').release()  # the run's own value is fine


def test_a_resume_refuses_other_data(tiny_run):
    tmp, run_dir = tiny_run
    config = json.load(open(os.path.join(run_dir, 'config.json')))
    assert len(config['data_sha256']) == 64 and config['threads'] == torch.get_num_threads()
    write_synthetic_cifar(str(tmp / 'other'), 'cifar10', n_train=32, n_test=16, seed=3)
    with pytest.raises(InputError, match='holds other data than the run was trained on'):
        resume(tmp, run_dir, data='other')


def test_a_checkpoint_saved_before_the_data_digest_was_recorded_resumes(tiny_run):
    tmp, run_dir = tiny_run
    config = json.load(open(os.path.join(run_dir, 'config.json')))
    path = os.path.join(run_dir, 'checkpoint.pth')
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint['data_sha256'], config['data_sha256']
    torch.save(checkpoint, path)
    with open(os.path.join(run_dir, 'config.json'), 'w') as f:
        json.dump(config, f)
    trainer = resume(tmp, run_dir)
    trainer.release()
    assert trainer.epoch == checkpoint['epoch']


def test_a_resume_refuses_a_checkpoint_from_another_run(tiny_run, tmp_path_factory):
    tmp, run_dir = tiny_run
    other_tmp = tmp_path_factory.mktemp('other')
    write_synthetic_cifar(str(other_tmp / 'data'), 'cifar10', n_train=32, n_test=16, seed=2)
    other = training.Trainer(*tiny_args(other_tmp, '--lr-max', '0.05', '--seed', '7'))
    other.release()
    shutil.copy(os.path.join(other.run_dir, 'config.json'), os.path.join(run_dir, 'config.json'))
    with pytest.raises(InputError, match='checkpoint.pth does not belong to this run directory: '
                                         r'seed differ\(s\) from config.json'):
        resume(tmp, run_dir)


@pytest.mark.parametrize('config_text, message', [
    ('[1, 2]', 'config.json: not a JSON object of flags'),
    ('{"method": ', 'config.json: not valid JSON'),
    ('{"method": "mixkl"}', 'config.json: not the config.json of a training run'),
])
def test_a_resume_refuses_a_config_json_that_is_not_training_s(tiny_run, config_text, message):
    tmp, run_dir = tiny_run
    with open(os.path.join(run_dir, 'config.json'), 'w') as f:
        f.write(config_text)
    with pytest.raises(InputError, match=message):
        resume(tmp, run_dir)


def drop_student(checkpoint):
    del checkpoint['student']


def shrink_bias(checkpoint):
    checkpoint['student']['linear.bias'] = torch.zeros(3)


def epoch_as_text(checkpoint):
    checkpoint['epoch'] = '1'


def empty_rng(checkpoint):
    checkpoint['rng'] = {}


def short_numpy_rng(checkpoint):
    checkpoint['rng']['numpy'] = checkpoint['rng']['numpy'][:3]


def python_rng_as_number(checkpoint):
    checkpoint['rng']['python'] = 3


@pytest.mark.parametrize('spoil, message', [
    (drop_student, 'not a resumable checkpoint of this project (student missing or not what '
                   'training writes)'),
    (shrink_bias, 'cannot be resumed (Error(s) in loading state_dict'),
    (epoch_as_text, '(epoch missing or not what training writes)'),
    (empty_rng, "cannot be resumed ('torch')"),
    (short_numpy_rng, 'cannot be resumed ('),
    (python_rng_as_number, 'cannot be resumed ('),
])
def test_a_resume_refuses_a_checkpoint_training_did_not_write_in_one_line(tiny_run, spoil,
                                                                           message):
    tmp, run_dir = tiny_run
    path = os.path.join(run_dir, 'checkpoint.pth')
    checkpoint = torch.load(path, weights_only=True)
    spoil(checkpoint)
    torch.save(checkpoint, path)
    with pytest.raises(InputError) as error:
        resume(tmp, run_dir)
    assert str(error.value).startswith(f'--resume {path}') and message in str(error.value)


def test_a_resume_refuses_a_config_json_edited_by_hand(tiny_run):
    tmp, run_dir = tiny_run
    path = os.path.join(run_dir, 'config.json')
    config = json.load(open(path))
    json.dump(dict(config, lamda=3.0), open(path, 'w'))
    with pytest.raises(InputError, match='checkpoint.pth does not belong to this run directory: '
                                         'lamda differ'):
        resume(tmp, run_dir)


def test_a_checkpoint_with_non_finite_weights_is_refused_at_load(tiny_run):
    tmp, run_dir = tiny_run
    path = os.path.join(run_dir, 'checkpoint.pth')
    for model in ('teacher', 'student'):
        checkpoint = torch.load(path, weights_only=True)
        checkpoint[model]['linear.bias'][0] = float('nan')
        torch.save(checkpoint, path)
        with pytest.raises(InputError, match=f'{model} linear.bias is not finite or beyond '
                                             '1e.08; this checkpoint cannot be trained on'):
            resume(tmp, run_dir)
        checkpoint[model]['linear.bias'][0] = 0.0
        torch.save(checkpoint, path)


def test_the_end_of_a_run_names_only_the_models_present(tmp_path, capsys):
    write_synthetic_cifar(str(tmp_path / 'data'), 'cifar10', n_train=32, n_test=16, seed=2)
    trainer = training.Trainer(*tiny_args(tmp_path, '--epochs', '1'))
    real_save = training.atomic_save
    # best_model.pth deleted (by hand, or never written): the message does not claim it.
    training.atomic_save = lambda obj, path: None if path.endswith('best_model.pth') \
        else real_save(obj, path)
    try:
        assert trainer.fit() == 0
    finally:
        training.atomic_save = real_save
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.endswith(f'final_model.pth in {trainer.run_dir}') and 'best_model' not in last
    # After a divergence, a file whose weights are not finite is not called kept.
    torch.save({'x': torch.tensor([float('inf')])}, os.path.join(trainer.run_dir, 'best_model.pth'))
    assert 'best_model.pth' not in trainer.what_is_kept()
    assert 'checkpoint.pth' in trainer.what_is_kept()


def test_a_run_directory_takes_one_process_and_a_dead_ones_lock_does_not_block(tiny_run):
    tmp, run_dir = tiny_run
    trainer = resume(tmp, run_dir)
    writing = os.path.join(run_dir, '.checkpoint.pth.k2j4x9qa')  # the running process's
    open(writing, 'w').write('being written')
    with pytest.raises(InputError, match=f'{run_dir} is in use: process {os.getpid()} on'):
        resume(tmp, run_dir)
    assert os.path.exists(writing), 'the temporaries of a live run are left alone'
    trainer.release()
    # run.lock is still there with the old holder written in it, but nobody holds the lock.
    assert 'process' in open(os.path.join(run_dir, 'run.lock')).read()
    resume(tmp, run_dir).release()


def test_a_resume_removes_temporary_files_a_kill_left(tiny_run, monkeypatch):
    tmp, run_dir = tiny_run
    checked, check = [], training.check_writable_dir
    monkeypatch.setattr(training, 'check_writable_dir',
                        lambda *args: checked.append(args) or check(*args))
    for name in ('.checkpoint.pth.k2j4x9qa', '.metrics.csv.abcdefgh'):
        open(os.path.join(run_dir, name), 'w').write('half written')
    open(os.path.join(run_dir, 'notes.txt'), 'w').write('mine')
    config = open(os.path.join(run_dir, 'config.json'), 'rb').read()
    resume(tmp, run_dir).release()
    assert open(os.path.join(run_dir, 'config.json'), 'rb').read() == config, 'as trained'
    assert checked == [(run_dir, '--resume')], 'writable: before an epoch, not after it'
    assert sorted(n for n in os.listdir(run_dir) if n.startswith('.')) == []
    assert os.path.exists(os.path.join(run_dir, 'notes.txt'))


def test_a_resume_uses_the_thread_count_of_the_run(monkeypatch, capsys):
    monkeypatch.setattr(torch, 'get_num_threads', lambda: 2)
    chosen = []
    monkeypatch.setattr(torch, 'set_num_threads', chosen.append)
    training.use_threads_of({'threads': 1})
    assert chosen == [1] and 'using 1 CPU threads, as the run did (not 2)' in capsys.readouterr().out
    training.use_threads_of({'threads': 2})
    training.use_threads_of({})  # a checkpoint from before the count was saved
    assert chosen == [1]


def test_concurrent_starts_get_distinct_run_directories(tmp_path):
    args = tiny_args(tmp_path)[0]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        made = list(pool.map(lambda _: runs.new_run_dir(args.out_dir, 'cifar10', args.arch,
                                                        args.method, args.seed), range(60)))
    assert len(set(made)) == 60 and all(os.path.isdir(d) for d in made)


def test_a_signal_during_the_evaluation_stops_it_at_once_and_the_resume_matches(tmp_path,
                                                                                monkeypatch):
    write_synthetic_cifar(str(tmp_path / 'data'), 'cifar10', n_train=32, n_test=16, seed=2)
    whole = training.Trainer(*tiny_args(tmp_path))
    assert whole.fit() == 0
    evaluate, calls = training.evaluate_robustness, []

    def signalled(*args, **kwargs):  # SIGTERM as the first evaluation ends: PGD drew its starts
        calls.append(1)
        result = evaluate(*args, **kwargs)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this at once
        return result

    monkeypatch.setattr(training, 'evaluate_robustness', signalled)
    trainer = training.Trainer(*tiny_args(tmp_path))
    start = time.time()
    assert trainer.fit() == 128 + signal.SIGTERM
    assert time.time() - start < 4, 'stopped within the evaluation, not after it'
    checkpoint = load_weights(os.path.join(trainer.run_dir, 'checkpoint.pth'))
    assert (checkpoint['epoch'], checkpoint['step']) == (0, 2), 'epoch 1 trained, not evaluated'
    assert 'in the evaluation after epoch 1' in open(os.path.join(trainer.run_dir, 'train.log')).read()
    resumed = resume(tmp_path, trainer.run_dir)
    assert resumed.fit() == 0
    assert same_weights(os.path.join(whole.run_dir, 'final_model.pth'),
                        os.path.join(trainer.run_dir, 'final_model.pth'))
    assert read_metrics(trainer.run_dir, times=False) == read_metrics(whole.run_dir, times=False)


def test_a_full_disk_is_one_line_and_status_1(tmp_path, monkeypatch, capsys):
    write_synthetic_cifar(str(tmp_path / 'data'), 'cifar10', n_train=32, n_test=16, seed=2)

    def no_space(obj, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(training, 'atomic_save', no_space)
    argv = ['--data-dir', str(tmp_path / 'data'), '--out_dir', str(tmp_path / 'output'),
            '--epochs', '1', '--batch-size', '16', '--width', '8', '--alarm-examples', '8']
    with pytest.raises(SystemExit) as exit_info:
        training.main('cifar10', argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()  # above it: tqdm's progress bar
    errors = [line for line in err if 'error' in line]
    assert errors == [err[-1]] and err[-1].startswith('error: ')
    assert err[-1].endswith('best_model.pth: No space left on device; nothing was left half-written')


def test_an_epoch_resumed_part_way_adds_its_time_to_the_seconds_saved_before_the_stop(tmp_path):
    write_synthetic_cifar(str(tmp_path / 'data'), 'cifar10', n_train=16, n_test=8, seed=2)
    trainer = training.Trainer(*tiny_args(tmp_path, '--epochs', '1'))
    try:
        trainer.stats['seconds'] = 1000.0  # as a checkpoint saved part way through the epoch
        assert not trainer.train_epoch(0, SimpleNamespace(signum=signal.SIGTERM))  # stopped again
        assert trainer.stats['seconds'] >= 1000
        assert trainer.train_epoch(0, SimpleNamespace(signum=None))
        assert trainer.stats['seconds'] > 1000
        trained = trainer.stats['seconds']
        assert trainer.end_epoch(0, training.StopSignal())
        row, = read_metrics(trainer.run_dir)
        assert float(row['seconds']) == round(trained, 2), 'training time, the evaluation apart'
    finally:
        trainer.release()


def test_under_torchrun_each_epochs_evaluation_draws_its_random_starts_from_seed_and_epoch(
        tmp_path, monkeypatch):
    write_synthetic_cifar(str(tmp_path / 'data'), 'cifar10', n_train=32, n_test=8, seed=2)
    monkeypatch.setattr(training, 'wrap_ddp', lambda model, device: AsWrapped(model))
    seeds = []
    monkeypatch.setattr(training, 'evaluate_robustness', lambda *args, **kwargs: seeds.append(
        kwargs['seed']) or (0.5, 0.25))
    for seed in ('3', '3', '4'):
        trainer = training.Trainer(*tiny_args(tmp_path, '--seed', seed), FirstOfTwoProcesses())
        assert trainer.fit() == 0
    three, again, four = seeds[:2], seeds[2:4], seeds[4:]
    assert None not in three and len(set(three)) == 2, 'seeded, another seed each epoch'
    assert three == again and not set(three) & set(four)
