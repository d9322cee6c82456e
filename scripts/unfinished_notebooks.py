"""After a failed or time-limited `nbdev_test --do_print`: name the notebooks that started and never completed.

Usage: python3 scripts/unfinished_notebooks.py LOG  (the captured output of nbdev_test). Printed last, so the tail of
a CI log says which notebook a hang or a crash was in (the stacks printed above it say where in it)."""

import re
import sys
from pathlib import Path


def unfinished(text: str) -> list:
    "Notebooks with a 'Starting' line and no '- Completed' line, in the order they started."
    started = re.findall(r'^Starting (\S+)', text, flags=re.M)
    done = set(re.findall(r'^- Completed (\S+)', text, flags=re.M))
    return [p for p in started if p not in done]


def main(argv: list) -> int:
    text = Path(argv[0]).read_text(errors='replace')
    names = [Path(p).name for p in unfinished(text)]
    print(f'nbdev_test: {len(names)} notebook(s) started and not completed: {", ".join(names) or "none"}')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
