"""Training under torchrun (DistributedDataParallel), on CPU with gloo and 2 processes.

Every test launches real processes through ``python -m torch.distributed.run``
(what ``torchrun`` runs) on synthetic data in the CIFAR layout.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import ddp
import training
from conftest import ROOT, read_metrics, same_weights, the_run_dir
from utils import CifarLoader, InputError, load_cifar
from synthetic import write_synthetic_cifar

# Small enough for a slow CPU, long enough (4 steps x 3 epochs) to be stopped part way.
TRAIN_FLAGS = ['--epochs', '3', '--train-examples', '128', '--eval-examples', '32',
               '--batch-size', '32', '--width', '8', '--alarm-examples', '16',
               '--eval-batch-size', '16']


def torchrun(nproc, *argv):
    return [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}',
            '--standalone', *map(str, argv)]


def env():
    e = dict(os.environ, PYTHONPATH=ROOT)
    e.pop('WORLD_SIZE', None)
    return e


def run(cmd, cwd, timeout=240):
    result = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True,
                            timeout=timeout)
    return result, result.stdout + result.stderr


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return write_synthetic_cifar(str(tmp_path_factory.mktemp('data')), n_train=128, n_test=32,
                                 learnable=True)


@pytest.fixture(scope='module')
def ddp_run(tmp_path_factory, data_dir):
    """One uninterrupted 2-process MIX-KL run: (run directory, its output)."""
    work = tmp_path_factory.mktemp('ddp_run')
    result, output = run(torchrun(2, os.path.join(ROOT, 'MIX_KL_CIFAR10.py'), '--data-dir',
                                  data_dir, '--out_dir', work / 'out', *TRAIN_FLAGS), work)
    assert result.returncode == 0, output
    return the_run_dir(work / 'out'), output


def test_training_under_torchrun(ddp_run):
    run_dir, output = ddp_run
    # _check_replicas compares the student and the teacher of every rank with rank 0's,
    # bitwise, after every epoch and fails the run otherwise.
    assert 'bitwise identical on all 2 processes after every epoch' in output
    assert output.count('epoch 3/3 ') == 1  # only rank 0 logs
    assert json.load(open(os.path.join(run_dir, 'config.json')))['world_size'] == 2
    assert len(read_metrics(run_dir)) == 3
    checkpoint = torch.load(os.path.join(run_dir, 'checkpoint.pth'), weights_only=True)
    assert checkpoint['world_size'] == 2 and len(checkpoint['rng_per_rank']) == 2
    # Each rank draws its own mixup and random starts.
    assert not torch.equal(checkpoint['rng_per_rank'][0]['torch'],
                           checkpoint['rng_per_rank'][1]['torch'])
    for name in ('best_model.pth', 'final_model.pth'):
        state = torch.load(os.path.join(run_dir, name), weights_only=True)
        assert 'conv1.weight' in state and not any(k.startswith('module.') for k in state)
    assert not any(k.startswith('module.') for k in checkpoint['student'])


def test_checkpoint_evaluates(ddp_run, data_dir, tmp_path):
    run_dir, _ = ddp_run
    result, output = run([sys.executable, os.path.join(ROOT, 'test_cifar10.py'), '--model_path',
                          run_dir, '--data-dir', data_dir, '--attacks', 'clean,pgd10',
                          '--n_ex', '32', '--out_dir', tmp_path / 'eval', '--device', 'cpu',
                          '--no-checks'],
                         tmp_path)
    assert result.returncode == 0, output
    report = json.load(open(tmp_path / 'eval' / 'results.json'))
    assert len(report['results']) == 2
    assert all(r['attacks']['pgd10']['n'] == 32 for r in report['results'])
    # The two processes' per-epoch evaluation, split and summed, saw the same 32 test images.
    rows = read_metrics(run_dir)
    best = max(rows, key=lambda row: float(row['test_pgd_acc']))
    best_entry, final_entry = report['results']
    assert best_entry['attacks']['clean']['accuracy'] == float(best['test_clean_acc'])
    assert final_entry['attacks']['clean']['accuracy'] == float(rows[-1]['test_clean_acc'])


def test_resume_needs_the_same_world_size(ddp_run, data_dir, tmp_path):
    run_dir, _ = ddp_run
    result, output = run([sys.executable, os.path.join(ROOT, 'MIX_KL_CIFAR10.py'), '--resume',
                          run_dir, '--data-dir', data_dir], tmp_path)
    assert result.returncode == 2, output
    assert 'trained by 2 process(es)' in output and 'torchrun --nproc_per_node=2' in output


def _worker_pids(launcher_pid):
    """{RANK: pid} of the processes torchrun started."""
    pids = {}
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/stat') as f:
                ppid = int(f.read().rsplit(')', 1)[1].split()[1])
            if ppid != launcher_pid:
                continue
            with open(f'/proc/{entry}/environ', 'rb') as f:
                environ = dict(v.split(b'=', 1) for v in f.read().split(b'\0') if b'=' in v)
        except (OSError, IndexError, ValueError):
            continue
        if b'RANK' in environ:
            pids[int(environ[b'RANK'])] = int(entry)
    return pids


@pytest.mark.skipif(not os.path.isdir('/proc/self'), reason='needs /proc to find the workers')
def test_signal_on_one_rank_stops_all_then_resume_matches(ddp_run, data_dir, tmp_path):
    """SIGTERM to rank 1 only: both ranks stop at the same step; the resumed run then ends
    with exactly the weights and metrics of the uninterrupted run."""
    reference_dir, _ = ddp_run
    out = tmp_path / 'out'
    launcher = subprocess.Popen(
        torchrun(2, os.path.join(ROOT, 'MIX_KL_CIFAR10.py'), '--data-dir', data_dir,
                 '--out_dir', out, *TRAIN_FLAGS),
        cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        # The first epoch's checkpoint: both ranks are inside the training loop.
        while time.time() < deadline and launcher.poll() is None and not (
                os.path.isdir(out) and os.listdir(out)
                and os.path.exists(os.path.join(the_run_dir(out), 'checkpoint.pth'))):
            time.sleep(0.02)
        workers = _worker_pids(launcher.pid)
        assert launcher.poll() is None and set(workers) == {0, 1}, launcher.communicate()[0]
        os.kill(workers[1], signal.SIGTERM)
        output = launcher.communicate(timeout=180)[0]
    finally:
        if launcher.poll() is None:
            launcher.kill()
    run_dir = the_run_dir(out)
    assert 'stopped at epoch' in output, 'the run ended before the signal came?\n' + output
    assert f'Resume with: torchrun --nproc_per_node=2 MIX_KL_CIFAR10.py --resume {run_dir}' \
        in output
    assert launcher.returncode != 0  # torchrun reports the workers' exit code 128 + SIGTERM
    checkpoint = torch.load(os.path.join(run_dir, 'checkpoint.pth'), weights_only=True)
    assert checkpoint['epoch'] >= 1 and checkpoint['world_size'] == 2
    assert not os.path.exists(os.path.join(run_dir, 'final_model.pth'))

    result, output = run(torchrun(2, os.path.join(ROOT, 'MIX_KL_CIFAR10.py'), '--resume',
                                  run_dir), tmp_path)
    assert result.returncode == 0, output
    assert f'resumed from {run_dir}' in output
    assert read_metrics(run_dir, times=False) == read_metrics(reference_dir, times=False)
    for name in ('final_model.pth', 'best_model.pth'):
        assert same_weights(os.path.join(run_dir, name), os.path.join(reference_dir, name)), name


def torchrun_environment(monkeypatch, **variables):
    """This process's WORLD_SIZE, RANK and LOCAL_RANK: those of ``variables``, no others."""
    for name in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK'):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


