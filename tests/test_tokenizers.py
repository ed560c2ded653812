"""Tokenizer ids against references: HF `tokenizers`/`transformers`, `sentencepiece`, known ids.

Real vocabularies (Llama-3, Qwen3, Mistral-7B) come from packages installed for the tests;
tiny byte-level BPEs are trained here with `tokenizers` for the file shapes those don't cover.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tok_assets import (
    SAMPLE,
    cached_file,
    package_file,
    quicktok_ranks,
    quicktok_specials,
    write_hf_tokenizer_json,
    write_tiktoken_file,
)

from tunewright.data.tokenizer import load_tokenizer
from tunewright.data.tokenizer.bpe import LLAMA3_PATTERN

tokenizers = pytest.importorskip("tokenizers")

QWEN_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen2/3 split digits singly
TEXTS = [*SAMPLE, "\n".join(SAMPLE)]
# Text with special tokens inside, which HF encodes as single ids.
SPECIAL_TEXTS = {
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>x<|eot_id|>",
    "qwen3": "<|im_start|>user\nhi 42<|im_end|>\n<|im_start|>assistant\n<think>\nok</think><|endoftext|>",
    "mistral": "<s>[INST] hi [/INST] hello</s>[INST] yo [/INST]</s>x",
}
SMOLLM2_TEMPLATE = (  # HuggingFaceTB/SmolLM2-*-Instruct's chat_template
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MISSING_BYTES = {0, 1, 2, 0x7F, 0xC0, 0xC1, *range(0xF5, 0x100)}
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 17 * 3?"},
    {"role": "assistant", "content": "51."},
    {"role": "user", "content": "And in words, with an emoji? 🤔"},
    {"role": "assistant", "content": "  Fifty-one 🎉\n\nDone. "},
]


# -- assets: each built once per session ------------------------------------------------------


@pytest.fixture(scope="session")
def llama3_dir(tmp_path_factory) -> Path:
    """Llama-3 as Meta ships it: a tiktoken ranks file named tokenizer.model, nothing else."""
    directory = tmp_path_factory.mktemp("llama3")
    write_tiktoken_file(quicktok_ranks("llama3"), directory / "tokenizer.model")
    return directory


@pytest.fixture(scope="session")
def llama3_reference(llama3_dir, tmp_path_factory) -> Path:
    """HF tokenizer.json of the same ranks, made by transformers' TikTokenConverter."""

    def build(path: Path) -> None:
        specials = quicktok_specials("llama3")
        write_hf_tokenizer_json(llama3_dir / "tokenizer.model", LLAMA3_PATTERN, specials, path, nfc=False)

    return cached_file("llama3-tokenizer.json", build)


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory) -> Path:
    """Qwen3 as an HF directory: tokenizer.json (NFC normaliser, Split regex) + tokenizer_config."""
    directory = tmp_path_factory.mktemp("qwen3")

    def build(path: Path) -> None:
        ranks_file = write_tiktoken_file(quicktok_ranks("qwen3"), directory / "ranks.tiktoken")
        write_hf_tokenizer_json(ranks_file, QWEN_PATTERN, quicktok_specials("qwen3"), path, nfc=True)
        ranks_file.unlink()

    shutil.copy(cached_file("qwen3-tokenizer.json", build), directory / "tokenizer.json")
    config = {"chat_template": SMOLLM2_TEMPLATE, "bos_token": None, "eos_token": "<|im_end|>"}
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<|endoftext|>"}))
    return directory


@pytest.fixture(scope="session")
def mistral_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("mistral")
    shutil.copy(package_file("mistral_common", "data/tokenizer.model.v1"), directory / "tokenizer.model")
    return directory


