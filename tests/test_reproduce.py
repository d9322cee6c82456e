"""papermill end to end: a parameterised notebook runs through `abaw_nb.reproduce` from another
working directory, finds the repo root, writes a table atomically and REPORT.md indexes it."""
import json, os
from pathlib import Path
import pytest
from abaw_nb.reproduce import reproduce, main

def _nb(cells):
    return {'cells': [{'cell_type': 'code', 'id': f'c{i}', 'execution_count': None, 'metadata': {'tags': tags},
                       'outputs': [], 'source': src} for i, (src, tags) in enumerate(cells)],
            'metadata': {'kernelspec': {'name': 'python3', 'display_name': 'python3', 'language': 'python'}},
            'nbformat': 4, 'nbformat_minor': 5}

def test_reproduce_runs_a_paper_notebook(tmp_path, root, monkeypatch):
    nb = tmp_path/'10_demo.ipynb'
    nb.write_text(json.dumps(_nb([
        ("preset = 'smoke'\nout_dir = None\nn = 3", ['parameters']),
        ("import os\nfrom pathlib import Path\nimport pandas as pd\nfrom abaw_nb.core import find_repo_root, write_text, write_csv\n"
         "df = pd.DataFrame({'x': range(n)})\n"
         "write_csv(Path(out_dir)/'tables'/'demo.csv', df)\n"
         "write_text(Path(out_dir)/'tables'/'demo.md', f'Data: none, preset {preset}\\n\\n' + df.to_markdown(index=False))\n"
         "write_text(Path(out_dir)/'root.txt', str(find_repo_root()) + '\\n' + os.getcwd())", []),
    ])))
    monkeypatch.chdir(tmp_path)                        # papermill runs from outside the checkout
    monkeypatch.delenv('ABAW_NB_ROOT', raising=False)
    out = tmp_path/'out'
    runs = reproduce('smoke', out=out, notebooks=[nb])
    assert [(r['name'], r['status']) for r in runs] == [('10_demo.ipynb', 'ok')]
    found_root, cwd = (out/'root.txt').read_text().splitlines()
    assert Path(found_root) == root and Path(cwd).resolve() == tmp_path.resolve()
    assert (out/'tables'/'demo.csv').read_text().splitlines() == ['x', '0', '1', '2']
    report = (out/'REPORT.md').read_text()
    assert 'Data: none, preset smoke' in report and '| `10_demo.ipynb` | ok |' in report
    # the executed copy records the injected parameters (provenance)
    executed = json.loads((out/'executed'/'10_demo.ipynb').read_text())
    assert executed['metadata']['papermill']['parameters']['preset'] == 'smoke'

def test_reproduce_reports_a_failing_notebook(tmp_path):
    nb = tmp_path/'20_broken.ipynb'
    nb.write_text(json.dumps(_nb([("preset = 'smoke'\nout_dir = None", ['parameters']), ("raise ValueError('bad table')", [])])))
    runs = reproduce('smoke', out=tmp_path/'out', notebooks=[nb])
    assert runs[0]['status'] == 'failed' and 'bad table' in runs[0]['error']
    assert '20_broken.ipynb failed' in (tmp_path/'out'/'REPORT.md').read_text()

def test_cli_rejects_unknown_preset(capsys):
    with pytest.raises(SystemExit):
        main(['--preset', 'laptop'])
    assert "invalid choice: 'laptop'" in capsys.readouterr().err
