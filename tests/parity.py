"""The checkpoint parity harness (tests only): the kit's fill rules and input rule, its reference outputs, the
originals'
on-disk layouts, and import -> forward -> compare of every kit folder. The kit lives in `tests/parity_kit/` (or
`$ABAW_PARITY_KIT`, read through `abaw_nb.core.parity_kit_dir`); notebooks that check an importer on it import this
module with `sys.path` pointing at `tests/`."""

from __future__ import annotations
import functools, json, math, tempfile, zlib
from pathlib import Path

import numpy as np, torch
from torch import nn

from abaw_nb.core import check_choice, parity_kit_dir
from abaw_nb.checkpoints import Imported, convert_checkpoint
from abaw_nb.methods import import_checkpoint


def kit_dir(folder: str | None = None) -> Path:
    "The parity kit (or one model folder of it): `$ABAW_PARITY_KIT`, else `tests/parity_kit/` in the checkout."
    return parity_kit_dir(folder)


@functools.lru_cache(maxsize=16)
def kit_keys(folder: str) -> dict:
    "The folder's keys.json (cached: do not modify it)."
    return json.loads((kit_dir(folder) / 'keys.json').read_text())


_TWO_PI = 6.283185307179586


def fill_values(
    key: str,  # state-dict key (the string the rule hashes)
    shape,  # entry shape
    dtype: str = 'float32',  # entry dtype name ('float32', 'int64', ...)
    rule: str = 'A',  # 'A' (primary) or 'B' (full-rank supplementary)
    # only the first `first` values (flat, C order), e.g. to check fill_first_values cheaply
    first: int | None = None,
) -> np.ndarray:
    "The kit's deterministic value of one state-dict entry (README §3/§4), as a numpy array of `dtype`."
    check_choice('rule', rule, ('A', 'B'))
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    out_shape = shape if first is None else (min(first, n),)
    if first is not None:
        n = min(first, n)
    dt = np.dtype(str(dtype).replace('torch.', ''))
    if key.endswith('num_batches_tracked') or dt.kind in 'iub':
        return np.zeros(out_shape, dt)
    h = zlib.crc32(key.encode('utf8')) & 0xFFFFFFFF
    if rule == 'A':
        a = 0.5 + (h % 1000) / 1000
        b = ((h // 1000) % 1000) / 1000 * _TWO_PI
        t = np.sin(a * np.arange(n, dtype=np.float64) + b)
    else:
        m = (h % 1000) + 1
        r = np.arange(n, dtype=np.int64) % 65521
        q = (m * r * r + r + h) % 65521
        t = np.sin((_TWO_PI * q.astype(np.float64)) / 65521)
    if key.endswith('running_var'):
        v = 1 + 0.5 * np.abs(t)
    elif len(shape) >= 2:
        v = math.sqrt(2 / math.prod(shape[1:])) * t
    elif len(shape) == 1 and key.endswith('weight'):
        v = 1 + 0.1 * t
    else:
        v = 0.1 * t
    return v.astype(dt).reshape(out_shape)


def kit_fill_sources(folder: str) -> dict:
    """{rule: {'fill_checksums', 'fill_first_values'}} of a folder (rule B's from fill_B/outputs.json; none for
    key-list-only folders)."""
    d, out = kit_keys(folder), {}
    if 'fill_checksums' in d:
        out['A'] = d
    fb = kit_dir(folder) / 'fill_B' / 'outputs.json'
    if fb.is_file():
        out['B'] = json.loads(fb.read_text())
    keys = ('fill_checksums', 'fill_first_values')
    return {r: {k: dict(v[k]) if isinstance(v[k], list) else v[k] for k in keys} for r, v in out.items()}


def check_fill(folder: str, rule: str = 'A', max_numel: int | None = None) -> int:
    """Compare `fill_values` with the kit's checksums and first values of every key (checksums of entries up to
    `max_numel` only); returns the keys checked."""
    src = kit_fill_sources(folder)[rule]
    cs, fv = src['fill_checksums'], src['fill_first_values']
    n = 0
    for k, s, dt in kit_keys(folder)['keys']:
        if k == 'A':
            continue  # the original's adjacency, not rule-filled
        np.testing.assert_allclose(
            fill_values(k, s, dt, rule, first=3).astype(np.float64),
            np.asarray(fv[k], np.float64),
            rtol=1e-6,
            atol=1e-7,
            err_msg=f'{folder} rule {rule}: first values of {k}',
        )
        if max_numel is None or math.prod(s) <= max_numel:
            got = float(fill_values(k, s, dt, rule).astype(np.float64).sum())
            tol = 1e-6 * max(1.0, abs(cs[k])) + 1e-4
            assert abs(got - cs[k]) <= tol, f'{folder} rule {rule}: checksum of {k}: {got} != {cs[k]}'
        n += 1
    return n


def kit_state_dict(
    folder: str,  # kit model folder, e.g. 'emenet_v'
    rule: str = 'A',
    device: str = 'cpu',  # 'meta': shapes only (no values), for key-list-only folders
) -> dict:
    "Every key of the folder's keys.json in the original's order, filled by `rule` (Emotion-GCN's `A` from `A.npy`)."
    d = kit_keys(folder)
    sd = {}
    for k, s, dt in d['keys']:
        tdt = getattr(torch, dt)
        if device == 'meta':
            sd[k] = torch.empty(s, dtype=tdt, device='meta')
            continue
        if k == 'A' and (kit_dir(folder) / 'A.npy').is_file():
            v = np.load(kit_dir(folder) / 'A.npy')
        else:
            v = fill_values(k, s, dt, rule)
        # (ascontiguousarray makes 0-d arrays 1-d)
        sd[k] = torch.from_numpy(np.ascontiguousarray(v)).reshape(s).to(tdt)
    return sd


def kit_input(shape) -> np.ndarray:
    "The kit's input rule (README §5): x_j = sin(0.001 j)·0.5 + 0.1·cos(0.017 j), float32, C order."
    j = np.arange(math.prod(shape), dtype=np.float64)
    return (np.sin(0.001 * j) * 0.5 + 0.1 * np.cos(0.017 * j)).astype(np.float32).reshape(shape)


def kit_input_file(folder: str) -> Path | None:
    "The kit's own input.npy of `folder` (None for key-list-only folders)."
    f = kit_dir(folder) / 'input.npy'
    return f if f.is_file() else None


def kit_outputs(folder: str, rule: str = 'A', diagnostics: bool = False) -> dict:
    "Reference outputs {name: array} of a folder under `rule`, in the original's return order."
    d = kit_keys(folder)
    base = kit_dir(folder) / ('fill_B' if rule == 'B' else '')
    meta = d['outputs'] if rule == 'A' else json.loads((base / 'outputs.json').read_text())['outputs']
    out = {o['name']: np.load(base / o['file']) for o in sorted(meta, key=lambda o: o['order'])}
    if diagnostics:
        dm = (
            d.get('diagnostics', [])
            if rule == 'A'
            else json.loads((base / 'outputs.json').read_text()).get('diagnostics', [])
        )
        diag = base / 'diagnostics'
        out.update({'diag_' + o['name']: np.load(diag / o['file']) for o in dm if (diag / o['file']).is_file()})
    return out


FORMATS = (
    'emenet_v',
    'emotion_gcn',
    'emotion_gcn_multi',
    'emotion_gcn_bregnext',
    'fpn_multitask',
    'multitask_cnn',
    'multitask_cnn_rnn',
    'fmae_vit',
    'fmae_mae',
)


def _namespace(fmt):
    import argparse

    return argparse.Namespace(
        model='vit_base_patch16' if fmt == 'fmae_vit' else 'mae_vit_base_patch16', blr=5e-4, epochs=30
    )


def save_original(sd: dict, fmt: str, path) -> Path:
    "Write `sd` in the on-disk layout the original repository used for format `fmt` (tests and examples)."
    check_choice('fmt', fmt, FORMATS)
    obj = {
        'emenet_v': lambda: {'state_dict': sd, 'epoch': 4},
        'emotion_gcn': lambda: {'epoch': 10, 'model_state_dict': sd, 'optimizer_state_dict': {}},
        'emotion_gcn_multi': lambda: {'epoch': 10, 'model_state_dict': sd, 'optimizer_state_dict': {}},
        'emotion_gcn_bregnext': lambda: {'epoch': 10, 'model_state_dict': sd, 'optimizer_state_dict': {}},
        'fpn_multitask': lambda: {
            'epoch': 19,
            'global_step': 1000,
            'pytorch-lightning_version': '1.1.8',
            'state_dict': sd,
            'callbacks': {},
            'optimizer_states': [],
            'lr_schedulers': [],
            'hyper_parameters': {'img_size': 128},
        },
        'multitask_cnn': lambda: sd,
        'multitask_cnn_rnn': lambda: sd,
        'fmae_vit': lambda: {'model': sd, 'optimizer': {}, 'epoch': 0, 'scaler': {}, 'args': _namespace(fmt)},
        'fmae_mae': lambda: {'model': sd, 'optimizer': {}, 'epoch': 0, 'scaler': {}, 'args': _namespace(fmt)},
    }[fmt]()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


KIT = {  # kit folder -> (format, importer options, input shape)
    'emenet_v': ('emenet_v', dict(compat_gru_axis=True, landmarks=True), (2, 3, 3, 112, 112)),
    'emotion_gcn_densenet_227': ('emotion_gcn', dict(input_size=227), (2, 3, 227, 227)),
    'emotion_gcn_densenet_112': ('emotion_gcn', dict(input_size=112), (2, 3, 112, 112)),
    'emotion_gcn_multi_densenet_227': ('emotion_gcn_multi', dict(input_size=227), (2, 3, 227, 227)),
    'emotion_gcn_bregnext_112': ('emotion_gcn_bregnext', {}, (2, 3, 112, 112)),
    'fpn_multitask': ('fpn_multitask', {}, (2, 3, 128, 128)),
    'multitask_cnn': ('multitask_cnn', {}, (2, 3, 112, 112)),
    'multitask_cnn_rnn': ('multitask_cnn_rnn', {}, (2, 32, 3, 112, 112)),  # no input.npy: the 5-D input rule (§5)
    'fmae_vit_base_patch16': ('fmae_vit', {}, (2, 3, 224, 224)),
}
KEYS_ONLY = {
    'fmae_mae_vit_base_patch16': 'fmae_mae',
    'fmae_mae_vit_large_patch16': 'fmae_mae',
    'fmae_iat_vit_large_patch16_bp4d': 'fmae_vit',
}


def kit_import(folder: str, rule: str = 'A', tmp_dir=None, **kw) -> Imported:
    """Fill the folder's keys by `rule`, save them in the original layout, import the file (the kit's options, e.g. the
    GRU compat switch)."""
    fmt, opts, _ = KIT[folder]
    opts = {**opts, **kw}
    if fmt in ('emotion_gcn', 'emotion_gcn_bregnext'):
        opts.setdefault('embeddings', fill_values('input.embeddings', (9, 300), rule=rule))
    with tempfile.TemporaryDirectory(dir=tmp_dir) as d:
        p = save_original(kit_state_dict(folder, rule), fmt, Path(d) / f'{folder}.pth')
        # the released layout pickles argparse.Namespace: the documented conversion first (no code from the file runs)
        if fmt.startswith('fmae'):
            p = convert_checkpoint(p, Path(d) / f'{folder}.weights.pt')
        return import_checkpoint(p, fmt, **opts)


def _capture(module: nn.Module, store: dict, name: str):
    "Forward hook keeping `module`'s output under `name` (the kit's diagnostics, taken during the one forward pass)."
    return module.register_forward_hook(lambda m, i, o: store.__setitem__(name, o))


@torch.no_grad()
def kit_forward(imp: Imported, folder: str) -> dict:
    """Run an imported model (its own forward, once) on the kit's input of `folder`; outputs named like the kit's files,
    `diag_*` diagnostics from hooks."""
    x = torch.from_numpy(kit_input(KIT[folder][2]))
    m = imp.model.eval()
    f = imp.fmt
    cap: dict = {}
    other = ('backbone', 'pooled_features' if f.startswith('emotion_gcn') else 'backbone_features')
    where = {
        'fmae_vit': ('fc_norm', 'pooled_features'),
        'fpn_multitask': ('backbone', 'embedding'),
        'multitask_cnn': ('backbone', 'cross_task'),
    }.get(f, other)
    if (
        f == 'multitask_cnn_rnn'
    ):  # the per-frame ResNet feature, and each GRU head's ReLU(GRU output) (its dropout's input)
        hs = [_capture(m.cnn.backbone, cap, 'cross_task')]
        hs += [_capture(m.rnn[t].drop, cap, f'gru_{t}') for t in ('expr', 'au', 'va')]
    else:
        hs = [_capture(getattr(m, where[0]), cap, where[1])]
    try:
        if f == 'emenet_v':
            out, hid = m.step(x)
            r = {
                'expr_logits': out['expr'],
                'au_logits': out['au'],
                'va_logits': out['va'],
                'diag_backbone_features': cap['backbone_features'].unflatten(0, x.shape[:2]),
            }
            if 'fa' in out:
                r['fa_landmarks'] = out['fa']
            r.update({f'hidden_{t}': v for t, v in hid.items()})
        elif f in ('emotion_gcn', 'emotion_gcn_multi', 'emotion_gcn_bregnext'):
            out = m(x)
            r = {'expr_logits': out['expr'], 'va': out['va'], 'diag_pooled_features': cap['pooled_features']}
            if f == 'emotion_gcn_bregnext':  # G (9 x 128), the gc2 output: the graph path on its own
                r['diag_gcn_classifiers'] = m.classifier_weights()
        elif f == 'fpn_multitask':
            out = m(x)
            r = {'va_expr_au': torch.cat([out['va'], out['expr'], out['au']], 1), 'diag_embedding': cap['embedding']}
        elif f == 'multitask_cnn':
            out, feats = m(x, features=True)
            r = {
                'expr_logits': out['expr'],
                'au_logits': out['au'],
                'va_logits': out['va'],
                'feature_cross_task': cap['cross_task'],
            }
            r.update({f'feature_{t}': feats[t] for t in ('expr', 'au', 'va')})
        elif (
            f == 'multitask_cnn_rnn'
        ):  # the GRU heads' logits, and the CNN heads' features as the original returns them
            out, feats = m(x, features=True)
            r = {
                'expr_logits': out['expr'],
                'au_logits': out['au'],
                'va_logits': out['va'],
                'diag_backbone_feature_cross_task': cap['cross_task'].unflatten(0, x.shape[:2]),
            }
            r.update({f'feature_{t}': feats[t] for t in ('expr', 'au', 'va')})
            r.update({f'diag_gru_feature_{t}': cap[f'gru_{t}'] for t in ('expr', 'au', 'va')})
        else:
            y = m(x)
            r = {'au_logits': y[0] if isinstance(y, tuple) else y, 'diag_pooled_features': cap['pooled_features']}
    finally:
        for h in hs:
            h.remove()
    return {k: v.numpy() for k, v in r.items()}


def kit_compare(got: dict, ref: dict, atol: float = 1e-4, rtol: float = 1e-3) -> dict:
    "Max |got - ref| per reference output; raises AssertionError naming the outputs outside atol + rtol·|ref|."
    diff, bad = {}, []
    for k, r in ref.items():
        if k not in got:
            bad.append(f'{k}: not produced')
            continue
        g = got[k]
        if g.shape != r.shape:
            bad.append(f'{k}: shape {g.shape} != {r.shape}')
            continue
        diff[k] = float(np.abs(g - r).max())
        if not np.allclose(g, r, atol=atol, rtol=rtol):
            bad.append(f'{k}: max |diff| {diff[k]:.3g}')
    if bad:
        raise AssertionError('outputs differ from the kit: ' + '; '.join(bad))
    return diff
