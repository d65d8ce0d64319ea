"""Corpus builders on tiny fixture trees: no network, no Debian downloads."""

from __future__ import annotations

import json
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from memorizing_transformers.data.corpora import (
    CORPORA,
    CorpusUnavailable,
    Document,
    common,
    load_corpus,
    prepare_corpus,
)

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


def test_pycode_documents_are_directories_of_source(stdlib, monkeypatch):
    from memorizing_transformers.data.corpora import pycode

    monkeypatch.setattr(pycode, "MIN_CHARACTERS", 10)
    write(stdlib, {"email/mime/base.py": "BASE = 7\n", "memorizing_transformers/model.py": "SKIPPED = 0\n"})
    documents = all_documents("pycode", stdlib)
    assert sorted(documents) == ["src/.", "src/email", "src/email/mime", "src/idlelib"]  # emptypkg: too short
    assert (
        documents["src/email/mime"] == "# file: email/mime/base.py\nBASE = 7\n\n# file: email/mime/text.py\nTEXT = 2\n"
    )
    assert documents["src/."].startswith("# file: _pydecimal.py\nDECIMAL = 6\n")
    assert not any("SKIPPED" in text or "not python" in text for text in documents.values())


def test_default_pycode_corpus_holds_the_standard_library_and_installed_packages():
    built = CORPORA["pycode"].build(None)
    names = {d.name for split in common.SPLITS for d in built.splits[split]}
    assert {"stdlib/json", "site/torch/nn/modules", "site/transformers/models/llama"} <= names
    assert "torch==" in built.source and "transformers==" in built.source
    own = [n for n in names if n == "site/memorizing_transformers" or n.startswith("site/memorizing_transformers/")]
    assert not own and not [n for n in names if "/tests" in n]  # not this project's package, nor tests


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
    assert [p.name for p in target.parent.iterdir()] == ["code"]  # the replaced corpus is gone


def test_unknown_corpus_and_split():
    with pytest.raises(ValueError, match="known corpora"):
        load_corpus("nope", "train")
    with pytest.raises(ValueError, match="train, valid, test"):
        load_corpus("code", "validation")


# --- proofs ------------------------------------------------------------------------------


def test_proofs_documents_follow_require_order(tmp_path):
    theories = write(
        tmp_path / "theories",
        {
            "Arith/Alpha.v": "From Coq Require Export Coq.Arith.Mid.\nLemma alpha : True.\n",
            "Arith/Beta.v": "Require Import\n  Zeta Coq.Init.Datatypes.\nLemma beta : True.\n",
            "Arith/Gamma.v": "Lemma gamma : True.\n",
            "Arith/Mid.v": "(* Require Import Zeta. (* nested *) *)\nLemma mid : True.\n",
            "Arith/Zeta.v": "Require Import Alpha.\nLemma zeta : True.\n",
            "Init/Datatypes.v": b"Inductive unit := tt. (* \xff *)\n",
            "Init/Empty.v": "",
            "Sets/Blank.v": "  \n",
            "Top.v": "Lemma top : True.\n",
        },
    )
    documents = all_documents("proofs", theories)
    assert sorted(documents) == ["Coq", "Coq/Arith", "Coq/Init"]
    headers = [line for line in documents["Coq/Arith"].splitlines() if line.startswith("(* file:")]
    assert headers == [f"(* file: Arith/{stem}.v *)" for stem in ["Gamma", "Mid", "Alpha", "Zeta", "Beta"]]
    assert documents["Coq/Init"] == "(* file: Init/Datatypes.v *)\nInductive unit := tt. (* \ufffd *)\n"
    assert documents["Coq"] == "(* file: Top.v *)\nLemma top : True.\n"


def test_proofs_dependency_cycles_are_broken_by_name():
    from memorizing_transformers.data.corpora.proofs import dependency_order, required_modules

    assert required_modules("Require Import A B.C. (* Require D. *) From X Require Export E.\nImport F.") == {
        "A",
        "C",
        "E",
    }
    assert dependency_order({"C": "Require A.", "B": "Require C.", "A": "Require Import B."}) == ["A", "C", "B"]
    assert dependency_order({"B": "", "A": "Require B.", "C": "Require A."}) == ["B", "A", "C"]


# --- metamath ----------------------------------------------------------------------------


