"""Checkpoint importers against the reference parity kit (tests/parity_kit in the checkout, or $ABAW_PARITY_KIT): every
kit folder with outputs under both
fill rules, key-list-only folders on the meta device, and the failure naming a renamed key or a changed shape. The
harness (fill rules, the originals' layouts, import -> forward -> compare) is tests/parity.py; the importers live beside
their methods and `abaw_nb.methods.import_checkpoint` dispatches by format.

Kept in pytest rather than the notebook: each case writes a full-size checkpoint (up to 350 MB for the ViT-B) to a
temporary file in the original's layout and imports it from there."""

import json, math
from pathlib import Path
import numpy as np, pytest, torch
import parity as ck
from abaw_nb.checkpoints import CheckpointError, Imported, Preprocess, Labels
from abaw_nb.methods import import_checkpoint, checkpoint_formats


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(min(n, 2))
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize('rule', ['A', 'B'])
@pytest.mark.parametrize('folder', sorted(ck.KIT))
def test_parity(folder, rule, tmp_path):
    imp = ck.kit_import(folder, rule, tmp_dir=tmp_path)
    got = ck.kit_forward(imp, folder)
    ref = ck.kit_outputs(folder, rule, diagnostics=True)
    assert set(ck.kit_outputs(folder, rule)) <= set(got)  # every output of the original is produced
    ck.kit_compare(got, ref)  # atol 1e-4 + rtol 1e-3, element-wise
    if (
        folder.startswith(('emotion_gcn_densenet', 'emotion_gcn_bregnext')) and rule == 'A'
    ):  # degenerate: relative to scale
        for k in ('expr_logits', 'va'):
            assert np.abs(got[k] - ref[k]).max() <= 1e-3 * np.abs(ref[k]).max()


def test_bregnext_shortcut_zeros_at_the_end_fail_parity(tmp_path, monkeypatch):
    "The kit tells the shortcut's zero channels on both sides (the original's) from zeros at the end, under rule B."
    import abaw_nb.models.backbones as bb

    imp = ck.kit_import('emotion_gcn_bregnext_112', 'B', tmp_dir=tmp_path)
    ref = ck.kit_outputs('emotion_gcn_bregnext_112', 'B', diagnostics=True)
    ck.kit_compare(ck.kit_forward(imp, 'emotion_gcn_bregnext_112'), ref)
    pad, calls = bb.F.pad, []

    def at_the_end(x, p, *a, **k):  # the channel pad (0, 0, 0, 0, before, after) -> (0, 0, 0, 0, 0, before + after)
        calls.append(p)
        return pad(x, (0, 0, 0, 0, 0, p[4] + p[5]) if len(p) == 6 else p, *a, **k)

    monkeypatch.setattr(bb.F, 'pad', at_the_end)
    with pytest.raises(AssertionError, match=r'outputs differ from the kit: expr_logits.*va'):
        ck.kit_compare(ck.kit_forward(imp, 'emotion_gcn_bregnext_112'), ref)
    assert calls == [(0, 0, 0, 0, 16, 16), (0, 0, 0, 0, 32, 32)]  # the two widening layers, 32->64 and 64->128


def test_fill_rule_and_input_rule_match_the_kit():
    "The kit README's worked examples, the checksums and first values of every key (rule A and B), and the input rule."
    np.testing.assert_allclose(
        ck.fill_values('head.bias', (12,))[:3], [0.096029369, 0.051716877, -0.069358972], atol=1e-7
    )
    np.testing.assert_allclose(
        ck.fill_values('head.bias', (12,), rule='B')[:3], [0.072325008, 0.077477833, 0.090000224], atol=1e-7
    )
    np.testing.assert_allclose(
        ck.fill_values('backbone.conv1.conv.weight', (64, 3, 3, 3)).ravel()[:3],
        [0.2455298, 0.0800898, -0.1369565],
        atol=1e-6,
    )
    assert (ck.fill_values('x.num_batches_tracked', (), 'int64') == np.zeros((), np.int64)).all()
    for f in json.loads((ck.kit_dir() / 'index.json').read_text())['models']:
        for rule in ck.kit_fill_sources(f['folder']):
            adj = (ck.kit_dir(f['folder']) / 'A.npy').is_file()  # the original's adjacency is data, not rule-filled
            assert ck.check_fill(f['folder'], rule, max_numel=50_000) == f['n_keys'] - adj
    np.testing.assert_allclose(
        ck.kit_input((2, 3, 112, 112)).ravel()[:2], [0.1, 0.5 * math.sin(0.001) + 0.1 * math.cos(0.017)], atol=1e-7
    )
    k, s, dt = ck.kit_keys('emenet_v')['keys'][0]  # a fill of the wrong rule is caught
    assert not np.allclose(
        ck.fill_values(k, s, dt, 'B', first=3), ck.kit_fill_sources('emenet_v')['A']['fill_first_values'][k]
    )


