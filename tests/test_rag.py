"""rag.py: BM25 against rank_bm25 and an independent reference, chunking, the index folder, search,
ask, compare (and its honesty), and the one-sentence errors."""
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

import rag
from common import UserError
from data import load_entries, split_entries
from model import GPT, PRESETS, save_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"


def run(*argv: str) -> dict:
    return rag.main(rag.parse_args(list(argv)))


def reference_scores(corpus: list[list[str]], query: list[str], k1=1.5, b=0.75, epsilon=0.25) -> list[float]:
    """BM25 Okapi written out document by document, with the idf floor of rank_bm25."""
    n = len(corpus)
    avgdl = sum(len(d) for d in corpus) / n
    vocabulary = list(dict.fromkeys(w for d in corpus for w in d))
    df = {w: sum(w in d for d in corpus) for w in vocabulary}
    idf = {w: math.log((n - df[w] + 0.5) / (df[w] + 0.5)) for w in vocabulary}
    floor = epsilon * sum(idf.values()) / len(idf)
    idf = {w: floor if v < 0 else v for w, v in idf.items()}
    scores = []
    for d in corpus:
        s = 0.0
        for q in query:
            tf = d.count(q)
            if tf:
                s += idf[q] * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(d) / avgdl))
        scores.append(s)
    return scores


CORPORA = {
    "repeats and unknowns": ([["a", "b", "a"], ["b", "c"], ["c", "c", "c", "d"], ["e"]],
                             [["a", "a"], ["c", "zzz"], ["b", "b", "d", "e"]]),
    "a term in every chunk": ([["x", "y"], ["x"], ["x", "z", "z"]], [["x"], ["x", "z"], ["y", "x", "x"]]),
    "one long chunk": ([["w"] * 50 + ["v"], ["v", "u"], ["u"] * 3], [["w"], ["v", "u"], ["u", "w", "v"]]),
}


@pytest.mark.parametrize("name", CORPORA)
def test_bm25_equals_an_independent_reference(name):
    corpus, queries = CORPORA[name]
    for params in ((1.5, 0.75, 0.25), (0.8, 0.3, 0.6), (2.0, 1.0, 0.0)):
        bm25 = rag.build_bm25(corpus, *params)
        for query in queries:
            np.testing.assert_allclose(bm25.scores(query), reference_scores(corpus, query, *params), rtol=1e-12,
                                       atol=1e-12, err_msg=f"{name} {params} {query}")


def test_bm25_equals_rank_bm25_on_its_fixture():
    cases = json.loads((FIXTURES / "bm25_cases.json").read_text(encoding="utf-8"))["cases"]
    assert len(cases) >= 5
    for case in cases:
        bm25 = rag.build_bm25(case["corpus"], case["k1"], case["b"], case["epsilon"])
        for query, expected in zip(case["queries"], case["scores"]):
            np.testing.assert_allclose(bm25.scores(query), expected, rtol=1e-12, atol=1e-12,
                                       err_msg=f"{case['name']}: {query}")


def test_idf_floor_gives_common_terms_epsilon_times_the_average_idf():
    # x in all 6 chunks (idf < 0), y in 3 (ln 3.5 - ln 3.5 = 0), a b c d in one each
    corpus = [["x", "y", "a"], ["x", "y", "b"], ["x", "y", "c"], ["x", "d"], ["x"], ["x"]]
    bm25 = rag.build_bm25(corpus, epsilon=0.5)
    counts = {"x": 6, "y": 3, "a": 1, "b": 1, "c": 1, "d": 1}
    raw = {w: math.log(6 - n + 0.5) - math.log(n + 0.5) for w, n in counts.items()}
    floor = 0.5 * sum(raw.values()) / len(raw)
    assert bm25.idf[bm25.terms["x"]] == pytest.approx(floor, rel=1e-12) and floor > 0
    assert bm25.idf[bm25.terms["y"]] == 0  # zero is not negative: no floor
    assert bm25.scores(["x"]).min() > 0  # the floor keeps a term in every chunk worth something


def test_top_k_is_best_first_with_ties_in_chunk_order():
    bm25 = rag.build_bm25([["a"], ["b"], ["a", "a"], ["a"], ["c"]])
    ids, scores = bm25.top(["a"], 3)
    assert ids.tolist() == [2, 0, 3] and scores[1] == scores[2] and scores[0] > scores[1]
    ids, scores = bm25.top(["c"], 3)  # one chunk holds c: the other two are the first of those scoring 0
    assert ids.tolist() == [4, 0, 1] and scores.tolist()[1:] == [0, 0]
    with pytest.raises(UserError, match="more than the 5 chunks"):
        bm25.top(["a"], 6)


