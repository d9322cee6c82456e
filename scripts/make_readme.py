#!/usr/bin/env python3
"""Write README.md from nbs/index.ipynb (the markdown cells, in order; code cells are not shown).

nbdev 2's `nbdev_readme` needs the Quarto binary, which this project does not install; this script
renders the same content for a notebook made of markdown cells. `tests/test_project.py` checks that
README.md is up to date. Usage: python3 scripts/make_readme.py [--check]
"""

import json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def render(nb_path=ROOT / 'nbs' / 'index.ipynb') -> str:
    nb = json.loads(Path(nb_path).read_text(encoding='utf-8'))
    parts = [''.join(c['source']).strip() for c in nb['cells'] if c['cell_type'] == 'markdown']
    head = '<!-- generated from nbs/index.ipynb by scripts/make_readme.py: edit the notebook, not this file -->'
    return head + '\n\n' + '\n\n'.join(p for p in parts if p) + '\n'


if __name__ == '__main__':
    text, readme = render(), ROOT / 'README.md'
    if '--check' in sys.argv:
        ok = readme.exists() and readme.read_text(encoding='utf-8') == text
        print('README.md is up to date' if ok else 'README.md is stale: run python3 scripts/make_readme.py')
        sys.exit(0 if ok else 1)
    readme.write_text(text, encoding='utf-8')
    print(f'wrote {readme}')
