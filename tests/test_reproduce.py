"""papermill end to end: parameterised notebooks run through `abaw_nb.reproduce` (called from another working
directory; they run from the repo root), write tables, and REPORT.md indexes them; a failure stops the run and
leaves the other notebooks' outputs intact; a notebook the given data cannot feed is a recorded skip."""

import json
import os
from pathlib import Path
import pytest
from abaw_nb.reproduce import reproduce, main


def _nb(cells):
    return {
        'cells': [
            {
                'cell_type': 'code',
                'id': f'c{i}',
                'execution_count': None,
                'metadata': {'tags': tags},
                'outputs': [],
                'source': src,
            }
            for i, (src, tags) in enumerate(cells)
        ],
        'metadata': {'kernelspec': {'name': 'python3', 'display_name': 'python3', 'language': 'python'}},
        'nbformat': 4,
        'nbformat_minor': 5,
    }


def test_reproduce_runs_a_paper_notebook(tmp_path, root, monkeypatch):
    nb = tmp_path / '10_demo.ipynb'
    nb.write_text(
        json.dumps(
            _nb(
                [
                    ("preset = 'smoke'\nout_dir = None\nn = 3", ['parameters']),
                    (
                        "import os\nfrom pathlib import Path\nimport pandas as pd\nfrom abaw_nb.core import "
                        "find_repo_root, write_text, write_csv\n"
                        "df = pd.DataFrame({'x': range(n)})\n"
                        "write_csv(Path(out_dir)/'tables'/'demo.csv', df)\n"
                        "write_text(Path(out_dir)/'tables'/'demo.md', f'Data: none, preset {preset}\\n\\n' + "
                        "df.to_markdown(index=False))\n"
                        "write_text(Path(out_dir)/'root.txt', str(find_repo_root()) + '\\n' + os.getcwd() + '\\n' + "
                        "os.environ.get('OMP_NUM_THREADS', ''))",
                        [],
                    ),
                ]
            )
        )
    )
    monkeypatch.chdir(tmp_path)  # papermill runs from outside the checkout
    monkeypatch.delenv('ABAW_NB_ROOT', raising=False)
    out = tmp_path / 'out'
    runs = reproduce('smoke', out=out, notebooks=[nb])
    assert [(r['name'], r['status']) for r in runs] == [('10_demo.ipynb', 'ok')]
    found_root, cwd, threads = (out / 'root.txt').read_text().splitlines()
    assert Path(found_root) == root and Path(cwd).resolve() == root.resolve()  # a fixed working directory
    # one notebook runs alone with the caller's threads; the ledger and the report say how many (they change rounding)
    assert threads == os.environ.get('OMP_NUM_THREADS', ''), threads
    want = int(threads or os.cpu_count())
    assert (out / 'tables' / 'demo.csv').read_text().splitlines() == ['x', '0', '1', '2']
    report = (out / 'REPORT.md').read_text()
    rows = [ln for ln in report.splitlines() if ln.startswith('| `10_demo.ipynb`')]
    assert rows and f'| {want} |' in rows[0], rows
    assert (
        'Data: none, preset smoke' in report.split('## 10_demo.ipynb')[1]
        and '| `10_demo.ipynb` | ok | smoke |' in report
    )
    ledger = json.loads((out / 'reproduce.json').read_text())
    assert ledger['10_demo.ipynb']['tables'] == ['demo.md'] and ledger['10_demo.ipynb']['status'] == 'ok'
    assert ledger['10_demo.ipynb']['threads'] == want, ledger['10_demo.ipynb']
    # the executed copy records the injected parameters (provenance)
    executed = json.loads((out / 'notebooks' / '10_demo.ipynb').read_text())
    assert executed['metadata']['papermill']['parameters']['preset'] == 'smoke'


