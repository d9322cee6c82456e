"""DDP under torchrun with 2 gloo processes gives the same metrics as 1 process on the same data.

Same global batch (16 = 2 x 8), same order (no shuffling), mean losses: the averaged DDP gradient
equals the single-process gradient up to float32 summation order, so the metrics agree to 1e-5."""

import json, os, subprocess, sys
from pathlib import Path
import pytest

HERE = Path(__file__).parent


def _run(cmd, out):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'ABAW_NB_DEVICE': 'cpu'}
    r = subprocess.run(cmd + [str(HERE / 'ddp_toy.py'), str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads((out / 'result.json').read_text())


def test_ddp_two_gloo_ranks_match_one_process(tmp_path):
    one = _run([sys.executable], tmp_path / 'one')
    two = _run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2'], tmp_path / 'two'
    )
    assert (one['world'], two['world']) == (1, 2)
    for a, b in zip(one['history'], two['history']):
        assert a['val_n'] == b['val_n'] == 50  # predictions gathered from both ranks, padding removed
        assert abs(a['train_loss'] - b['train_loss']) < 1e-5
        assert abs(a['val_score'] - b['val_score']) < 1e-5
    # and training did something
    assert one['history'][-1]['val_score'] > one['history'][0]['val_score']


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_ddp_rank_death_stops_the_other_rank_with_a_clear_error(tmp_path):
    "Rank 1 SIGKILLs itself at its 3rd optimiser step (ABAW_NB_FAULT); rank 0 must not hang in the next all-reduce."
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
                [sys.executable, str(HERE / 'ddp_toy.py'), str(tmp_path / 'run')],
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
