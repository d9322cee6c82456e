"""Reliability and security (DESIGN.md section 8, issue 13): what a crashed week of training or a silently wrong
table would come from, each proven by fault injection, subprocesses and papermill.

- kill and resume: `tests/fault_toy.py` (the real engine on a tiny MLP) SIGKILLs itself at a chosen point
  (`$ABAW_NB_FAULT`, see `abaw_nb.core.fault_point`); no file is ever half-written and a restart ends with the
  metrics and prediction table of an uninterrupted run; FMAE's pretraining and fine-tuning (`tests/fmae_toy.py`) too;
- determinism: same seed, same bytes; another seed, other numbers;
- safe checkpoints: only `torch.load(weights_only=True)` in the package; a pickle that would create a file is
  refused; mismatching state dicts are reported key by key;
- run folder unwritable or disk full: refused before training;
- train_multi.ipynb by papermill: bad inputs (bad annotation line, corrupt image, missing image, out-of-range
  labels), wrongly typed parameters, an unwritable out_dir, two runs at once on a fresh SynthAffect cache.
"""

import json, os, re, shutil, signal, subprocess, sys
from pathlib import Path
import pandas as pd, pytest, torch
from torch import nn

HERE = Path(__file__).parent
ROOT = HERE.parent
TINY = dict(n_subjects=10, n_videos=12, frames=[12, 16], n_pool=0, img_size=32)  # a SynthAffect world of ~160 frames


def _env(**kw):
    env = {k: v for k, v in os.environ.items() if k not in ('ABAW_NB_FAULT', 'MPLBACKEND')}
    env.update(OMP_NUM_THREADS='1', ABAW_NB_DEVICE='cpu', ABAW_NB_PROGRESS='0', PYTHONPATH=str(ROOT))
    env.update({k: str(v) for k, v in kw.items()})
    return env


