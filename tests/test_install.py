"""The install metadata is complete: every third-party module that the package, the notebooks and the tests import is
declared in settings.ini (`requirements` for what `pip install .` must bring, `dev_requirements` for the test tools),
and no tracked file reads anything outside the checkout.

The check is static (the import statements of every module and code cell, plus the calls that make pandas import an
optional package) and dynamic (a fresh interpreter imports every module of `abaw_nb`; every distribution it loaded must
be declared or required by a declared one)."""

import ast, json, re, subprocess, sys
from configparser import ConfigParser
from importlib import metadata
from pathlib import Path
import pytest

# calls that make a declared library import an optional package of its own at run time
INDIRECT = {'to_markdown': 'tabulate'}


def _name(req: str) -> str:
    "The normalised distribution name of a requirement string ('opencv-python-headless<5' -> 'opencv-python-headless')."
    return re.split(r'[<>=!~\[; ]', req.strip(), maxsplit=1)[0].lower().replace('_', '-')


def declared(root: Path) -> dict:
    "{'requirements': {name: spec}, 'dev_requirements': {name: spec}} from settings.ini."
    cfg = ConfigParser()
    cfg.read(root / 'settings.ini')
    return {k: {_name(r): r for r in cfg['DEFAULT'][k].split()} for k in ('requirements', 'dev_requirements')}