def _table_nb(name, value):
    return _nb(
        [
            ("preset = 'smoke'\nout_dir = None\ndata_root = None", ['parameters']),
            (
                "from pathlib import Path\nfrom abaw_nb.core import write_text\n"
                f"write_text(Path(out_dir)/'tables'/'{name}.md', 'Data: x\\n\\n| v |\\n|---|\\n| {value} |')",
                [],
            ),
        ]
    )


def test_a_failing_notebook_stops_the_run_and_keeps_other_outputs(tmp_path):
    nbs = tmp_path / 'nbs'
    nbs.mkdir()
    out = tmp_path / 'out'
    for n, v in [('10_a', 1), ('30_c', 3)]:
        (nbs / f'{n}.ipynb').write_text(json.dumps(_table_nb(n, v)))
    reproduce('smoke', out=out, notebooks=sorted(nbs.glob('*.ipynb')))  # a first, complete run
    before = {p.name: p.read_text() for p in (out / 'tables').glob('*.md')}
    (nbs / '10_a.ipynb').write_text(json.dumps(_table_nb('10_a', 10)))  # new results for a
    (nbs / '20_b.ipynb').write_text(
        json.dumps(
            _nb(
                [
                    ("preset = 'smoke'\nout_dir = None", ['parameters']),
                    ("x = 1", []),
                    ("raise ValueError('bad table')", []),
                ]
            )
        )
    )
    (nbs / '30_c.ipynb').write_text(json.dumps(_table_nb('30_c', 30)))
    runs = reproduce(
        'smoke', out=out, notebooks=sorted(nbs.glob('*.ipynb')), jobs=1
    )  # one at a time (smoke defaults to 2)
    assert [(r['name'], r['status']) for r in runs] == [
        ('10_a.ipynb', 'ok'),
        ('20_b.ipynb', 'failed'),
        ('30_c.ipynb', 'not run'),
    ]
    assert (
        runs[1]['error'] == "cell In [4] `raise ValueError('bad table')`: ValueError: bad table"
    )  # the failing cell and its error
    assert '| 10 |' in (out / 'tables' / '10_a.md').read_text()  # the notebook before it ran
    assert (out / 'tables' / '30_c.md').read_text() == before['30_c.md']  # the one after it is untouched
    report = (out / 'REPORT.md').read_text()
    assert '**failed:** `cell In [4]' in report and '| `30_c.ipynb` | not run |' in report
    assert '| 3 |' in report.split('## 30_c.ipynb')[1]  # its previous table is still reported


def test_main_exits_nonzero_naming_the_failing_notebook(tmp_path, capsys, monkeypatch):
    nb = tmp_path / '20_broken.ipynb'
    nb.write_text(
        json.dumps(_nb([("preset = 'smoke'\nout_dir = None", ['parameters']), ("raise KeyError('AU1')", [])]))
    )
    import abaw_nb.reproduce as R

    monkeypatch.setattr(R, 'paper_notebooks', lambda root=None: [nb])
    assert main(['--preset', 'smoke', '--out', str(tmp_path / 'out')]) == 1
    assert "FAILED: 20_broken.ipynb: cell In [3] `raise KeyError('AU1')`: KeyError: 'AU1'" in capsys.readouterr().err


def test_data_the_notebook_cannot_use_is_a_recorded_skip(tmp_path):
    nb = tmp_path / '50_needs_bp4d.ipynb'
    nb.write_text(
        json.dumps(
            _nb(
                [
                    ("preset = 'smoke'\nout_dir = None\ndata_root = None", ['parameters']),
                    (
                        "from abaw_nb.analysis import require_data\nrequire_data(data_root is None, f'{data_root} "
                        "is not a BP4D-like folder')",
                        [],
                    ),
                ]
            )
        )
    )
    other = tmp_path / '60_ok.ipynb'
    other.write_text(json.dumps(_table_nb('60_ok', 6)))
    runs = reproduce('smoke', out=tmp_path / 'out', notebooks=[nb, other], data_root=tmp_path)
    assert [(r['name'], r['status']) for r in runs] == [('50_needs_bp4d.ipynb', 'skipped'), ('60_ok.ipynb', 'ok')]
    assert runs[0]['reason'] == f'{tmp_path.resolve()} is not a BP4D-like folder'
    assert runs[1]['data'] == str(tmp_path.resolve())