def test_metamath_is_cut_into_contiguous_parts(tmp_path):
    bar = "#" * 79
    header = "$(\n{bar}\n   {title}\n{bar}\n$)\n"
    text = (
        "$( set.mm front matter $)\n"
        + header.format(bar=bar, title="CLASSICAL LOGIC")
        + "$c ( ) $.\n"
        + header.format(bar=bar, title="ZF SET\n   THEORY")
        + "$( caf\xe9 $)\n"
    )
    folder = write(tmp_path / "databases", {"set.mm": text.encode("latin-1"), "iset.mm": "ignored"})
    documents = all_documents("metamath", folder)
    assert sorted(documents) == ["set.mm/00 front matter", "set.mm/01 CLASSICAL LOGIC", "set.mm/02 ZF SET THEORY"]
    assert "".join(documents[name] for name in sorted(documents)) == text.replace("\xe9", "\ufffd")
    assert documents["set.mm/01 CLASSICAL LOGIC"].endswith("$c ( ) $.\n")


# --- books: the R lazy-load database -------------------------------------------------------


def xdr_character_vector(lines: list[str | None], version: int = 3, latin1: bool = False) -> bytes:
    """R's serialize() of a character vector in XDR format."""
    out = b"X\n" + struct.pack(">iii", version, 0x040201, 0x030500)
    if version == 3:
        out += struct.pack(">i", 5) + b"UTF-8"
    out += struct.pack(">ii", 16, len(lines))  # STRSXP, length
    for line in lines:
        if line is None:
            out += struct.pack(">ii", 9, -1)  # NA_character_
        else:
            data = line.encode("latin-1" if latin1 else "utf-8")
            out += struct.pack(">ii", 9 | ((4 if latin1 else 8) << 12), len(data)) + data  # CHARSXP, LATIN1/UTF8
    return out


def xdr_integer_vector(values: list[int]) -> bytes:
    return (
        b"X\n"
        + struct.pack(">iii", 2, 0x040201, 0x020300)
        + struct.pack(f">ii{len(values)}i", 13, len(values), *values)
    )


def rdb(*payloads: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(p)) + zlib.compress(p) for p in payloads)


def test_rdb_parser():
    from memorizing_transformers.data.corpora.books import read_rdb

    data = rdb(
        xdr_character_vector(["EMMA", "", "caf\u00e9 \u2014 fin", None]),
        xdr_integer_vector([1, 2, 3]),
        xdr_character_vector(["na\u00efve"], version=2, latin1=True),
    )
    assert read_rdb(data) == [["EMMA", "", "caf\u00e9 \u2014 fin", None], ["na\u00efve"]]
    with pytest.raises(ValueError, match="truncated"):
        read_rdb(data[:-3])
    with pytest.raises(ValueError, match="zlib"):
        read_rdb(struct.pack(">I", 4) + b"not zlib at all")


def fake_bible(folder: Path, verses: str) -> None:
    """bible.data and a `bible` program that prints `verses` and records its arguments."""
    write(folder, {"usr/lib/bible.data": "EC02", "usr/bin/verses.txt": verses})
    program = folder / "usr/bin/bible"
    program.write_text(f'#!/bin/sh\necho "$@" > {folder}/arguments\ncat {folder}/usr/bin/verses.txt\n')
    program.chmod(0o644)  # as unpacked without its mode: made executable when run


def bible_verses(books: int = 66) -> str:
    # book 0 has two chapters; the reader's abbreviations are letters, "1Sm"-style ones too
    lines = ["Ge1:1 In the beginning.", "Ge1:2 And the earth.", "Ge2:1 Thus the heavens."]
    lines += [f"{i % 3 or ''}B{chr(97 + i // 26)}{chr(97 + i % 26)}1:1 Verse of book {i}." for i in range(1, books)]
    return "\n".join(lines) + "\n"


def test_books_one_document_per_novel_and_per_book_of_the_bible(tmp_path):
    novels = {
        "PRIDE AND PREJUDICE": ["", "PRIDE AND PREJUDICE", "", "It is a truth universally acknowledged"],
        "Persuasion": ["Persuasion", None, "Sir Walter Elliot"],
        "SENSE AND SENSIBILITY": ["SENSE AND SENSIBILITY", "by Jane Austen"],
    }
    data = rdb(*(xdr_character_vector(lines) for lines in novels.values()), xdr_character_vector(["", "  "]))
    folder = write(tmp_path / "janeaustenr/data", {"Rdata.rdb": data})
    fake_bible(folder, bible_verses())
    splits = {split: load_corpus("books", split, folder) for split in common.SPLITS}
    documents = {d.name: d.text for docs in splits.values() for d in docs}
    assert len(documents) == 3 + 66 and all(splits.values())
    assert {"Persuasion", "Pride and Prejudice", "Sense and Sensibility"} <= set(documents)
    assert documents["Pride and Prejudice"] == "\nPRIDE AND PREJUDICE\n\nIt is a truth universally acknowledged"
    assert documents["Persuasion"] == "Persuasion\n\nSir Walter Elliot"
    assert documents["KJV: Genesis"] == "Genesis\n\n1:1 In the beginning.\n1:2 And the earth.\n\n2:1 Thus the heavens."
    assert documents["KJV: Revelation"] == "Revelation\n\n1:1 Verse of book 65."
    assert (folder / "arguments").read_text().split() == ["-f", "-p", str(folder / "usr/lib"), "gen1:1-rev22:21"]


