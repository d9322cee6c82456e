"""Toy run for tests/test_ddp.py: `python ddp_toy.py OUT [none|weighted]`, or the same under
`torchrun --nproc_per_node 2`.

With `weighted`, training draws through a balancing sampler (`weighted_sampler`, with replacement, redrawn per epoch);
every rank writes the rows of each batch it trained on to `OUT/draws_rank<r>.json`."""

import json, sys
import torch
from torch import nn
from abaw_nb.core import get_config
from abaw_nb.data.sampling import weighted_sampler
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


def toy_weights(ds):
    "Rows with a positive target drawn 4x as often as the others."
    return (1 + 3 * (ds.y > 0)).double().numpy()


if __name__ == '__main__':
    out = sys.argv[1]
    kind = sys.argv[2] if len(sys.argv) > 2 else 'none'
    val, train = Toy(50, 1), Toy(160, 0)
    cfg = get_config(
        'smoke', epochs=3, batch_size=16, lr=0.01, optimizer='sgd', max_steps_per_epoch=None, progress=False
    )
    sampler = weighted_sampler(toy_weights(train), seed=cfg.seed) if kind == 'weighted' else None
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    draws = {}

    def loss_fn(o, b):
        draws.setdefault(str(t.epoch), []).append(b['index'].tolist())
        return ((o.squeeze(1) - b['y']) ** 2).mean()

    t = Trainer(
        model,
        cfg,
        loss_fn=loss_fn,
        train_ds=train,
        val_ds=val,
        predict_fn=lambda o, b: {'pred': o.squeeze(1)},
        score_fn=lambda p: {
            'score': -float(((p['pred'].to_numpy() - val.y.numpy()[p['index']]) ** 2).mean()),
            'n': len(p),
        },
        out_dir=out,
        shuffle=False,
        train_sampler=sampler,
    )
    hist = t.fit()
    json.dump(draws, open(f'{out}/draws_rank{t.rank}.json', 'w'))
    if t.is_main:
        json.dump({'history': hist, 'world': t.world}, open(f'{out}/result.json', 'w'))