# ---------------------------------------------------------------------------------------------- kill and resume
def _toy(out, seed=0, fault=None):
    env = _env(**({'ABAW_NB_FAULT': fault} if fault else {}))
    return subprocess.run(
        [sys.executable, str(HERE / 'fault_toy.py'), str(out), str(seed)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def _metrics(run):
    "metrics.jsonl without the wall-clock `seconds` of each epoch (the only field that may differ between runs)."
    return [
        {k: v for k, v in json.loads(l).items() if k != 'seconds'}
        for l in (run / 'metrics.jsonl').read_text().splitlines()
    ]


def _check_complete(run) -> list:
    "Every visible file of the run folder reads back whole; returns the hidden temporary files a killed write left."
    from abaw_nb.train.engine import load_checkpoint

    for p in run.iterdir():
        if p.name.startswith('.'):
            continue
        if p.suffix == '.pt':
            assert isinstance(load_checkpoint(p)['epoch'], int), p
        elif p.suffix == '.json':
            json.loads(p.read_text())
        elif p.suffix == '.jsonl':
            [json.loads(l) for l in p.read_text().splitlines()]
        elif p.suffix == '.csv':
            assert len(pd.read_csv(p)) == 40, p
    return sorted(p.name for p in run.glob('.*.tmp'))


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    "An uninterrupted run (seed 0)."
    run = tmp_path_factory.mktemp('ref') / 'run'
    r = _toy(run)
    assert r.returncode == 0, r.stderr[-3000:]
    return run


# fault point -> (epochs trained after the kill, lines in metrics.jsonl after the kill, temporary file left, last.pt
# kept)
KILLS = {
    'step@15': (1, 1, None, True),  # mid-epoch 2 (10 steps an epoch)
    'partial:last.pt@2': (1, 1, '.last.pt.', True),  # half of epoch 2's checkpoint on disk
    'write:metrics.jsonl@3': (3, 2, '.metrics.jsonl.', True),  # after the last checkpoint, before its metrics line
    'write:finished.json': (3, 3, '.finished.json.', True),  # finished, before last.pt is dropped
    'write:scores_val.json': (3, 3, '.scores_val.json.', False),  # writing the final outputs (last.pt already dropped)
}


@pytest.mark.parametrize('fault', list(KILLS))
def test_kill_and_resume_gives_the_uninterrupted_numbers(fault, reference, tmp_path):
    run = tmp_path / 'run'
    r = _toy(run, fault=fault)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    epochs, lines, tmp, last_kept = KILLS[fault]
    temps = _check_complete(run)  # nothing visible is half-written
    assert [t.startswith(tmp) for t in temps] == ([True] if tmp else []), temps
    from abaw_nb.train.engine import load_checkpoint

    assert (run / 'last.pt').is_file() == last_kept
    if last_kept:
        assert load_checkpoint(run / 'last.pt')['epoch'] == epochs
    else:
        assert json.loads((run / 'finished.json').read_text())['epochs'] == epochs
    assert len((run / 'metrics.jsonl').read_text().splitlines()) == lines
    assert not (run / 'scores_val.json').exists()
    r = _toy(run)  # restart: resumes from last.pt (or reopens the finished run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _check_complete(run) == []  # the stale temporary file is gone
    assert _metrics(run) == _metrics(reference)
    assert (run / 'predictions_val.csv').read_bytes() == (reference / 'predictions_val.csv').read_bytes()
    assert json.loads((run / 'scores_val.json').read_text()) == json.loads((reference / 'scores_val.json').read_text())
    assert load_checkpoint(run / 'best.pt')['epoch'] == load_checkpoint(reference / 'best.pt')['epoch']
    assert not (run / 'last.pt').exists() and (run / 'finished.json').is_file()  # a finished run keeps its weights only


def _fmae(out, stage, fault=None):
    env = _env(**({'ABAW_NB_FAULT': fault} if fault else {}))
    return subprocess.run(
        [sys.executable, str(HERE / 'fmae_toy.py'), str(out), stage],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


# killed in epoch 2 (3 and 2 steps an epoch)
@pytest.mark.parametrize('stage,fault', [('mae', 'step@4'), ('au', 'step@3')])
def test_fmae_stages_resume_after_a_kill(stage, fault, tmp_path):
    """FMAE's MAE pretraining and AU fine-tuning are engine runs: killed mid-epoch, they resume to the uninterrupted
    numbers."""
    from abaw_nb.train.engine import load_checkpoint

    ref, run = tmp_path / 'ref', tmp_path / 'killed'
    r = _fmae(ref, stage)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _fmae(run, stage, fault)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    assert load_checkpoint(run / 'run' / 'last.pt')['epoch'] == 1 and not (run / 'result.json').exists()
    r = _fmae(run, stage)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(_metrics(run / 'run')) == 2 and _metrics(run / 'run') == _metrics(ref / 'run')
    assert json.loads((run / 'result.json').read_text()) == json.loads((ref / 'result.json').read_text())


def test_same_seed_same_numbers_other_seed_other_numbers(reference, tmp_path):
    same, other = tmp_path / 'same', tmp_path / 'other'
    for run, seed in ((same, 0), (other, 1)):
        r = _toy(run, seed)
        assert r.returncode == 0, r.stderr[-3000:]
    assert _metrics(same) == _metrics(reference)
    assert (same / 'predictions_val.csv').read_bytes() == (reference / 'predictions_val.csv').read_bytes()
    m0, m1 = _metrics(reference), _metrics(other)
    assert all(a['train_loss'] != b['train_loss'] and a['val_score'] != b['val_score'] for a, b in zip(m0, m1))
    p0, p1 = pd.read_csv(reference / 'predictions_val.csv'), pd.read_csv(other / 'predictions_val.csv')
    assert (p0['index'] == p1['index']).all() and (p0['pred'] != p1['pred']).all()


# ---------------------------------------------------------------------------------------------- safe checkpoints
def test_every_torch_load_in_the_package_is_weights_only():
    calls = []
    for p in sorted((ROOT / 'abaw_nb').rglob('*.py')) + sorted((ROOT / 'nbs').rglob('*.ipynb')):
        text = p.read_text()
        for m in re.finditer(r'torch\.load\(', text):
            line = text[m.start() : text.find('\n', m.start())]
            calls.append((str(p.relative_to(ROOT)), line))
    assert any(f == 'abaw_nb/train/engine.py' for f, _ in calls)  # the grep finds the real one
    bad = [(f, l) for f, l in calls if 'weights_only=True' not in l]
    assert bad == [], f'torch.load without weights_only=True: {bad}'
    pickle_loads = [
        str(p)
        for p in (ROOT / 'abaw_nb').rglob('*.py')
        if re.search(r'pickle\.loads?\(|allow_pickle=True', p.read_text())
    ]
    assert pickle_loads == []


class _CreatesFile:
    "Unpickling this calls open(path, 'w'): it creates a file."

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, 'w'))


def test_crafted_pickle_checkpoint_is_refused(tmp_path):
    from abaw_nb.train.engine import load_checkpoint, UnsafeCheckpoint, Trainer
    from abaw_nb.core import get_config

    target = tmp_path / 'pwned.txt'
    torch.save({'model': _CreatesFile(target), 'epoch': 1}, tmp_path / 'evil.pt')
    # the file really is dangerous: a plain pickle load in another process creates the file
    probe = tmp_path / 'probe'
    probe.mkdir()
    torch.save({'model': _CreatesFile(probe / 'made.txt')}, probe / 'evil.pt')
    subprocess.run(
        [sys.executable, '-c', f"import torch; torch.load({str(probe / 'evil.pt')!r}, weights_only=False)"],
        env=_env(),
        capture_output=True,
        cwd=HERE,
    )
    assert (probe / 'made.txt').exists()
    with pytest.raises(
        UnsafeCheckpoint, match=r'refusing to load .*evil\.pt: it is not a plain-tensor checkpoint and would run code'
    ):
        load_checkpoint(tmp_path / 'evil.pt')
    assert not target.exists()
    # the same file as a run's last.pt: resuming refuses it too
    run = tmp_path / 'run'
    run.mkdir()
    shutil.copy(tmp_path / 'evil.pt', run / 'last.pt')
    cfg = get_config('smoke', progress=False, out_dir=str(run))
    with pytest.raises(UnsafeCheckpoint, match='last.pt'):
        Trainer(nn.Linear(2, 1), cfg, loss_fn=None, out_dir=run)
    assert not target.exists()


def test_mismatching_checkpoint_is_reported_key_by_key(tmp_path):
    from abaw_nb.train.engine import Trainer, CheckpointMismatch
    from abaw_nb.core import get_config

    cfg = get_config('smoke', progress=False)
    a = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    t = Trainer(a, cfg, loss_fn=None, out_dir=tmp_path)
    t.save(tmp_path / 'last.pt')
    b = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2), nn.Linear(2, 2))
    with pytest.raises(CheckpointMismatch) as e:
        Trainer(b, cfg, loss_fn=None, out_dir=tmp_path)
    lines = str(e.value).splitlines()
    assert lines[0].endswith('last.pt does not fit the model (2 missing, 0 unexpected, 3 wrong shape):')
    assert lines[1:] == [
        '  missing key: 3.weight',
        '  missing key: 3.bias',
        '  wrong shape: 0.weight: checkpoint (8, 4), model (16, 4)',
        '  wrong shape: 0.bias: checkpoint (8,), model (16,)',
        '  wrong shape: 2.weight: checkpoint (2, 8), model (2, 16)',
    ]