def test_words_are_lowercased_unicode_words_and_numbers():
    assert rag.words("Naïve café, 東京 in 2024! foo_bar 3.14") == [
        "naïve", "café", "東京", "in", "2024", "foo", "bar", "3", "14"]
    assert rag.words("The cat and the hat", rag.STOP_WORDS) == ["cat", "hat"]


TEXT = "  First line here.\n\nSecond\tparagraph has   more words, and more;\nthe end é 東京 ok  "


@pytest.mark.parametrize("size,overlap", [(1, 0), (3, 0), (4, 1), (5, 4), (100, 10)])
def test_chunking_round_trips_the_text(size, overlap):
    chunks = rag.chunk_document(rag.Document("t.txt", TEXT), size, overlap)
    for c in chunks:
        assert TEXT[c.offset:c.offset + len(c.text)] == c.text  # the offset points at the chunk's text
        assert len(c.text.split()) <= size
    if overlap == 0:
        assert [w for c in chunks for w in c.text.split()] == TEXT.split()
    else:  # each chunk repeats the last `overlap` words of the one before, and together they cover the text
        for a, b in zip(chunks, chunks[1:]):
            assert b.text.split()[:overlap] == a.text.split()[-overlap:]
        assert chunks[0].offset == TEXT.index("First") and chunks[-1].text.endswith("ok")


def test_chunking_by_tokens_keeps_chunks_within_the_token_budget():
    from tokenizer import get_tokenizer
    tokenizer = get_tokenizer()
    text = "Tokenization of unbelievably long words splits them into several tokens each. " * 5
    chunks = rag.chunk_document(rag.Document("t.txt", text), 12, 0, tokenizer)
    assert len(chunks) > 3
    assert [w for c in chunks for w in c.text.split()] == text.split()
    for c in chunks:
        assert sum(len(tokenizer.encode_ordinary(" " + w)) for w in c.text.split()) <= 12


@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "cats.txt").write_text("Cats sleep most of the day. " * 30 + "A cat purrs when happy.", encoding="utf-8")
    (folder / "dogs.md").write_text("# Dogs\n\nDogs bark at the mail carrier. Dogs love walks.", encoding="utf-8")
    (folder / "faq.jsonl").write_text(json.dumps({"q": "How do I pay my bill?", "a": "Pay online with a card."}) + "\n"
                                      + json.dumps({"q": "Opening hours?", "a": "Nine to five."}) + "\n",
                                      encoding="utf-8")
    return folder


