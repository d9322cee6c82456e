"""A sixth method written outside the package: one module whose import registers it (`tests/test_methods.py`).

`abaw_nb.methods` finds it through `$ABAW_NB_METHODS=toy_method` (with this folder on the path), as a user's own
method would be found; a built-in method is the same module exported from a notebook into `abaw_nb/methods/`."""

from dataclasses import dataclass
import torch
from torch import nn
from abaw_nb.methods import MethodSpec, Recipe, RunData, choice, frame_data, register_method
from abaw_nb.train.losses import MultiTaskLoss, batch_targets


@dataclass
class ToySettings:
    "The toy method's own settings."

    width: int = 8  # channels of its one convolution
    pool: str = choice('avg', ('avg', 'max'))


def toy_presets(preset: str, task: str) -> tuple[dict, dict]:
    "(Config fields, settings): one short epoch at every preset (it is a toy)."
    return dict(img_size=32, batch_size=8, epochs=1, max_steps_per_epoch=3, optimizer='adam', lr=1e-2), {}


class ToyNet(nn.Module):
    "One convolution, a global pool, a linear head per task."

    def __init__(self, tasks, width: int, pool: str, n_expr: int, n_au: int):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1) if pool == 'avg' else nn.AdaptiveMaxPool2d(1)
        dims = dict(va=2, expr=n_expr, au=n_au)
        self.heads = nn.ModuleDict({t: nn.Linear(width, dims[t]) for t in tasks})

    def forward(self, x):
        f = self.pool(torch.relu(self.conv(x))).flatten(1)
        return {t: h(f) for t, h in self.heads.items()}


def toy_recipe(cfg, s: ToySettings, data: RunData) -> Recipe:
    "The toy's network, its masked multi-task loss and its prediction columns."
    tasks = ('va', 'expr', 'au') if cfg.task == 'multi' else (cfg.task,)
    model = ToyNet(tasks, s.width, s.pool, data.n_expr, len(data.au_names))
    crit = MultiTaskLoss({t: {'va': 'mse', 'expr': 'ce', 'au': 'bce'}[t] for t in tasks})

    def loss_fn(out, b):
        total, parts = crit(out, {t: v for t, v in batch_targets(b).items() if t in tasks})
        return total, {k: float(v.detach()) for k, v in parts.items()}

    def predict_fn(out, b):
        p = {}
        if 'va' in out:
            p['valence'], p['arousal'] = out['va'][:, 0], out['va'][:, 1]
        if 'expr' in out:
            p['prob_expr'] = out['expr'].softmax(1)
        if 'au' in out:
            p.update({f'prob_{a}': out['au'][:, j].sigmoid() for j, a in enumerate(data.au_names)})
        return p

    train_data, eval_data = frame_data(cfg.img_size)
    return Recipe(model, tasks, predict_fn, eval_data, loss_fn, train_data, backbone='toy')


register_method(MethodSpec('toy', ToySettings, toy_presets, toy_recipe, doc='a toy method written in a test'))