def test_books_refuse_a_bible_that_is_missing_or_misread(tmp_path):
    folder = write(tmp_path / "janeaustenr/data", {"Rdata.rdb": rdb(xdr_character_vector(["EMMA", "text"]))})
    with pytest.raises(CorpusUnavailable, match="no bible.data and bible under .*apt-get download bible-kjv-text"):
        prepare_corpus("books", folder)
    fake_bible(folder, bible_verses(65))
    with pytest.raises(ValueError, match="printed 65 books, expected 66"):
        prepare_corpus("books", folder)
    fake_bible(folder, "Genesis 1\n")
    with pytest.raises(ValueError, match="not a verse: 'Genesis 1'"):
        prepare_corpus("books", folder)


# --- tex, and Debian packages --------------------------------------------------------------

TEX_FILES = {
    "usr/share/pari/doc/users.tex": "\\input usersch1\n\\bye\n",
    "usr/share/pari/doc/usersch1.tex": "\\chapter{Overview}\n",
    "usr/share/pari/doc/sub/appendix.tex": "\\section{More}\n",
    "usr/share/pari/doc/latin.tex": b"Erd\xf6s\n",
    "usr/share/pari/doc/empty.tex": "",
    "usr/share/pari/doc/users.pdf": "not tex",
}


def test_tex_documents_from_an_unpacked_package(tmp_path):
    package = write(tmp_path / "pari-doc", TEX_FILES)
    documents = all_documents("tex", package)
    assert sorted(documents) == ["latin.tex", "sub/appendix.tex", "users.tex", "usersch1.tex"]
    assert documents["users.tex"] == "\\input usersch1\n\\bye\n"
    assert documents["latin.tex"] == "Erd\ufffds\n"


def fake_apt(calls: list[list[str]], files: dict[str, str | bytes]):
    """A stand-in for apt-get download / dpkg-deb that 'unpacks' `files`."""

    def run_tool(command: list[str], cwd: Path | None = None) -> str:
        calls.append(command)
        if command[:2] == ["apt-get", "download"]:
            (cwd / f"{command[2]}_1.0-1_all.deb").write_bytes(b"deb")
        elif command[:2] == ["dpkg-deb", "-x"]:
            write(Path(command[3]), files)
        elif command[:2] == ["dpkg-deb", "-f"]:
            return "1.0-1\n"
        return ""

    return run_tool


