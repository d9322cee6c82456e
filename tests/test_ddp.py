"""DDP under torchrun with 2 gloo processes gives the same metrics as 1 process on the same data.

Same global batch (16 = 2 x 8), same order (no shuffling), mean losses: the averaged DDP gradient
equals the single-process gradient up to float32 summation order, so the metrics agree to 1e-5."""

import json, os, subprocess, sys
from pathlib import Path
import pytest

HERE = Path(__file__).parent
# one node: the rendezvous on the loopback, so the tests do not depend on what this machine's host name resolves to
# (where it names an unreachable address, torchrun's own rendezvous waits for minutes before the ranks even start)
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--local-addr', '127.0.0.1']


def _run(cmd, out, sampler='none'):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'ABAW_NB_DEVICE': 'cpu'}
    r = subprocess.run(
        cmd + [str(HERE / 'ddp_toy.py'), str(out), sampler], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads((out / 'result.json').read_text())


def test_ddp_two_gloo_ranks_match_one_process(tmp_path):
    one = _run([sys.executable], tmp_path / 'one')
    two = _run(TORCHRUN + ['--nproc_per_node', '2'], tmp_path / 'two')
    assert (one['world'], two['world']) == (1, 2)
    for a, b in zip(one['history'], two['history']):
        assert a['val_n'] == b['val_n'] == 50  # predictions gathered from both ranks, padding removed
        assert abs(a['train_loss'] - b['train_loss']) < 1e-5
        assert abs(a['val_score'] - b['val_score']) < 1e-5
    # and training did something
    assert one['history'][-1]['val_score'] > one['history'][0]['val_score']


def test_ddp_balanced_sampler_two_ranks_draw_the_one_process_epoch(tmp_path):
    """A balancing sampler under DDP: each rank trains on its share of the same (seed, epoch) draw, so the ranks' j-th
    batches together are the single process's j-th batch, every epoch, and the metrics agree."""
    import importlib.util
    import numpy as np
    from abaw_nb.data.sampling import weighted_sampler

    one = _run([sys.executable], tmp_path / 'one', 'weighted')
    two = _run(TORCHRUN + ['--nproc_per_node', '2'], tmp_path / 'two', 'weighted')
    assert (one['world'], two['world']) == (1, 2)
    d1 = json.loads((tmp_path / 'one' / 'draws_rank0.json').read_text())
    r0, r1 = (json.loads((tmp_path / 'two' / f'draws_rank{r}.json').read_text()) for r in (0, 1))
    # the single process draws what the sampler says for (seed 0, epoch): computed here from the toy's weights
    spec = importlib.util.spec_from_file_location('ddp_toy', HERE / 'ddp_toy.py')
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    s = weighted_sampler(toy.toy_weights(toy.Toy(160, 0)), seed=0)
    assert sorted(d1) == sorted(r0) == sorted(r1) == ['0', '1', '2']
    for e in d1:
        assert sum(d1[e], []) == s.draw(int(e)).tolist()
        assert len(d1[e]) == len(r0[e]) == len(r1[e]) == 10  # 10 global batches of 16 = 2 x 8
        for b1, b0, bb in zip(d1[e], r0[e], r1[e]):
            assert (len(b0), len(bb)) == (8, 8)
            assert sorted(b0 + bb) == sorted(b1)
    assert d1['0'] != d1['1']  # redrawn every epoch
    pos = (toy.Toy(160, 0).y > 0).numpy()
    assert pos[np.array(sum(d1['0'], []))].mean() > 0.7  # balanced: 4:1 weights on ~half the rows
    for a, b in zip(one['history'], two['history']):
        assert abs(a['train_loss'] - b['train_loss']) < 1e-5
        assert abs(a['val_score'] - b['val_score']) < 1e-5


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.parametrize('sampler', ['none', 'weighted'])
def test_ddp_rank_death_stops_the_other_rank_with_a_clear_error(tmp_path, sampler):
    """Rank 1 SIGKILLs itself at its 3rd optimiser step (ABAW_NB_FAULT); rank 0 must not hang in the next all-reduce,
    with the default shards and with a balancing sampler's."""
    import signal, time

    base = {
        **os.environ,
        'OMP_NUM_THREADS': '1',
        'ABAW_NB_DEVICE': 'cpu',
        'ABAW_NB_PROGRESS': '0',
        'MASTER_ADDR': '127.0.0.1',
        'MASTER_PORT': str(_free_port()),
        'WORLD_SIZE': '2',
        'LOCAL_WORLD_SIZE': '2',
        'ABAW_NB_DIST_TIMEOUT': '60',
    }
    base.pop('ABAW_NB_FAULT', None)
    procs = []
    for rank in (0, 1):  # launched by hand, not by torchrun, whose agent would kill the survivors itself
        env = {**base, 'RANK': str(rank), 'LOCAL_RANK': str(rank), **({'ABAW_NB_FAULT': 'step@3'} if rank == 1 else {})}
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HERE / 'ddp_toy.py'), str(tmp_path / 'run'), sampler],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    procs[1].communicate(timeout=300)
    assert procs[1].returncode == -signal.SIGKILL
    died = time.time()
    try:
        out, err = procs[0].communicate(timeout=120)  # bounded: well below the 60 s timeout + start-up, never forever
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail('rank 0 still running 120 s after rank 1 died')
    assert procs[0].returncode not in (0, None)
    assert (
        'DistributedFailure: rank 0 of 2: training stopped at epoch 1 because a collective with the other ranks failed'
        in err
    ), err[-3000:]
    print(f'rank 0 stopped {time.time() - died:.1f} s after rank 1 died')
    assert not (tmp_path / 'run' / 'result.json').exists()


def test_abaw_train_under_torchrun_two_ranks(tmp_path):
    """`python -m abaw_nb.train` under torchrun, 2 gloo ranks: a Multitask-CNN smoke run (its balancing sampler sharded
    over the ranks) writes one run folder, named by rank 0, whose provenance says world size 2."""
    env = {
        **os.environ,
        'OMP_NUM_THREADS': '1',
        'ABAW_NB_DEVICE': 'cpu',
        'ABAW_NB_PROGRESS': '0',
        'ABAW_NB_OUTPUTS': str(tmp_path / 'outputs'),
    }
    cmd = [
        *TORCHRUN,
        '--nproc_per_node',
        '2',
        '-m',
        'abaw_nb.train',
        '--method',
        'mtl_cnn',
        '--task',
        'multi',
        '--preset',
        'smoke',
        '--config',
        '{max_steps_per_epoch: 3}',
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    runs = list((tmp_path / 'outputs' / 'runs').iterdir())
    assert len(runs) == 1, runs  # one folder for both ranks
    run = runs[0]
    assert r.stdout.count('run folder: ') == 1 and f'run folder: {run}' in r.stdout  # rank 0 reports
    prov = json.loads((run / 'provenance.json').read_text())
    assert prov['world_size'] == 2
    cfg = json.loads((run / 'config.json').read_text())
    assert (cfg['method'], cfg['task'], cfg['max_steps_per_epoch']) == ('mtl_cnn', 'multi', 3)
    hist = [json.loads(l) for l in (run / 'metrics.jsonl').read_text().splitlines()]
    assert [h['epoch'] for h in hist] == [1] and hist[0]['train_loss'] > 0
    scores = json.loads((run / 'scores_val.json').read_text())
    assert 0 <= scores['score'] <= 3
    import pandas as pd

    pred = pd.read_csv(run / 'predictions_val.csv')
    assert len(pred) == len(set(zip(pred['video'], pred['frame'])))  # the ranks' predictions gathered, no duplicates
