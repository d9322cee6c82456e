"""Toy run for tests/test_reliability.py: `python fault_toy.py OUT SEED`.

The real engine (Trainer: shuffling, dropout, per-epoch reseeding, last.pt / best.pt, metrics.jsonl) on a
tiny MLP, then what `train.run.train` does at the end: load the best epoch, predict the validation set and
write predictions_val.csv and scores_val.json through the core's atomic writers. `$ABAW_NB_FAULT` (see
`abaw_nb.core.fault_point`) makes it SIGKILL itself at a chosen point; running it again resumes."""

import sys
import torch
from torch import nn
from abaw_nb.core import get_config, write_csv, write_json
from abaw_nb.train.engine import Trainer


class Toy(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ torch.linspace(-1, 1, 8) + 0.3 * torch.randn(n, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {'image': self.x[i], 'y': self.y[i], 'video': f'v{i // 10}', 'frame': i % 10}


if __name__ == '__main__':
    out, seed = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    val = Toy(40, 1)
    cfg = get_config(
        'smoke', epochs=3, batch_size=16, lr=0.02, optimizer='adam', max_steps_per_epoch=None, progress=False, seed=seed
    )
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
    t = Trainer(
        model,
        cfg,
        loss_fn=lambda o, b: ((o.squeeze(1) - b['y']) ** 2).mean(),
        train_ds=Toy(160, 0),
        val_ds=val,
        predict_fn=lambda o, b: {'pred': o.squeeze(1)},
        score_fn=lambda p: {'score': -float(((p['pred'].to_numpy() - val.y.numpy()[p['index']]) ** 2).mean())},
        out_dir=out,
    )
    t.fit()
    t.load_best()
    scores, pred = t.evaluate()
    write_csv(f'{out}/predictions_val.csv', pred)
    write_json(f'{out}/scores_val.json', scores)
