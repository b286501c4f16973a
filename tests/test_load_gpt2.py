"""load_gpt2.py: our safetensors reader and writer, the Hub <-> ours mapping, load_model, export.

The reference is tests/fixtures/hf_tiny_gpt2, a random GPT2LMHeadModel saved by transformers with its
logits and greedy tokens (made by tests/fixtures/make_hf_fixture.py): our loader must reproduce them.
"""
import argparse
import json
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_in_process

import load_gpt2
from common import UserError
import download
from load_gpt2 import export_hf, load_model, load_pretrained
from safetensors_file import SafetensorsError, SafetensorsFile, write_safetensors
from model import GPTConfig, get_config, save_checkpoint


REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "hf_tiny_gpt2"
REFERENCE = np.load(FIXTURE / "reference.npz")
FIXTURE_CONFIG = GPTConfig(vocab_size=1000, block_size=64, n_layer=2, n_head=2, n_embd=32)


def load(name_or_path, dtype: torch.dtype = torch.float32):
    """Hub-layout weights as our GPT, without the card."""
    return load_pretrained(name_or_path, dtype=dtype)[0]


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, memory-mapped, in file order."""
    file = SafetensorsFile(path)
    return {name: file.tensor(name) for name in file.names()}


@torch.no_grad()
def logits_of(model, ids: np.ndarray) -> np.ndarray:
    return model(torch.from_numpy(ids))[0].float().numpy()  # (B, T, V)


def header_of(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def write_raw(path: Path, header: dict | bytes, data: bytes = b"", header_length: int | None = None) -> Path:
    """A safetensors file from parts, lies included."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_length is None else header_length) + raw + data)
    return path


# --- against transformers ---------------------------------------------------------------------------

def test_logits_match_transformers():
    model = load(FIXTURE)
    diff = np.abs(logits_of(model, REFERENCE["input_ids"]) - REFERENCE["logits"]).max()
    assert diff <= 1e-5, f"max abs logit difference {diff:.2e}"


@torch.no_grad()
def test_greedy_tokens_match_transformers():
    model = load(FIXTURE).eval()
    greedy = REFERENCE["greedy"]
    ids = torch.from_numpy(greedy[:, :int(REFERENCE["prompt_length"])])
    while ids.size(1) < greedy.shape[1]:
        next_id = model(ids)[0][:, -1].argmax(-1, keepdim=True)  # (1, 1)
        ids = torch.cat([ids, next_id], dim=1)
    assert ids.tolist() == greedy.tolist()