def test_cli_rejects_unknown_preset(capsys):
    with pytest.raises(SystemExit):
        main(['--preset', 'laptop'])
    assert "invalid choice: 'laptop'" in capsys.readouterr().err


def _tables(out):
    "Every csv table of an outputs folder, without wall-clock columns (the only values allowed to differ between runs)."
    import pandas as pd

    tabs = {p.name: pd.read_csv(p) for p in sorted((out / 'tables').glob('*.csv'))}
    return {n: t.drop(columns=[c for c in t.columns if 'second' in c.lower()]) for n, t in tabs.items()}


def test_a_second_run_gives_the_same_tables(tmp_path, root):
    """Determinism of a real paper notebook (EMENet rounds: ensembles, distillation rounds, calibration) at the
    smoke preset."""
    nb = root / 'nbs' / 'paper' / '31_emenet_rounds.ipynb'
    a, b = (reproduce('smoke', out=tmp_path / o, notebooks=[nb]) for o in ('a', 'b'))
    assert [r['status'] for r in a + b] == ['ok', 'ok'], (a, b)
    ta, tb = _tables(tmp_path / 'a'), _tables(tmp_path / 'b')
    assert len(ta) >= 3 and list(ta) == list(tb)
    for name in ta:
        assert ta[name].equals(tb[name]), name


def _slow_table_nb(name, value, seconds):
    return _nb(
        [
            ("preset = 'smoke'\nout_dir = None\ndata_root = None", ['parameters']),
            (
                "import time\nfrom pathlib import Path\nfrom abaw_nb.core import write_text\n"
                f"time.sleep({seconds})\nwrite_text(Path(out_dir)/'tables'/'{name}.md', 'Data: x\\n\\n| v "
                f"|\\n|---|\\n| {value} |')",
                [],
            ),
        ]
    )