def on_a_node_with_two_gpus(monkeypatch):
    """CUDA as a node with 2 GPUs shows it (process groups and GPUs are the test's stubs)."""
    monkeypatch.setattr(ddp, 'resolve_device', lambda name: torch.device(name))
    monkeypatch.setattr(ddp.torch.cuda, 'device_count', lambda: 2)


@pytest.mark.parametrize('device, backend, expected', [('cpu', 'gloo', 'cpu'),
                                                      ('cuda', 'nccl', 'cuda:1')])
def test_a_process_of_a_multi_node_run_takes_its_global_rank_and_its_nodes_gpu(
        monkeypatch, device, backend, expected):
    """The second process of the second node of 2 x 2: RANK 3, LOCAL_RANK 1."""
    torchrun_environment(monkeypatch, WORLD_SIZE='4', RANK='3', LOCAL_RANK='1')
    joined, chosen = [], []
    monkeypatch.setattr(ddp.dist, 'init_process_group',
                        lambda backend, **kwargs: joined.append(backend))
    on_a_node_with_two_gpus(monkeypatch)
    monkeypatch.setattr(ddp.torch.cuda, 'set_device', chosen.append)
    dist = ddp.Distributed.from_env(device)
    assert (dist.rank, dist.local_rank, dist.world_size, dist.is_main) == (3, 1, 4, False)
    # The first process of the second node is not the main one: only rank 0 writes files.
    assert [ddp.Distributed(rank, 4, local_rank).is_main
            for rank, local_rank in ((0, 0), (1, 1), (2, 0), (3, 1))] == [True, False, False, False]
    assert (str(dist.device), joined) == (expected, [backend])
    assert [str(d) for d in chosen] == ([expected] if device == 'cuda' else [])