def test_every_released_format_has_an_importer_in_the_registry():
    assert set(ck.FORMATS) == set(checkpoint_formats())
    assert {ck.KIT[f][0] for f in ck.KIT} | set(ck.KEYS_ONLY.values()) == set(ck.FORMATS)


def test_input_rule_matches_the_kits_files():
    found = 0
    for folder, (_, _, shape) in ck.KIT.items():
        f = ck.kit_input_file(folder)
        if f is None:
            continue
        np.testing.assert_array_equal(ck.kit_input(shape), np.load(f))
        found += 1
    assert found >= 5  # every kit folder with outputs but the CNN-RNN (whose 9.6 MB input is made by the rule) has one
    for folder, (
        _,
        _,
        shape,
    ) in ck.KIT.items():  # the input each folder's forward is given has the reference run's shape
        assert list(shape) == ck.kit_keys(folder)['input']['shape'], folder
    x = ck.kit_input((2, 32, 3, 112, 112))  # 5-D rule: frame (b, t) is the block of the 4-D (B*T, ...) input
    np.testing.assert_array_equal(x[1, 2], ck.kit_input((64, 3, 112, 112))[32 + 2])


@pytest.mark.parametrize('rule', ['A', 'B'])
def test_fill_rule_checksums_of_every_key(rule):
    for folder in sorted(ck.KIT):
        assert ck.check_fill(folder, rule) == ck.kit_keys(folder)['n_keys'] - (ck.kit_dir(folder) / 'A.npy').is_file()


def _meta_import(folder, sd):
    fmt = ck.KIT[folder][0] if folder in ck.KIT else ck.KEYS_ONLY[folder]
    kw = {'embeddings': np.zeros((9, 300), np.float32)} if fmt in ('emotion_gcn', 'emotion_gcn_bregnext') else {}
    return import_checkpoint(sd, fmt, device='meta', **kw)


ALL = sorted(ck.KIT) + sorted(ck.KEYS_ONLY)


@pytest.mark.parametrize('folder', ALL)
def test_every_key_and_shape_maps(folder):
    sd = ck.kit_state_dict(folder, device='meta')
    imp = _meta_import(folder, sd)
    own = imp.model.state_dict()
    used = imp.report['mapped'] + len(imp.report['ignored'])
    assert used == len(sd)  # no key of the file left over
    assert imp.report['mapped'] == len(own) - len(imp.report['from_elsewhere'])


