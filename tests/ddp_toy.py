"""Toy run for tests/test_ddp.py: `python ddp_toy.py OUT` or `torchrun --nproc_per_node 2 ddp_toy.py OUT`."""

import json, sys
import torch
from torch import nn
from abaw_nb.core import get_config
from abaw_nb.train.engine import Trainer


class Toy(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ torch.linspace(-1, 1, 8) + 0.1 * torch.randn(n, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {'image': self.x[i], 'y': self.y[i]}


if __name__ == '__main__':
    out = sys.argv[1]
    val = Toy(50, 1)
    cfg = get_config(
        'smoke', epochs=3, batch_size=16, lr=0.01, optimizer='sgd', max_steps_per_epoch=None, progress=False
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    t = Trainer(
        model,
        cfg,
        loss_fn=lambda o, b: ((o.squeeze(1) - b['y']) ** 2).mean(),
        train_ds=Toy(160, 0),
        val_ds=val,
        predict_fn=lambda o, b: {'pred': o.squeeze(1)},
        score_fn=lambda p: {
            'score': -float(((p['pred'].to_numpy() - val.y.numpy()[p['index']]) ** 2).mean()),
            'n': len(p),
        },
        out_dir=out,
        shuffle=False,
    )
    hist = t.fit()
    if t.is_main:
        json.dump({'history': hist, 'world': t.world}, open(f'{out}/result.json', 'w'))
