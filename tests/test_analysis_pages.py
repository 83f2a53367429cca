"""Key pages: Markdown and self-contained HTML per key, with the trigger token marked and corpus text escaped."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from helpers import tiny
from tiny_models import SPECIALS, VOCAB
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kvedit.analysis.pages import marked_prefix, marked_prefix_html, split_prefix, write_key_pages
from kvedit.analysis.runs import analyze_triggers
from kvedit.analysis.triggers import TriggerExample, TriggerSet
from kvedit.models import LM

#: corpus words that are markup in HTML or Markdown; they replace tiny-vocabulary words so the model's size holds
HOSTILE = ["<script>alert(1)</script>", "a&b", '"quoted"', "x|y", "*bold*", "<b>"]
WORDS = "the tower is located in city of paris rome london capital france and it".split()


@pytest.fixture
def hostile_lm() -> LM:
    """A tiny Llama whose whitespace-split tokenizer has markup tokens such as `<script>alert(1)</script>`."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS + HOSTILE)}
    assert len(vocab) <= VOCAB
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>"
    )
    return LM.wrap(tiny("llama").model, tok, name="tiny-llama-<hostile>")


@pytest.fixture
def hostile_corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(
        "the <script>alert(1)</script> tower is located in a&b city of paris. "
        "x|y is the capital of *bold* france and <b> it is in rome. "
        'the "quoted" city of london is located in a&b france.\n' * 3
    )
    return path


class _Checker(HTMLParser):
    """Collects the tags of a document and the text inside `<mark>`."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.marked: list[str] = []
        self._in_mark = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._in_mark = tag == "mark"

    def handle_endtag(self, tag):
        self._in_mark = self._in_mark and tag != "mark"

    def handle_data(self, data):
        if self._in_mark:
            self.marked.append(data)


def parse(text: str) -> _Checker:
    checker = _Checker()
    checker.feed(text)
    return checker


def example(lm: LM, text: str, coefficient: float = 1.5) -> TriggerExample:
    ids = tuple(lm.tokenizer(text)["input_ids"])
    return TriggerExample(coefficient, 0, len(ids) - 1, ids, None)


def test_the_trigger_token_is_marked_and_markup_is_escaped(hostile_lm):
    ex = example(hostile_lm, "the tower of <script>alert(1)</script>")
    assert split_prefix(hostile_lm, ex).head == "the tower of "
    assert split_prefix(hostile_lm, ex).trigger == "<script>alert(1)</script>"
    assert marked_prefix_html(hostile_lm, ex) == "the tower of <mark>&lt;script&gt;alert(1)&lt;/script&gt;</mark>"
    assert marked_prefix(hostile_lm, ex) == "the tower of **\\<script>alert(1)\\</script>**"
    ex = example(hostile_lm, "x|y is *bold* a&b")
    assert marked_prefix_html(hostile_lm, ex) == "x|y is *bold* <mark>a&amp;b</mark>"
    assert marked_prefix(hostile_lm, ex) == "x\\|y is \\*bold\\* **a&b**"
    assert (
        marked_prefix_html(hostile_lm, example(hostile_lm, "the city of london is in paris"), 16)
        == "…london is in <mark>paris</mark>"
    )


def test_key_pages_in_markdown_and_self_contained_html(hostile_lm, hostile_corpus, tmp_path):
    done = analyze_triggers(
        hostile_lm, tmp_path, str(hostile_corpus), keys=[(1, 5), (3, 60)], k=6, tokens=10_000, progress=False
    )
    triggers = TriggerSet.load(tmp_path)
    names = {p.relative_to(tmp_path).as_posix() for p in done["files"]}
    assert {"keys/L1-K5.md", "keys/L1-K5.html", "keys/L3-K60.md", "keys/L3-K60.html", "keys.md", "keys.html"} <= names
    for layer, key in ((1, 5), (3, 60)):
        page = (tmp_path / "keys" / f"L{layer}-K{key}.html").read_text()
        found = triggers.examples(layer, key, 20)
        checker = parse(page)
        # self-contained: inline CSS, no script, no external file
        assert "<style>" in page and not re.search(r"<script|<link|src=|@import", page, re.IGNORECASE)
        assert set(checker.tags) <= {
            "html",
            "head",
            "meta",
            "title",
            "style",
            "body",
            "p",
            "a",
            "h1",
            "table",
            "thead",
            "tbody",
            "tr",
            "th",
            "td",
            "span",
            "mark",
            "code",
        }
        # one row per example, in rank order, with its coefficient and its trigger token marked
        assert checker.marked == [split_prefix(hostile_lm, ex).trigger for ex in found]
        coefficients = re.findall(r'<td class="num">(-?\d+\.\d{3})</td>', page)
        assert coefficients == [f"{ex.coefficient:.3f}" for ex in found]
        assert "Value tokens (+v)" in page and 'href="../keys.html"' in page
        markdown = (tmp_path / "keys" / f"L{layer}-K{key}.md").read_text()
        assert markdown.count("**") == 2 * len(found) and not re.search(r"(?<!\\)<", markdown)  # no raw inline HTML
    pages = "".join((tmp_path / "keys" / name).read_text() for name in ("L1-K5.html", "L3-K60.html"))
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in pages and "&amp;" in pages
    index = (tmp_path / "keys.html").read_text()
    assert re.findall(r'href="(keys/[^"]+)"', index) == ["keys/L1-K5.html", "keys/L3-K60.html"]
    assert "tiny-llama-&lt;hostile&gt;" in index and "<script" not in index.lower()
    assert "(keys/L1-K5.md)" in (tmp_path / "keys.md").read_text()


def test_a_key_the_corpus_never_reached_gets_a_page_saying_so(hostile_lm, tmp_path):
    import torch

    empty = TriggerSet(
        [0],
        {0: torch.zeros(64, 2)},
        {0: torch.full((64, 2), -1)},
        {},
        8,
        {"coefficient": "m", "rank": "value", "tokens": 0, "source": "x"},
    )
    write_key_pages(hostile_lm, empty, [(0, 3)], tmp_path)
    assert "no examples" in (tmp_path / "keys" / "L0-K3.html").read_text()
