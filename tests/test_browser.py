"""Browser test (`make test-browser`): JupyterLab from the venv on localhost, nbs/explore.ipynb opened and run in
headless Chromium (Debian's `chromium`), driven over the Chrome DevTools Protocol with `websocket-client`
(already in the lock through jupyter-server; no playwright, no browser download). Fails on any error output,
on a traceback on stderr, or on a widget that does not render; saves a screenshot to
outputs/figures/explore_jupyterlab.png. Marked `browser`: `make test` deselects it (-m "not browser")."""

import base64, json, os, shutil, socket, subprocess, time, urllib.request, uuid
import pytest

pytestmark = pytest.mark.browser
NOTEBOOK = 'explore.ipynb'
RUN_TIMEOUT = float(os.environ.get('ABAW_BROWSER_TIMEOUT', 600))  # seconds for "run all" (2 shared CPU cores: slow)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc=None) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f'{proc.args[0]} exited with {proc.returncode} before {url} answered')
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except Exception:
            time.sleep(0.5)
    raise TimeoutError(f'{url} did not answer within {timeout:.0f} s')


class CDP:
    "A minimal Chrome DevTools Protocol client over one page's websocket."

    def __init__(self, ws_url: str):
        import websocket

        self.ws, self.n = websocket.create_connection(ws_url, timeout=60, suppress_origin=True), 0

    def call(self, method: str, **params):
        self.n += 1
        mid = self.n
        self.ws.send(json.dumps(dict(id=mid, method=method, params=params)))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get('id') == mid:
                if 'error' in msg:
                    raise RuntimeError(f'CDP {method}: {msg["error"]}')
                return msg.get('result', {})

    def js(self, expr: str):
        r = self.call('Runtime.evaluate', expression=expr, returnByValue=True, awaitPromise=True)
        if 'exceptionDetails' in r:
            raise RuntimeError(f'JS error in {expr[:80]!r}: {r["exceptionDetails"]}')
        return r['result'].get('value')

    def close(self):
        self.ws.close()


def wait_js(cdp: CDP, expr: str, timeout: float, what: str):
    t0, last = time.time(), None
    while time.time() - t0 < timeout:
        try:
            last = cdp.js(expr)
            if last:
                return last
        except RuntimeError as e:
            last = str(e)
        time.sleep(1)
    raise TimeoutError(f'{what}: not done after {timeout:.0f} s (last: {last!r})')


# JupyterLab exposes its application object as window.jupyterapp with --LabApp.expose_app_in_browser
NB_STATE = """(() => {
  const app = window.jupyterapp; if (!app) return null;
  const w = Array.from(app.shell.widgets('main')).find(x => x.context && x.context.path === 'explore.ipynb');
  if (!w || !w.content || !w.content.model) return null;
  const cells = []; const n = w.content.model.cells.length;
  for (let i = 0; i < n; i++) { const c = w.content.model.cells.get(i);
    const j = c.toJSON(); cells.push({type: j.cell_type, count: j.execution_count ?? null,
      outputs: (j.outputs || []).map(o => ({t: o.output_type, name: o.name || null, ename: o.ename || null,
        text: (o.text ? (Array.isArray(o.text) ? o.text.join('') : o.text) : (o.evalue || '')).slice(0, 400),
        mimes: Object.keys(o.data || {})}))}); }
  const k = w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  const node = w.content.node;
  return {path: w.context.path, kernel: k ? k.status : null, cells: cells,
          busy: node.querySelectorAll('.jp-InputPrompt').length ? Array.from(node.querySelectorAll('.jp-InputPrompt')).filter(e => e.textContent.includes('*')).length : -1,
          widgets_rendered: node.querySelectorAll('.jp-OutputArea-output .jupyter-widgets.widget-vbox, .jp-OutputArea-output .widget-vbox').length,
          widget_errors: Array.from(node.querySelectorAll('.jp-OutputArea-output')).filter(e => /Error displaying widget|Loading widget|model not found/.test(e.textContent)).length,
          widget_images: Array.from(node.querySelectorAll('.jp-OutputArea-output .widget-image')).map(e => e.naturalWidth || 0)};
})()"""


@pytest.fixture(scope='module')
def chromium():
    exe = shutil.which('chromium') or shutil.which('chromium-browser')
    if exe is None:
        pytest.fail('chromium is not installed: run `make test-browser` (it installs Debian\'s chromium with apt-get)')
    return exe


