"""The committed outputs/ agree with themselves: every table REPORT.md shows inline is its tables/<name>.md, and
the numbers of that markdown table are the numbers of tables/<name>.csv (to the printed precision)."""

import math, re
import pandas as pd


def _md_tables(text: str) -> dict[str, list[list[str]]]:
    "REPORT.md -> {table name: rows of cells} for every '#### name' section's first markdown table."
    out = {}
    for sec in re.split(r'^#### ', text, flags=re.M)[1:]:
        name, body = sec.split('\n', 1)
        rows = [l for l in body.split('\n## ')[0].split('\n#### ')[0].splitlines() if l.startswith('|')]
        out[name.strip()] = [
            [c.strip() for c in r.strip().strip('|').split('|')] for r in rows if not set(r) <= set('|:- ')
        ]
    return out


def _same(md: str, v) -> bool:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return md in ('', 'nan', 'NaN', '<NA>')
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        try:
            x = float(md.replace(',', ''))
        except ValueError:
            return False
        decimals = len(md.split('.')[1]) if '.' in md and 'e' not in md.lower() else 0
        return abs(x - v) <= 0.5 * 10**-decimals + 1e-9 * max(1, abs(v))
    return md == str(v).strip()


def test_helper_reads_a_hand_made_report():
    rep = '## nb\n\n#### t\n\nData: x\n\n| a | b |\n|:--|--:|\n| u | 0.1235 |\n\nnote\n#### s\n\n| c |\n|---|\n| 1 |\n'
    assert _md_tables(rep) == {'t': [['a', 'b'], ['u', '0.1235']], 's': [['c'], ['1']]}
    assert _same('0.1235', 0.12346) and not _same('0.1235', 0.1237) and _same('', float('nan')) and _same('u', 'u')


def test_report_tables_match_their_csv_files(root):
    out = root / 'outputs'
    report = (out / 'REPORT.md').read_text()
    tables = _md_tables(report)
    csvs = sorted((out / 'tables').glob('*.csv'))
    assert csvs, 'no committed tables under outputs/tables'
    assert {p.stem for p in csvs} <= set(tables), (
        f'tables missing from REPORT.md: {sorted({p.stem for p in csvs} - set(tables))}'
    )
    for p in csvs:
        df = pd.read_csv(p)
        rows = tables[p.stem]
        assert rows[0] == [str(c) for c in df.columns], f'{p.name}: header differs from REPORT.md'
        assert len(rows) - 1 == len(df), f'{p.name}: {len(df)} csv rows, {len(rows) - 1} in REPORT.md'
        for i, (md_row, (_, r)) in enumerate(zip(rows[1:], df.iterrows())):
            for col, md in zip(df.columns, md_row):
                v = r[col]
                v = v.item() if hasattr(v, 'item') else v
                assert _same(md, v), f'{p.name} row {i} column {col!r}: REPORT.md shows {md!r}, csv has {v!r}'
        assert (out / 'tables' / f'{p.stem}.md').read_text().strip() in report  # the whole markdown file, verbatim
