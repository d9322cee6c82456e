"""The paper path on real data, proven on CPU without the real data.

`abaw_nb.standins` renders SynthAffect in the layouts the real datasets are released in (Aff-Wild2 without test
labels, its unlabelled test set, AffectNet, ExpW, the FMAE and Multitask-CNN external sets) and writes every published
initialisation as a stand-in file in its publisher's format. `make reproduce PRESET=smoke RESOURCES=<that file>` then
runs every paper notebook through the code a user with the real data runs: these tests check that each notebook ran
on the data it was given, started from the stand-in initialisation in the network it is published for, reported on
validation where the test labels are withheld, and wrote challenge files for the test set that read back valid.
"""

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from abaw_nb.data.formats import check_submission, read_affwild2_test
from abaw_nb.resources import NEEDS, PARAMS, load_resources
from abaw_nb.data.synth import QUICK_WORLD
from abaw_nb.standins import standin_resources

ROOT = Path(__file__).resolve().parents[1]
SUBMITS = {'10_fpn_results': 'fpn', '20_incomplete_results': 'incomplete', '31_emenet_rounds': 'emenet'}
SUBMITS['40_emotion_gcn_ablation'] = 'emotion_gcn'


@pytest.fixture(scope='module')
def real_run(tmp_path_factory):
    "One `make reproduce PRESET=smoke RESOURCES=...` into a scratch folder: (resources, outputs folder, ledger)."
    d = tmp_path_factory.mktemp('real-path')
    # the smoke world with half its frames: the paper networks predict every split at their published sizes here
    # (MobileFaceNet at 112 px), and prediction is most of this run (294 s with the smoke world, 205 s with this one)
    res = standin_resources(d / 'resources.yml', **QUICK_WORLD)
    out = d / 'out'
    cmd = ['make', '--no-print-directory', 'reproduce', 'PRESET=smoke', f'RESOURCES={res}', f'OUT={out}', 'JOBS=2']
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=2400)
    said = [ln for ln in (r.stdout + r.stderr).splitlines() if 'failed in' in ln or 'FAILED' in ln or 'rror' in ln]
    assert r.returncode == 0, '\n'.join(said[-10:]) or r.stderr[-3000:]
    return load_resources(res), out, json.loads((out / 'reproduce.json').read_text())


def test_every_paper_notebook_ran_on_the_data_the_resources_file_names(real_run):
    res, out, ledger = real_run
    recs = {k.removesuffix('.ipynb'): v for k, v in ledger.items() if k.endswith('.ipynb')}
    assert set(recs) == set(NEEDS)
    aw = str(res.datasets['affwild2']['root'])
    assert aw.endswith('affwild2_release')  # Aff-Wild2 as released: no test labels
    for nb, needs in NEEDS.items():
        assert recs[nb]['status'] == 'ok', (nb, recs[nb])
        first = needs.data[0][0] if needs.data and isinstance(needs.data[0], tuple) else (needs.data or [None])[0]
        want = 'SynthAffect' if needs.synth_only else str(res.datasets[first]['root'])
        assert recs[nb]['data'] == want, (nb, recs[nb]['data'], want)
    # every table of a real-data notebook carries that root in its provenance line, none says SynthAffect
    for nb in ('10_fpn_results', '20_incomplete_results', '31_emenet_rounds', '60_cross_method'):
        for t in recs[nb]['tables']:
            first_line = (out / 'tables' / t).read_text().splitlines()[0]
            assert aw in first_line and 'SynthAffect' not in first_line, (nb, t, first_line)


def test_the_notebooks_were_handed_every_resource_they_take(real_run):
    res, out, _ = real_run
    for nb, needs in NEEDS.items():
        if needs.synth_only:
            continue
        text = (out / 'notebooks' / f'{nb}.ipynb').read_text()
        given = [x for x in (needs.init, *needs.optional) if x and (x in res.weights or x in res.datasets)]
        for x in given:
            v = str(res.weights[x]) if x in res.weights else str(res.datasets[x]['root'])
            assert v in text, (nb, x, PARAMS[x])  # papermill's injected-parameters cell


def _configs(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in out.rglob('runs/**/config.json')]


def test_each_method_started_from_its_standin_initialisation_in_the_published_network(real_run):
    res, out, _ = real_run
    want = {  # method -> (resources weight name, the network the file is published for, input size it fixes)
        'fpn': ('fpn_init', 'resnet50_fpn', None),
        'mtl_cnn': ('incomplete_init', 'resnet50_caffe', None),
        'emenet': ('emenet_init', 'mobilefacenet', 112),
        'emotion_gcn': ('emotion_gcn_init', 'densenet121', None),
    }
    cfgs = _configs(out)
    for m, (w, backbone, size) in want.items():
        mine = [c for c in cfgs if c['method'] == m and c['extra'].get('pretrained') == str(res.weights[w])]
        assert mine, f'no {m} run started from {res.weights[w]}'
        assert {c['extra']['backbone'] for c in mine} == {backbone}, m
        if size:
            assert {c['img_size'] for c in mine} == {size}, m
    fmae = (out / 'tables' / 'fmae_au_f1.md').read_text().splitlines()[0]
    assert 'ViT-small/16' in fmae, fmae  # the stand-in MAE checkpoint is a ViT-S: the encoder the notebook fine-tuned


def test_without_test_labels_the_notebooks_report_validation_and_say_so(real_run):
    _, out, ledger = real_run
    for nb in ('31_emenet_rounds', '60_cross_method'):
        for t in ledger[f'{nb}.ipynb']['tables']:
            assert 'validation (no test labels' in (out / 'tables' / t).read_text().splitlines()[0], (nb, t)


def test_every_aff_wild2_method_wrote_a_valid_challenge_submission(real_run):
    res, out, _ = real_run
    test = read_affwild2_test(res.datasets['affwild2']['test_set'])
    lists = test.attrs['test_lists']
    for nb, name in SUBMITS.items():
        tab = pd.read_csv(out / 'tables' / f'{name}_submission.csv')
        assert len(tab), nb
        for r in tab.itertuples():
            folder = out / 'submissions' / name / r.run
            chk = check_submission(folder, test, [r.task])  # every listed video, one valid row per frame
            assert (len(chk), int(chk['rows'].sum())) == (len(lists[r.task]), sum(lists[r.task].values()))
            assert (r.videos, r.rows) == (len(chk), int(chk['rows'].sum()))
        assert {'va', 'expr'} <= set(tab.task), (nb, sorted(set(tab.task)))


def test_the_cross_method_table_scored_the_predictions_the_method_notebooks_saved(real_run):
    """The notebooks run two at a time, each into its own staging folder: the cross-method notebook starts after the
    others have finished and reads the predictions they saved in the outputs folder, instead of training them again."""
    _, out, _ = real_run
    saved = sorted(p.name for p in (out / 'predictions').iterdir())
    assert {'fpn', 'mtl_cnn', 'mtl_cnn_rnn', 'emenet', 'emotion_gcn'} <= set(saved), saved
    tab = pd.read_csv(out / 'tables' / 'cross_method_scores.csv')
    budget = tab.drop_duplicates('method').set_index('method')['budget']
    for m in saved:
        assert budget[m].startswith("from its notebook's runs"), (m, budget[m])
    assert budget['fmae'].startswith('trained here'), budget['fmae']  # no FMAE notebook saves predictions
