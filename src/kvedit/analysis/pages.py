"""Readable outputs of mined triggers: one JSONL per layer, and one page per requested key in Markdown and
in self-contained HTML (inline CSS, every corpus string escaped), each with an index page."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..models.lm import LM
from .triggers import TriggerExample, TriggerSet
from .values import ValueProjection
from .vocab import show, token_strings


@dataclass(frozen=True)
class MarkedPrefix:
    """A trigger example as text: `head` (everything before the trigger token, with the space that leads
    it) and `trigger` (the trigger token, stripped of surrounding spaces)."""

    head: str
    trigger: str


def split_prefix(lm: LM, example: TriggerExample) -> MarkedPrefix:
    """The prefix of `example` decoded, cut where its trigger token (`ids[-1]`) begins."""
    tok = lm.tokenizer
    head = str(tok.decode(list(example.ids[:-1]), skip_special_tokens=True))
    full = str(tok.decode(list(example.ids), skip_special_tokens=True))
    rest = full[len(head) :] if full.startswith(head) else str(tok.decode([example.ids[-1]]))
    lead = rest[: len(rest) - len(rest.lstrip())]
    return MarkedPrefix((head + lead).lstrip(), rest.strip() or repr(rest))


def _md_text(text: str) -> str:
    """Corpus text for a Markdown table cell: pipes, asterisks and `<` escaped (no inline HTML)."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*").replace("<", "\\<")


def _md_token(token: str) -> str:
    """A token for a Markdown table: quoted (see `show`), `<` escaped."""
    return show(token).replace("<", "\\<")


def marked_prefix(lm: LM, example: TriggerExample, chars: int | None = None) -> str:
    """The prefix as Markdown with its trigger token in bold, e.g. `The capital of **France**`; `chars` keeps
    only the end of the text before the trigger token."""
    p = split_prefix(lm, example)
    head = _tail(p.head, chars) if chars else p.head
    return f"{_md_text(head)}**{_md_text(p.trigger)}**"


def marked_prefix_html(lm: LM, example: TriggerExample, chars: int | None = None) -> str:
    """The prefix as escaped HTML with its trigger token in `<mark>`; `chars` keeps only the head's end."""
    p = split_prefix(lm, example)
    head = _tail(p.head, chars) if chars else p.head
    return f"{html.escape(head)}<mark>{html.escape(p.trigger)}</mark>"


def _tail(text: str, chars: int = 60) -> str:
    """The end of `text`, cut at a word boundary."""
    if len(text) <= chars:
        return text
    cut = text[-chars:]
    return "…" + (cut[cut.index(" ") + 1 :] if " " in cut else cut)


