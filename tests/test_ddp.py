"""DDP under torchrun with 2 gloo processes gives the same metrics as 1 process on the same data.

Same global batch (16 = 2 x 8), same order (no shuffling), mean losses: the averaged DDP gradient
equals the single-process gradient up to float32 summation order, so the metrics agree to 1e-5."""
import json, os, subprocess, sys
from pathlib import Path
import pytest

HERE = Path(__file__).parent

def _run(cmd, out):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'ABAW_NB_DEVICE': 'cpu'}
    r = subprocess.run(cmd + [str(HERE/'ddp_toy.py'), str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads((out/'result.json').read_text())

def test_ddp_two_gloo_ranks_match_one_process(tmp_path):
    one = _run([sys.executable], tmp_path/'one')
    two = _run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2'], tmp_path/'two')
    assert (one['world'], two['world']) == (1, 2)
    for a, b in zip(one['history'], two['history']):
        assert a['val_n'] == b['val_n'] == 50          # predictions gathered from both ranks, padding removed
        assert abs(a['train_loss'] - b['train_loss']) < 1e-5
        assert abs(a['val_score'] - b['val_score']) < 1e-5
    # and training did something
    assert one['history'][-1]['val_score'] > one['history'][0]['val_score']
