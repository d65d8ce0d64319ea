"""Corpus builders on tiny fixture trees: no network, no Debian downloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memorizing_transformers.data.corpora import CORPORA, CorpusUnavailable, Document, load_corpus, prepare_corpus
from memorizing_transformers.data.corpora import common

LATIN1 = b"caf\xe9 = 1\n"  # not valid UTF-8


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def write(root: Path, files: dict[str, str | bytes]) -> Path:
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return root


def all_documents(name: str, source: Path | None = None) -> dict[str, str]:
    return {d.name: d.text for split in common.SPLITS for d in load_corpus(name, split, source)}


# --- code -------------------------------------------------------------------------------


@pytest.fixture
def stdlib(tmp_path) -> Path:
    return write(
        tmp_path / "stdlib",
        {
            "email/__init__.py": "",
            "email/charset.py": "CHARSET = 1\n",
            "email/mime/text.py": "TEXT = 2",
            "email/tests/test_charset.py": "SKIPPED\n",
            "email/README.txt": "not python\n",
            "test/test_os.py": "SKIPPED\n",
            "idlelib/run.py": "RUN = 3\n",
            "idlelib/idle_test/test_run.py": "SKIPPED\n",
            "site-packages/torch/__init__.py": "SKIPPED\n",
            "emptypkg/__init__.py": "",
            "abc.py": "ABC = 4\n",
            "pickle.py": "PICKLE = 5\n",
            "_pydecimal.py": "DECIMAL = 6\n",
            "latin.py": LATIN1,
            "LICENSE.txt": "not python\n",
        },
    )


def test_code_documents(stdlib):
    documents = all_documents("code", stdlib)
    assert sorted(documents) == ["email", "idlelib", "modules/a", "modules/l", "modules/p"]
    assert documents["email"] == "# file: email/charset.py\nCHARSET = 1\n\n# file: email/mime/text.py\nTEXT = 2\n"
    assert documents["modules/p"] == "# file: _pydecimal.py\nDECIMAL = 6\n\n# file: pickle.py\nPICKLE = 5\n"
    assert documents["modules/l"] == "# file: latin.py\ncaf\ufffd = 1\n"
    assert not any("SKIPPED" in text or "not python" in text for text in documents.values())


def test_code_builds_on_first_use_and_writes_meta(stdlib):
    assert load_corpus("code", "train", stdlib)  # no prepare step needed
    meta = json.loads((common.corpus_dir("code") / "meta.json").read_text())
    assert meta["source_argument"] == str(stdlib.resolve())
    assert meta["licence"].startswith("PSF")
    assert sum(s["documents"] for s in meta["splits"].values()) == 5
    assert sum(s["characters"] for s in meta["splits"].values()) == sum(map(len, all_documents("code").values()))


def test_default_code_corpus_is_the_standard_library():
    built = CORPORA["code"].build(None)
    documents = {d.name: d.text for split in common.SPLITS for d in built.splits[split]}
    assert {"json", "email", "asyncio", "modules/t"} <= set(documents) and "test" not in documents
    assert "# file: json/decoder.py\n" in documents["json"]
    assert "# file: typing.py\n" in documents["modules/t"]
    headers = [line for text in documents.values() for line in text.splitlines() if line.startswith("# file: ")]
    assert not [h for h in headers if "/test/" in h or "/tests/" in h or "idle_test" in h or not h.endswith(".py")]


# --- splits and the cache -----------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_by_name():
    documents = [Document(f"doc{i}", f"text {i}") for i in range(200)]
    first = common.split_documents(documents)
    again = common.split_documents(list(reversed(documents)))
    names = {split: [d.name for d in first[split]] for split in common.SPLITS}
    assert {s: sorted(n) for s, n in names.items()} == {s: sorted(d.name for d in again[s]) for s in common.SPLITS}
    assert sum(len(n) for n in names.values()) == 200 == len(set().union(*map(set, names.values())))
    assert 2 <= len(names["test"]) <= 20 and 2 <= len(names["valid"]) <= 20
    assert names["train"] == sorted(names["train"], key=lambda n: int(n[3:]))  # input order kept
    for split, members in names.items():
        for name in members:  # with this many documents the hash thresholds alone decide
            u = common.split_key(name)
            assert split == ("test" if u < 0.05 else "valid" if u < 0.10 else "train")


@pytest.mark.parametrize("n", [3, 4, 6, 10])
def test_small_corpora_get_nonempty_valid_and_test(n):
    splits = common.split_documents([Document(f"book {i}", "x") for i in range(n)])
    assert all(splits[s] for s in common.SPLITS)
    assert sum(len(v) for v in splits.values()) == n


def test_split_drops_empty_documents_and_rejects_duplicate_names():
    splits = common.split_documents([Document("a", "x"), Document("b", " \n"), Document("c", "y")])
    assert sorted(d.name for docs in splits.values() for d in docs) == ["a", "c"]
    with pytest.raises(ValueError, match="duplicate"):
        common.split_documents([Document("a", "x"), Document("a", "y")])


def test_interrupted_build_leaves_previous_corpus(stdlib, monkeypatch):
    target = prepare_corpus("code", stdlib)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def failing(source):
        def documents():
            yield Document("half", "written")
            raise KeyboardInterrupt

        return common.Built(source="x", splits={"train": documents()})

    monkeypatch.setitem(CORPORA, "code", common.Corpus("code", "d", "l", failing, self_contained=True))
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus("code", stdlib, force=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in target.parent.iterdir()] == ["code"]  # no temporary folders left


def test_cache_is_reused_unless_forced_or_source_changes(stdlib, tmp_path):
    target = prepare_corpus("code", stdlib)
    (stdlib / "zlib.py").write_text("ZLIB = 7\n")
    prepare_corpus("code", stdlib)
    assert "modules/z" not in all_documents("code")
    prepare_corpus("code", stdlib, force=True)
    assert "modules/z" in all_documents("code")
    other = write(tmp_path / "other", {"json/__init__.py": "JSON = 8\n"})
    assert prepare_corpus("code", other) == target
    assert list(all_documents("code")) == ["json"]


def test_unknown_corpus_and_split():
    with pytest.raises(ValueError, match="known corpora"):
        load_corpus("nope", "train")
    with pytest.raises(ValueError, match="train, valid, test"):
        load_corpus("code", "validation")
