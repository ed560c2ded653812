"""Tokenizers and chat formats of the model families against reference implementations.

Vocabularies: Qwen2/2.5/3 and Llama-3 (quicktok), Mistral v1/v3 SentencePiece (mistral-common's
model files). References: transformers' own Qwen2Tokenizer / LlamaTokenizer (their regex and
Metaspace set-up, not ours), HF `tokenizers` files, `sentencepiece`, and `apply_chat_template`.
Gemma's and Phi-3's real vocabularies are not installable offline: their chat formats are tested
on stand-ins with their special tokens (Gemma: a byte-level tokenizer.json; Phi-3: the Llama-2-kind
SentencePiece model of Mistral v1 plus Phi-3's added tokens and rstrip flags, which is how
Phi-3-mini's own tokenizer is built).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tok_assets
from tok_assets import MISTRAL_V1 as V1
from tok_assets import MISTRAL_V3 as V3
from tok_assets import FAMILY_SAMPLE, byte_level_tokenizer_dir, llama_reference, package_file, write_json

from tunewright.data.tokenizer import load_tokenizer
from tunewright.data.tokenizer.chat import NAMED_TEMPLATES

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

CONVERSATION = [
    {"role": "system", "content": "You are terse. Answer in one line."},
    {"role": "user", "content": "What is 12345 * 3?"},
    {"role": "assistant", "content": "37035."},
    {"role": "user", "content": "And in words, with an emoji? 🤔 Café?"},
    {"role": "assistant", "content": "  Thirty-seven thousand thirty-five 👩‍💻\n\nDone. "},
]
TEMPLATE_STRIPS = {"llama3", "llama3_2", "mistral_v3", "gemma", "gemma2"}  # these trim the reply
END_OF_TURN = {"qwen2_5": "<|im_end|>", "llama3": "<|eot_id|>", "llama3_2": "<|eot_id|>",
               "mistral_v3": "</s>", "gemma": "<end_of_turn>", "gemma2": "<end_of_turn>", "phi3": "<|end|>"}


_LOADED: dict[tuple[str, str | None], object] = {}


def loaded(directory: Path, chat_template: str | None = None):
    """load_tokenizer, once per directory and template in this module (Qwen's takes seconds)."""
    key = (str(directory), chat_template)
    if key not in _LOADED:
        _LOADED[key] = load_tokenizer(directory, chat_template=chat_template)
    return _LOADED[key]


def assert_same_ids(ours, reference, texts) -> None:
    for text in texts:
        assert ours.encode(text) == reference(text), repr(text)


def assert_round_trips_where_reference_does(ours, ref_encode, ref_decode, texts) -> None:
    for text in texts:
        if ref_decode(ref_encode(text)) == text:
            assert ours.decode(ours.encode(text)) == text, repr(text)


# -- assets (built in tok_assets.py, shared with test_chat_masks.py) --------------------------


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    return tok_assets.qwen_dir(tmp_path_factory.mktemp("qwen2_5"))


@pytest.fixture(scope="module")
def qwen_ref():
    return tok_assets.qwen_reference()


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory) -> Path:
    return tok_assets.llama3_dir(tmp_path_factory.mktemp("llama3"))


@pytest.fixture(scope="module")
def llama3_ref():
    return tok_assets.llama3_reference()


@pytest.fixture(scope="module")
def mistral_v3_dir(tmp_path_factory) -> Path:
    return tok_assets.mistral_v3_dir(tmp_path_factory.mktemp("mistral_v3"))


@pytest.fixture(scope="module")
def mistral_v3_ref():
    return tok_assets.mistral_v3_reference()


@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory) -> Path:
    return tok_assets.phi3_dir(tmp_path_factory.mktemp("phi3"))


@pytest.fixture(scope="module")
def phi3_ref():
    return tok_assets.phi3_reference()


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> Path:
    return tok_assets.gemma_dir(tmp_path_factory.mktemp("gemma"))


@pytest.fixture(scope="module")
def gemma_ref(gemma_dir):
    return tok_assets.gemma_reference(gemma_dir)