@pytest.mark.parametrize('local_rank', ['2', '3'])
def test_more_processes_on_a_node_than_its_gpus_are_refused_before_joining(monkeypatch,
                                                                          local_rank):
    torchrun_environment(monkeypatch, WORLD_SIZE='4', RANK=local_rank, LOCAL_RANK=local_rank)
    monkeypatch.setattr(ddp.dist, 'init_process_group',
                        lambda *args, **kwargs: pytest.fail('joined a process group'))
    on_a_node_with_two_gpus(monkeypatch)
    monkeypatch.setattr(ddp.torch.cuda, 'set_device', lambda device: pytest.fail('set a GPU'))
    with pytest.raises(InputError, match=f'LOCAL_RANK {local_rank} but only 2 GPUs are '
                                         'visible: use --nproc_per_node <= the number of GPUs'):
        ddp.Distributed.from_env('cuda')


@pytest.mark.parametrize('device', ['cuda:0', 'cuda:1'])
def test_a_numbered_gpu_under_torchrun_is_refused_each_process_takes_its_local_rank(
        monkeypatch, device):
    torchrun_environment(monkeypatch, WORLD_SIZE='2', RANK='0', LOCAL_RANK='0')
    monkeypatch.setattr(ddp.dist, 'init_process_group',
                        lambda *args, **kwargs: pytest.fail('joined a process group'))
    on_a_node_with_two_gpus(monkeypatch)
    with pytest.raises(InputError, match=rf'^--device {device}: under torchrun each process '
                                         r'uses cuda:LOCAL_RANK; pass --device cuda \(or leave '
                                         r'it out\)$'):
        ddp.Distributed.from_env(device)


@pytest.mark.parametrize('environment', [
    dict(WORLD_SIZE='2', RANK='0'),  # a half-set environment, not torchrun's
    dict(WORLD_SIZE='2', LOCAL_RANK='0'),
    dict(WORLD_SIZE='1', RANK='0', LOCAL_RANK='0'),  # torchrun --nproc_per_node=1
    dict(RANK='0', LOCAL_RANK='0'),
])
def test_a_process_not_one_of_several_that_torchrun_started_trains_alone(monkeypatch,
                                                                         environment):
    torchrun_environment(monkeypatch, **environment)
    monkeypatch.setattr(ddp.dist, 'init_process_group',
                        lambda *args, **kwargs: pytest.fail('joined a process group'))
    dist = ddp.Distributed.from_env('cpu')
    assert (dist.rank, dist.local_rank, dist.world_size, dist.enabled) == (0, 0, 1, False)