def test_loaded_model_is_tied_and_real():
    model = load(FIXTURE)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert model.config == FIXTURE_CONFIG


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loads_in_lower_precision(dtype):
    model = load(FIXTURE, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    full = load(FIXTURE)
    for (name, p), q in zip(model.named_parameters(), full.parameters()):
        assert torch.equal(p, q.to(dtype)), name


def test_hub_original_layout(tmp_path):
    """openai-community/gpt2's file: no 'transformer.' prefix, attn.bias mask buffers, maybe lm_head."""
    tensors = {}
    for name, t in read_safetensors(FIXTURE / "model.safetensors").items():
        name = name.removeprefix("transformer.")
        tensors[name] = t
        if name.endswith("attn.c_attn.bias"):
            tensors[name.replace("c_attn.bias", "bias")] = torch.ones(64, 64).tril().view(1, 1, 64, 64)
            tensors[name.replace("c_attn.bias", "masked_bias")] = torch.tensor(-1e4)
    tensors["lm_head.weight"] = tensors["wte.weight"]
    write_safetensors(tensors, tmp_path / "model.safetensors")
    shutil.copy(FIXTURE / "config.json", tmp_path / "config.json")
    model = load(tmp_path / "model.safetensors")
    assert np.array_equal(logits_of(model, REFERENCE["input_ids"]), logits_of(load(FIXTURE), REFERENCE["input_ids"]))


# --- export -----------------------------------------------------------------------------------------

def test_export_round_trip(tmp_path):
    model = load(FIXTURE)
    export_hf(model, tmp_path)
    again = load(tmp_path)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert np.array_equal(logits_of(again, REFERENCE["input_ids"]), logits_of(model, REFERENCE["input_ids"]))


def test_export_has_save_pretrained_layout(tmp_path):
    export_hf(load(FIXTURE), tmp_path)
    ours, theirs = header_of(tmp_path / "model.safetensors"), header_of(FIXTURE / "model.safetensors")
    assert {k: (v["dtype"], v["shape"]) for k, v in ours.items() if k != "__metadata__"} == \
           {k: (v["dtype"], v["shape"]) for k, v in theirs.items() if k != "__metadata__"}
    assert ours["__metadata__"] == {"format": "pt"}  # transformers refuses safetensors files without it
    config, reference = json.loads((tmp_path / "config.json").read_text()), json.loads((FIXTURE / "config.json").read_text())
    for key in ("model_type", "architectures", "vocab_size", "n_positions", "n_embd", "n_layer", "n_head",
                "n_inner", "activation_function", "layer_norm_epsilon", "tie_word_embeddings", "scale_attn_weights"):
        assert config[key] == reference[key], key
    # and the exported bytes are the fixture's bytes
    mine, original = read_safetensors(tmp_path / "model.safetensors"), read_safetensors(FIXTURE / "model.safetensors")
    assert all(torch.equal(mine[k], original[k]) for k in original)


def test_export_bfloat16_keeps_bits(tmp_path):
    model = load(FIXTURE, dtype=torch.bfloat16)
    export_hf(model, tmp_path)
    assert {v["dtype"] for k, v in header_of(tmp_path / "model.safetensors").items() if k != "__metadata__"} == {"BF16"}
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = load(tmp_path, dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_export_refuses_a_classifier(tmp_path):
    classifier = load_gpt2.GPT(get_config("tiny", num_classes=2))
    with pytest.raises(UserError, match="classifier"):
        export_hf(classifier, tmp_path)


# --- load_model and user mistakes ---------------------------------------------------------------------

def test_load_model_random_needs_a_known_preset():
    with pytest.raises(UserError, match="preset"):
        load_model("random")
    with pytest.raises(UserError, match="tiny"):
        load_model("random", preset="huge")
    model, extra = load_model("random", preset="tiny", dtype=torch.bfloat16)
    assert extra == {"model_type": "gpt2", "tokenizer": "gpt2"} and model.config == get_config("tiny")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_load_model_reads_our_checkpoint(tmp_path):
    model = load_gpt2.GPT(get_config("tiny"))
    save_checkpoint(tmp_path / "ckpt.pt", model, step=7, model_type="gpt2", tokenizer="gpt2")
    loaded, card = load_model(str(tmp_path / "ckpt.pt"))
    assert card == {"step": 7, "model_type": "gpt2", "tokenizer": "gpt2"}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_a_checkpoint_without_a_card_is_refused_with_what_to_do(tmp_path):
    """No stage could tell which tokenizer such a model needs; guessing GPT-2's was a shim for old files."""
    save_checkpoint(tmp_path / "old.pt", load_gpt2.GPT(get_config("tiny")), step=7)
    with pytest.raises(UserError, match=r"old.pt has no model card \(model_type and tokenizer\).*save it again"):
        load_model(str(tmp_path / "old.pt"))


def test_load_model_bad_checkpoint_is_a_user_error(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04" + b"\0" * 100)  # a zip header, then nothing
    with pytest.raises(UserError, match="bad.pt"):
        load_model(str(tmp_path / "bad.pt"))


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(UserError, match="gpt2, gpt2-medium, gpt2-large, gpt2-xl"):
        load_model("gpt-3")


def test_folder_without_weights(tmp_path):
    with pytest.raises(UserError, match="no model.safetensors"):
        load(tmp_path)


def test_file_without_config_needs_a_gpt2_size(tmp_path, monkeypatch):
    shutil.copy(FIXTURE / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(UserError, match="config.json"):
        load(tmp_path / "model.safetensors")
    # a file of a GPT-2 size is recognised by its shapes (here the fixture's size plays gpt2)
    monkeypatch.setitem(load_gpt2.PRESETS, "gpt2", FIXTURE_CONFIG)
    assert load(tmp_path / "model.safetensors").config == FIXTURE_CONFIG


def fixture_tensors() -> dict[str, torch.Tensor]:
    return dict(read_safetensors(FIXTURE / "model.safetensors"))


def load_tensors(tmp_path: Path, tensors: dict[str, torch.Tensor]):
    write_safetensors(tensors, tmp_path / "model.safetensors")
    shutil.copy(FIXTURE / "config.json", tmp_path / "config.json")
    return load(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    tensors = fixture_tensors()
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(UserError, match=r"1 missing \(transformer.h.1.mlp.c_fc.bias\)"):
        load_tensors(tmp_path, tensors)


def test_unexpected_tensor_is_named(tmp_path):
    tensors = fixture_tensors()
    tensors["transformer.h.2.ln_1.weight"] = torch.ones(32)
    with pytest.raises(UserError, match=r"1 unexpected \(transformer.h.2.ln_1.weight\)"):
        load_tensors(tmp_path, tensors)


def test_wrong_shape_is_named(tmp_path):
    tensors = fixture_tensors()
    tensors["transformer.h.0.attn.c_attn.weight"] = tensors["transformer.h.0.attn.c_attn.weight"].t().contiguous()
    with pytest.raises(UserError, match=r"transformer.h.0.attn.c_attn.weight .* has shape \[96, 32\].* needs \[32, 96\]"):
        load_tensors(tmp_path, tensors)


def test_untied_head_is_refused(tmp_path):
    tensors = fixture_tensors()
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1
    with pytest.raises(UserError, match="lm_head.weight"):
        load_tensors(tmp_path, tensors)


@pytest.mark.parametrize("change, message", [
    ({"activation_function": "relu"}, "activation_function"),
    ({"n_inner": 64}, "n_inner"),
    ({"model_type": "bert"}, "type 'bert', which model.py does not implement"),
    ({"n_head": "two"}, "n_head"),
])
def test_unsupported_config_is_refused(tmp_path, change, message):
    shutil.copy(FIXTURE / "model.safetensors", tmp_path / "model.safetensors")
    config = json.loads((FIXTURE / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UserError, match=message):
        load(tmp_path)


def test_a_model_folder_missing_its_config_and_weights_names_both(tmp_path):
    with pytest.raises(UserError, match=r"has no model.safetensors \(nor .*\), and no config.json; put the model's"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"has no model.safetensors \(nor .*\); put the model's") as error:
        load_model(str(tmp_path))
    assert "config.json" not in str(error.value)


def test_a_config_that_does_not_fit_its_weights_is_refused_within_a_second(tmp_path):
    """n_layer 100,000 of width 8,192 beside a 2-layer file: checked against the headers before any
    module is built (building them first took minutes and gigabytes)."""
    shutil.copy(FIXTURE / "model.safetensors", tmp_path / "model.safetensors")
    config = json.loads((FIXTURE / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_layer": 100_000, "n_embd": 8192}))
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"does not fit its weights \(n_layer is 100000, but the weights hold 2 "
                                        r"layers; vocab_size x n_embd is 1000 x 8192, but transformer.wte.weight "
                                        r"is 1000 x 32\)"):
        load_model(str(tmp_path))
    assert time.perf_counter() - start < 1.0


# --- downloads (the network is replaced; tokenizer.download is tested with the tokenizer) ------------

def test_gpt2_name_downloads_pinned_files(monkeypatch):
    calls = []

    def fake_download(url, relpath, *, sha256=None, size=None, cache=None):
        calls.append((url, relpath, sha256, size))
        return FIXTURE / Path(relpath).name

    monkeypatch.setattr(download, "download", fake_download)
    monkeypatch.setattr(load_gpt2, "hub_file_info", lambda repo, filename: pytest.fail("pinned files need no API"))
    assert load("gpt2").config == FIXTURE_CONFIG
    assert calls == [
        ("https://huggingface.co/openai-community/gpt2/resolve/main/config.json",
         "hf/openai-community/gpt2/config.json", load_gpt2.HUB_PINNED["openai-community/gpt2", "config.json"][1], 665),
        ("https://huggingface.co/openai-community/gpt2/resolve/main/model.safetensors",
         "hf/openai-community/gpt2/model.safetensors",
         "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707", 548105171),
    ]


def test_other_sizes_verify_against_the_hub_listing(monkeypatch):
    listing = [{"type": "file", "path": "config.json", "size": 718, "oid": "abc"},
               {"type": "file", "path": "model.safetensors", "size": 135,
                "lfs": {"oid": "f" * 64, "size": 1519, "pointerSize": 135}}]

    class Response:
        def raise_for_status(self):
            pass

        def json(self):
            return listing

    monkeypatch.setattr(download.requests, "get", lambda url, timeout, headers: Response())
    assert load_gpt2.hub_file_info("openai-community/gpt2-medium", "model.safetensors") == (1519, "f" * 64)
    assert load_gpt2.hub_file_info("openai-community/gpt2-medium", "config.json") == (718, None)
    with pytest.raises(UserError, match="tokenizer.json"):
        load_gpt2.hub_file_info("openai-community/gpt2-medium", "tokenizer.json")


# --- safetensors reader and writer ---------------------------------------------------------------------

def test_safetensors_round_trip_all_dtypes(tmp_path):
    tensors = {
        "f32": torch.randn(3, 5), "f16": torch.randn(7).half(), "bf16": torch.randn(2, 2, 3).bfloat16(),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "transposed": torch.randn(4, 6).t(),
    }
    write_safetensors(tensors, tmp_path / "t.safetensors", metadata={"note": "hi"})
    back = read_safetensors(tmp_path / "t.safetensors")
    assert list(back) == list(tensors)  # file order is write order
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    assert SafetensorsFile(tmp_path / "t.safetensors").metadata == {"note": "hi"}
    assert (8 + struct.unpack("<Q", (tmp_path / "t.safetensors").read_bytes()[:8])[0]) % 8 == 0


def test_reader_is_copy_on_write(tmp_path):
    write_safetensors({"x": torch.zeros(4)}, tmp_path / "t.safetensors")
    read_safetensors(tmp_path / "t.safetensors")["x"].add_(1)
    assert torch.equal(read_safetensors(tmp_path / "t.safetensors")["x"], torch.zeros(4))


def test_unaligned_offsets_still_read(tmp_path):
    data = b"\0" + np.arange(3, dtype="<f4").tobytes()
    header = {"pad": {"dtype": "F16", "shape": [0], "data_offsets": [0, 0]},
              "x": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]}}
    assert read_safetensors(write_raw(tmp_path / "t.safetensors", header, data))["x"].tolist() == [0.0, 1.0, 2.0]


GOOD = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header, data, message", [
    ({"x": {**GOOD, "data_offsets": [0, 16]}}, bytes(8), "outside"),
    ({"x": {**GOOD, "data_offsets": [8, 0]}}, bytes(8), "outside"),
    ({"x": {**GOOD, "data_offsets": [-8, 0]}}, bytes(8), "non-negative"),
    ({"x": {**GOOD, "data_offsets": [0]}}, bytes(8), "two data_offsets"),
    ({"x": GOOD, "y": {**GOOD, "data_offsets": [4, 12]}}, bytes(12), "overlap"),
    ({"x": {**GOOD, "shape": [3]}}, bytes(8), "needs 12 bytes"),
    ({"x": {**GOOD, "shape": [2, 2**62]}}, bytes(8), "impossible shape|needs"),
    ({"x": {**GOOD, "shape": [0, 2**62, 2**62]}}, bytes(8), "impossible shape"),
    ({"x": {**GOOD, "shape": [True, 2]}}, bytes(8), "non-negative"),
    ({"x": {**GOOD, "shape": [2.0]}}, bytes(8), "non-negative"),
    ({"x": {**GOOD, "shape": "2"}}, bytes(8), "shape list"),
    ({"x": {**GOOD, "dtype": "F16"}}, bytes(8), "needs 4 bytes"),
    ({"x": {**GOOD, "dtype": "F64"}}, bytes(8), "only F32, F16, BF16"),
    ({"x": {**GOOD, "dtype": "I64"}}, bytes(8), "only F32, F16, BF16"),
    ({"x": {"dtype": "F32", "shape": [2]}}, bytes(8), "exactly dtype"),
    ({"x": {**GOOD, "extra": 1}}, bytes(8), "exactly dtype"),
    ({"x": [GOOD]}, bytes(8), "exactly dtype"),
    ({"__metadata__": {"format": 1}, "x": GOOD}, bytes(8), "__metadata__"),
    ([GOOD], bytes(8), "a JSON list, not an object"),
    (b"\xff\xfe{}", b"", "not UTF-8 JSON"),
    (b"{\"x\": ", b"", "not UTF-8 JSON"),
    (b"[" * 100_000 + b"]" * 100_000, b"", "nests too deeply|not UTF-8 JSON"),
    (b"{\"x\": {\"dtype\": \"F32\", \"shape\": [" + b"9" * 5000 + b"]}}", b"", "not UTF-8 JSON"),
])
def test_lying_headers_are_refused(tmp_path, header, data, message):
    path = write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(SafetensorsError, match=message) as error:
        read_safetensors(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("declared", [2**64 - 1, 2**40, 200_000_000, 11])
def test_huge_declared_header_length(tmp_path, declared):
    path = write_raw(tmp_path / "bad.safetensors", b"{}  ", header_length=declared)  # 12 bytes in all
    with pytest.raises(SafetensorsError, match=f"declares a {declared}-byte header"):
        read_safetensors(path)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(SafetensorsError, match="cannot read"):
        read_safetensors(tmp_path / "nothing.safetensors")


def test_truncated_files_are_refused(tmp_path):
    data = (FIXTURE / "model.safetensors").read_bytes()
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    rng = np.random.default_rng(0)
    cuts = set(range(0, 16)) | set(rng.integers(16, header_end, 150).tolist()) | \
        set(rng.integers(header_end, len(data), 50).tolist()) | {header_end, len(data) - 1}
    path = tmp_path / "cut.safetensors"
    for cut in sorted(cuts):
        path.write_bytes(data[:cut])
        with pytest.raises(SafetensorsError, match="cut.safetensors"):
            read_safetensors(path)


def test_header_bit_flips_never_crash(tmp_path):
    """A flipped bit either still parses (a changed name or digit can be valid) or is our error;
    loading the result is then a model or a UserError, never a crash."""
    data = bytearray((FIXTURE / "model.safetensors").read_bytes())
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    shutil.copy(FIXTURE / "config.json", tmp_path / "config.json")
    path = tmp_path / "model.safetensors"
    rng = np.random.default_rng(1)
    outcomes = {"refused": 0, "parsed": 0}
    for _ in range(300):
        flipped = bytearray(data)
        position = int(rng.integers(0, header_end))
        flipped[position] ^= 1 << int(rng.integers(0, 8))
        path.write_bytes(flipped)
        try:
            tensors = read_safetensors(path)
        except SafetensorsError:
            outcomes["refused"] += 1
            continue
        outcomes["parsed"] += 1
        for t in tensors.values():
            t.float().sum()  # every tensor it describes can be read
        try:
            load(tmp_path)
        except UserError:
            pass
    assert outcomes["refused"] > 100, outcomes


# --- command line --------------------------------------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "load_gpt2.py"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_main_exports_a_checkpoint(tmp_path):
    model = load_gpt2.GPT(get_config("tiny"))
    save_checkpoint(tmp_path / "ckpt.pt", model, model_type="gpt2", tokenizer="gpt2")
    args = load_gpt2.parse_args(["--export", str(tmp_path / "hf"), "--init", str(tmp_path / "ckpt.pt"), "--device", "cpu"])
    result = load_gpt2.main(args)
    assert result["params"] == model.num_params() and result["export"] == str(tmp_path / "hf")
    again = load(tmp_path / "hf")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_cli_shows_next_tokens_from_a_local_folder(tmp_path):
    export_hf(load_gpt2.GPT(get_config("tiny")), tmp_path)
    result = run_cli("--init", str(tmp_path), "--prompt", "Hello", "--top", "3", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "3,320,640 parameters" in result.stdout and "after 'Hello' the model expects:" in result.stdout
    assert result.stdout.count("%") == 3


def test_cli_user_error_is_one_line(tmp_path):
    result = run_cli("--init", str(tmp_path / "nowhere"))
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


# --- Hub repos of every family (the network is replaced by the fixtures) --------------------------------

FAMILY_FIXTURE = REPO / "tests" / "fixtures" / "hf_tiny_mistral"  # 3 shards and an index


def fake_hub(monkeypatch, tmp_path, repo_files: dict[str, Path], status: int = 200):
    """The Hub's listing API and file downloads served from local files; returns the calls made."""
    calls = {"listing": [], "download": []}

    class Response:
        status_code = status

        def raise_for_status(self):
            if status != 200:
                error = download.requests.HTTPError(f"{status}")
                error.response = self
                raise error

        def json(self):
            return [{"type": "file", "path": name, "size": path.stat().st_size,
                     **({"lfs": {"oid": "a" * 64, "size": path.stat().st_size}}
                        if name.endswith(".safetensors") else {})}
                    for name, path in repo_files.items()]

    def fake_get(url, timeout, headers):
        calls["listing"].append((url, headers))
        return Response()

    def fake_download(url, relpath, *, sha256=None, size=None, cache=None, headers=None):
        name = Path(relpath).name
        calls["download"].append((name, sha256, size, headers))
        dest = load_gpt2.cache_dir() / relpath
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(repo_files[name], dest)
        return dest

    monkeypatch.setattr(download.requests, "get", fake_get)
    monkeypatch.setattr(download, "download", fake_download)
    return calls


def test_hub_repo_downloads_config_tokenizer_index_and_shards_once(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    (tmp_path / "tokenizer.json").write_text("{}")
    files = {p.name: p for p in FAMILY_FIXTURE.iterdir() if p.name != "reference.npz"}
    files["tokenizer.json"] = tmp_path / "tokenizer.json"
    calls = fake_hub(monkeypatch, tmp_path, files)
    model, card = load_model("acme/tiny-mistral")
    assert card == {"model_type": "mistral", "tokenizer": "hf/acme/tiny-mistral"}
    assert calls["listing"] == [("https://huggingface.co/api/models/acme/tiny-mistral/tree/main",
                                 {"Authorization": "Bearer hf_secret"})]
    order = [name for name, *_ in calls["download"]]
    assert order[:3] == ["config.json", "tokenizer.json", "model.safetensors.index.json"]
    assert sorted(order[3:]) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    shard = next(c for c in calls["download"] if c[0].endswith(".safetensors"))
    assert shard[1] == "a" * 64 and shard[2] == files[shard[0]].stat().st_size  # verified by the Hub's sha256 and size
    assert all(c[3] == {"Authorization": "Bearer hf_secret"} for c in calls["download"])  # gated repos need the token
    reference = np.load(FAMILY_FIXTURE / "reference.npz")
    assert np.abs(logits_of(model, reference["input_ids"]) - reference["logits"]).max() < 1e-4
    # a second load reads the cache and never asks the Hub
    monkeypatch.setattr(download.requests, "get", lambda *a, **k: pytest.fail("the Hub was asked again"))
    monkeypatch.setattr(download, "download", lambda *a, **k: pytest.fail("downloaded again"))
    assert load_model("acme/tiny-mistral")[1] == card


@pytest.mark.parametrize("status, token, message", [
    (401, None, r"HTTP 401; no \$HF_TOKEN is set\): accept its licence on https://huggingface.co/meta-llama/x "
                "and set HF_TOKEN"),
    (403, "hf_bad", r"HTTP 403; the token in \$HF_TOKEN was refused"),
    (404, None, "has no model repo meta-llama/x"),
])
def test_hub_refusals_say_what_to_do(monkeypatch, tmp_path, status, token, message):
    monkeypatch.setenv("LLM_CACHE_DIR", str(tmp_path))
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    else:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    fake_hub(monkeypatch, tmp_path, {}, status=status)
    with pytest.raises(UserError, match=message) as error:
        load_model("meta-llama/x")
    assert "\n" not in str(error.value)


def test_offline_a_hub_repo_says_where_its_files_go(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM_CACHE_DIR", str(tmp_path))

    def offline(*args, **kwargs):
        raise download.requests.ConnectionError("no network")
    monkeypatch.setattr(download.requests, "get", offline)
    with pytest.raises(UserError, match=f"or put the repo's files into {tmp_path / 'hf/acme/tiny'}$"):
        load_model("acme/tiny")


def test_an_unsupported_hub_family_stops_before_the_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    calls = fake_hub(monkeypatch, tmp_path, {"config.json": tmp_path / "config.json",
                                             "model.safetensors": FIXTURE / "model.safetensors"})
    with pytest.raises(UserError, match="type 'mamba'"):
        load_model("state-spaces/mamba")
    assert [name for name, *_ in calls["download"]] == ["config.json"]


def test_a_missing_local_path_is_not_taken_for_a_repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(download.requests, "get", lambda *a, **k: pytest.fail("asked the Hub"))
    for name in ("out/model", "nowhere/model.safetensors"):
        with pytest.raises(UserError, match="neither a GPT-2 name"):
            load_model(name)
    with pytest.raises(UserError, match=r"checkpoint out/ckpt.pt does not exist \(python pretrain.py writes it"):
        load_model("out/ckpt.pt")
    with pytest.raises(UserError, match=r"out/mine.pt does not exist \(the stages write theirs as best.pt \(pretrain.py\)"):
        load_model("out/mine.pt")
    assert load_gpt2.is_hub_repo("mistralai/Mistral-7B-v0.1") and not load_gpt2.is_hub_repo("a/b/c")


# --- the model card and the model's tokenizer -----------------------------------------------------------

def test_every_preset_has_a_card():
    assert set(load_gpt2.PRESET_CARDS) == set(load_gpt2.PRESETS)
    for preset, (model_type, _) in load_gpt2.PRESET_CARDS.items():
        model = load_gpt2.meta_model(get_config(preset))
        assert not load_gpt2.export_problems(model.config, model_type), preset  # the card's family fits


@pytest.mark.parametrize("preset, card", [
    ("tiny", {"model_type": "gpt2", "tokenizer": "gpt2"}),
    ("mistral-tiny", {"model_type": "mistral", "tokenizer": "hf/mistralai/Mistral-7B-v0.1/tokenizer.model"}),
    ("llama-tiny", {"model_type": "llama", "tokenizer": "hf/mistralai/Mistral-7B-v0.1/tokenizer.model"}),
    ("phi-3-tiny", {"model_type": "phi3", "tokenizer": "hf/mistralai/Mistral-7B-v0.1/tokenizer.model"}),
    ("phi-2-tiny", {"model_type": "phi", "tokenizer": "gpt2"}),
])
def test_random_presets_carry_their_card(preset, card):
    assert load_model("random", preset=preset)[1] == card


def test_real_presets_read_their_hub_repos_tokenizer():
    assert {p: load_gpt2.PRESET_CARDS[p][1] for p in ("mistral-7b", "phi-2", "phi-3-mini", "llama-3.2-1b")} == {
        "mistral-7b": "hf/mistralai/Mistral-7B-v0.1", "phi-2": "hf/microsoft/phi-2",
        "phi-3-mini": "hf/microsoft/Phi-3-mini-4k-instruct", "llama-3.2-1b": "hf/meta-llama/Llama-3.2-1B"}


@pytest.mark.needs_files("hf/mistralai/Mistral-7B-v0.1/tokenizer.model")
def test_tiny_presets_tokenizer_is_mistrals_cached_file():
    card = load_model("random", preset="mistral-tiny")[1]
    path = load_gpt2.tokenizer_path(card["tokenizer"])
    assert path == load_gpt2.cache_dir() / "hf/mistralai/Mistral-7B-v0.1/tokenizer.model" and path.is_file()
    tokenizer = load_gpt2.tokenizer_for(card)
    assert tokenizer.n_vocab == 32000 and tokenizer.bos_id == 1 and tokenizer.eos_id == 2


def test_gpt2_card_gives_gpt2s_tokenizer():
    assert load_gpt2.tokenizer_for({"model_type": "phi", "tokenizer": "gpt2"}).n_vocab == 50257


def test_folder_cards_name_the_folders_own_tokenizer(tmp_path):
    shutil.copytree(REPO / "tests" / "fixtures" / "hf_tiny_phi3", tmp_path / "phi3")
    assert load_model(str(tmp_path / "phi3"))[1]["tokenizer"] == str((tmp_path / "phi3").resolve())
    with pytest.raises(UserError, match="holds no tokenizer"):  # the fixture has no tokenizer files
        load_gpt2.tokenizer_for(load_model(str(tmp_path / "phi3"))[1])
    (tmp_path / "phi3" / "tokenizer.json").write_text("{}")
    assert load_gpt2.tokenizer_path(str(tmp_path / "phi3")) == tmp_path / "phi3"
    # a folder whose BPE files are GPT-2's own has GPT-2's tokenizer, whatever its family
    shutil.copytree(REPO / "tests" / "fixtures" / "hf_tiny_phi", tmp_path / "phi")
    assert load_model(str(tmp_path / "phi"))[1]["tokenizer"] == str((tmp_path / "phi").resolve())
    shutil.copy(load_gpt2.cache_dir() / "gpt2/encoder.json", tmp_path / "phi" / "vocab.json")
    shutil.copy(load_gpt2.cache_dir() / "gpt2/vocab.bpe", tmp_path / "phi" / "merges.txt")
    assert load_model(str(tmp_path / "phi"))[1]["tokenizer"] == "gpt2"


# --- files that are not what they claim (issue 14) --------------------------------------------------------

def test_zero_byte_checkpoint_is_one_sentence(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(UserError, match=r"empty.pt is empty \(0 bytes\)"):
        load_model(str(tmp_path / "empty.pt"))


def test_random_bytes_are_not_called_a_safetensors_file(tmp_path):
    (tmp_path / "junk.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(UserError, match="neither a checkpoint of this project") as error:
        load_model(str(tmp_path / "junk.pt"))
    assert "safetensors file:" not in str(error.value) and "not a valid safetensors" not in str(error.value)


def test_a_pickle_of_objects_never_repeats_torchs_advice(tmp_path):
    torch.save({"config": {}, "model": argparse.Namespace(lr=1.0)}, tmp_path / "objects.pt")  # not plain data
    with pytest.raises(UserError, match="Python objects other than tensors") as error:
        load_model(str(tmp_path / "objects.pt"))
    assert "weights_only" not in str(error.value) and "\n" not in str(error.value)


def test_a_safetensors_file_as_a_checkpoint_never_says_pip_install(tmp_path):
    from model import load_checkpoint
    write_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="is a safetensors file") as error:
        load_checkpoint(tmp_path / "w.safetensors")
    assert "pip" not in str(error.value)


def test_cli_export_needs_force_to_replace_a_model(tmp_path, capsys):
    """The script's own entry point in this process (test_cli_errors.py runs the command line in fresh ones)."""
    args = ["--init", "random", "--preset", "phi-2-tiny", "--device", "cpu", "--export", str(tmp_path / "hf")]
    assert run_in_process("load_gpt2.py", args, capsys)[0] == 0
    before = (tmp_path / "hf" / "model.safetensors").read_bytes()
    code, _, stderr = run_in_process("load_gpt2.py", args, capsys)
    assert code == 1 and stderr.startswith("error: ") and "already holds a model" in stderr and "--force" in stderr
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == before
    assert run_in_process("load_gpt2.py", [*args, "--force"], capsys)[0] == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["PhiForCausalLM"]


# ---- every family's export, as transformers read it ------------------------------------------------

EXPORTS = json.loads((Path(__file__).resolve().parent / "fixtures" / "exports_in_transformers.json").read_text())


@pytest.mark.parametrize("family", sorted(EXPORTS["families"]))
def test_every_familys_export_is_what_transformers_loaded_with_our_logits(family, tmp_path):
    """tests/fixtures/make_export_fixture.py exported each family's tiny fixture with export_hf and loaded
    it with transformers' AutoModelForCausalLM. Today's export must write the same config.json, and
    our model the logits transformers computed from it: then transformers still reads the export."""
    reference = EXPORTS["families"][family]
    model, card = load_model(str(Path(__file__).resolve().parent / "fixtures" / f"hf_tiny_{family}"))
    export_hf(model, tmp_path / family, card)
    assert json.loads((tmp_path / family / "config.json").read_text()) == reference["config"]
    again, _ = load_model(str(tmp_path / family))
    with torch.no_grad():
        logits = again.eval()(torch.tensor([reference["input_ids"]]))[0][0]  # (T, vocab)
    torch.testing.assert_close(logits[:, :EXPORTS["logit_columns"]], torch.tensor(reference["logits"]),
                               rtol=1e-4, atol=1e-4)
    assert logits.argmax(-1).tolist() == reference["argmax"]
