"""The method contract (issue 23): a sixth method is one module that registers its spec, and nothing else in the
package changes. The toy method of `tests/toy_method.py` trains through `train.run` and through `train_multi.ipynb`
(papermill, found through `$ABAW_NB_METHODS`), its run folder rebuilds its model, its settings are checked, and a module
dropped into the methods package is found by the registry's discovery. The package tree is hashed before and after:
adding the method changed no file of it."""

import hashlib, os, subprocess, sys
from pathlib import Path
import numpy as np, pytest, torch

HERE = Path(__file__).parent
ROOT = HERE.parent


def _tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob('*')):
        if p.is_file() and '__pycache__' not in p.parts:
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope='module')
def package_hash():
    "The package and its notebooks as they were before the toy method was added; checked again at the end."
    before = (_tree_hash(ROOT / 'abaw_nb'), _tree_hash(ROOT / 'nbs'))
    yield before
    assert (_tree_hash(ROOT / 'abaw_nb'), _tree_hash(ROOT / 'nbs')) == before  # the toy changed nothing in the package


@pytest.fixture(scope='module')
def toy(package_hash):
    sys.path.insert(0, str(HERE))
    import toy_method

    return toy_method


def test_a_registered_method_trains_and_its_run_folder_rebuilds_its_model(toy, tmp_path):
    from abaw_nb.methods import get_method, list_methods
    from abaw_nb.train.run import run_config, train, load_run, load_run_model, predict_run, load_frames
    from abaw_nb.data.frames import task_frames

    assert 'toy' in list_methods() and get_method('toy').recipe is toy.toy_recipe
    torch.set_num_threads(1)
    cfg = run_config('toy', 'multi', 'smoke', out_dir=str(tmp_path / 'run'), progress=False, extra={'width': 6})
    assert cfg.extra == {'width': 6, 'pool': 'avg'}  # every setting, typed, in config.json
    res = train(cfg, verbose=False)
    back = load_run(tmp_path / 'run')
    assert back['config'] == cfg and {'va_score', 'expr_score', 'au_score', 'score'} <= set(back['scores'])
    model, c2 = load_run_model(tmp_path / 'run')  # the generic run-folder loader of the spec
    assert isinstance(model, toy.ToyNet) and model.conv.out_channels == 6 and c2 == cfg
    best = torch.load(tmp_path / 'run' / 'best.pt', weights_only=True)['model']
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())
    frames, root = load_frames(cfg)  # and predicts what the run wrote
    va = task_frames(frames[frames.split == 'val'].reset_index(drop=True), 'multi')
    p, q = predict_run(tmp_path / 'run', va, root, num_workers=0), res['predictions']
    cols = [c for c in q.columns if c.startswith(('prob_', 'valence', 'arousal'))]
    np.testing.assert_allclose(p[cols].to_numpy(), q[cols].to_numpy(), atol=1e-6)


def test_settings_are_checked_by_name_type_and_choice(toy):
    from abaw_nb.train.run import run_config

    with pytest.raises(
        KeyError,
        match=r"unknown setting\(s\) \['widht'\] of method 'toy'; valid settings: width \(int\), "
        r"pool \(str: one of 'avg', 'max'\)",
    ):
        run_config('toy', 'multi', 'smoke', extra={'widht': 6})
    with pytest.raises(TypeError, match=r"setting width='6' of method 'toy' has type str; expected int"):
        run_config('toy', 'multi', 'smoke', extra={'width': '6'})
    with pytest.raises(TypeError, match=r"setting width=True of method 'toy' has type bool; expected int"):
        run_config('toy', 'multi', 'smoke', extra={'width': True})
    with pytest.raises(ValueError, match="pool='median' is not valid; choose one of: avg, max"):
        run_config('toy', 'multi', 'smoke', extra={'pool': 'median'})
    with pytest.raises(KeyError, match=r"gamma is a Config field: pass run_config\(\.\.\., gamma=\.\.\.\)"):
        run_config('toy', 'multi', 'smoke', extra={'gamma': 0.5})
    assert run_config('toy', 'multi', 'smoke', gamma=0.5).gamma == 0.5


def test_train_multi_trains_a_method_from_outside_the_package(toy, root, tmp_path):
    from abaw_nb.train.run import load_run

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
        'toy',
        '-p',
        'task',
        'multi',
        '-p',
        'out_dir',
        str(run),
        '-y',
        'extra: {pool: max}',
    ]
    env = {k: v for k, v in os.environ.items() if k != 'MPLBACKEND'}
    env.update(ABAW_NB_PROGRESS='0', ABAW_NB_METHODS='toy_method', PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT)]))
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    back = load_run(run)
    assert (back['config'].method, back['config'].extra) == ('toy', {'width': 8, 'pool': 'max'})
    assert {'va_score', 'expr_score', 'au_score'} <= set(back['scores']) and (run / 'learning_curves.png').is_file()


def test_a_module_in_the_methods_package_is_discovered(tmp_path, monkeypatch):
    """A notebook exporting `abaw_nb/methods/<name>.py` is all a built-in method needs: the registry imports every
    module of the package."""
    import abaw_nb.methods as M

    src = (HERE / 'toy_method.py').read_text().replace("MethodSpec('toy'", "MethodSpec('toy_builtin'")
    (tmp_path / 'toy_builtin.py').write_text(src)
    monkeypatch.setattr(M, '__path__', [*M.__path__, str(tmp_path)])  # as if the module sat in abaw_nb/methods/
    monkeypatch.setattr(M, '_DISCOVERED', [])
    monkeypatch.setattr(M, '_REGISTRY', dict(M._REGISTRY))
    monkeypatch.delenv('ABAW_NB_METHODS', raising=False)
    assert 'toy_builtin' in M.list_methods()
    assert M.get_method('toy_builtin').settings.__name__ == 'ToySettings'
    assert M.list_methods()[:6] == ['fpn', 'mtl_cnn', 'mtl_cnn_rnn', 'emenet', 'emotion_gcn', 'fmae']
    sys.modules.pop('abaw_nb.methods.toy_builtin', None)