# -- tokenizer ids ----------------------------------------------------------------------------


def test_qwen_ids_equal_transformers_qwen2_tokenizer(qwen_dir, qwen_ref):
    ours = loaded(qwen_dir)
    specials = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
    assert {t: ours.token_to_id(t) for t in specials} == specials
    assert {t: qwen_ref.convert_tokens_to_ids(t) for t in specials} == specials
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (None, 151645, 151643)
    chat = "<|im_start|>user\n2024 + 1 = ?<|im_end|>\n<|im_start|>assistant\n2025<|im_end|><|endoftext|>"
    texts = [*FAMILY_SAMPLE, chat, "Cafe\u0301 A\u030a"]  # NFC composes the last before BPE
    assert_same_ids(ours, lambda t: qwen_ref.encode(t, add_special_tokens=False), texts)
    assert ours.encode("hello world") == [14990, 1879]
    assert_round_trips_where_reference_does(ours, qwen_ref.encode, qwen_ref.decode, texts)


def test_llama3_ids_equal_hf_tokenizer(llama3_dir, llama3_ref):
    ours = loaded(llama3_dir)
    chat = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n1234567<|eot_id|>"
    texts = [*FAMILY_SAMPLE, chat]
    assert_same_ids(ours, lambda t: llama3_ref.encode(t, add_special_tokens=False), texts)
    assert ours.encode("12345678") == [4513, 10961, 2495]  # digits grouped by three
    assert_round_trips_where_reference_does(ours, llama3_ref.encode, llama3_ref.decode, texts)


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_mistral_sentencepiece_ids_equal_references(tmp_path, version):
    """v1: SentencePiece's dummy prefix on every piece (legacy); v3 (legacy: false): only at the
    start, as transformers' LlamaTokenizer and mistral-common do."""
    import sentencepiece

    model_file = package_file("mistral_common", V1 if version == "v1" else V3)
    shutil.copy(model_file, tmp_path / "tokenizer.model")
    if version == "v3":
        write_json(tmp_path / "tokenizer_config.json", {"legacy": False})
    ours = load_tokenizer(tmp_path)
    ref = llama_reference(model_file, legacy=version == "v1")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    specials = "<s>[INST] What is 2+2?[/INST] 4</s>[INST] And 3+3? [/INST]</s>x"
    texts = [*FAMILY_SAMPLE, specials, "a</s> b", "<unk>"]
    assert_same_ids(ours, lambda t: ref.encode(t, add_special_tokens=False), texts)
    # Plain text: what sentencepiece itself gives (a leading space is the one case where
    # HF's Metaspace and SentencePiece's dummy prefix differ, and v3 follows HF).
    plain = [t for t in FAMILY_SAMPLE if version == "v1" or not t[:1].isspace()]
    assert_same_ids(ours, sp.encode, plain)
    if version == "v3":
        assert ours.encode("[INST] Hi[/INST]") == [3, *sp.encode("Hi"), 4]
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (1, 2, sp.get_piece_size())
    assert_round_trips_where_reference_does(ours, lambda t: ref.encode(t, add_special_tokens=False),
                                            ref.decode, texts)


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy-prepend", "metaspace-first"])
def test_sentencepiece_style_tokenizer_json_sets_where_the_prefix_goes(tmp_path, legacy):
    model_file = package_file("mistral_common", V3)
    shutil.copy(model_file, tmp_path / "tokenizer.model")
    ref = llama_reference(model_file, legacy=legacy)
    ref._tokenizer.save(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(tmp_path)
    texts = ["<s>[INST] Hello[/INST] Hi</s>", " leading", "[INST]x[/INST] y", *FAMILY_SAMPLE[:4]]
    assert_same_ids(ours, lambda t: ref.encode(t, add_special_tokens=False), texts)


STRIP_TEXTS = [
    "a <L> b <R>  c\n<B>\td <W> e<W>f <W>",
    "<R>\n\n<R> <L>  <L>x",
    "  <B>  <B>  ",
    "<L><R><B>",
    "word<W> <W>word <W>\u3000<R>\u00a0end",
    "nothing special here",
]
STRIP_FLAGS = {"<L>": {"lstrip": True}, "<R>": {"rstrip": True}, "<B>": {"lstrip": True, "rstrip": True},
               "<W>": {"single_word": True}}


def test_added_token_strip_flags_match_tokenizers_byte_level(tmp_path):
    byte_level_tokenizer_dir(tmp_path, ["<|endoftext|>", *STRIP_FLAGS], flags=STRIP_FLAGS)
    ref = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(tmp_path)
    assert_same_ids(ours, lambda t: ref.encode(t).ids, STRIP_TEXTS)


def test_added_token_strip_flags_match_tokenizers_sentencepiece(phi3_dir, phi3_ref):
    ours = load_tokenizer(phi3_dir)
    texts = [
        "<|user|>\nHello <|end|>\n<|assistant|>\n  Hi there<|end|>\n<|endoftext|>",
        "<|system|> \t\nsys<|end|>  \n\n<|user|>x",
        *FAMILY_SAMPLE[:5],
    ]
    assert_same_ids(ours, lambda t: phi3_ref.encode(t, add_special_tokens=False), texts)
    assert ours.token_to_id("<|end|>") == 32007 and ours.eos_id == 32000


# -- chat formats -----------------------------------------------------------------------------

# name -> (directory fixture, reference fixture, whether it is that directory's default)
FORMATS = {
    "qwen2_5": ("qwen_dir", "qwen_ref", True),
    "llama3": ("llama3_dir", "llama3_ref", True),
    "llama3_2": ("llama3_dir", "llama3_ref", False),
    "mistral_v3": ("mistral_v3_dir", "mistral_v3_ref", True),
    "gemma": ("gemma_dir", "gemma_ref", True),
    "gemma2": ("gemma_dir", "gemma_ref", False),
    "phi3": ("phi3_dir", "phi3_ref", True),
}


def masked_runs(tok, ids: list[int], mask: list[bool]) -> list[str]:
    runs, run = [], []
    for id_, trained in [*zip(ids, mask), (None, False)]:
        if trained:
            run.append(id_)
        elif run:
            runs, run = runs + [tok.decode(run)], []
    return runs


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_chat_format_equals_apply_chat_template_and_masks_replies(request, name, generation_prompt):
    dir_fixture, ref_fixture, is_default = FORMATS[name]
    directory = request.getfixturevalue(dir_fixture)
    ours = loaded(directory, None if is_default else name)
    assert ours.chat_format.template == NAMED_TEMPLATES[name]
    ref = request.getfixturevalue(ref_fixture)
    messages = CONVERSATION[1:] if name == "gemma2" else CONVERSATION  # Gemma-2 rejects a system turn
    if generation_prompt:
        messages = messages[:-1]
    options = {"chat_template": NAMED_TEMPLATES[name], "add_generation_prompt": generation_prompt}

    text = ours.chat_format.render(messages, add_generation_prompt=generation_prompt)
    assert text == ref.apply_chat_template(messages, tokenize=False, **options)
    ids, mask = ours.tokenize_messages(messages, add_generation_prompt=generation_prompt)
    assert ids == ref.apply_chat_template(messages, tokenize=True, return_dict=False, **options)

    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    replies = [r.strip() if name in TEMPLATE_STRIPS else r for r in replies]
    expected = [r + END_OF_TURN[name] for r in replies]
    runs = masked_runs(ours, ids, mask)
    if name in ("mistral_v3", "phi3"):  # SentencePiece decode drops a run's leading space
        runs, expected = [r.lstrip() for r in runs], [e.lstrip() for e in expected]
    assert runs == expected
    assert set(ids[i] for i, m in enumerate(mask) if m) >= {ours.token_to_id(END_OF_TURN[name])}


def test_mistral_v3_chat_ids_equal_mistral_commons_layout(mistral_v3_dir):
    """mistral-common's v3 layout, built from sentencepiece: <s> [INST] user [/INST] reply </s>
    ..., each text encoded on its own, the system prompt prepended to the last user message.

    Only for a conversation ending with a user turn: the published v0.3 template writes the
    system prompt only when that last user turn is the last message (`loop.last`), so a
    conversation ending with a reply (training data) loses it there, in transformers and here.
    """
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(mistral_v3_dir / "tokenizer.model"))
    ours = loaded(mistral_v3_dir)
    system, user1, reply1, user2, reply2 = (m["content"] for m in CONVERSATION)
    expected = [1, 3, *sp.encode(user1), 4, *sp.encode(reply1.strip()), 2,
                3, *sp.encode(system + "\n\n" + user2), 4]
    assert ours.tokenize_messages(CONVERSATION[:-1], add_generation_prompt=True)[0] == expected
    assert system not in ours.chat_format.render(CONVERSATION)


