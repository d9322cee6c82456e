"""`abaw-predict` end to end, as a user runs it (a subprocess of the installed console script): a SynthAffect mp4 and a
folder of images, with a smoke run folder and with imported stand-ins of the authors' checkpoints (the parity kit's key
names and shapes, random values, written in the original's layout); and one clear error per unreadable input.

Kept in pytest rather than nbs/12_predict.ipynb: the end-to-end cases start a fresh process each (about 10 s of CPU to
import torch, pandas and the methods), and the stand-in checkpoints are written to temporary files (FPN: 100 MB). The
error cases and the clip model run `main` in this process."""

import json, math, shutil, subprocess, sys
from pathlib import Path

import cv2, numpy as np, pandas as pd, pytest, torch

import parity as ck
from abaw_nb.data.frames import au_columns, expr_names
from abaw_nb.explore import demo_run, synth_video

CLI = Path(sys.executable).parent / 'abaw-predict'


def run_main(*args, capsys):
    "abaw-predict in this process (the error cases: no interpreter start-up each); (exit status, stdout, stderr)."
    from abaw_nb.predict import main

    try:
        rc = main([*map(str, args), '--no-progress'])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def run_cli(*args, ok=True):
    "Run abaw-predict; its CompletedProcess (stdout, stderr as text)."
    assert CLI.is_file(), f'{CLI} is missing: `make env` installs the console scripts of settings.ini'
    p = subprocess.run([str(CLI), *map(str, args), '--no-progress'], capture_output=True, text=True, timeout=600)
    if ok:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def standin(folder: str, fmt: str, path: Path, seed: int = 0) -> Path:
    "A checkpoint with the kit folder's key names and shapes, random values, in format `fmt`'s on-disk layout."
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape, dt in ck.kit_keys(folder)['keys']:
        if not dt.startswith('float'):
            sd[k] = torch.zeros(shape, dtype=getattr(torch, dt))
        elif k.endswith('running_var'):
            sd[k] = torch.ones(shape)
        elif k.endswith('running_mean'):
            sd[k] = torch.zeros(shape)
        elif len(shape) >= 2:  # scaled by the fan-in, so activations neither vanish nor explode
            sd[k] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        elif k.endswith('weight'):
            sd[k] = torch.ones(shape)
        else:
            sd[k] = torch.randn(shape, generator=g) * 0.01
    return ck.save_original(sd, fmt, path)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    "A SynthAffect mp4 (12 frames, two of them blank), the same frames as a folder of png, and the smoke run."
    d = tmp_path_factory.mktemp('predict')
    lat = synth_video(d / 'clip.mp4', video=1, size=112, n_frames=12, blank_frames=(4, 5))
    (d / 'frames').mkdir()
    cap = cv2.VideoCapture(str(d / 'clip.mp4'))
    for i in range(6):
        cv2.imwrite(str(d / 'frames' / f'frame{i + 1}.png'), cap.read()[1])
    cap.release()
    (d / 'frames' / 'readme.txt').write_text('not an image')
    yield dict(dir=d, lat=lat, run=demo_run())
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope='module')
def fpn_ckpt(data):
    p = standin('fpn_multitask', 'fpn_multitask', data['dir'] / 'ckpt' / 'fpn_multi.ckpt')
    yield p
    p.unlink(missing_ok=True)


def read(out: Path):
    return pd.read_csv(out), json.loads(out.with_suffix('.json').read_text())


def test_video_with_a_run(data):
    d = data['dir']
    out = d / 'run_video' / 'clip.csv'
    p = run_cli(
        d / 'clip.mp4',
        '--out',
        out,
        '--run',
        data['run'],
        '--detector',
        'whole',
        '--batch-size',
        '5',
        '--video',
        d / 'run_video' / 'clip_annotated.mp4',
        '--plots',
    )
    df, meta = read(out)
    assert len(df) == 12 and df['frame'].tolist() == list(range(12))
    np.testing.assert_allclose(df['timestamp'], np.arange(12) / 30, atol=1e-6)
    assert df['face'].isna().tolist() == (~data['lat']['face']).tolist()
    assert df.loc[df['face'].isna(), ['valence', 'AU12', 'expr_Neutral']].isna().all().all()
    has = df['face'].notna()
    names = expr_names('expr7')
    np.testing.assert_allclose(df.loc[has, [f'expr_{n}' for n in names]].sum(axis=1), 1, atol=1e-5)
    assert (df.loc[has, 'expression'] == df.loc[has, [f'expr_{n}' for n in names]].idxmax(1).str[5:]).all()
    aus = [f'AU{int(a[2:]):02d}' for a in au_columns('affwild2_12')]
    assert ((df.loc[has, aus] >= 0.5).astype(int).to_numpy() == df.loc[has, [f'{a}_on' for a in aus]].to_numpy()).all()
    assert meta['model']['kind'] == 'run' and meta['labels']['expr'] == names and meta['n_faces'] == 10
    assert 'SynthAffect' in meta['warning'] and 'SynthAffect' in p.stdout
    for f in ('clip_annotated.mp4', 'clip_va.png', 'clip_au.png', 'clip_summary.png'):
        assert (d / 'run_video' / f).stat().st_size > 1000, f