# ---------------------------------------------------------------------------------------------- run folder
def test_full_disk_is_refused_before_training(tmp_path, monkeypatch, tiny_world):
    "Through `train()`: the disk looks almost full; the run stops before the first step and leaves no folder."
    from abaw_nb.core import OutputDirError
    from abaw_nb.data.formats import read_affwild2
    from abaw_nb.train.run import run_config, train
    import abaw_nb.train.engine as engine

    steps = []
    monkeypatch.setattr(engine.Trainer, 'train_epoch', lambda self: steps.append(1))
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, 'disk_usage', lambda p: real(p)._replace(free=50 * 2**20))
    run = tmp_path / 'run'
    cfg = run_config('fpn', 'va', 'smoke', out_dir=str(run), progress=False)
    with pytest.raises(
        OutputDirError,
        match=r'not enough free disk space for the run in .*run: 50.0 MiB free, about [\d,.]+ MiB needed',
    ):
        train(cfg, verbose=False, data=(read_affwild2(tiny_world), tiny_world))
    assert steps == [] and not run.exists()


# ---------------------------------------------------------------------------------------------- train_multi by
# papermill
def _papermill(out_nb, *params, **env):
    cmd = [
        str(Path(sys.executable).parent / 'papermill'),
        str(ROOT / 'nbs' / 'train_multi.ipynb'),
        str(out_nb),
        '-k',
        'python3',
        '--no-progress-bar',
        *params,
    ]
    return subprocess.Popen(
        cmd, cwd=out_nb.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(**env)
    )


def _run(out_nb, *params, **env):
    p = _papermill(out_nb, *params, **env)
    out, err = p.communicate(timeout=900)
    return p.returncode, out + err