@pytest.fixture(scope="session")
def mistral_reference(mistral_dir):
    """Mistral-7B's HF tokenizer.json rebuilt from the SentencePiece model (no protobuf needed):
    BPE with byte fallback, merges from piece scores, the legacy Prepend/Replace normaliser."""
    import sentencepiece
    from tokenizers import AddedToken, decoders, models, normalizers
    from transformers.convert_slow_tokenizer import generate_merges

    sp = sentencepiece.SentencePieceProcessor(model_file=str(mistral_dir / "tokenizer.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = generate_merges(vocab, {piece: sp.get_score(i) for piece, i in vocab.items()})
    model = models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    ref = tokenizers.Tokenizer(model)
    ref.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    ref.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    ref.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    return ref


@pytest.fixture(scope="session")
def llama3(llama3_dir):
    return load_tokenizer(llama3_dir)


@pytest.fixture(scope="session")
def qwen3(qwen3_dir):
    return load_tokenizer(qwen3_dir)


@pytest.fixture(scope="session")
def mistral(mistral_dir):
    return load_tokenizer(mistral_dir)


def assert_same_ids(ours, reference_encode, texts) -> None:
    for text in texts:
        assert ours.encode(text) == reference_encode(text), text


def hf_ids(reference: tokenizers.Tokenizer):
    return lambda text: reference.encode(text, add_special_tokens=False).ids


# -- engines against references ---------------------------------------------------------------


def test_llama3_tiktoken_file_matches_hf_tokenizer_and_known_ids(llama3, llama3_reference):
    ref = tokenizers.Tokenizer.from_file(str(llama3_reference))
    assert llama3.encode("hello world") == [15339, 1917]  # Meta's published example ids
    assert_same_ids(llama3, hf_ids(ref), TEXTS + [SPECIAL_TEXTS["llama3"]])
    assert (llama3.bos_id, llama3.eos_id, llama3.vocab_size) == (128000, 128001, 128256)
    assert {128001, 128009} <= llama3.stop_ids  # end_of_text and the chat format's eot_id
    assert llama3.encode("hi", add_bos=True, add_eos=True) == [128000, 6151, 128001]
    for text in TEXTS + [SPECIAL_TEXTS["llama3"]]:
        assert llama3.decode(llama3.encode(text)) == text
    assert llama3.decode(llama3.encode(SPECIAL_TEXTS["llama3"]), skip_special=True) == "user\n\nhix"


def test_qwen3_tokenizer_json_matches_hf_tokenizers(qwen3, qwen3_dir):
    ref = tokenizers.Tokenizer.from_file(str(qwen3_dir / "tokenizer.json"))
    assert qwen3.encode("hello world") == [14990, 1879]
    decomposed = "Cafe\u0301 n\u0303 A\u030a"  # NFC composes these before BPE, in both
    assert_same_ids(qwen3, hf_ids(ref), TEXTS + [SPECIAL_TEXTS["qwen3"], decomposed])
    assert (qwen3.bos_id, qwen3.eos_id, qwen3.pad_id) == (None, 151645, 151643)  # from tokenizer_config
    for text in TEXTS + [SPECIAL_TEXTS["qwen3"]]:
        assert qwen3.decode(qwen3.encode(text)) == text


def _train_bpe(directory: Path, *, digits: bool, shuffle_ids: bool = False) -> tokenizers.Tokenizer:
    """A tiny byte-level BPE. With `digits`, like SmolLM2: a `Digits(individual_digits=True)`
    split and no tokens for some bytes (SmolLM2 lacks 21), which HF then drops from the text."""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tok = tokenizers.Tokenizer(models.BPE())
    steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if digits:
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=[bytes_to_unicode()[b] for b in range(256) if not (digits and b in MISSING_BYTES)],
        show_progress=False,
    )
    corpus = SAMPLE * 10 + [f"item {i}: {i * 37} costs ${i * 1.5:.2f}, isn't it?  {i}" for i in range(300)]
    tok.train_from_iterator(corpus, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    if shuffle_ids:  # ids no longer follow merge order: ranks must come from the merge list
        data = json.loads((directory / "tokenizer.json").read_text())
        vocab, added = data["model"]["vocab"], {t["id"] for t in data["added_tokens"]}
        free = sorted(i for i in vocab.values() if i not in added)
        moved = dict(zip(free, random.Random(0).sample(free, len(free))))
        data["model"]["vocab"] = {text: moved.get(i, i) for text, i in vocab.items()}
        (directory / "tokenizer.json").write_text(json.dumps(data))
    return tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))


@pytest.mark.parametrize("shuffle_ids", [False, True], ids=["ids-in-merge-order", "shuffled-ids"])
def test_smollm2_style_tokenizer_json_matches_hf(tmp_path, shuffle_ids):
    ref = _train_bpe(tmp_path, digits=True, shuffle_ids=shuffle_ids)
    ours = load_tokenizer(tmp_path / "tokenizer.json")
    # Spaces before a digit end a piece under Digits + ByteLevel: "abc  5" is "abc", "  ", "5".
    texts = [*TEXTS, "abc  5 and  55\t 7", "costs $18.00, isn't it?  \n 2 ", "<|im_start|>x 1<|im_end|>"]
    texts.append("no token for \x00, \x01\x02 or \x7f")  # dropped, as HF does
    assert_same_ids(ours, lambda text: ref.encode(text).ids, texts)
    assert ours.eos_id == 0  # <|endoftext|>, found by name without a config
    for text in texts[:-1]:
        assert ours.decode(ours.encode(text)) == text