def write_trigger_jsonl(lm: LM, triggers: TriggerSet, out: str | Path, examples: int | None = None) -> list[Path]:
    """`triggers/layer-XX.jsonl`: per memory, its top examples as coefficient, sequence, position, trigger
    token and next token (decoded). `examples` caps the examples per memory (default: all k; the full top-k
    always stays in `triggers.safetensors`)."""
    folder = Path(out) / "triggers"
    folder.mkdir(parents=True, exist_ok=True)
    strings = token_strings(lm)
    n = examples or triggers.k
    paths = []
    for layer in triggers.layers:
        coef, codes = triggers.coefficients[layer][:, :n].tolist(), triggers.codes[layer][:, :n]
        trig, nxt = triggers.token_table(layer, 0)[:, :n].tolist(), triggers.token_table(layer, 1)[:, :n].tolist()
        seq, pos = (codes // triggers.stride).tolist(), (codes % triggers.stride).tolist()
        path = folder / f"layer-{layer:02d}.jsonl"
        with path.open("w") as f:
            for key in range(len(coef)):
                rows = [
                    {
                        "coefficient": round(c, 5),
                        "sequence": s,
                        "position": p,
                        "token": strings[t],
                        "next": strings[x] if x >= 0 else None,
                    }
                    for c, s, p, t, x, code in zip(
                        coef[key], seq[key], pos[key], trig[key], nxt[key], codes[key].tolist()
                    )
                    if code >= 0
                ]
                f.write(json.dumps({"layer": layer, "key": key, "examples": rows}) + "\n")
        paths.append(path)
    return paths


_CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d1d1f;max-width:64rem;margin:2rem auto;padding:0 1rem}
h1{font-size:1.4rem;margin-bottom:.2rem}
.note{color:#555;margin-top:0}
table{border-collapse:collapse;width:100%;margin-top:1rem}
th,td{padding:.3rem .5rem;border-bottom:1px solid #e3e3e3;vertical-align:top;text-align:left}
th{background:#f6f6f6;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.bar{width:8rem}
td.bar span{display:block;height:.7rem;margin-top:.35rem;background:#7aa7d8;border-radius:2px}
td.bar span.neg{background:#d88c7a}
mark{background:#ffd966;font-weight:600;padding:0 .15em;border-radius:2px}
code{font:13px ui-monospace,SFMono-Regular,Menlo,monospace;background:#f1f1f1;padding:0 .25em;border-radius:3px;margin-right:.25em;white-space:pre;display:inline-block}
a{color:#0b5cad}
""".strip()


def _html_page(title: str, body: list[str]) -> str:
    """A whole self-contained HTML document (inline CSS, no scripts, no external files)."""
    return "\n".join(
        [
            "<!doctype html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{html.escape(title)}</title>",
            f"<style>\n{_CSS}\n</style>",
            "</head>",
            "<body>",
            *body,
            "</body>",
            "</html>",
            "",
        ]
    )


def _codes(tokens: Sequence[str]) -> str:
    return "".join(f"<code>{html.escape(repr(t))}</code>" for t in tokens)


def _summary(triggers: TriggerSet) -> str:
    rank = "the signed coefficient" if triggers.meta.get("rank") == "value" else "|coefficient|"
    return (
        f"{triggers.meta.get('coefficient', '')}; ranked by {rank}; {triggers.meta.get('tokens')} tokens of "
        f"{triggers.meta.get('source')}."
    )


@dataclass(frozen=True)
class KeyPage:
    """What one key's page shows: its top trigger examples, the token after each (None at a sentence's
    end), and its value's top tokens for `+v` and `−v` (None when not projected)."""

    layer: int
    key: int
    examples: list[TriggerExample]
    next_tokens: list[str | None]
    values: tuple[list[str], list[str]] | None

    @property
    def name(self) -> str:
        return f"L{self.layer}-K{self.key}"

    @property
    def heading(self) -> str:
        return f"Layer {self.layer}, memory {self.key}"


def key_markdown(lm: LM, triggers: TriggerSet, page: KeyPage) -> str:
    """One key's page as Markdown: trigger token in bold, corpus text escaped for a table cell."""
    lines = [f"# {page.heading}", "", triggers.meta.get("coefficient", ""), ""]
    if page.values:
        lines += [
            f"Value tokens (+v): {', '.join(_md_token(t) for t in page.values[0])}",
            f"Value tokens (−v): {', '.join(_md_token(t) for t in page.values[1])}",
            "",
        ]
    lines += ["| # | coefficient | prefix (trigger token in bold) | next token |", "|---:|---:|---|---|"]
    for rank, (ex, nxt) in enumerate(zip(page.examples, page.next_tokens), 1):
        lines.append(
            f"| {rank} | {ex.coefficient:.3f} | {marked_prefix(lm, ex)} | "
            f"{_md_token(nxt) if nxt is not None else '(end)'} |"
        )
    return "\n".join(lines) + "\n"


def key_html(lm: LM, triggers: TriggerSet, page: KeyPage) -> str:
    """One key's page as a self-contained HTML document: trigger token in `<mark>`, a bar per coefficient
    (scaled to the page's largest |coefficient|), every corpus string escaped."""
    scale = max((abs(ex.coefficient) for ex in page.examples), default=0.0) or 1.0
    body = [
        '<p><a href="../keys.html">← all keys</a></p>',
        f"<h1>{html.escape(page.heading)}</h1>",
        f'<p class="note">{html.escape(_summary(triggers))}</p>',
    ]
    if page.values:
        body += [
            f"<p>Value tokens (+v): {_codes(page.values[0])}</p>",
            f"<p>Value tokens (−v): {_codes(page.values[1])}</p>",
        ]
    body += [
        "<table>",
        "<thead><tr><th>#</th><th>coefficient</th><th></th><th>prefix (trigger token marked)</th>"
        "<th>next token</th></tr></thead>",
        "<tbody>",
    ]
    for rank, (ex, nxt) in enumerate(zip(page.examples, page.next_tokens), 1):
        sign = ' class="neg"' if ex.coefficient < 0 else ""
        body.append(
            f'<tr><td class="num">{rank}</td><td class="num">{ex.coefficient:.3f}</td>'
            f'<td class="bar"><span{sign} style="width:{100 * abs(ex.coefficient) / scale:.0f}%"></span></td>'
            f"<td>{marked_prefix_html(lm, ex)}</td><td>{_codes([nxt]) if nxt is not None else '(end)'}</td></tr>"
        )
    if not page.examples:
        body.append('<tr><td colspan="5">no examples (the corpus never reached this memory)</td></tr>')
    body += ["</tbody>", "</table>"]
    return _html_page(f"{page.heading} — {lm.name}", body)


def write_key_pages(
    lm: LM,
    triggers: TriggerSet,
    keys: Sequence[tuple[int, int]],
    out: str | Path,
    projections: dict[int, ValueProjection] | None = None,
    examples: int = 20,
) -> list[Path]:
    """`keys/L<layer>-K<key>.md` and `.html` per requested (layer, key): its top `examples` trigger examples
    (prefix with the trigger token marked, coefficient, next token) and, when `projections` hold its layer, its
    value's top tokens; plus the indexes `keys.md` and `keys.html` linking every page."""
    out = Path(out)
    folder = out / "keys"
    folder.mkdir(parents=True, exist_ok=True)
    strings = token_strings(lm)
    title = f"Trigger examples: {lm.name}"
    md_index = [f"# {_md_text(title)}", "", _summary(triggers), "", "HTML pages: [keys.html](keys.html).", ""]
    html_rows, paths = [], []
    for layer, key in keys:
        found = triggers.examples(layer, key, examples)
        values = None
        if projections and layer in projections:
            proj = projections[layer]
            values = (
                [strings[t] for t in proj.top_ids[key].tolist()],
                [strings[t] for t in proj.bottom_ids[key].tolist()],
            )
        page = KeyPage(
            layer, key, found, [strings[ex.next_id] if ex.next_id is not None else None for ex in found], values
        )
        (folder / f"{page.name}.md").write_text(key_markdown(lm, triggers, page))
        (folder / f"{page.name}.html").write_text(key_html(lm, triggers, page))
        paths += [folder / f"{page.name}.md", folder / f"{page.name}.html"]
        md_index.append(
            f"- [layer {layer}, memory {key}](keys/{page.name}.md): "
            + " · ".join(marked_prefix(lm, ex, 60) for ex in found[:3])
        )
        html_rows.append(
            f'<tr><td class="num">{layer}</td><td class="num"><a href="keys/{page.name}.html">{key}</a></td>'
            f"<td>{' · '.join(marked_prefix_html(lm, ex, 60) for ex in found[:3])}</td>"
            f"<td>{_codes(values[0][:5]) if values else ''}</td></tr>"
        )
    (out / "keys.md").write_text("\n".join(md_index) + "\n")
    index = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">{html.escape(_summary(triggers))}</p>',
        "<table>",
        "<thead><tr><th>layer</th><th>memory</th><th>top trigger examples</th><th>value's top tokens</th></tr></thead>",
        "<tbody>",
        *html_rows,
        "</tbody>",
        "</table>",
    ]
    (out / "keys.html").write_text(_html_page(title, index))
    return [*paths, out / "keys.md", out / "keys.html"]
