"""`make bench` smoke check: the `abaw-bench` console script (what the Makefile's `bench` target runs) in quick mode
writes
every csv, BENCH.md, bench.json and the figure into the folder it is given. Nothing timed is asserted."""

import json, os, re, subprocess
import pandas as pd
from abaw_nb.bench import SECTIONS


def test_make_bench_target_runs_abaw_bench(root):
    mk = (root / 'Makefile').read_text()
    recipe = re.search(r'^bench:.*\n((?:\t.*\n)+)', mk, re.M)
    assert recipe and 'abaw-bench' in recipe.group(1), 'the Makefile bench target must call abaw-bench'


def test_abaw_bench_quick_writes_everything(tmp_path_factory, root, venv_bin):
    # (tmp_path_factory: works with this branch's conftest, whose autouse fixture asked for tmp_path after its teardown;
    # fixed on main in f84aebc)
    tmp_path = tmp_path_factory.mktemp('bench')
    out = tmp_path / 'bench'
    env = {
        **os.environ,
        'PYTHONPATH': str(root),
        'ABAW_NB_OUTPUTS': str(tmp_path / 'outputs'),
    }  # nothing lands in outputs/
    exe = venv_bin / 'abaw-bench'
    cmd = (
        [str(exe)]
        if exe.exists()
        else [str(venv_bin / 'python'), '-c', 'import sys; from abaw_nb.bench import main; sys.exit(main())']
    )
    p = subprocess.run(
        cmd + ['--quick', '--out', str(out)], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stderr[-3000:]
    for s in SECTIONS + ('consumption', 'targets'):
        assert (out / f'{s}.csv').is_file(), s
    assert (out / 'bench.png').stat().st_size > 1000
    tr = pd.read_csv(out / 'train_step.csv')
    assert tr['method'].tolist() == ['emenet'] and (tr['train_images_per_s'] > 0).all()
    res = json.loads((out / 'bench.json').read_text())
    assert res['provenance']['quick'] is True and len(res['provenance']['load_average_start']) == 3
    md = (out / 'BENCH.md').read_text()
    assert '## Targets' in md and 'Quick run: not for reporting' in md
    assert not (tmp_path / 'outputs' / 'bench').exists()