def test_gpt2_style_vocab_json_and_merges_txt(tmp_path):
    ref = _train_bpe(tmp_path / "trained", digits=False)
    ref.model.save(str(tmp_path))  # writes vocab.json + merges.txt
    added = {"0": {"content": "<|endoftext|>", "special": True}}
    config = {"eos_token": "<|endoftext|>", "added_tokens_decoder": added}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = load_tokenizer(tmp_path)
    assert_same_ids(ours, lambda text: ref.encode(text).ids, TEXTS + ["x<|endoftext|>y"])
    assert ours.eos_id == 0 and ours.decode(ours.encode("x<|endoftext|>y"), skip_special=True) == "xy"


def test_mistral_sentencepiece_matches_sentencepiece_and_hf(mistral, mistral_dir, mistral_reference):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(mistral_dir / "tokenizer.model"))
    assert mistral.encode("Hello world") == sp.encode("Hello world") == [22557, 1526]
    assert_same_ids(mistral, sp.encode, TEXTS)  # no special tokens: plain SentencePiece
    texts = TEXTS + [SPECIAL_TEXTS["mistral"], "a</s> b"]
    assert_same_ids(mistral, hf_ids(mistral_reference), texts)
    assert (mistral.bos_id, mistral.eos_id, mistral.pad_id, mistral.vocab_size) == (1, 2, 0, 32000)
    assert mistral.encode("hi", add_bos=True, add_eos=True) == [1, *sp.encode("hi"), 2]
    for text in texts:
        assert mistral.decode(mistral.encode(text)) == text
    plain = mistral.decode(mistral.encode(SPECIAL_TEXTS["mistral"]), skip_special=True)
    assert plain == "[INST] hi [/INST] hello[INST] yo [/INST]x"


