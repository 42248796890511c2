"""The two packaged corpora of the standard protocol (PROTOCOL.md), read from the gensim 4.4.0 wheel.

Nothing here touches the network: both files ship inside gensim's test data, so every machine that has the
pinned stack has exactly the same text, and a perplexity measured on it is comparable across machines.
"""

from __future__ import annotations

import bz2
import functools
from pathlib import Path

from logart.errors import LogartError
from logart.packages import package_dir

WIKIPEDIA_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"

# Lines of cleaned markup this short are list debris, headings, captions and template leftovers, not prose.
MIN_LINE_CHARS = 40


def _gensim_test_file(name: str) -> Path:
    """Locate a file of gensim's bundled test data without importing gensim's heavy top-level package."""
    root = package_dir("gensim")
    if root is None:
        raise LogartError("the packaged text needs gensim, which is not installed.", "pip install gensim==4.4.0")
    path = root / "test" / "test_data" / name
    if not path.is_file():
        raise LogartError(f"gensim is installed but lacks its test data file {name}.",
                          "pip install --force-reinstall gensim==4.4.0")
    return path


def _clean_article(title: str, markup: str) -> str:
    """One article as in PROTOCOL.md: ' = {title} = ', a blank line, then the kept prose lines.

    The body's lines are joined with a single "\\n" (one paragraph per line, like the markup). That choice
    gives the 2.886 M characters and 645 K tokens recorded in ASSETS.md; "\\n\\n" would give 2.894 M.
    """
    from gensim.corpora.wikicorpus import filter_wiki

    lines = (line.strip() for line in filter_wiki(markup).split("\n"))
    body = "\n".join(line for line in lines if len(line) > MIN_LINE_CHARS)
    # Bold before italics: removing '' first would leave a stray ' out of every '''.
    body = body.replace("'''", "").replace("''", "")
    return f" = {title} = \n\n{body}"


@functools.lru_cache(maxsize=1)
def packaged_wikipedia_text() -> str:
    """The protocol's evaluation text: 107 cleaned English Wikipedia articles (about 2.89 M characters).

    Main-namespace pages only, redirects dropped (99 of the 206 pages), joined with "\\n\\n" like the
    GPTQ-protocol WikiText-2 text. One article ("Wikipedia:Adding Wikipedia articles to Nupedia", a main-
    namespace page of the 2001 wiki) keeps only its title line: the protocol counts it, so it stays.
    Cached in memory because the cleaning takes about 2 s and the text never changes.
    """
    from gensim.corpora.wikicorpus import extract_pages

    articles = []
    with bz2.open(_gensim_test_file(WIKIPEDIA_FILE), "rb") as f:
        for title, markup, _pageid in extract_pages(f, filter_namespaces=("0",)):
            if markup.lstrip().lower().startswith("#redirect"):
                continue
            articles.append(_clean_article(title, markup))
    return "\n\n".join(articles)


@functools.lru_cache(maxsize=1)
def packaged_news_text() -> str:
    """The protocol's calibration text: 300 Australian news documents (Lee corpus), one per line in the file,
    stripped, empty lines dropped, joined with "\\n\\n". Disjoint from the Wikipedia text."""
    raw = _gensim_test_file(NEWS_FILE).read_text(encoding="utf-8")
    return "\n\n".join(line.strip() for line in raw.splitlines() if line.strip())