def test_debian_package_is_fetched_once_and_unpacked_into_the_cache(monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(common, "run_tool", fake_apt(calls, TEX_FILES))
    monkeypatch.setattr(common.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    target = prepare_corpus("tex")
    assert [c[:2] for c in calls] == [["apt-get", "download"], ["dpkg-deb", "-x"], ["dpkg-deb", "-f"]]
    meta = json.loads((target / "meta.json").read_text())
    assert meta["source"].startswith("Debian package pari-doc 1.0-1 (")
    assert sum(s["documents"] for s in meta["splits"].values()) == 4
    assert (common.cache_dir() / "debian/pari-doc/usr/share/pari/doc/users.tex").is_file()
    prepare_corpus("tex", force=True)
    assert len(calls) == 3  # unpacked package reused
    assert sorted(p.name for p in (common.cache_dir() / "debian").iterdir()) == ["pari-doc"]


def test_unavailable_debian_package_says_what_to_run(monkeypatch):
    def apt_fails(command, cwd=None):
        raise subprocess.CalledProcessError(100, command, stderr="E: Unable to locate package libcoq-stdlib")

    monkeypatch.setattr(common, "run_tool", apt_fails)
    monkeypatch.setattr(common.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    with pytest.raises(CorpusUnavailable) as error:
        load_corpus("proofs", "train")  # not prepared: never fetches by itself
    assert "run `mt data prepare proofs`" in str(error.value)
    with pytest.raises(CorpusUnavailable) as error:
        prepare_corpus("proofs")
    message = str(error.value)
    assert "apt-get download libcoq-stdlib" in message and "apt-get update" in message
    assert "mt data prepare proofs --source DIR" in message
    assert [p.name for p in (common.cache_dir() / "debian").iterdir()] == []  # nothing half-unpacked
    monkeypatch.setattr(common.shutil, "which", lambda tool: None)
    with pytest.raises(CorpusUnavailable, match="apt-get and dpkg-deb cannot be found"):
        prepare_corpus("books")


# --- files and pg19 (through the datasets library) -----------------------------------------


def test_files_corpus_from_txt_and_jsonl(tmp_path):
    rows = [{"text": "first row", "name": "row-one"}, {"text": "second row"}, {"text": ""}]
    folder = write(
        tmp_path / "mine",
        {
            "a.txt": "alpha\nbeta\n",
            "deep/b.txt": "gamma",
            "empty.txt": "",
            "latin.txt": b"na\xefve",
            "notes.md": "ignored",
            "rows.jsonl": "".join(json.dumps(r) + "\n" for r in rows),
        },
    )
    with pytest.raises(CorpusUnavailable, match="--source DIR"):
        load_corpus("files", "train")
    documents = all_documents("files", folder)
    assert documents == {
        "a.txt": "alpha\nbeta\n",
        "deep/b.txt": "gamma",
        "latin.txt": "na\ufffdve",
        "row-one": "first row",
        "rows.jsonl#1": "second row",
    }
    assert all(load_corpus("files", split) for split in common.SPLITS)  # cached: no source needed now
    with pytest.raises(CorpusUnavailable, match="--source DIR"):
        prepare_corpus("files", force=True)


def test_pg19_keeps_its_own_splits(tmp_path):
    folder = write(
        tmp_path / "pg19",
        {
            "train/10.txt": "book ten",
            "train/11.txt": "book eleven",
            "validation/20.txt": "book twenty",
            "test/30.txt": "book thirty",
            "test/31.txt": "",
        },
    )
    assert {s: [(d.name, d.text) for d in load_corpus("pg19", s, folder)] for s in common.SPLITS} == {
        "train": [("10", "book ten"), ("11", "book eleven")],
        "valid": [("20", "book twenty")],
        "test": [("30", "book thirty")],
    }
    assert "own splits" in json.loads((common.corpus_dir("pg19") / "meta.json").read_text())["split_rule"]
    with pytest.raises(CorpusUnavailable, match="validation/"):
        prepare_corpus("pg19", write(tmp_path / "partial", {"train/1.txt": "x", "test/2.txt": "y"}))


def test_pg19_from_the_hub_names_books_by_gutenberg_id(monkeypatch):
    from memorizing_transformers.data.corpora import pg19

    def fake_hub(path, **kwargs):
        assert path == pg19.HUB_ID
        book = {"short_book_title": "T", "publication_date": 1900, "url": "http://www.gutenberg.org/ebooks/{}"}
        return {
            "train": [dict(book, url=book["url"].format(1), text="one")],
            "validation": [dict(book, url=book["url"].format(2), text="two"), dict(book, url="u/3", text=" ")],
            "test": [dict(book, url=book["url"].format(4), text="four")],
        }

    monkeypatch.setattr(pg19, "stream_dataset", fake_hub)
    with pytest.raises(CorpusUnavailable, match="run `mt data prepare pg19`"):
        load_corpus("pg19", "valid")  # never downloads by itself
    prepare_corpus("pg19")
    assert [(d.name, d.text) for d in load_corpus("pg19", "valid")] == [("2", "two")]
    assert [d.name for d in load_corpus("pg19", "test")] == ["4"]

    def offline(path, **kwargs):
        raise ConnectionError("Couldn't reach 'emozilla/pg19' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(pg19, "stream_dataset", offline)
    with pytest.raises(CorpusUnavailable, match="OfflineModeIsEnabled.*--source DIR"):
        prepare_corpus("pg19", force=True)


def test_a_rebuilt_corpus_gets_caches_of_its_own(monkeypatch):
    import dataclasses

    from memorizing_transformers.data import corpora
    from memorizing_transformers.data.pipeline import corpus_key, corpus_tokenizer_dir

    assert corpus_key("code") == "code" and corpus_key("books") == "books-c2"  # books 2: the Bible added
    monkeypatch.setitem(corpora.CORPORA, "code", dataclasses.replace(corpora.CORPORA["code"], version=3))
    assert corpus_tokenizer_dir("code", 512).name == "code-c3-bpe512"