def test_sentencepiece_style_tokenizer_json_defers_to_tokenizer_model(
    tmp_path, mistral_dir, mistral_reference
):
    """Mistral's and Llama-2's HF repos hold a non-byte-level tokenizer.json next to tokenizer.model."""
    shutil.copy(mistral_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    mistral_reference.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert_same_ids(tok, hf_ids(mistral_reference), [SPECIAL_TEXTS["mistral"], SAMPLE[1]])


# -- chat templates against transformers' apply_chat_template --------------------------------

# What each format trains on after an assistant message's content.
EOT = {"qwen3": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "</s>", "llama2": " </s>"}


@pytest.fixture(scope="session")
def qwen3_hf(qwen3_dir):
    """transformers' tokenizer of the same directory we load, template from tokenizer_config.json."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen3_dir))


@pytest.fixture(scope="session")
def llama3_hf(llama3_reference):
    from transformers import PreTrainedTokenizerFast

    names = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    return PreTrainedTokenizerFast(tokenizer_file=str(llama3_reference), **names)


def _hf_tokenizer(request, name: str, template: str | None):
    from transformers import PreTrainedTokenizerFast

    if name == "qwen3":
        return request.getfixturevalue("qwen3_hf")
    if name == "llama3":
        hf = request.getfixturevalue("llama3_hf")
        hf.chat_template = template
        return hf
    reference = request.getfixturevalue("mistral_reference")
    names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    return PreTrainedTokenizerFast(tokenizer_object=reference, chat_template=template, **names)


def _masked_texts(tok, ids: list[int], mask: list[bool]) -> list[str]:
    """Decoded runs of consecutive trained-on tokens."""
    runs, run = [], []
    for id_, trained in zip(ids, mask):
        if trained:
            run.append(id_)
        elif run:
            runs, run = runs + [run], []
    return [tok.decode(r) for r in runs + ([run] if run else [])]


@pytest.mark.parametrize(
    "name,template", [("qwen3", None), ("llama3", "llama3"), ("mistral", "mistral"), ("mistral", "llama2")]
)
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_chat_ids_equal_apply_chat_template_and_mask_is_assistant_turns(
    request, name, template, generation_prompt
):
    from tunewright.data.tokenizer.chat import NAMED_TEMPLATES

    if template is None:  # the model's own Jinja template
        tok = request.getfixturevalue(name)
    else:
        tok = load_tokenizer(request.getfixturevalue(f"{name}_dir"), chat_template=template)
    hf = _hf_tokenizer(request, name, template and NAMED_TEMPLATES[template])
    messages = CONVERSATION[:-1] if generation_prompt else CONVERSATION
    ids, mask = tok.tokenize_messages(messages, add_generation_prompt=generation_prompt)
    expected = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    assert ids == expected["input_ids"]

    assistant = [m["content"] for m in messages if m["role"] == "assistant"]
    if template in ("llama3", "llama2"):  # these templates strip the content
        assistant = [content.strip() for content in assistant]
    decoded = _masked_texts(tok, ids, mask)
    if name == "mistral":  # SentencePiece decode drops the first piece's leading space
        decoded, assistant = [t.lstrip() for t in decoded], [c.lstrip() for c in assistant]
    assert decoded == [content + EOT[template or name] for content in assistant]


def test_generation_tags_give_the_same_mask_as_transformers(qwen3, qwen3_hf):
    """A template marking assistant text with {% generation %} is trusted, as transformers does."""
    from tunewright.data.tokenizer.chat import ChatFormat

    turn = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    tagged = (
        "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
        "{% else %}" + turn + "{% endif %}"
    )
    template = SMOLLM2_TEMPLATE.replace(turn, tagged)
    assert template != SMOLLM2_TEMPLATE
    options = {"tokenize": True, "return_dict": True, "return_assistant_tokens_mask": True}
    expected = qwen3_hf.apply_chat_template(CONVERSATION, chat_template=template, **options)
    saved = qwen3.chat_format
    qwen3.chat_format = ChatFormat(template, template_vars=saved.template_vars)
    try:
        ids, mask = qwen3.tokenize_messages(CONVERSATION)
    finally:
        qwen3.chat_format = saved
    assert ids == expected["input_ids"]
    assert mask == [bool(m) for m in expected["assistant_masks"]]


def test_template_that_rewrites_earlier_turns_still_masks_each_turn(qwen3):
    """Qwen3-style: only the last assistant turn gets an (empty) think block, so rendering a
    prefix of the conversation does not give a prefix of the full text."""
    from tunewright.data.tokenizer.chat import ChatFormat

    template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
        "{% if m['role'] == 'assistant' and loop.last %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
        "{{ m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    saved = qwen3.chat_format
    qwen3.chat_format = ChatFormat(template)
    try:
        ids, mask = qwen3.tokenize_messages(CONVERSATION)
        text = qwen3.chat_format.render(CONVERSATION)
    finally:
        qwen3.chat_format = saved
    assert ids == qwen3.encode(text)
    last = "<think>\n\n</think>\n\n" + CONVERSATION[-1]["content"] + "<|im_end|>"
    assert _masked_texts(qwen3, ids, mask) == ["51.<|im_end|>", last]


def test_max_seq_len_cuts_ids_and_mask(llama3_dir):
    tok = load_tokenizer(llama3_dir, max_seq_len=8)
    ids, mask = tok.tokenize_messages(CONVERSATION)
    assert len(ids) == len(mask) == 8


# -- loader errors and import cost ------------------------------------------------------------


def test_bad_paths_raise_value_error_naming_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        load_tokenizer(missing)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        load_tokenizer(tmp_path)  # no tokenizer files
    garbage = tmp_path / "tokenizer.model"
    garbage.write_bytes(b"\x00\x01not a model at all")
    with pytest.raises(ValueError, match=re.escape(str(garbage))):
        load_tokenizer(tmp_path)
    wordpiece = tmp_path / "wp" / "tokenizer.json"
    wordpiece.parent.mkdir()
    wordpiece.write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}, "added_tokens": []}))
    with pytest.raises(ValueError, match=re.escape(str(wordpiece))):
        load_tokenizer(wordpiece.parent)


def test_unknown_chat_template_name_is_rejected(llama3_dir):
    with pytest.raises(ValueError, match="unknown chat template 'vicuna'"):
        load_tokenizer(llama3_dir, chat_template="vicuna")


def test_importing_the_package_loads_no_engine():
    engines = "{'tiktoken', 'sentencepiece', 'jinja2'}"
    code = f"import sys, tunewright.data.tokenizer; print(sorted({engines} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
