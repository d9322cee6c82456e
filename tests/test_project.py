"""Project-level guarantees: the package is importable and equals a fresh nbdev_export, notebooks
are clean, papermill notebooks are tagged, the environment files agree, README is generated."""

import json, re, shutil, subprocess, sys
from configparser import ConfigParser
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'scripts'))
import make_environment_yml, make_readme


def _copy_project(root: Path, dst: Path) -> Path:
    for name in ['settings.ini', 'setup.py', 'nbs', 'abaw_nb']:
        src = root / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns('__pycache__', '.ipynb_checkpoints'))
        else:
            shutil.copy2(src, dst / name)
    return dst


def test_import_and_version(root):
    import abaw_nb, abaw_nb.core

    cfg = ConfigParser()
    cfg.read(root / 'settings.ini')
    assert abaw_nb.__version__ == cfg['DEFAULT']['version']
    assert Path(abaw_nb.__file__).resolve().parent == root / 'abaw_nb'


def test_environment_stack_works():
    import torch, torchvision, timm, nbdev

    assert torch.__version__.split('+')[0] == '2.13.0' and torchvision.__version__.split('+')[0] == '0.28.0'
    assert nbdev.__version__.startswith('2.')
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=torch.float32)
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]  # the second box overlaps the first with IoU 0.81 and is suppressed
    m = timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=0)
    assert m(torch.zeros(1, 3, 224, 224)).shape == (1, 192)