def test_explore_notebook_runs_in_jupyterlab(root, venv_bin, chromium, tmp_path):
    # a copy of the notebook in a git-ignored folder inside the checkout: JupyterLab's autosave never touches nbs/,
    # and the kernel (cwd = that folder) still finds the repo root, its .cache and this checkout's abaw_nb
    work = root / '.cache' / 'browser-test' / uuid.uuid4().hex[:8]
    work.mkdir(parents=True)
    shutil.copy(root / 'nbs' / NOTEBOOK, work / NOTEBOOK)
    port, dbg, token = free_port(), free_port(), uuid.uuid4().hex
    env = {
        **os.environ,
        'PYTHONPATH': str(root),
        'ABAW_NB_PROGRESS': '0',
        'MPLBACKEND': 'module://matplotlib_inline.backend_inline',
        'JUPYTER_CONFIG_DIR': str(tmp_path / 'jcfg'),
        'JUPYTER_RUNTIME_DIR': str(tmp_path / 'jrt'),
    }
    lab = subprocess.Popen(
        [
            str(venv_bin / 'jupyter'),
            'lab',
            '--no-browser',
            f'--port={port}',
            '--ip=127.0.0.1',
            '--allow-root',
            f'--ServerApp.token={token}',
            f'--ServerApp.root_dir={work}',
            '--LabApp.expose_app_in_browser=True',
            '--LabApp.news_url=',
            '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate',
        ],
        stdout=open(tmp_path / 'lab.log', 'w'),
        stderr=subprocess.STDOUT,
        env=env,
        cwd=work,
    )
    chrome = None
    try:
        wait_http(f'http://127.0.0.1:{port}/api/status?token={token}', 120, lab)
        chrome = subprocess.Popen(
            [
                chromium,
                '--headless=new',
                '--no-sandbox',
                '--disable-gpu',
                '--disable-dev-shm-usage',
                f'--remote-debugging-port={dbg}',
                '--remote-allow-origins=*',
                f'--user-data-dir={tmp_path / "chrome"}',
                '--window-size=1500,1100',
                '--no-first-run',
                'about:blank',
            ],
            stdout=open(tmp_path / 'chrome.log', 'w'),
            stderr=subprocess.STDOUT,
        )
        wait_http(f'http://127.0.0.1:{dbg}/json/version', 60, chrome)
        page = next(
            t
            for t in json.loads(urllib.request.urlopen(f'http://127.0.0.1:{dbg}/json/list').read())
            if t['type'] == 'page'
        )
        cdp = CDP(page['webSocketDebuggerUrl'])
        cdp.call('Page.enable')
        cdp.call('Runtime.enable')
        cdp.call('Page.navigate', url=f'http://127.0.0.1:{port}/lab/tree/{NOTEBOOK}?token={token}&reset')
        st = wait_js(
            cdp,
            f'(() => {{ const s = {NB_STATE}; return s && s.kernel === "idle" ? s : null; }})()',
            180,
            'JupyterLab opens the notebook and its kernel starts',
        )
        n_code = sum(c['type'] == 'code' for c in st['cells'])
        cdp.js(f"""(() => {{ const app = window.jupyterapp;
                 const w = Array.from(app.shell.widgets('main')).find(x => x.context && x.context.path === '{NOTEBOOK}');
                 app.shell.activateById(w.id); app.commands.execute('notebook:run-all-cells'); return true; }})()""")
        st = wait_js(
            cdp,
            f"""(() => {{ const s = {NB_STATE}; if (!s) return null;
                     const code = s.cells.filter(c => c.type === 'code');
                     const err = code.some(c => c.outputs.some(o => o.t === 'error'));
                     return (err || (s.kernel === 'idle' && s.busy === 0 && code.every(c => c.count !== null))) ? s : null; }})()""",
            RUN_TIMEOUT,
            'run all cells',
        )
        time.sleep(3)  # let the widget views draw their images
        st = cdp.js(NB_STATE)
        # the screenshot shows the run browser: dismiss JupyterLab's news prompt, scroll the first widget into view
        cdp.js("""(() => { for (const b of document.querySelectorAll('.jp-toast-button, .Toastify button'))
                              if (/^(No|Dismiss)$/.test(b.textContent.trim())) b.click();
                          const w = document.querySelector('.jp-OutputArea-output .widget-vbox');
                          if (w) w.scrollIntoView({block: 'start'}); return true; })()""")
        time.sleep(1)
        shot = base64.b64decode(cdp.call('Page.captureScreenshot', format='png', captureBeyondViewport=False)['data'])
        fig = root / 'outputs' / 'figures' / 'explore_jupyterlab.png'
        fig.parent.mkdir(parents=True, exist_ok=True)
        fig.write_bytes(shot)
        cdp.close()
        code = [c for c in st['cells'] if c['type'] == 'code']
        errors = [(i, o['ename'], o['text']) for i, c in enumerate(code) for o in c['outputs'] if o['t'] == 'error']
        tracebacks = [
            (i, o['text'])
            for i, c in enumerate(code)
            for o in c['outputs']
            if o['t'] == 'stream' and o['name'] == 'stderr' and 'Traceback' in o['text']
        ]
        assert not errors, f'error outputs in {NOTEBOOK}: {errors}'
        assert not tracebacks, f'tracebacks on stderr in {NOTEBOOK}: {tracebacks}'
        assert len(code) == n_code and all(c['count'] is not None for c in code), 'not every code cell ran'
        n_widgets = sum('application/vnd.jupyter.widget-view+json' in o['mimes'] for c in code for o in c['outputs'])
        assert n_widgets >= 2, f'expected the run browser and face designer widgets, found {n_widgets} widget outputs'
        assert st['widget_errors'] == 0, f"{st['widget_errors']} widget output(s) show an error or never loaded"
        assert st['widgets_rendered'] >= n_widgets, (
            f"{n_widgets} widget outputs but {st['widgets_rendered']} rendered widget views"
        )
        assert len(st['widget_images']) >= 2 and all(w > 0 for w in st['widget_images']), (
            f"widget figures not drawn: {st['widget_images']}"
        )
        assert len(shot) > 10_000 and shot[:4] == b'\x89PNG'
    finally:
        for p in (chrome, lab):
            if p is not None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(work, ignore_errors=True)