def _cells(nb_path):
    "(source, text output, has error) per code cell of an executed notebook."
    nb = json.loads(Path(nb_path).read_text())
    res = []
    for c in nb['cells']:
        if c['cell_type'] != 'code':
            continue
        text = ''.join(
            ''.join(o.get('text', ''))
            + '\n'.join(o.get('traceback', []))
            + (f"\n{o['ename']}: {o['evalue']}" if o.get('output_type') == 'error' else '')
            for o in c.get('outputs', [])
        )
        res.append((''.join(c['source']), text, any(o.get('output_type') == 'error' for o in c.get('outputs', []))))
    return res


def _first_error(nb_path):
    cells = _cells(nb_path)
    i = next(i for i, c in enumerate(cells) if c[2])
    return i, cells[i][0], re.sub(r'\x1b\[[0-9;]*m', '', cells[i][1])


@pytest.fixture(scope='module')
def tiny_world(tmp_path_factory):
    "A small SynthAffect world in the Aff-Wild2 layout (the bad-input cases copy and damage it)."
    from abaw_nb.data.synth import generate

    return generate(tmp_path_factory.mktemp('tiny') / 'world', 'smoke', 0, workers=1, show_progress=False, **TINY)


def _damaged(tiny_world, tmp_path, damage):
    root = tmp_path / 'data'
    shutil.copytree(tiny_world, root)
    return damage(root)


def _set_line(path, lineno, text):
    lines = path.read_text().splitlines()
    lines[lineno - 1] = text
    path.write_text('\n'.join(lines) + '\n')


def test_bad_annotation_line_stops_with_file_and_line(tiny_world, tmp_path):
    f = _damaged(tiny_world, tmp_path, lambda r: r / 'annotations/VA_Set/Train_Set/synth_0002.txt')
    _set_line(f, 5, '0.25,abc')
    run = tmp_path / 'run'
    rc, log = _run(tmp_path / 'out.ipynb', '-p', 'data_root', str(tmp_path / 'data'), '-p', 'out_dir', str(run))
    assert rc != 0
    i, src, msg = _first_error(tmp_path / 'out.ipynb')
    assert 'train(with_prerequisites(cfg))' in src  # the first failing cell: where the data is read
    assert f"FormatError: {f}, line 5: non-numeric value 'abc' in '0.25,abc'" in msg
    assert not run.exists()  # no partial run folder


def test_corrupt_image_stops_with_the_file_and_leaves_no_run_folder(tiny_world, tmp_path):
    def damage(r):  # every image of the first validation video with VA labels (what the run reads): truncated
        video = sorted((r / 'annotations' / 'VA_Set' / 'Validation_Set').glob('*.txt'))[0].stem
        for img in (r / 'cropped_aligned' / video).glob('*.jpg'):
            img.write_bytes(img.read_bytes()[:80])
        return r / 'cropped_aligned' / video

    folder = _damaged(tiny_world, tmp_path, damage)
    run = tmp_path / 'run'
    rc, log = _run(tmp_path / 'out.ipynb', '-p', 'data_root', str(tmp_path / 'data'), '-p', 'out_dir', str(run))
    assert rc != 0
    i, src, msg = _first_error(tmp_path / 'out.ipynb')
    assert 'train(with_prerequisites(cfg))' in src
    assert re.search(rf'ImageReadError: corrupt or truncated image {folder}/\d{{5}}\.jpg', msg), msg[-2000:]
    assert not run.exists()  # config.json etc. of the failed run were removed


def test_missing_image_and_out_of_range_labels_are_counted_and_reported(tiny_world, tmp_path):
    from abaw_nb.data.formats import read_affwild2

    base = {}
    for it in read_affwild2(tiny_world).attrs['issues']:
        base[it['kind']] = base.get(it['kind'], 0) + it['count']

    def damage(r):
        sorted((r / 'cropped_aligned' / 'synth_0004').glob('*.jpg'))[2].unlink()  # an annotated frame loses its image
        _set_line(r / 'annotations/VA_Set/Train_Set/synth_0002.txt', 4, '3.0,0.1')  # valence out of [-1, 1]
        _set_line(r / 'annotations/VA_Set/Train_Set/synth_0002.txt', 6, '0.1,-7')
        return r

    _damaged(tiny_world, tmp_path, damage)
    run = tmp_path / 'run'
    rc, log = _run(tmp_path / 'out.ipynb', '-p', 'data_root', str(tmp_path / 'data'), '-p', 'out_dir', str(run))
    assert rc == 0, log[-3000:]
    train_out = next(t for s, t, e in _cells(tmp_path / 'out.ipynb') if 'train(with_prerequisites(cfg))' in s)
    assert (
        f"out_of_range: {base.get('out_of_range', 0) + 2} in" in train_out
        and 'VA_Set/Train_Set/synth_0002.txt' in train_out
    )
    assert f"missing_image: {base.get('missing_image', 0) + 1} in" in train_out
    rep = pd.read_csv(run / 'data_report.csv')
    tot = rep[rep.section == 'issues_total'].set_index('key')['value']
    assert (
        tot['out_of_range'] == base.get('out_of_range', 0) + 2
        and tot['missing_image'] == base.get('missing_image', 0) + 1
    )