def test_parallel_notebooks_keep_their_own_tables_and_stop_at_a_failure(tmp_path):
    nbs = tmp_path / 'nbs'
    nbs.mkdir()
    out = tmp_path / 'out'
    (nbs / '10_a.ipynb').write_text(json.dumps(_slow_table_nb('10_a', 1, 0)))
    (nbs / '20_b.ipynb').write_text(
        json.dumps(_slow_table_nb('20_b', 2, 2))
    )  # runs beside a and c: writes while they run
    (nbs / '30_c.ipynb').write_text(json.dumps(_slow_table_nb('30_c', 3, 0)))
    runs = reproduce('smoke', out=out, notebooks=sorted(nbs.glob('*.ipynb')), jobs=2)
    assert [(r['name'], r['status']) for r in runs] == [
        ('10_a.ipynb', 'ok'),
        ('20_b.ipynb', 'ok'),
        ('30_c.ipynb', 'ok'),
    ]
    ledger = json.loads((out / 'reproduce.json').read_text())
    assert {n: e['tables'] for n, e in ledger.items()} == {f'{n}.ipynb': [f'{n}.md'] for n in ('10_a', '20_b', '30_c')}
    assert {e['threads'] for e in ledger.values()} == {max((os.cpu_count() or 1) // 2, 1)}  # cores / jobs each
    assert '| 2 |' in (out / 'tables' / '20_b.md').read_text()
    # a failure: a and the failing b run together; no notebook starts after it, b's partial table never reaches out/
    (nbs / '10_a.ipynb').write_text(json.dumps(_slow_table_nb('10_a', 10, 10)))  # still running when b fails
    (nbs / '20_b.ipynb').write_text(
        json.dumps(
            _nb(
                [
                    ("preset = 'smoke'\nout_dir = None", ['parameters']),
                    (
                        "from pathlib import Path\nfrom abaw_nb.core import "
                        "write_text\nwrite_text(Path(out_dir)/'tables'/'20_b.md', 'partial')",
                        [],
                    ),
                    ("raise ValueError('bad table')", []),
                ]
            )
        )
    )
    runs = reproduce('smoke', out=out, notebooks=sorted(nbs.glob('*.ipynb')), jobs=2)
    assert [(r['name'], r['status']) for r in runs] == [
        ('10_a.ipynb', 'ok'),
        ('20_b.ipynb', 'failed'),
        ('30_c.ipynb', 'not run'),
    ]
    assert runs[1]['error'] == "cell In [4] `raise ValueError('bad table')`: ValueError: bad table"
    assert (
        '| 10 |' in (out / 'tables' / '10_a.md').read_text()
    )  # the notebook running beside it finished and was merged
    assert '| 2 |' in (out / 'tables' / '20_b.md').read_text()  # the failed notebook's previous table, untouched
    assert '| 3 |' in (out / 'tables' / '30_c.md').read_text()


def test_peak_memory_of_each_notebook_is_its_own(tmp_path):
    """Each notebook runs in a fresh process: a notebook holding 400 MiB reports at least that, the small one after
    it does not."""

    def nb(code):
        return _nb([("preset = 'smoke'\nout_dir = None\ndata_root = None", ['parameters']), (code, [])])

    nbs = tmp_path / 'nbs'
    nbs.mkdir()
    (nbs / '10_big.ipynb').write_text(json.dumps(nb('import numpy as np\nx = np.ones(400 * 2**20 // 8)\nx.sum()')))
    (nbs / '20_small.ipynb').write_text(json.dumps(nb('y = 1')))
    runs = reproduce('smoke', out=tmp_path / 'out', notebooks=sorted(nbs.glob('*.ipynb')), jobs=1)
    big, small = (r['peak_rss_mb'] for r in runs)
    assert big >= 400 and small < big - 300, (big, small)
    report = (tmp_path / 'out' / 'REPORT.md').read_text()
    assert '| peak memory (MiB) |' in report and f"| {big:.0f} |" in report


def test_a_resources_file_feeds_each_notebook_and_skips_what_it_cannot(tmp_path):
    """The resources file gives each paper notebook its own parameters (FPN: the Aff-Wild2 root and its initialisation)
    and records a notebook whose needs it does not meet (FMAE: its AU and FER sets) as skipped."""
    (tmp_path / 'aw').mkdir()
    (tmp_path / 'r50.pth').write_bytes(b'weights')
    res = tmp_path / 'resources.yml'
    res.write_text('datasets:\n  affwild2: aw\nweights:\n  fpn_init: r50.pth\n')
    fpn = tmp_path / '10_fpn_results.ipynb'
    fpn.write_text(
        json.dumps(
            _nb(
                [
                    ("preset = 'smoke'\nout_dir = None\ndata_root = None\npretrained = None", ['parameters']),
                    (
                        "from pathlib import Path\n"
                        "(Path(out_dir) / 'got.txt').write_text(f'{data_root}\\n{pretrained}')",
                        [],
                    ),
                ]
            )
        )
    )
    rounds = tmp_path / '50_fmae_results.ipynb'
    rounds.write_text(json.dumps(_nb([("preset = 'smoke'\nout_dir = None", ['parameters']), ('raise SystemExit', [])])))
    out = tmp_path / 'out'
    runs = reproduce('smoke', out=out, notebooks=[fpn, rounds], resources=res)
    assert [(r['name'], r['status']) for r in runs] == [
        ('10_fpn_results.ipynb', 'ok'),
        ('50_fmae_results.ipynb', 'skipped'),
    ]
    assert (out / 'got.txt').read_text().splitlines() == [str(tmp_path / 'aw'), str(tmp_path / 'r50.pth')]
    assert runs[1]['reason'].startswith('needs dataset fmae (FMAE sets'), runs[1]['reason']
    ledger = json.loads((out / 'reproduce.json').read_text())
    assert ledger['50_fmae_results.ipynb']['status'] == 'skipped' and ledger['10_fpn_results.ipynb']['data'] == str(
        tmp_path / 'aw'
    )
    assert 'needs dataset fmae (FMAE sets' in (out / 'REPORT.md').read_text()


def test_cli_prints_a_resources_template(capsys):
    assert main(['--resources-template']) == 0
    text = capsys.readouterr().out
    assert text.startswith('# abaw-nb resources') and '# fpn_init: /path' in text and '# fmae: /path' in text


def _echo_notebooks(tmp_path, name: str, default: str) -> tuple:
    """Two notebooks writing repr(`name`) (or 'absent') to <out_dir>/a.txt and b.txt: 10_a declares `name = default`
    in its parameters cell, 20_b does not."""
    says = (
        "from pathlib import Path\n(Path(out_dir) / '{0}.txt').write_text(repr(globals().get('%s', 'absent')))" % name
    )
    a = tmp_path / '10_a.ipynb'
    a.write_text(
        json.dumps(
            _nb([(f"preset = 'smoke'\nout_dir = None\n{name} = {default}", ['parameters']), (says.format('a'), [])])
        )
    )
    b = tmp_path / '20_b.ipynb'
    b.write_text(json.dumps(_nb([("preset = 'smoke'\nout_dir = None", ['parameters']), (says.format('b'), [])])))
    return a, b, tmp_path / 'out'


def test_resume_reaches_only_the_notebooks_that_take_it(tmp_path):
    """`reproduce(resume=True)` (`abaw-reproduce --resume`) passes resume=True to a notebook whose parameters cell
    declares `resume`, not to one that does not, and the ledger marks the resumed record."""
    a, b, out = _echo_notebooks(tmp_path, 'resume', 'False')
    runs = reproduce('smoke', out=out, notebooks=[a, b], jobs=1, resume=True)
    assert [r['status'] for r in runs] == ['ok', 'ok'], runs
    assert (out / 'a.txt').read_text() == 'True' and (out / 'b.txt').read_text() == "'absent'"
    ledger = json.loads((out / 'reproduce.json').read_text())
    assert ledger['10_a.ipynb'].get('resumed') is True and 'resumed' not in ledger['20_b.ipynb']
    runs = reproduce('smoke', out=out, notebooks=[a], jobs=1)  # without resume: the notebook's default
    assert (out / 'a.txt').read_text() == 'False' and 'resumed' not in json.loads((out / 'reproduce.json').read_text())[
        '10_a.ipynb'
    ]


def test_seeds_reach_only_the_notebooks_that_take_them(tmp_path):
    """`reproduce(seeds=5)` (`abaw-reproduce --seeds 5`, `make reproduce SEEDS=5`) passes seeds=5 to a notebook whose
    parameters cell declares `seeds`, not to one that does not; the ledger and the report's run table say so."""
    a, b, out = _echo_notebooks(tmp_path, 'seeds', 'None')
    with pytest.raises(ValueError, match='seeds=0: train at least 1 seed'):
        reproduce('smoke', out=out, notebooks=[a, b], jobs=1, seeds=0)
    runs = reproduce('smoke', out=out, notebooks=[a, b], jobs=1, seeds=5)
    assert [r['status'] for r in runs] == ['ok', 'ok'], runs
    assert (out / 'a.txt').read_text() == '5' and (out / 'b.txt').read_text() == "'absent'"
    ledger = json.loads((out / 'reproduce.json').read_text())
    assert ledger['10_a.ipynb']['seeds'] == 5 and 'seeds' not in ledger['20_b.ipynb']
    report = (out / 'REPORT.md').read_text()
    assert '| `10_a.ipynb` | ok | smoke, 5 seeds |' in report and '| `20_b.ipynb` | ok | smoke |' in report
    runs = reproduce('smoke', out=out, notebooks=[a], jobs=1)  # without seeds: the notebook's default
    assert (out / 'a.txt').read_text() == 'None' and 'seeds' not in json.loads((out / 'reproduce.json').read_text())[
        '10_a.ipynb'
    ]