def test_json_and_jsonl_records_are_documents_and_a_bad_line_is_named(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(["a plain string", {"q": "an object"}]), encoding="utf-8")
    documents = rag.read_documents(tmp_path / "list.json")
    assert [d.text for d in documents] == ["a plain string", "an object"]
    assert [d.source for d in documents] == [f"{tmp_path / 'list.json'}#0", f"{tmp_path / 'list.json'}#1"]
    (tmp_path / "bad.jsonl").write_text('{"q": 1}\n{"q": 2,\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.jsonl line 2 is not valid JSON"):
        rag.read_documents(tmp_path / "bad.jsonl")


def test_index_saved_loaded_and_queried_gives_the_same_results(docs, tmp_path):
    out = tmp_path / "index"
    built = run("index", str(docs / "*"), "--out", str(out), "--chunk", "20", "--overlap", "5")
    assert built["files"] == 3 and built["chunks"] > 3
    chunks = [c for f in sorted(docs.iterdir()) for d in rag.read_documents(f) for c in rag.chunk_document(d, 20, 5)]
    meta = {"k1": 1.5, "b": 0.75, "epsilon": 0.25, "stop_words": False}
    in_memory = rag.build_index(chunks, meta)
    loaded = rag.load_index(out)
    for query in ("cat purrs", "dogs bark", "pay my bill", "nine"):
        assert loaded.search(query, 3) == in_memory.search(query, 3)
    best = loaded.search("how do I pay my bill", 1)[0]
    assert best["source"].endswith("faq.jsonl#0") and "Pay online" in best["text"]
    cat = loaded.search("purrs", 1)[0]
    assert cat["source"].endswith("cats.txt")
    original = (docs / "cats.txt").read_text(encoding="utf-8")
    assert original[cat["offset"]:cat["offset"] + len(cat["text"])] == cat["text"]


def test_search_many_queries_writes_the_json_fields(docs, tmp_path):
    run("index", str(docs), "--out", str(tmp_path / "i"))
    (tmp_path / "q.txt").write_text("cats sleep\n\ndogs love walks\n", encoding="utf-8")
    result = run("search", "--index", str(tmp_path / "i"), "--queries", str(tmp_path / "q.txt"), "--k", "2",
                 "--json", str(tmp_path / "r.json"))
    written = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert written == json.loads(json.dumps(result))
    assert [q["query"] for q in written["queries"]] == ["cats sleep", "dogs love walks"]
    assert written["seconds_per_query"] > 0 and "load_seconds" in written
    first = written["queries"][1]["results"][0]
    assert set(first) == {"score", "source", "offset", "text"} and first["source"].endswith("dogs.md")


def test_a_changed_source_is_reported(docs, tmp_path, capsys):
    run("index", str(docs), "--out", str(tmp_path / "i"))
    capsys.readouterr()
    run("search", "--index", str(tmp_path / "i"), "cats", "--k", "1")
    assert "changed" not in capsys.readouterr().err
    (docs / "dogs.md").write_text("Dogs have changed.", encoding="utf-8")
    run("search", "--index", str(tmp_path / "i"), "cats", "--k", "1")
    assert "1 source file(s) changed" in capsys.readouterr().err


def one_sentence(error: UserError) -> str:
    text = str(error)
    assert "\n" not in text and text.count(". ") == 0, text
    return text


def test_bad_input_is_one_clear_sentence(docs, tmp_path):
    (tmp_path / "empty.txt").write_text(" -- ... \n", encoding="utf-8")
    with pytest.raises(UserError, match="no words to index") as e:
        run("index", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "x"))
    one_sentence(e.value)
    index = tmp_path / "i"
    run("index", str(docs), "--out", str(index))
    for argv, message in [(("search", "--index", str(index), "?!"), "has no words"),
                          (("search", "--index", str(index), "cats", "--k", "1000"), "more than the"),
                          (("search", "--index", str(tmp_path / "none"), "cats"), "is not a folder"),
                          (("index", str(docs), "--out", str(index)), "already holds an index"),
                          (("index", str(docs), "--out", str(tmp_path / "y"), "--b", "1.5"),
                           "not a number from 0 to 1"),
                          (("search", "--index", str(index), "cats", "--k", "1", "--json", str(index / "meta.json")),
                           "already exists; add --force")]:
        with pytest.raises(UserError, match=message) as e:
            run(*argv)
        one_sentence(e.value)
    meta = json.loads((index / "meta.json").read_text(encoding="utf-8"))
    (index / "meta.json").write_text(json.dumps({**meta, "version": 99}), encoding="utf-8")
    with pytest.raises(UserError, match="format version 99"):
        run("search", "--index", str(index), "cats")
    (index / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    tf = np.load(index / "posting_tf.npy")
    np.save(index / "posting_tf.npy", tf + 1)  # readable, but no longer adds up
    with pytest.raises(UserError, match="damaged .the postings do not add up"):
        run("search", "--index", str(index), "cats")
    (index / "chunk_bytes.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(UserError, match="chunk_bytes.npy cannot be read"):
        run("search", "--index", str(index), "cats")


def tiny_model(path: Path) -> Path:
    model = GPT(PRESETS["tiny"])
    save_checkpoint(path, model.eval(), model_type="gpt2", tokenizer="gpt2", template="alpaca")
    return path


def test_ask_drops_the_lowest_ranked_chunks_to_fit_and_names_its_sources(docs, tmp_path, capsys):
    run("index", str(docs), "--out", str(tmp_path / "i"), "--chunk", "8", "--overlap", "0")
    ckpt = tiny_model(tmp_path / "m.pt")
    result = run("ask", "--index", str(tmp_path / "i"), "--init", str(ckpt), "--k", "5", "--max-new-tokens", "8",
                 "--device", "cpu", "Do cats sleep or purr?")
    captured = capsys.readouterr()
    assert result["prompt_tokens"] + 8 <= PRESETS["tiny"].block_size  # the tiny model's context is 64 tokens
    assert result["dropped"] >= 1 and "dropped the" in captured.err
    assert all(s["source"].endswith("cats.txt") for s in result["sources"])
    assert "sources:" in captured.out if result["sources"] else "sources:" not in captured.out
    without = run("ask", "--index", str(tmp_path / "i"), "--init", str(ckpt), "--no-retrieval", "--max-new-tokens",
                  "8", "--device", "cpu", "Do cats sleep or purr?")
    assert without["sources"] == [] and without["prompt_tokens"] < 64


def test_retrieval_prompt_names_its_sources():
    instruction, sources = rag.grounded_prompt("Why?", [{"source": "a.txt", "offset": 7, "text": "Because."}])
    assert "[1] a.txt, character 7:\nBecause." in sources and "[1]" in instruction
    assert rag.grounded_prompt("Why?", []) == ("Why?", "")


def test_compare_never_shows_a_test_item(tmp_path):
    """Only the training split is indexed, and neither kind of example is ever the item itself, even when
    the training split holds a copy of it."""
    entries = [{"instruction": f"Name a colour number {i}.", "input": "", "output": f"Colour {i}."} for i in range(40)]
    entries[0] = dict(entries[37])  # a test item (index 34..37) duplicated into the training split
    splits = split_entries(entries)
    assert entries[37] in splits["test"] and entries[0] in splits["train"]
    bm25 = rag.build_bm25([rag.entry_words(e) for e in splits["train"]])
    assert len(bm25) == len(splits["train"])
    rng = random.Random(0)
    for item in splits["test"]:
        for shots in (rag.retrieved_shots(bm25, splits["train"], item, 3),
                      rag.random_shots(splits["train"], item, 3, rng)):
            assert len(shots) == 3
            assert all(not rag.same_item(s, item) for s in shots)
            assert all(s in splits["train"] for s in shots)


@pytest.mark.needs_files("instruct/instruction-data.json", "gpt2/encoder.json", "gpt2/vocab.bpe")
def test_compare_on_a_tiny_model_writes_every_row(tmp_path):
    ckpt = tiny_model(tmp_path / "ft.pt")
    result = run("compare", "--init", "random", "--preset", "tiny", "--finetuned", str(ckpt), "--limit", "10",
                 "--max-new-tokens", "4", "--device", "cpu", "--json", str(tmp_path / "c.json"))
    rows = json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))["rows"]
    assert [r["name"] for r in rows] == ["base zero-shot", "base 3 random examples", "base 3 BM25 examples",
                                         "finetuned zero-shot", "finetuned 3 BM25 examples"]
    for row in rows:
        assert {"rouge_l", "exact_match", "prompt_tokens_per_answer", "seconds_per_answer"} <= set(row)
        assert 0 <= row["rouge_l"] <= 1 and row["seconds_per_answer"] > 0
    assert result["items"] == 10
    # examples make prompts longer (within the tiny model's 64-token context, after the cut)
    assert rows[1]["prompt_tokens_per_answer"] >= rows[0]["prompt_tokens_per_answer"]


