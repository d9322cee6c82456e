"""Data loading across worker processes: what notebooks cannot hold well (multiprocessing DataLoader, fault
injection)."""

import numpy as np, pytest, torch
from torch.utils.data import DataLoader
from abaw_nb.data.frames import make_frames
from abaw_nb.data.formats import write_affwild2, read_affwild2, affwild2_frame_path
from abaw_nb.data.loading import ClipDataset, FrameDataset, scatter_predictions, make_transform


def _layout(tmp_path, n=9):
    rows = [('a', f) for f in range(n)] + [('b', f) for f in range(4)]
    ft = make_frames(
        {
            'dataset': 'affwild2',
            'split': 'train',
            'video': [v for v, _ in rows],
            'frame': [f for _, f in rows],
            'path': [affwild2_frame_path(v, f) for v, f in rows],
            'expr': [f % 7 for _, f in rows],
        }
    )
    write_affwild2(
        ft, tmp_path, lambda r: np.full((8, 8, 3), (100 if r['video'] == 'b' else 0) + 10 * r['frame'], np.uint8)
    )
    return read_affwild2(tmp_path).sample(frac=1, random_state=1).reset_index(drop=True)


def test_clip_predictions_land_on_their_frames_with_two_workers(tmp_path):
    df = _layout(tmp_path)
    ds = ClipDataset(df, tmp_path, length=4, stride=3, end='pad')
    dl = DataLoader(ds, batch_size=2, shuffle=True, num_workers=2, generator=torch.Generator().manual_seed(0))
    idx, pred = [], []
    for b in dl:
        idx.append(b['index'].numpy())
        pred.append((b['image'][:, :, 0, 0, 0] * 255).round().numpy())
    out, cnt = scatter_predictions(np.concatenate(idx), np.concatenate(pred), len(df))
    truth = np.where(df['video'] == 'b', 100, 0) + 10 * df['frame'].to_numpy()
    assert (cnt > 0).all()
    np.testing.assert_allclose(out, truth, atol=2)


def test_corrupt_image_in_worker_names_the_file(tmp_path):
    df = _layout(tmp_path)
    bad = tmp_path / df['path'].iloc[5]
    bad.write_bytes(bad.read_bytes()[:60])
    ds = FrameDataset(df, tmp_path, make_transform(True, size=8))
    with pytest.raises(Exception, match=rf"corrupt or truncated image .*{df['path'].iloc[5]}"):
        for _ in DataLoader(ds, batch_size=4, num_workers=2):
            pass
