"""Terminal views: each token of one example on its own coloured background, and scored pairs."""
from __future__ import annotations

import itertools
import re
from typing import Any

_BACKGROUNDS = [167, 179, 185, 77, 80, 68, 134]
# C0 and C1 controls but the line end and tab: an ESC from the data could recolour, retitle or erase the terminal
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


# every control character (line ends and tabs too) and the Unicode line separators
_LINE_BREAKING = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """`text` with every control character and line separator a space: a name from the data as a key or
    a Markdown cell holds it."""
    return _LINE_BREAKING.sub(" ", text)


def table_cell(text: str) -> str:
    """one_line(`text`) with `|` escaped: GFM splits a table's cells on it, even inside a code span."""
    return one_line(text).replace("|", "\\|")


# what Markdown (and the HTML it lets through) reads as markup: links, images, tags, entities, emphasis, code
_MARKUP = re.compile(r"([\\`*_\[\]<>!&#~|])")
# what GitHub's Markdown (and the Hub's) links with no markup at all: a URL, www.<host>, an e-mail address
_AUTOLINKED = re.compile(r"://|www\.|@[\w-]+\.", re.IGNORECASE)


def code_span(text: str) -> str:
    """`text` (one line) as Markdown inline code that stays one span, whatever it holds: the fence is longer
    than any run of backticks inside. Links, images and HTML inside a code span are text."""
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _literal_word(word: str) -> str:
    if _AUTOLINKED.search(word):  # a code span: no autolink inside one; GFM wants the bar escaped there too
        return code_span(table_cell(word))
    return _MARKUP.sub(r"\\\1", word)


def markdown_text(text: str) -> str:
    """one_line(`text`) as literal Markdown text, table cells included: each character Markdown or HTML
    would read as markup backslash-escaped, and a word GitHub would link by itself (a URL, www., an
    e-mail address) a code span. For sentences that carry names from the data or from a Hub record (the
    release gate's details): a name could otherwise be a link, an image or a tag on the page."""
    return re.sub(r"\S+", lambda m: _literal_word(m.group()), one_line(text))


def printable(text: str) -> str:
    """`text` safe to print: every control character from the data written as its escape (\\x1b)."""
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def visualize_token(ids: list[int], tokenizer: Any, color: bool = True) -> str:
    """Every token visible: alternating background colours (or [brackets] without colour),
    special tokens included, whitespace shown as ␣ and ↵."""
    pieces = [tokenizer.convert_ids_to_tokens(i) for i in ids]
    pieces = [printable(p.replace(" ", "␣").replace("Ġ", "␣").replace("\n", "↵").replace("Ċ", "↵")) for p in pieces]
    if not color:
        return "".join(f"[{p}]" for p in pieces)
    backgrounds = itertools.cycle(f"\x1b[48;5;{c}m" for c in _BACKGROUNDS)
    return "".join(f"{bg}{p}" for bg, p in zip(backgrounds, pieces)) + "\x1b[0m"


def visualize_samples(rows: list[dict], limit: int = 4, width: int = 70) -> str:
    """A small table of pairs with their rewards: what a person checks when accuracy looks wrong."""
    lines = [f"{'reward chosen':>13} {'reward rejected':>15}  {'ok':2}  chosen | rejected (ends)"]
    for row in rows[:limit]:
        ok = "✓" if row["reward_chosen"] > row["reward_rejected"] else "✗"
        chosen = printable(row.get("chosen_text", "")[-width // 2:].replace("\n", " "))
        rejected = printable(row.get("rejected_text", "")[-width // 2:].replace("\n", " "))
        lines.append(f"{row['reward_chosen']:>13.3f} {row['reward_rejected']:>15.3f}  {ok:2}  …{chosen} | …{rejected}")
    return "\n".join(lines)