def test_folder_with_a_run(data):
    d = data['dir']
    out = d / 'run_folder' / 'frames.csv'
    p = run_cli(d / 'frames', '--out', out, '--run', data['run'], '--detector', 'whole', '--fex')
    fx, meta = read(out)
    assert 'readme.txt' in p.stdout  # the skipped file is named
    assert fx['input'].tolist() == [f'frame{i + 1}.png' for i in range(6)]
    assert fx['approx_time'].isna().all()  # images have no timestamps
    for c in ('FaceRectX', 'FaceRectY', 'FaceRectWidth', 'FaceRectHeight', 'FaceScore', 'AU01', 'happiness', 'frame'):
        assert c in fx.columns, c
    assert fx.loc[fx['face'].isna()].index.tolist() == [4, 5]  # the blank frames
    assert meta['columns'][:4] == ['input', 'frame', 'timestamp', 'face']  # the sidecar describes the native table


def test_video_and_folder_with_an_imported_checkpoint(data, fpn_ckpt):
    d = data['dir']
    out = d / 'ckpt_video' / 'clip.csv'
    run_cli(
        d / 'clip.mp4',
        '--out',
        out,
        '--checkpoint',
        fpn_ckpt,
        '--format',
        'fpn',
        '--detector',
        'whole',
        '--batch-size',
        '4',
    )
    df, meta = read(out)
    assert meta['model']['format'] == 'fpn_multitask' and meta['model']['kind'] == 'checkpoint'
    assert meta['align']['style'] == 'whole' and meta['model']['trained_on'].startswith("the authors'")
    assert meta['warning'] == ''
    has = df['face'].notna()
    assert has.sum() == 10 and df.loc[has, ['valence', 'arousal', 'AU26', 'expr_Surprise']].notna().all().all()
    assert df.loc[has, ['valence', 'arousal']].abs().max().max() <= 0.99  # the original clips VA to +-0.99
    # the original decides an AU by logit > 0.5, i.e. probability > sigmoid(0.5)
    on = (df.loc[has, 'AU01'] > 1 / (1 + math.exp(-0.5))).astype(int)
    assert (on == df.loc[has, 'AU01_on']).all()
    out2 = d / 'ckpt_folder' / 'frames.csv'
    run_cli(d / 'frames', '--out', out2, '--checkpoint', fpn_ckpt, '--format', 'fpn_multitask', '--detector', 'whole')
    im, _ = read(out2)
    # the same pixels give the same predictions (png frames were decoded from the same video by OpenCV, not PyAV:
    # the colour conversions may differ by a grey level, hence the tolerance)
    np.testing.assert_allclose(im.loc[[0, 1, 2, 3], 'valence'], df.loc[[0, 1, 2, 3], 'valence'], atol=2e-2)


def test_a_clip_model_imported(data, capsys):
    "EMENet-V (GRU heads over clips; in this process): a stand-in with the kit's keys predicts every frame with a face."
    d = data['dir']
    ckpt = standin('emenet_v', 'emenet_v', d / 'ckpt' / 'emenet.pth')
    out = d / 'emenet' / 'clip.csv'
    rc, _, err = run_main(
        d / 'clip.mp4', '--out', out, '--checkpoint', ckpt, '--format', 'emenet_v', '--detector', 'whole', capsys=capsys
    )
    ckpt.unlink()
    assert rc == 0, err
    df, meta = read(out)
    assert meta['model']['method'] == 'emenet' and meta['align']['style'] == 'whole'
    assert df.loc[df['face'].notna(), ['valence', 'AU01', 'expr_Anger']].notna().all().all()


@pytest.mark.parametrize(
    'name, content, message',
    [
        ('empty.mp4', b'', 'is empty (0 bytes)'),
        ('corrupt.mp4', b'this is not a video' * 50, 'is not a readable video or image'),
        ('broken.jpg', b'\xff\xd8 not really a jpeg', 'cannot decode broken.jpg as an image'),
        ('nofiles', None, 'no images'),
        ('missing.mp4', 'missing', 'input not found'),
    ],
)
def test_bad_input_is_one_clear_error(data, tmp_path, capsys, name, content, message):
    src = tmp_path / name
    if content is None:
        src.mkdir()
    elif content != 'missing':
        src.write_bytes(content)
    rc, out, err = run_main(src, '--out', tmp_path / 'x.csv', '--run', data['run'], capsys=capsys)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('abaw-predict: error:') and message in lines[0], err
    assert name in lines[0] and not (tmp_path / 'x.csv').exists()


def test_bad_arguments(data, tmp_path, capsys):
    clip = data['dir'] / 'clip.mp4'
    rc, _, err = run_main(clip, '--out', tmp_path / 'x.xlsx', '--run', data['run'], capsys=capsys)
    assert rc == 2 and 'write a .csv file' in err
    rc, _, err = run_main(clip, '--out', tmp_path / 'x.csv', '--checkpoint', 'x.pt', capsys=capsys)
    assert rc == 2 and '--checkpoint needs --format' in err
    rc, _, err = run_main(
        clip, '--out', tmp_path / 'x.csv', '--checkpoint', tmp_path / 'no.pt', '--format', 'fpn', capsys=capsys
    )
    assert rc == 2 and 'checkpoint file not found' in err


def test_video_without_faces_gives_na_rows(data, tmp_path, capsys):
    from abaw_nb.video import write_video

    write_video(tmp_path / 'dark.mp4', [np.full((64, 64, 3), 20, np.uint8)] * 6, fps=25)
    out = tmp_path / 'dark.csv'
    rc, stdout, err = run_main(
        tmp_path / 'dark.mp4', '--out', out, '--run', data['run'], '--detector', 'yunet', capsys=capsys
    )
    assert rc == 0, err
    df, meta = read(out)
    assert len(df) == 6 and df['face'].isna().all() and meta['n_faces'] == 0
    assert df.drop(columns=['input', 'frame', 'timestamp']).isna().all().all()
    np.testing.assert_allclose(df['timestamp'], np.arange(6) / 25, atol=1e-6)
    assert '6 frames, 0 faces' in stdout
