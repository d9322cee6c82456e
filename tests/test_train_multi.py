"""train_multi.ipynb through the papermill CLI, as a researcher calls it."""

import json, os, re, subprocess, sys
from pathlib import Path
import pytest
from abaw_nb.methods import UnknownSetting
from abaw_nb.train.run import load_run, run_config


def _papermill(root, out_nb, *params, cwd=None):
    cmd = [
        str(Path(sys.executable).parent / 'papermill'),
        str(root / 'nbs' / 'train_multi.ipynb'),
        str(out_nb),
        '-k',
        'python3',
        '--no-progress-bar',
        *params,
    ]
    env = {k: v for k, v in os.environ.items() if k != 'MPLBACKEND'}  # the kernel's own inline backend draws figures
    env['ABAW_NB_PROGRESS'] = '0'
    return subprocess.run(cmd, cwd=cwd or root, capture_output=True, text=True, env=env, timeout=900)


def test_train_multi_va_writes_a_run_folder(root, tmp_path):
    run = tmp_path / 'run'
    r = _papermill(root, tmp_path / 'out.ipynb', '-p', 'task', 'va', '-p', 'out_dir', str(run), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    back = load_run(run)
    assert (back['config'].task, back['config'].method, back['config'].preset) == ('va', 'fpn', 'smoke')
    assert {'va_ccc_valence', 'va_ccc_arousal', 'score'} <= set(back['scores'])
    assert set(back['predictions'].columns) >= {'video', 'frame', 'valence', 'arousal'}
    nb = json.loads((tmp_path / 'out.ipynb').read_text())
    assert nb['metadata']['papermill']['parameters']['task'] == 'va'  # provenance of the call
    kinds = [o.get('output_type') for c in nb['cells'] for o in c.get('outputs', [])]
    assert 'display_data' in kinds  # the learning-curve figure was drawn
    assert (run / 'learning_curves.png').read_bytes()[:4] == b'\x89PNG'


def test_train_multi_rejects_invalid_parameters_first(root, tmp_path):
    out = tmp_path / 'out.ipynb'
    r = _papermill(root, out, '-p', 'task', 'pose')
    assert r.returncode != 0
    assert "task='pose' is not valid; choose one of: va, expr, au, multi" in r.stderr
    nb = json.loads(out.read_text())
    cells = nb['cells']
    inj = next(i for i, c in enumerate(cells) if 'injected-parameters' in c['metadata'].get('tags', []))
    failed = [i for i, c in enumerate(cells) if any(o.get('output_type') == 'error' for o in c.get('outputs', []))]
    first_code_after = next(i for i in range(inj + 1, len(cells)) if cells[i]['cell_type'] == 'code')
    assert failed == [first_code_after]  # the first cell after the parameters stops the run
    # the same cell's other refusals, called as that cell calls them (a kernel start each would add half a minute)
    methods = 'fpn, mtl_cnn, mtl_cnn_rnn, emenet, emotion_gcn, fmae'  # the registered (built-in) methods are listed
    with pytest.raises(ValueError, match=re.escape(f"method='nosuch' is not valid; choose one of: {methods}")):
        run_config('nosuch', 'va', 'smoke')
    with pytest.raises(UnknownSetting) as e:  # a misspelt setting is refused
        run_config('emenet', 'va', 'smoke', extra={'seq_lenn': 6})
    assert (
        "unknown setting(s) ['seq_lenn'] of method 'emenet'; valid settings: backbone (str), "
        'pretrained (str | None), audio (bool)' in str(e.value)
    )


def test_train_multi_emenet_clips(root, tmp_path):
    "A clip-based method through the same entry point: one prediction row per validation frame, with uncertainties."
    run = tmp_path / 'run'
    r = _papermill(
        root,
        tmp_path / 'out.ipynb',
        '-p',
        'method',
        'emenet',
        '-p',
        'task',
        'va',
        '-p',
        'out_dir',
        str(run),
        '-y',
        'extra: {seq_len: 6}',
        cwd=tmp_path,
    )  # a method option through the `extra` dict
    assert r.returncode == 0, r.stderr[-3000:]
    back = load_run(run)
    assert back['config'].method == 'emenet' and back['config'].extra['seq_len'] == 6  # smoke preset's default is 4
    pred = back['predictions']
    assert pred['index'].tolist() == list(range(len(pred))) and pred[['video', 'frame']].duplicated().sum() == 0
    assert {'valence', 'arousal', 'unc_valence', 'unc_arousal'} <= set(pred.columns)
    assert pred['unc_valence'].between(0, 1).all()


def test_train_multi_mtl_cnn_rnn_smoke(root, tmp_path):
    "method=mtl_cnn_rnn: trains (or reuses) the Multitask-CNN teacher, then the frozen-CNN + GRU model on clips."
    run = tmp_path / 'run'
    r = _papermill(
        root, tmp_path / 'out.ipynb', '-p', 'task', 'multi', '-p', 'method', 'mtl_cnn_rnn', '-p', 'out_dir', str(run)
    )
    assert r.returncode == 0, r.stderr[-3000:]
    back = load_run(run)
    assert (back['config'].method, back['config'].extra['seq_len']) == ('mtl_cnn_rnn', 8)
    cnn = Path(back['config'].extra['cnn_run'])  # the Multitask-CNN it froze, trained first
    assert cnn.name.startswith('mtl_cnn-') and load_run(cnn)['config'].method == 'mtl_cnn'
    assert {'va_score', 'expr_score', 'au_score', 'score'} <= set(back['scores'])
    pred = back['predictions']
    assert pred[['video', 'frame']].duplicated().sum() == 0  # overlapping windows averaged to one row per frame
    assert {'valence', 'arousal', 'prob_expr_0', 'prob_AU12'} <= set(pred.columns)


@pytest.mark.parametrize('variant,embeddings', [('multi_task', None), ('emotion_gcn', 'onehot')])
def test_train_multi_emotion_gcn_variant_from_extra(root, tmp_path, variant, embeddings):
    """method=emotion_gcn reads its variant (and node embeddings) from `extra`; the run folder's config and weights
    say so."""
    import torch
    from abaw_nb.train.engine import load_checkpoint

    run = tmp_path / 'run'
    x = f'variant: {variant}' + (f', embeddings: {embeddings}' if embeddings else '')
    r = _papermill(
        root,
        tmp_path / 'out.ipynb',
        '-p',
        'method',
        'emotion_gcn',
        '-p',
        'task',
        'multi',
        '-p',
        'out_dir',
        str(run),
        '-y',
        f'extra: {{{x}}}',
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    back = load_run(run)
    cfg = back['config']
    assert (cfg.method, cfg.task, cfg.extra['variant']) == (
        'emotion_gcn',
        'multi',
        variant,
    )  # default for multi: emotion_gcn
    sd = load_checkpoint(run / 'best.pt', map_location='cpu')['model']
    if variant == 'multi_task':
        assert 'fc_cont.weight' in sd and not any(k.startswith('gcn.') for k in sd)  # the baseline's two linear heads
    else:
        assert cfg.extra['embeddings'] == 'onehot'
        assert torch.equal(sd['gcn.emb'], torch.eye(9))  # one-hot node inputs, not MiniLM
    assert {'expr_f1', 'expr_acc', 'va_ccc_valence', 'va_ccc_arousal'} <= set(back['scores'])
