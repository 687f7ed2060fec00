"""MkDocs hooks (mkdocs.yml `hooks:`): benchmark pages take their numbers from results files.

A benchmark writes `results.json` (with `command`, `written_at` and, since the docs site,
`machine`: `tierwise.bench.harness.run_record`), often `table.md`, and PNG plots into its
`--out` directory. `make docs-results` copies those into `docs/benchmarks/results/<name>/`,
and a page then says, on a line of its own:

    <!-- results: bench-active -->

which becomes the command, date and machine, the table (table.md, when the benchmark writes
one) and every plot of that run. `<!-- results: optimize/bottleneck-camera -->` names one
result of a directory holding several: bottleneck-camera.json, .md and its plots.
Inline, `<!-- value: bench-active best.ratio .2f -->` becomes one number from
results.json (a dotted path; list items by index), formatted.

A missing results directory, file or key fails the build (`mkdocs build --strict` in
`make test`): a page cannot quote a number no run wrote.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "results"
_BLOCK = re.compile(r"^<!-- results: ([\w./-]+) -->$", re.MULTILINE)
_VALUE = re.compile(r"<!-- value: ([\w./-]+) ([\w.-]+)(?: ([^ ]+))? -->")


def _files(name: str) -> tuple[Path, str]:
    """(folder, stem) of a run: `bench-active` is bench-active/results.json, table.md and
    every plot; `optimize/bottleneck-camera` is optimize/bottleneck-camera.json, .md and
    bottleneck-camera*.png."""
    folder, _, stem = name.partition("/")
    return RESULTS / folder, stem


def _results(name: str, page: str) -> dict[str, Any]:
    folder, stem = _files(name)
    path = folder / f"{stem or 'results'}.json"
    if not path.is_file():
        raise PluginError(f"{page}: no benchmark results at {path}; run the benchmark, then "
                          f"`make docs-results`")
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def lookup(document: Any, dotted: str, where: str) -> Any:
    """`document`'s value at `dotted` ("best.ratio", "rows.0.p50_ms")."""
    value = document
    for key in dotted.split("."):
        try:
            value = value[int(key)] if isinstance(value, list) else value[key]
        except (KeyError, IndexError, ValueError, TypeError):
            raise PluginError(f"{where}: results have no {dotted!r} (stopped at {key!r})"
                              ) from None
    return value


def _machine(document: dict[str, Any]) -> str:
    machine = document.get("machine")
    if not machine:
        return "not recorded in this results file (it predates the machine record)"
    memory = f", {machine['memory_gib']} GiB" if machine.get("memory_gib") else ""
    return (f"{machine.get('cpu')}, {machine.get('cores')} cores{memory}; "
            f"{machine.get('os')}, Python {machine.get('python')}, ONNX Runtime "
            f"{machine.get('onnxruntime')}")


def block(name: str, page: str) -> str:
    """The Markdown a `<!-- results: NAME -->` line becomes."""
    document = _results(name, page)
    folder, stem = _files(name)
    emulated = document.get("emulated") or []
    if isinstance(emulated, str):
        emulated = [emulated]
    elif not isinstance(emulated, list):  # an older results file says only that it was
        emulated = ["yes: the links and the devices' compute, as the page says"]
    lines = ['!!! info "How this was measured"',
             f"    **Command:** `{document.get('command') or 'not recorded'}`  ",
             f"    **Date:** {document.get('written_at') or 'not recorded'}  ",
             f"    **Machine:** {_machine(document)}  ",
             "    **Emulated:** " + ("; ".join(emulated) if emulated else "nothing"), ""]
    table = folder / f"{stem or 'table'}.md"
    if table.is_file():
        text = table.read_text()
        # the table's own emulation list repeats the box above
        text = text.split("\nEmulated (the numbers depend on these):")[0]
        lines += [text.strip(), ""]
    for plot in sorted(folder.glob(f"{stem}*.png")):
        lines += [f"![{plot.stem}](results/{folder.name}/{plot.name})", ""]
    return "\n".join(lines)


_CODE = re.compile(r"```.*?```|`[^`\n]+`", re.DOTALL)  # fenced blocks and inline code


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """Expand the markers outside code; code that shows a marker stays as written."""
    parts = _CODE.split(markdown)
    code = _CODE.findall(markdown)
    expanded = [_expand(part, page) for part in parts]
    return "".join(text + (code[i] if i < len(code) else "")
                   for i, text in enumerate(expanded))


def _expand(markdown: str, page: Any) -> str:
    where = page.file.src_uri
    if _BLOCK.search(markdown) and not where.startswith("benchmarks/"):
        raise PluginError(f"{where}: results blocks belong on pages under benchmarks/")
    markdown = _BLOCK.sub(lambda match: block(match.group(1), where), markdown)

    def value(match: re.Match[str]) -> str:
        name, dotted, spec = match.group(1), match.group(2), match.group(3) or ""
        found = lookup(_results(name, where), dotted, f"{where} ({name})")
        try:
            return format(found, spec)
        except (TypeError, ValueError):
            raise PluginError(f"{where}: {name} {dotted} = {found!r} does not format as "
                              f"{spec!r}") from None

    return _VALUE.sub(value, markdown)