@pytest.mark.needs_files("instruct/instruction-data.json")
def test_compare_indexes_only_the_935_training_entries():
    from data import default_data
    splits = split_entries(load_entries(default_data()))
    bm25 = rag.build_bm25([rag.entry_words(e) for e in splits["train"]])
    assert len(bm25) == 935  # chunk i is training entry i, and nothing else
    assert bm25.chunk_length.tolist() == [len(rag.entry_words(e)) for e in splits["train"]]
    for item in splits["test"][:20]:
        for shot in rag.retrieved_shots(bm25, splits["train"], item, 3):
            assert not rag.same_item(shot, item)
            assert shot in splits["train"]


def test_the_script_runs_and_ends_a_mistake_in_one_line(docs, tmp_path):
    import subprocess
    import sys
    script = str(Path(rag.__file__))
    done = subprocess.run([sys.executable, script, "index", str(docs), "--out", str(tmp_path / "i")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "indexed 3 file(s)" in done.stdout, done.stderr
    done = subprocess.run([sys.executable, script, "search", "--index", str(tmp_path / "i"), "dogs bark", "--k", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "dogs.md" in done.stdout, done.stderr
    bad = subprocess.run([sys.executable, script, "search", "--index", str(tmp_path / "i"), "dogs", "--k", "0"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1, bad.stderr