def test_package_equals_fresh_export(root, tmp_path, venv_bin):
    """Every .py under abaw_nb/ is exactly what nbdev_export writes (package data such as abaw_nb/assets/ is not
    generated)."""
    proj = _copy_project(root, tmp_path)
    for p in (proj / 'abaw_nb').rglob('*.py'):
        p.unlink()
    r = subprocess.run([str(venv_bin / 'nbdev_export')], cwd=proj, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

    def py(base):
        return {str(p.relative_to(base)): p.read_bytes() for p in base.rglob('*.py') if '__pycache__' not in p.parts}

    committed, fresh = py(root / 'abaw_nb'), py(proj / 'abaw_nb')
    diff = sorted(k for k in committed.keys() | fresh.keys() if committed.get(k) != fresh.get(k))
    assert diff == [], f'abaw_nb/ differs from what nbdev_export writes in {diff}; run nbdev_export and commit'


def test_notebooks_are_clean(root, tmp_path, venv_bin):
    proj = _copy_project(root, tmp_path)
    r = subprocess.run([str(venv_bin / 'nbdev_clean')], cwd=proj, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    changed = [
        str(p.relative_to(proj))
        for p in sorted(proj.glob('nbs/**/*.ipynb'))
        if p.read_bytes() != (root / p.relative_to(proj)).read_bytes()
    ]
    assert changed == [], f'nbdev_clean changes {changed}; run nbdev_clean and commit'


def papermill_notebooks(root: Path) -> list:
    nbs = (
        sorted((root / 'nbs' / 'paper').glob('*.ipynb'))
        + sorted(root.glob('nbs/train_multi.ipynb'))
        + sorted(root.glob('nbs/explore.ipynb'))
    )
    return [p for p in nbs if not p.name.startswith(('_', '.'))]


def tagged_cells(path: Path) -> int:
    nb = json.loads(path.read_text())
    return sum('parameters' in c.get('metadata', {}).get('tags', []) for c in nb['cells'])


def test_papermill_notebooks_have_one_parameters_cell(root, tmp_path):
    bad = {str(p.relative_to(root)): tagged_cells(p) for p in papermill_notebooks(root) if tagged_cells(p) != 1}
    assert bad == {}, f'papermill notebooks need exactly one cell tagged `parameters`: {bad}'
    # the check itself catches a notebook whose tag was lost
    (tmp_path / 'nbs' / 'paper').mkdir(parents=True)
    (tmp_path / 'nbs' / 'paper' / 'x.ipynb').write_text(
        json.dumps({'cells': [{'cell_type': 'code', 'metadata': {}, 'source': 'a=1'}]})
    )
    assert [tagged_cells(p) for p in papermill_notebooks(tmp_path)] == [0]


def test_settings_keep_parameters_tag(root):
    cfg = ConfigParser()
    cfg.read(root / 'settings.ini')
    d = cfg['DEFAULT']
    assert d['allowed_cell_metadata_keys'].split() == ['tags']
    assert 'clear_all' not in d or d['clear_all'].lower() == 'false'
    assert {'slow', 'gpu', 'paper'} <= set(d['tst_flags'].split())
    assert (d['lib_name'], d['nbs_path'], d['lib_path']) == ('abaw_nb', 'nbs', 'abaw_nb')


def test_environment_yml_matches_lock(root):
    import yaml

    env = yaml.safe_load((root / 'environment.yml').read_text())
    deps = env['dependencies']
    assert 'python=3.11' in deps
    pip = next(d['pip'] for d in deps if isinstance(d, dict))
    env_pins = dict(re.match(r'^(.+?)==(.+)$', p).groups() for p in pip)
    lock = make_environment_yml.lock_pins(root / 'requirements.lock')
    assert env_pins == lock, 'environment.yml and requirements.lock disagree: run `make lock`'
    assert lock['torch'] == '2.13.0' and lock['torchvision'] == '0.28.0' and lock['nbdev'] == '2.4.14'
    # every direct requirement is locked
    direct = [
        re.split(r'[=<>\[ ]', l.strip())[0].lower()
        for l in (root / 'requirements.in').read_text().splitlines()
        if l.strip() and not l.startswith('#')
    ]
    assert [d for d in direct if d not in lock] == []


def test_lock_is_what_is_installed(root):
    from importlib.metadata import version

    lock = make_environment_yml.lock_pins(root / 'requirements.lock')
    wrong = {n: (v, version(n)) for n, v in lock.items() if version(n).split('+')[0] != v.split('+')[0]}
    assert wrong == {}, f'installed versions differ from the lock: {wrong}; run `make env`'


def test_readme_is_generated_from_index(root):
    text = (root / 'README.md').read_text(encoding='utf-8')
    assert text == make_readme.render(root / 'nbs' / 'index.ipynb'), 'README.md is stale: run `make readme`'
    top = text[:600]
    assert 'make reproduce' in top and 'make test' in top


def test_kernel_python3_is_the_venv(venv_bin):
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec('python3')
    assert Path(spec.argv[0]).parent.resolve() == venv_bin.resolve(), spec.argv


def test_ci_runs_the_readme_test_command(root):
    lines = [l.strip() for l in (root / '.ci' / 'run').read_text().splitlines() if l.strip() and not l.startswith('#')]
    assert lines == ['set -euo pipefail', 'make test']
    assert 'make test' in (root / 'README.md').read_text()


def test_unfinished_notebooks_names_what_started_and_never_completed(tmp_path, capsys):
    "The line `make test` prints last when nbdev_test fails or hits its time limit."
    from unfinished_notebooks import unfinished, main

    log = '\n'.join(
        [
            'Starting /r/nbs/00_core.ipynb',
            'Starting /r/nbs/01a_data.ipynb',
            '- Completed /r/nbs/00_core.ipynb',
            'Starting /r/nbs/04f_train.slurm.ipynb',
            'Fatal Python error: Aborted',
            '  File "x.py", line 3 in wait  # Starting /not/a/line.ipynb',
        ]
    )
    assert unfinished(log) == ['/r/nbs/01a_data.ipynb', '/r/nbs/04f_train.slurm.ipynb']
    (tmp_path / 'log').write_text(log)
    assert main([str(tmp_path / 'log')]) == 0
    out = capsys.readouterr().out
    assert out == 'nbdev_test: 2 notebook(s) started and not completed: 01a_data.ipynb, 04f_train.slurm.ipynb\n'


def test_paper_notebooks_take_their_thread_count_from_the_runner(root):
    """`abaw-reproduce` gives each kernel cores/jobs threads (OMP_NUM_THREADS). A notebook that sets more itself
    oversubscribes the cores beside another job: notebook 50's `torch.set_num_threads(2)` made a ViT fine-tuning epoch
    take 250-440 s instead of 9 s (OpenMP threads spin-waiting on a busy core). Only 1 or a parameter is allowed."""
    bad = []
    for nb in sorted((root / 'nbs' / 'paper').glob('*.ipynb')):
        cells = json.loads(nb.read_text())['cells']
        src = '\n'.join(''.join(c['source']) for c in cells if c['cell_type'] == 'code')
        bad += [
            f'{nb.name}: {m}'
            for m in re.findall(r'set_num_threads\(([^)]*)\)', src)
            if m.strip() not in ('1', 'threads')
        ]
    assert not bad, bad