GRADIENT_AND_EVAL_SCRIPT = '''
import copy, json, sys
from types import SimpleNamespace
import torch
import mixkl, training
from ddp import Distributed, SyncedTeacher, wrap_ddp
from preactresnet import PreActResNet18
from utils import evaluate_robustness

dist = Distributed.from_env('cpu')
assert dist.enabled and dist.world_size == 2
rank, out = dist.rank, {}
torch.manual_seed(0)
model = PreActResNet18(10, 8)  # the same weights on both ranks
x, y = torch.rand(12, 3, 32, 32), torch.randint(0, 10, (12,))  # one global batch

# The step on the DDP-wrapped student averages the gradients of the ranks' shares (rank r:
# x[r::2], its own RNG seed 100 + r): compare with two single-process steps, one per share.
# At lr 0 the step leaves the weights as they are and p.grad is the gradient it used.
for method in ('mixkl', 'fgsm_rs'):
    args = training.parse_args('cifar10', ['--method', method, '--epsilon', '4', '--no-amp'])[0]
    hp = training.hyperparameters(args)

    def step(student, teacher, share):
        training.seed_everything(100 + share)
        optimizer = torch.optim.SGD(student.parameters(), lr=0)
        mixkl.STEPS[method](student, teacher, optimizer, x[share::2], y[share::2], hp, epoch=0)

    single = []
    for share in range(2):
        student = copy.deepcopy(model).train()
        step(student, mixkl.ConditionalEMA(student, hp.ema_value) if method == 'mixkl' else None,
             share)
        single.append([p.grad for p in student.parameters()])
    expected = [(a + b) / 2 for a, b in zip(*single)]
    student = copy.deepcopy(model).train()
    teacher = SyncedTeacher(student, hp.ema_value, hp.ema_decay_max, dist) if method == 'mixkl' else None
    step(wrap_ddp(student, dist.device), teacher, rank)
    grads = [p.grad for p in student.parameters()]
    out[method] = dict(
        max_error=max((g - e).abs().max().item() for g, e in zip(grads, expected)),
        local_vs_average=max((s - e).abs().max().item() for s, e in zip(single[rank], expected)),
        identical_on_ranks=dist.identical(grads),
        teacher_identical=teacher is None or dist.identical(list(teacher.model.state_dict().values())))

# identical() compares every dtype's message: a difference in any one of them counts.
floats, counts = torch.ones(3), torch.ones(2, dtype=torch.long)
out['differ'] = [dist.identical([floats + rank, counts]), dist.identical([floats, counts + rank]),
                 dist.identical([counts + rank, floats]), dist.identical([floats, counts])]

# The per-epoch evaluation split over the ranks equals the single-process evaluation.
torch.manual_seed(1)  # the same images on both ranks
x_eval, y_random = torch.rand(40, 3, 32, 32), torch.randint(0, 10, (40,))
for m in model.modules():  # BN statistics of these images, so that predictions vary
    if isinstance(m, torch.nn.BatchNorm2d):
        m.momentum = None
with torch.no_grad():  # labels: mostly the model's own predictions, so PGD has work to do
    model.train()(x_eval)
    y_eval = torch.where(torch.arange(40) % 4 == 0, y_random, model.eval()(x_eval).argmax(1))
batches = [(x_eval[i:i + 8], y_eval[i:i + 8]) for i in range(0, 40, 8)]  # 5: 3 + 2 per rank
evaluate = lambda dist: evaluate_robustness(model, batches, 0.5 / 255, 0.125 / 255, 3,
                                            dist=dist, seed=7)
rng_before = torch.get_rng_state()
out['distributed'] = evaluate(dist)
out['single'] = evaluate(None)
out['rng_untouched'] = torch.equal(rng_before, torch.get_rng_state())

# The overfitting alarm's batch is split the same way: rank 0's half is labelled with the
# model's predictions, rank 1's half wrongly; at epsilon 0 FGSM and PGD leave 8 of 16.
with torch.no_grad():
    predicted = model.eval()(x_eval[:16]).argmax(1)
y_alarm = torch.cat([predicted[:8], (predicted[8:] + 1) % 10])
trainer = SimpleNamespace(alarm_batch=(x_eval[:16], y_alarm), hp=SimpleNamespace(epsilon=0.0),
                          dist=dist, student=model, pgd_alpha=0.0,
                          args=SimpleNamespace(pgd_iters=2))
out['alarm'] = training.Trainer._alarm_accuracies(trainer)

# The teacher decides on the global batch: rank 0 alone (4 of 4 kept) would not update, the
# sum (4 of 8 kept, below the threshold 0.8) does; 8 of 8 does not.
student = copy.deepcopy(model)
teacher = SyncedTeacher(student, 0.8, 0.999, dist)
student = wrap_ddp(student, dist.device)
out['teacher_updates'] = [teacher.maybe_update(student, 4, [4, 0][rank]),
                          teacher.maybe_update(student, 4, 4)]

# A step's numbers are summed over the ranks, the loss weighted by each rank's share:
# rank 0 has 3 images at loss 1 (2 correct), rank 1 one image at loss 5 (1 correct) and a
# stop request; the step's loss is 8 / 4, and both ranks stop.
trainer = SimpleNamespace(dist=dist, step=0, stats=training.new_epoch_stats(),
                          _stop_agreed=False, models=lambda: {'student': model})
result = SimpleNamespace(loss=[1.0, 5.0][rank], correct=[2, 1][rank], n=[3, 1][rank],
                         teacher_updated=1)
training.Trainer._record(trainer, 0, result, SimpleNamespace(signum=[None, 15][rank]))
out['record'] = dict(trainer.stats, stop=trainer._stop_agreed, step=trainer.step)

# The trainer's loader gives each rank its share of every global batch of the run's shuffle.
args, parser = training.parse_args('cifar10', [
    '--data-dir', sys.argv[2], '--out_dir', sys.argv[3], '--batch-size', '8', '--width', '8',
    '--alarm-examples', '8', '--seed', '3'])
trainer = training.Trainer(args, parser, dist)
labels = [y.tolist() for _, y in trainer.train_loader.batches(epoch=1)]
trainer.release()
json.dump(labels, open(f'{sys.argv[1]}.{rank}', 'w'))
if rank == 0:
    json.dump(out, open(sys.argv[1], 'w'))
dist.close()
'''