def imported(source: str) -> set:
    "Top-level module names that `source` imports (absolute imports only), plus the packages its `INDIRECT` calls need."
    tree = ast.parse(source)
    mods = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            mods |= {a.name.split('.')[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
            mods.add(n.module.split('.')[0])
        elif isinstance(n, ast.Attribute) and n.attr in INDIRECT:
            mods.add(INDIRECT[n.attr])
    return mods


def cell_sources(nb: Path) -> str:
    "The code cells of a notebook as one Python source (IPython magics and shell lines dropped)."
    cells = json.loads(nb.read_text())['cells']
    code = [''.join(c['source']) for c in cells if c['cell_type'] == 'code']
    lines = [l for c in code for l in c.splitlines() if not l.lstrip().startswith(('%', '!'))]
    return '\n'.join(lines)


LOCAL = {p.stem for d in ('tests', 'scripts') for p in (Path(__file__).resolve().parents[1] / d).glob('*.py')}


def distributions(mods: set) -> dict:
    "module -> normalised distribution names that provide it (stdlib, the project and its test/script files left out)."
    pd = metadata.packages_distributions()
    out = {}
    for m in sorted(mods):
        if m in sys.stdlib_module_names or m in ('abaw_nb', '__future__') or m in LOCAL:
            continue
        out[m] = {d.lower().replace('_', '-') for d in pd.get(m, [m])}
    return out


def undeclared(sources: dict, allowed: set) -> dict:
    """{file: [module (distribution)]} for the imports of `sources` (file -> text) whose distribution is not in
    `allowed`."""
    bad = {}
    for f, text in sources.items():
        miss = [f'{m} ({"/".join(sorted(d))})' for m, d in distributions(imported(text)).items() if not d & allowed]
        if miss:
            bad[f] = miss
    return bad


def test_the_check_names_an_undeclared_import():
    src = 'import numpy, yaml\nfrom sklearn.metrics import f1_score\ndf.to_markdown()\n'
    assert imported(src) == {'numpy', 'yaml', 'sklearn', 'tabulate'}
    assert undeclared({'x.py': src}, {'numpy', 'pyyaml'}) == {'x.py': ['sklearn (scikit-learn)', 'tabulate (tabulate)']}


def test_package_and_notebooks_import_only_declared_requirements(root):
    dec = declared(root)
    runtime = set(dec['requirements'])
    dev = runtime | set(dec['dev_requirements'])
    pkg = {str(p.relative_to(root)): p.read_text() for p in sorted((root / 'abaw_nb').rglob('*.py'))}
    papermill_nbs = sorted((root / 'nbs' / 'paper').glob('*.ipynb')) + [
        root / 'nbs' / 'train_multi.ipynb',
        root / 'nbs' / 'explore.ipynb',
    ]
    run_nbs = {str(p.relative_to(root)): cell_sources(p) for p in papermill_nbs}
    lib_nbs = {
        str(p.relative_to(root)): cell_sources(p)
        for p in sorted((root / 'nbs').glob('*.ipynb'))
        if p not in papermill_nbs
    }
    tests = {str(p.relative_to(root)): p.read_text() for p in sorted((root / 'tests').glob('*.py'))}
    assert undeclared(pkg, runtime) == {}, (
        'the package imports what `pip install .` does not bring: add it to requirements'
    )
    assert undeclared(run_nbs, runtime) == {}, 'a papermill notebook imports what `pip install .` does not bring'
    assert undeclared({**lib_nbs, **tests}, dev) == {}, (
        'a test imports what neither requirements nor dev_requirements bring'
    )


def test_opencv_pin_keeps_the_haar_cascade(root):
    "explore.FaceDetector reads the Haar cascade that OpenCV 4.x ships and 5.x dropped from the headless wheel."
    assert declared(root)['requirements']['opencv-python-headless'] == 'opencv-python-headless<5'


def test_every_module_imports_with_declared_distributions_only(root):
    """A fresh interpreter imports every module of abaw_nb, recording what abaw_nb's own code imports (however it
    imports it)."""
    mods = sorted(
        'abaw_nb.' + '.'.join(p.relative_to(root / 'abaw_nb').with_suffix('').parts)
        for p in (root / 'abaw_nb').rglob('*.py')
        if p.name not in ('_modidx.py', '__init__.py')
    )
    code = (
        'import builtins, importlib, json\n'
        'seen, imp = set(), builtins.__import__\n'
        'def rec(name, g=None, *a, **k):\n'
        '    if g and str(g.get("__name__", "")).startswith("abaw_nb") and not (a and a[-1]): '
        'seen.add(name.split(".")[0])\n'
        '    return imp(name, g, *a, **k)\n'
        'builtins.__import__ = rec\n'
        f'for m in {mods!r}: importlib.import_module(m)\n'
        'print(json.dumps(sorted(seen)))'
    )
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    loaded = distributions(set(json.loads(r.stdout.strip().splitlines()[-1])))
    assert {'torch', 'numpy', 'pandas'} <= set(loaded)  # the recorder sees the package's imports
    allowed = set(declared(root)['requirements'])
    bad = {m: sorted(d) for m, d in loaded.items() if not d & allowed}
    assert bad == {}, f'modules that `import abaw_nb.*` imports but settings.ini does not declare: {bad}'


def test_no_tracked_file_reads_outside_the_checkout(root):
    """The parity kit and every other input live in the repository; nothing refers to the shared folder beside the
    development checkout (absent beside a user's clone)."""
    files = subprocess.run(['git', 'ls-files'], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r'\.\./shared|/work/shared|shared/reference')
    hits = []
    for f in files:
        p = root / f
        if (
            p.suffix in ('.py', '.ipynb', '.md', '.ini', '.toml', '.yml', '.cff', '.in', '')
            and p.is_file()
            and 'parity_kit' not in p.parts
            and f != 'tests/test_install.py'
        ):
            text = p.read_text(errors='replace')
            hits += [f'{f}:{i + 1}' for i, l in enumerate(text.splitlines()) if pattern.search(l)]
    assert hits == [], f'tracked files refer to a folder outside the checkout: {hits[:10]}'


@pytest.mark.parametrize('name', ['LICENSE', 'CITATION.cff'])
def test_license_and_citation(root, name):
    text = (root / name).read_text()
    if name == 'LICENSE':
        assert 'Apache License' in text and 'Version 2.0' in text
        cfg = ConfigParser()
        cfg.read(root / 'settings.ini')
        assert cfg['DEFAULT']['license'] == 'apache2'
        return
    import yaml

    cff = yaml.safe_load(text)
    assert cff['cff-version'] == '1.2.0' and cff['license'] == 'Apache-2.0'
    ids = ' '.join(str(i['value']) for r in cff['references'] for i in r.get('identifiers', []))
    titles = [r['title'] for r in cff['references']]
    assert len(titles) == 5 and all(a in ids for a in ('2107.03670', '2002.03557', '2106.03487', '2407.11243'))
    assert any('Iterative Distillation' in t for t in titles)
