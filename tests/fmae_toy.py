"""FMAE stages for tests/test_reliability.py: `python fmae_toy.py OUT STAGE` (STAGE: mae | au).

The smoke settings with two epochs, so a run killed in its second epoch (`$ABAW_NB_FAULT`, see
`abaw_nb.core.fault_point`) has a first epoch's `last.pt` to resume from; the stage's results go to OUT/result.json."""

import copy, sys
import torch
from abaw_nb.core import write_json
from abaw_nb.data.synth import generate_cached, read_format
from abaw_nb.methods.fmae import fmae_settings
from abaw_nb.pipelines.fmae import pretrain_mae, finetune_au

if __name__ == '__main__':
    out, stage = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    s = copy.deepcopy(fmae_settings('smoke'))
    s['mae']['epochs'] = 2
    s['au']['recipes']['bp4d']['fmae'] = (1e-3, 2, 0)
    root = generate_cached('smoke', 0, formats=('affwild2', 'bp4d'), show_progress=False)
    if stage == 'mae':
        _, hist = pretrain_mae(root, s, seed=0, device='cpu', out_dir=f'{out}/run')
        write_json(f'{out}/result.json', {'loss': hist['train_loss'].tolist()})
    else:
        bp, bproot = read_format(root, 'bp4d')
        r = finetune_au(bp, bproot, 'bp4d', 1, s, None, seed=0, device='cpu', out_dir=f'{out}/run')
        write_json(f'{out}/result.json', {'f1': r['f1'], 'threshold': r['threshold'], 'probs': r['probs'].tolist()})
