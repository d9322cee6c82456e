"""The FPN method end to end at the smoke preset: mixed single-task sets, pseudo labels, multi-task run, split,
scores."""

import json
import numpy as np
import pytest
import torch
from abaw_nb.pipelines.fpn import run_fpn, KEY, TASKS, check_no_subject_leak
from abaw_nb.methods.fpn import read_pseudo_labels
from abaw_nb.train.run import load_run_model
from abaw_nb.data.synth import QUICK_WORLD


@pytest.fixture(scope='module')
def res(tmp_path_factory):
    torch.set_num_threads(1)
    # the smoke world with half its frames (`QUICK_WORLD`): the external layouts are added to that world's own folder
    out = tmp_path_factory.mktemp('fpn')
    return run_fpn('smoke', out_dir=out, affectnet='synth', expw='synth', device='cpu', synth=QUICK_WORLD)


def keys(df):
    return set(map(tuple, df[KEY].to_numpy()))


def test_every_stage_leaves_its_files(res):
    out = res['out_dir']
    for t in TASKS:
        assert (out / f'single_{t}' / 'best.pt').is_file() and (out / 'split' / f'multi_{t}.pt').is_file()
        m, cfg = load_run_model(out / 'split' / f'multi_{t}.pt')
        assert cfg.task == t and list(m.heads) == [t]
    assert (out / 'multi' / 'best.pt').is_file()
    scores = json.loads((out / 'scores_validation.json').read_text())
    assert set(scores) == {f'{k}_{t}' for k in ('single', 'multi') for t in TASKS}
    for t in TASKS:
        for k in ('single', 'multi'):
            assert np.isfinite(scores[f'{k}_{t}'][f'{t}_score'])
            # the reported numbers are on the real validation frames of the task
            n_val = res['predictions'][(k, t)]
            assert set(n_val['split']) == {'val'} and keys(n_val) <= keys(res['frames'][res['frames'].split == 'val'])


def test_external_sets_are_mixed_without_held_out_people(res):
    held = res['held_subjects']
    val_test = set(res['frames'].loc[res['frames'].split != 'train', 'subject'])
    sel = set(res['work'].loc[res['work'].split == 'val', 'subject'])
    assert val_test and sel and held == val_test | sel
    counts = {
        t: res['mixed'][t].loc[res['mixed'][t].split == 'train', 'dataset'].value_counts().to_dict() for t in TASKS
    }
    assert counts['va'].get('affectnet', 0) > 0 and 'expw' not in counts['va']
    assert counts['expr'].get('affectnet', 0) > 0 and counts['expr'].get('expw', 0) > 0
    assert set(counts['au']) == {'synthaffect'}
    for t in TASKS:
        tab = res['mixed'][t]
        check_no_subject_leak(tab, held)
        assert not (set(tab.loc[tab.split == 'train', 'subject']) & held)
        assert set(tab.loc[tab.split == 'val', 'dataset']) == {'synthaffect'}  # selection is Aff-Wild2-like only


def test_no_validation_or_test_frame_in_the_multitask_training_set(res):
    F, mt = res['frames'], res['multi_frames']
    held_keys = keys(F[F.split != 'train'])
    tr = mt[mt.split == 'train']
    assert len(tr) and not (keys(tr) & held_keys)
    assert not (keys(tr) & keys(res['work'][res['work'].split == 'val']))  # nor a checkpoint-selection frame
    pl = read_pseudo_labels(res['out_dir'] / 'pseudo_labels.csv')
    assert keys(pl) == keys(res['work'][res['work'].split == 'train'])  # pseudo labels: training frames only
    # the run actually trained on that file: the multi-task run's config points at it
    from abaw_nb.train.run import load_run

    assert load_run(res['out_dir'] / 'multi')['config'].extra['pseudo_labels'] == str(
        res['out_dir'] / 'pseudo_labels.csv'
    )


def test_synth_external_needs_synthaffect(tmp_path):
    with pytest.raises(ValueError, match="affectnet/expw='synth' takes SynthAffect's own layouts"):
        run_fpn('smoke', out_dir=tmp_path, data_root=tmp_path, affectnet='synth')