@pytest.mark.parametrize('folder', ALL)
def test_renamed_key_or_changed_shape_is_named(folder):
    sd = ck.kit_state_dict(folder, device='meta')
    keys = [k for k, v in sd.items() if v.dim() >= 1 and k != 'A']
    k = keys[len(keys) // 2]
    bad = dict(sd)
    bad[k.replace('.', '._renamed_', 1)] = bad.pop(k)
    with pytest.raises(
        CheckpointError, match=rf"unexpected key.*{k.replace('.', '._renamed_', 1)}.*missing from the file.*{k}"
    ):
        _meta_import(folder, bad)
    bad = dict(sd)
    s = list(sd[k].shape)
    s[0] += 1
    bad[k] = torch.empty(s, device='meta')
    with pytest.raises(CheckpointError, match=rf"another shape.*{k}: file \({s[0]},"):
        _meta_import(folder, bad)


def test_lightning_file_with_pickled_class_is_refused_then_converted(tmp_path):
    """A Lightning checkpoint whose hyper-parameters are a pickled class: refused with the command; the command
    converts it."""
    import subprocess, sys, types

    src = tmp_path / 'fpn_multi.ckpt'
    names = ('pytorch_lightning', 'pytorch_lightning.utilities', 'pytorch_lightning.utilities.parsing')
    assert not any(n in sys.modules for n in names)
    try:  # a stand-in Lightning class, registered only while the file is written
        for n in names:
            sys.modules[n] = m = types.ModuleType(n)

        class AttributeDict(dict):
            pass

        AttributeDict.__module__ = m.__name__
        AttributeDict.__qualname__ = 'AttributeDict'
        m.AttributeDict = AttributeDict
        torch.save(
            {
                'state_dict': {'VA_head.linear.bias': torch.zeros(1)},
                'hyper_parameters': AttributeDict(img_size=128),
                'epoch': 3,
            },
            src,
        )
    finally:
        for n in names:
            sys.modules.pop(n, None)
    with pytest.raises(
        CheckpointError,
        match=r'pytorch_lightning\.utilities\.parsing\.AttributeDict.*'
        r'python -m abaw_nb\.checkpoints convert',
    ):
        import_checkpoint(src, 'fpn_multitask')
    dst = tmp_path / 'fpn_multi.weights.pt'
    r = subprocess.run(
        [sys.executable, '-m', 'abaw_nb.checkpoints', 'convert', str(src), str(dst)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    obj = torch.load(dst, weights_only=True)
    assert list(obj['state_dict']) == ['VA_head.linear.bias']
    with pytest.raises(
        CheckpointError,
        # a 1-key file: counted and named
        match=r'286 key\(s\) missing.*VA_head\.linear\.bias: file \(1,\), model \(2,\)',
    ):
        import_checkpoint(dst, 'fpn_multitask')


def test_train_multi_evaluates_a_published_checkpoint(root, tmp_path):
    """train_multi with checkpoint=: no training; the imported EMENet-V (a rule-B file in the released layout)
    scored on SynthAffect smoke."""
    import json, os, subprocess, sys
    from abaw_nb.train.run import load_run, load_frames, run_config
    from abaw_nb.metrics import score_frames

    ckpt = ck.save_original(
        ck.kit_state_dict('emenet_v', 'B'), 'emenet_v', tmp_path / 'net_epoch_4_student_round_3_exp_0.pth'
    )
    run = tmp_path / 'run'
    cmd = [
        str(Path(sys.executable).parent / 'papermill'),
        str(root / 'nbs' / 'train_multi.ipynb'),
        str(tmp_path / 'out.ipynb'),
        '-k',
        'python3',
        '--no-progress-bar',
        '-p',
        'method',
        'emenet',
        '-p',
        'task',
        'multi',
        '-p',
        'device',
        'cpu',
        '-p',
        'out_dir',
        str(run),
        '-p',
        'checkpoint',
        str(ckpt),
    ]
    env = {k: v for k, v in os.environ.items() if k != 'MPLBACKEND'}
    env['ABAW_NB_PROGRESS'] = '0'
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    back = load_run(run)
    assert {'va_score', 'expr_score', 'au_score', 'score'} <= set(back['scores'])
    info = json.loads((run / 'import.json').read_text())
    assert info['format'] == 'emenet_v' and info['repository'] == 'wtomin/UncertainEmotion'
    assert info['report']['mapped'] == 345 and len(info['report']['ignored']) == 6  # the FA head dropped, by name
    p = back['predictions']
    pe = p[[f'prob_expr_{k}' for k in range(7)]].to_numpy()
    np.testing.assert_allclose(pe.sum(1), 1, atol=1e-5)
    assert (p['expr'].to_numpy() == pe.argmax(1)).all()
    # the written scores are what the metrics give on the written predictions
    cfg = run_config('emenet', 'multi', 'smoke')
    frames, _ = load_frames(cfg)
    va = frames[frames['split'] == 'val'].reset_index(drop=True)
    va.attrs = dict(frames.attrs)
    va = va.merge(p[['video', 'frame']], on=['video', 'frame'])
    va.attrs = dict(frames.attrs)
    s = score_frames(va, p, tasks=['va', 'expr', 'au'], edition='abaw2', thresholds=0.5)
    for k in ('va_score', 'expr_score', 'au_score'):
        assert abs(s[k] - back['scores'][k]) < 1e-9
    # the run folder is a run like any other: predicting from it imports the checkpoint again, the way it was evaluated
    from abaw_nb.train.run import predict_run
    from abaw_nb.explore import RunModel

    _, root_ = load_frames(cfg)
    again = predict_run(run, va, root_, num_workers=0, keys=('video', 'frame'))
    cols = ['valence', 'arousal', *[f'prob_expr_{k}' for k in range(7)]]
    got = again.merge(p[['video', 'frame', *cols]], on=['video', 'frame'], suffixes=('', '_eval'))
    assert len(got) == len(p)
    np.testing.assert_allclose(got[cols].to_numpy(), got[[c + '_eval' for c in cols]].to_numpy(), atol=1e-5)
    rm = RunModel(run)
    assert json.loads((run / 'labels.json').read_text()) == {'expr_space': 'expr7', 'au_space': 'affwild2_12'}
    faces = rm.predict_faces([np.zeros((112, 112, 3), np.uint8)] * 3)
    assert len(faces) == 3 and {'valence', 'arousal', 'expr'} <= set(faces.columns)


def test_evaluate_scores_only_the_aus_a_model_predicts(tmp_path):
    """A per-frame model with the 8 FG-2020 AUs on Aff-Wild2-layout data (12 AUs): the 7 shared AUs are scored, the
    rest listed."""
    import json
    from abaw_nb.methods.incomplete import MultitaskCNN
    from abaw_nb.train.run import run_config, load_frames, evaluate_checkpoint
    from abaw_nb.metrics import score_frames
    from abaw_nb.data.frames import au_columns, EXPR_SPACES, task_frames

    torch.manual_seed(0)
    imp = Imported(
        MultitaskCNN(7, 8, 'resnet18').eval(),
        'multitask_cnn',
        'mtl_cnn',
        Preprocess(32, 'square'),
        Labels(EXPR_SPACES['expr7'], 'expr7', au_columns('abaw1_8'), 'bins_linspace'),
    )
    cfg = run_config('mtl_cnn', 'au', 'smoke', out_dir=str(tmp_path / 'run'), device='cpu')
    r = evaluate_checkpoint(cfg, imp)
    info = json.loads((tmp_path / 'run' / 'import.json').read_text())
    assert info['au_not_predicted'] == ['AU7', 'AU10', 'AU23', 'AU24', 'AU26'] and 'au_score' in info
    assert 'au_score' not in r['scores'] and 'score' not in r['scores']
    assert {f'au_f1_AU{a}' for a in (1, 2, 4, 6, 12, 15, 25)} <= set(r['scores']) and 'au_f1_AU7' not in r['scores']
    frames, _ = load_frames(cfg)
    va = task_frames(frames[frames['split'] == 'val'].reset_index(drop=True), 'au')
    va.attrs = dict(frames.attrs)
    p = r['predictions']
    assert len(p) == len(va)
    s = score_frames(va.drop(columns=info['au_not_predicted']), p, tasks=['au'], thresholds=0.5)
    assert abs(s['au_f1'] - r['scores']['au_f1']) < 1e-12


def test_cnn_rnn_import_predicts_frames_from_windows_of_seq_len(tmp_path):
    """The imported CNN-RNN scores a frame table from windows of `seq_len` frames, the last one ending on the video's
    last
    frame (the original API's Seq_Dataset); a frame's prediction is the network's output on its window."""
    import dataclasses, json
    from abaw_nb.methods.incomplete import MultitaskCNN, MultitaskCNNRNN
    from abaw_nb.train.run import run_config, load_frames, evaluate_checkpoint
    from abaw_nb.data.frames import task_frames

    meta = import_checkpoint(
        ck.kit_state_dict('multitask_cnn_rnn', device='meta'), 'multitask_cnn_rnn', device='meta', seq_len=6
    )
    torch.manual_seed(0)
    small = MultitaskCNNRNN(MultitaskCNN(7, 8, 'resnet18', anchors='linspace')).eval()  # a cheap stand-in network
    imp = dataclasses.replace(meta, model=small)
    cfg = run_config('mtl_cnn_rnn', 'expr', 'smoke', out_dir=str(tmp_path / 'run'), device='cpu')
    r = evaluate_checkpoint(cfg, imp)
    assert json.loads((tmp_path / 'run' / 'import.json').read_text())['format'] == 'multitask_cnn_rnn'
    frames, root = load_frames(cfg)
    va = task_frames(frames[frames['split'] == 'val'].reset_index(drop=True), 'expr')
    va.attrs = dict(frames.attrs)
    ds = imp.dataset(va, root)
    assert ds.length == 6 and all(len(w) == 6 for w in ds.windows)
    b = ds[0]
    first, rows = b['index'][0].item(), va.iloc[b['index'].numpy()]
    assert (rows['video'] == rows['video'].iloc[0]).all() and rows['frame'].is_monotonic_increasing
    last = ds[len(ds) - 1]['index']  # the last window ends on its video's last frame
    tail = va.iloc[last.numpy()]
    assert tail['frame'].iloc[-1] == va.loc[va['video'] == tail['video'].iloc[0], 'frame'].max()
    with torch.no_grad():
        y = imp.predict(small(b['image'][None]))['prob_expr'][0, 0]
    p = r['predictions']
    row = p[(p['video'] == va['video'].iloc[first]) & (p['frame'] == va['frame'].iloc[first])]
    np.testing.assert_allclose(row[[f'prob_expr_{k}' for k in range(7)]].to_numpy()[0], y.numpy(), atol=1e-5)
    assert len(p) == len(va)