def test_the_ranks_average_gradients_and_sum_their_evaluation_teacher_and_step_counts(
        tmp_path, data_dir):
    script = tmp_path / 'check.py'
    script.write_text(textwrap.dedent(GRADIENT_AND_EVAL_SCRIPT))
    result, output = run(torchrun(2, script, tmp_path / 'out.json', data_dir, tmp_path / 'runs'),
                         tmp_path)
    assert result.returncode == 0, output
    out = json.load(open(tmp_path / 'out.json'))
    # Rank r's batches hold images r, r + 2, ... of the single-process run's batches.
    x, y = load_cifar('cifar10', data_dir, train=True, quiet=True)
    alone = [b.tolist() for _, b in CifarLoader(x, y, 8, 'cpu', train=True, seed=3).batches(1)]
    shares = [json.load(open(tmp_path / f'out.json.{rank}')) for rank in (0, 1)]
    assert shares == [[batch[rank::2] for batch in alone] for rank in (0, 1)]
    for method in ('mixkl', 'fgsm_rs'):
        assert out[method]['identical_on_ranks'] and out[method]['teacher_identical'], method
        assert out[method]['max_error'] < 1e-5, (method, out[method])
        assert out[method]['local_vs_average'] > 1e-3, 'the two shares should differ'
    assert out['differ'] == [False, False, False, True]
    assert out['distributed'] == out['single']
    assert 0 < out['single'][1] < out['single'][0]  # PGD breaks some, not all
    assert out['rng_untouched']
    assert out['alarm'] == [0.5, 0.5]
    assert out['teacher_updates'] == [True, False]
    assert out['record'] == dict(loss=8.0, correct=3.0, n=4, teacher_updates=1, seconds=0.0,
                                 stop=True, step=1)


def test_a_run_saved_before_its_process_count_was_recorded_resumes_as_one_process():
    training.check_world_size({}, 'run', 1)
    training.check_world_size({'world_size': 2}, 'run', 2)
    with pytest.raises(InputError, match=r'run: the run was trained by 1 process\(es\) and must '
                                         r'be resumed by as many \(python, without torchrun\), '
                                         r'not 2'):
        training.check_world_size({}, 'run', 2)


@pytest.mark.parametrize('n, batch_size, world_size, smallest', [
    (33, 16, 2, 1),   # the last batch holds 1 image for 2 processes
    (34, 16, 2, None),  # 2 images for 2 processes: one each
    (64, 48, 3, 16),  # 48 then 16 images: each of 3 processes gets some of both
    (32, 16, 2, None),
    (5, 16, 4, None),  # one batch of 5: 4 processes take 2, 1, 1, 1
    (1, 16, 1, None),  # one process takes any batch
])
def test_every_process_gets_an_image_of_every_batch_or_the_run_is_refused(n, batch_size,
                                                                          world_size, smallest):
    if smallest is None or smallest >= world_size:
        training.check_shares(n, batch_size, world_size)
        return
    with pytest.raises(InputError, match=f'a batch of {smallest} training image\\(s\\) cannot be '
                                         f'shared by {world_size} processes'):
        training.check_shares(n, batch_size, world_size)