def test_wrongly_typed_parameters_fail_fast_with_what_is_valid(tmp_path):
    """papermill -p epochs ten: the first cell after the parameters stops with the expected type (test_train_multi.py
    has task='pose')."""
    out = tmp_path / 'out.ipynb'
    rc, log = _run(out, '-p', 'epochs', 'ten', ABAW_NB_CACHE=tmp_path / 'cache')
    assert rc != 0
    i, src, msg = _first_error(out)
    assert 'run_config(' in src and "TypeError: epochs='ten' has type str; expected int" in msg, msg[-2000:]
    assert not (tmp_path / 'cache').exists()  # stopped before any data was generated
    # the same check, in process, for the other papermill-typed mistakes (each would cost a kernel start here)
    from abaw_nb.train.run import run_config

    for kw, err, message in [
        (dict(task=3), ValueError, 'task=3 is not valid; choose one of: va, expr, au, multi'),
        (dict(method='resnet'), ValueError, "method='resnet' is not valid; choose one of: fpn, mtl_cnn"),
        (dict(extra='variant=gcn'), TypeError, 'extra must be a dict of method options'),
        (dict(batch_size=8.5), TypeError, 'batch_size=8.5 has type float; expected int'),
        (dict(progress='no'), TypeError, "progress='no' has type str; expected bool or None"),
    ]:
        with pytest.raises(err, match=re.escape(message)):
            run_config(**{'method': 'fpn', 'task': 'va', **kw})


def test_unwritable_out_dir_is_refused_before_reading_data(tmp_path, monkeypatch):
    "Through `train()`, as train_multi calls it: the run folder would sit under a file; nothing is read or generated."
    from abaw_nb.core import OutputDirError
    from abaw_nb.train.run import run_config, train

    monkeypatch.setenv('ABAW_NB_CACHE', str(tmp_path / 'cache'))
    (tmp_path / 'afile').write_text('not a folder')
    cfg = run_config('fpn', 'va', 'smoke', out_dir=str(tmp_path / 'afile' / 'run'), progress=False)
    with pytest.raises(
        OutputDirError, match=re.escape(f'the output folder {tmp_path}/afile/run is not writable (Not a directory)')
    ):
        train(cfg, verbose=False)
    assert not (tmp_path / 'cache').exists()
    if os.geteuid() != 0:  # permissions bind everyone but root
        ro = tmp_path / 'ro'
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(OutputDirError, match='is not writable'):
            train(cfg.replace(out_dir=str(ro / 'run')), verbose=False)


def test_two_runs_at_once_share_a_fresh_cache(tmp_path):
    cache = tmp_path / 'cache'
    # a world without an unlabelled pool: no stand-in to pretrain, so the FPN starts from random weights
    tiny = 'config: {synth: {n_subjects: 10, n_videos: 12, frames: [12, 16], n_pool: 0, img_size: 32}}'
    procs = [
        (
            _papermill(
                tmp_path / f'out{i}.ipynb',
                '-p',
                'out_dir',
                str(tmp_path / f'run{i}'),
                '-y',
                tiny + '\nextra: {pretrained: none}',
                ABAW_NB_CACHE=cache,
            ),
            i,
        )
        for i in (0, 1)
    ]
    for p, i in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, (i, (out + err)[-3000:])
    log = (cache / 'synthaffect' / 'generate.log').read_text().splitlines()
    assert len(log) == 1  # generated once
    folders = sorted(p.name for p in (cache / 'synthaffect').iterdir() if p.is_dir())
    assert len(folders) == 1 and folders[0].startswith('smoke-0-')  # no temporary folder left behind
    p0, p1 = (json.loads((tmp_path / f'run{i}' / 'provenance.json').read_text()) for i in (0, 1))
    assert p0['data_fingerprint'] == p1['data_fingerprint']
    s0, s1 = (json.loads((tmp_path / f'run{i}' / 'scores_val.json').read_text()) for i in (0, 1))
    assert s0 == s1  # same seed, same data: same numbers
