"""Real English text for calibration (imatrix) and evaluation (KL divergence), from an installed package.

The text is the Lee background corpus that gensim ships as test data
(`gensim/test/test_data/lee_background.cor`): 300 news articles of the
Australian Broadcasting Corporation, one per line, 360 KB of plain ASCII
prose. Exact duplicate articles are dropped (293 remain); the first half of
the articles is the calibration text, the second half the evaluation text,
split at an article boundary, so the two share no passage (near-duplicate
articles all fall on the same side). gensim itself is never imported (its
import pulls in scipy and takes seconds): the file is located on disk.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

from bpwopt.errors import BpwoptError

CORPUS_PACKAGE = "gensim"
CORPUS_FILE = ("test", "test_data", "lee_background.cor")
CORPUS_SHA256 = "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb"
CALIBRATION_ARTICLES = 146  # of 293 distinct articles; the rest is the evaluation text
ARTICLE_SEPARATOR = "\n\n"


def corpus_path() -> Path:
    """Where the installed gensim keeps lee_background.cor; BpwoptError with the install command if absent."""
    spec = find_spec(CORPUS_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder).joinpath(*CORPUS_FILE)
        if path.is_file():
            return path
    raise BpwoptError("the calibration/evaluation text is not installed; run: pip install 'gensim>=4.3,<5'")


@lru_cache(maxsize=1)
def _articles() -> tuple[str, ...]:
    """The corpus's distinct articles in file order, checked against the corpus bpwopt was built with."""
    path = corpus_path()
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != CORPUS_SHA256:
        raise BpwoptError(f"{path}: unexpected content (sha256 {digest[:16]}…); this gensim's corpus is not the one "
                          "bpwopt's texts are defined on")
    articles = (line.strip() for line in data.decode("ascii").splitlines())
    return tuple(dict.fromkeys(article for article in articles if article))


def calibration_text() -> str:
    """Text for llama-imatrix: the first 146 distinct articles, blank-line separated (about 175 KB)."""
    return ARTICLE_SEPARATOR.join(_articles()[:CALIBRATION_ARTICLES]) + "\n"


def evaluation_text() -> str:
    """Text for KL divergence and perplexity: the other 147 articles (about 177 KB), none in the calibration text."""
    return ARTICLE_SEPARATOR.join(_articles()[CALIBRATION_ARTICLES:]) + "\n"