def test_stop_ids_include_each_formats_end_of_turn(qwen_dir, gemma_dir, phi3_dir, mistral_v3_dir):
    assert 151645 in loaded(qwen_dir).stop_ids
    gemma = loaded(gemma_dir)
    assert gemma.token_to_id("<end_of_turn>") in gemma.stop_ids
    assert 32007 in loaded(phi3_dir).stop_ids
    assert 2 in loaded(mistral_v3_dir).stop_ids


# -- which template a directory gets ----------------------------------------------------------

CUSTOM = "{% for m in messages %}<start_of_turn>{{ m['role'] }}|{{ m['content'] }}<end_of_turn>{% endfor %}"


def copy_dir(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_models_own_template_wins_over_the_family_default(tmp_path, gemma_dir):
    directory = copy_dir(gemma_dir, tmp_path / "own")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    write_json(directory / "tokenizer_config.json", {**config, "chat_template": CUSTOM})
    ours = load_tokenizer(directory)
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert ours.chat_format.template == hf.chat_template == CUSTOM
    assert ours.tokenize_messages(CONVERSATION)[0] == hf.apply_chat_template(CONVERSATION, return_dict=False)

    # Newer repos keep it in chat_template.jinja, which transformers also prefers.
    jinja = CUSTOM.replace("|", ": ")
    (directory / "chat_template.jinja").write_text(jinja)
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert load_tokenizer(directory).chat_format.template == hf.chat_template == jinja


def test_config_key_forces_a_named_template(tmp_path, gemma_dir):
    from tunewright.training.instantiate import instantiate

    directory = copy_dir(gemma_dir, tmp_path / "forced")
    (directory / "chat_template.jinja").write_text(CUSTOM)
    node = {"_component_": "tunewright.data.tokenizer.load_tokenizer", "path": str(directory),
            "chat_template": "gemma2"}
    assert instantiate(node).chat_format.template == NAMED_TEMPLATES["gemma2"]


def test_family_template_from_special_tokens_without_config_json(tmp_path, gemma_dir, phi3_dir, mistral_v3_dir):
    for source, name in ((gemma_dir, "gemma"), (phi3_dir, "phi3"), (mistral_v3_dir, "mistral_v3")):
        directory = copy_dir(source, tmp_path / name)
        (directory / "config.json").unlink()
        assert load_tokenizer(directory).chat_format.template == NAMED_TEMPLATES[name], name
    mistral_v1 = tmp_path / "mistral_v1"
    mistral_v1.mkdir()
    shutil.copy(package_file("mistral_common", V1), mistral_v1 / "tokenizer.model")
    write_json(mistral_v1 / "config.json", {"model_type": "mistral"})
    assert load_tokenizer(mistral_v1).chat_format.template == NAMED_TEMPLATES["mistral"]


def test_named_templates_ship_with_the_package():
    import tomllib

    repo = Path(__file__).resolve().parent.parent
    data = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "templates/*.jinja" in data["tunewright.data.tokenizer"]
    readme = (repo / "data" / "tokenizer" / "templates" / "README.md").read_text()
    for name in NAMED_TEMPLATES:
        assert f"| {name} |" in readme, f"templates/README.md does not say where {name}.jinja comes from"
