"""Assistant masks of every named chat template against transformers on generation-tagged copies.

transformers computes `return_assistant_tokens_mask` only for templates with `{% generation %}`
blocks, and the published templates have none. `TAGGED` holds copies with blocks around what the
model writes after the generation prompt, through its end-of-turn token; every conversation
checks that a copy renders the same text as the published template. Each template runs on seeded
random conversations (empty and all-whitespace replies, leading and trailing whitespace,
digit-first and byte-fallback-first replies, replies that also occur in the user's text, system
messages where the template takes them, 1-6 turns, with and without a generation prompt) on the
vocabularies of tests/tok_assets.py, and ids and masks must equal transformers'.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import tok_assets

from tunewright.data.tokenizer import load_tokenizer
from tunewright.data.tokenizer.chat import NAMED_TEMPLATES

transformers = pytest.importorskip("transformers")

NUM_CONVERSATIONS = 120  # per template; about a second each on 2 cores

# -- generation-tagged copies of the named templates ------------------------------------------

G, END = "{% generation %}", "{% endgeneration %}"


def _tagged(name: str, *edits: tuple[str, str]) -> str:
    source = NAMED_TEMPLATES[name]
    for old, new in edits:
        assert source.count(old) == 1, f"{name}.jinja changed: tag its copy again"
        source = source.replace(old, new)
    return source


_CHATML = "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
_QWEN = "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
_LLAMA32 = ("        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
            "+ message['content'] | trim + '<|eot_id|>' }}\n")
_GEMMA2 = "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"


def _assistant_first(turn: str, tagged_turn: str, role: str = "message['role'] == 'assistant'") -> tuple[str, str]:
    """An edit that renders assistant turns as `tagged_turn` and every other one as before."""
    return turn, f"{{% if {role} %}}{tagged_turn}{{% else %}}{turn}{{% endif %}}"


# Each block starts where the generation prompt ends, so a space the template writes before the
# reply (Llama-2, Mistral v0.3: SentencePiece's "▁") is the model's to write, and ends after the
# end-of-turn token, before the newline that separates turns.
TAGGED = {
    "chatml": _tagged("chatml", _assistant_first(
        _CHATML, "{{ '<|im_start|>assistant\n' }}" + G + "{{ message['content'] + '<|im_end|>' }}" + END
        + "{{ '\n' }}")),
    "qwen2_5": _tagged("qwen2_5", (_QWEN, (
        "        {%- if message.role == 'assistant' %}\n"
        "            {{- '<|im_start|>assistant\\n' }}\n"
        "            {%- generation %}{{- message.content + '<|im_end|>' }}{%- endgeneration %}\n"
        "            {{- '\\n' }}\n"
        "        {%- else %}\n" + _QWEN + "        {%- endif %}\n"))),
    "llama3": _tagged("llama3", _assistant_first(
        "{{ content }}", "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}" + G
        + "{{ message['content'] | trim + '<|eot_id|>' }}" + END,
        role="message['role'] == 'assistant' and loop.index0 > 0")),
    "llama3_2": _tagged("llama3_2", (_LLAMA32, (
        "        {%- if message.role == 'assistant' %}\n"
        "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
        "            {%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}\n"
        "        {%- else %}\n" + _LLAMA32 + "        {%- endif %}\n"))),
    "llama2": _tagged("llama2", ("{{ ' ' + content.strip() + ' ' + eos_token }}",
                                 G + "{{ ' ' + content.strip() + ' ' + eos_token }}" + END)),
    "mistral": _tagged("mistral", ("{{ message['content'] + eos_token }}",
                                   G + "{{ message['content'] + eos_token }}" + END)),
    "mistral_v3": _tagged("mistral_v3", ('{{- " " + message["content"]|trim + eos_token}}',
                                         '{%- generation %}{{- " " + message["content"]|trim + eos_token}}'
                                         "{%- endgeneration %}")),
    "gemma": _tagged(
        "gemma",
        ("    {%- if message['content'] is string -%}\n",
         "    {%- if role == 'model' -%}\n"
         "        {%- generation -%}{{ message['content'] | trim }}{{ '<end_of_turn>' }}{%- endgeneration -%}"
         "{{ '\n' }}\n"
         "    {%- else -%}\n"
         "    {%- if message['content'] is string -%}\n"),
        ("    {{ '<end_of_turn>\n' }}\n", "    {{ '<end_of_turn>\n' }}\n    {%- endif -%}\n"),
    ),
    "gemma2": _tagged("gemma2", _assistant_first(
        _GEMMA2, "{{ '<start_of_turn>model\n' }}" + G + "{{ message['content'] | trim + '<end_of_turn>' }}"
        + END + "{{ '\n' }}", role="role == 'model'")),
    "phi3": _tagged("phi3", ("{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}",
                             "{{'<|assistant|>\n'}}" + G + "{{ message['content'] + '<|end|>' }}" + END
                             + "{{'\n'}}")),
}

# template -> the vocabulary it runs on (a directory and a reference in tok_assets).
FAMILY = {"chatml": "qwen", "qwen2_5": "qwen", "llama3": "llama3", "llama3_2": "llama3", "llama2": "mistral_v1",
          "mistral": "mistral_v1", "mistral_v3": "mistral_v3", "gemma": "gemma", "gemma2": "gemma", "phi3": "phi3"}
NO_SYSTEM = {"gemma2"}  # raises on a system message, in transformers and here


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: getattr(tok_assets, f"{family}_dir")(root / family) for family in set(FAMILY.values())}


_REFERENCES: dict[str, object] = {}


def reference(family: str, directory: Path):
    if family not in _REFERENCES:
        build = getattr(tok_assets, f"{family}_reference")
        _REFERENCES[family] = build(directory) if family == "gemma" else build()
    return _REFERENCES[family]


def transformers_ids_and_mask(ref, name: str, messages: list[dict], prompt: bool) -> tuple[list[int], list[bool]]:
    """`apply_chat_template(return_assistant_tokens_mask=True)` on the tagged copy, after checking
    that the copy renders what the published template does.

    One difference is ours: transformers counts the whitespace an rstrip token swallows as part of
    that token, so Phi-3's `<|assistant|>` header is "trained on" when the reply starts with
    whitespace. The header is the prompt, not the reply: an added token counts by its own text.
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    options = {"add_generation_prompt": prompt, "return_dict": True}
    plain = ref.apply_chat_template(messages, chat_template=NAMED_TEMPLATES[name], tokenize=False, **options)
    (text,), (spans,) = render_jinja_template(conversations=[messages], chat_template=TAGGED[name],
                                              return_assistant_tokens_mask=True, add_generation_prompt=prompt,
                                              **ref.special_tokens_map)
    assert text == plain, f"the tagged copy of {name} renders other text than the template"
    out = ref.apply_chat_template(messages, chat_template=TAGGED[name], return_assistant_tokens_mask=True,
                                  **options)
    ids, mask = out["input_ids"], [bool(m) for m in out["assistant_masks"]]
    offsets = ref._tokenizer.encode(text, add_special_tokens=False).offsets
    added = ref.added_tokens_decoder
    for i, (id_, (start, end)) in enumerate(zip(ids, offsets)):
        if mask[i] and id_ in added:
            core = start + text[start:end].index(added[id_].content)
            mask[i] = any(core < e and core + len(added[id_].content) > s for s, e in spans)
    return ids, mask


def mismatches(ours, ref, name: str, cases) -> list[str]:
    """One line per conversation whose ids or mask differ from transformers' (or that raises)."""
    found = []
    for messages, prompt in cases:
        expected_ids, expected_mask = transformers_ids_and_mask(ref, name, messages, prompt)
        try:
            ids, mask = ours.tokenize_messages(messages, add_generation_prompt=prompt)
        except ValueError as e:
            found.append(f"raises {e}: {messages!r}")
            continue
        if ids != expected_ids:
            found.append(f"ids differ: {messages!r}")
        elif mask != expected_mask:
            found.append(f"mask differs: {messages!r}")
    return found


# -- random conversations ---------------------------------------------------------------------

BODIES = ["a", "Say a", "apples and pears", "Café au lait", "Cafe\u0301 (decomposed)", "日本語の文",
          "def f(x):\n    return x  # ok", "one  two   three", "line\n\n\nbreaks", "tab\there",
          "I'd've thought so", "¿Qué?", "x"]
# Digits and characters SentencePiece writes as bytes (🤗, ☃, 龘 are not in Mistral's vocabulary).
FIRSTS = ["42 apples", "7", "3.14 is pi", "0x1F", "🤗 hugs", "\u2603 snow", "龘 rare", "½ half", "…and so"]
SPACES = ["", "", "", " ", "  ", "\n", "\n\n", " \n", "\t"]


def random_text(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.1:
        return ""
    if kind < 0.15:
        return rng.choice([" ", "\n", "  \n ", "\t"])
    body = rng.choice(FIRSTS if kind < 0.45 else BODIES)
    if rng.random() < 0.3:
        body += " " + rng.choice(BODIES)
    return rng.choice(SPACES) + body + rng.choice(SPACES)


def random_conversation(rng: random.Random, *, system: bool) -> tuple[list[dict], bool]:
    """Messages and whether a generation prompt follows (when the last message is the user's)."""
    messages = []
    if system and rng.random() < 0.4:
        messages.append({"role": "system", "content": random_text(rng) or "Be brief."})
    for i in range(rng.randint(1, 6)):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": random_text(rng)})
    return messages, messages[-1]["role"] == "user"


def conversations(name: str) -> list[tuple[list[dict], bool]]:
    rng = random.Random(f"{name}-masks")
    return [random_conversation(rng, system=name not in NO_SYSTEM) for _ in range(NUM_CONVERSATIONS)]


def test_random_conversations_hold_the_cases_masks_got_wrong():
    """Guards edits to the generator: it must keep producing what the issue found broken."""
    cases = [c for name in NAMED_TEMPLATES for c in conversations(name)]
    replies = [m["content"] for messages, _ in cases for m in messages if m["role"] == "assistant"]
    counts = {
        "empty": sum(not r.strip() for r in replies),
        "trailing whitespace": sum(r != r.rstrip() and r.strip() != "" for r in replies),
        "digit first": sum(r.lstrip()[:1].isdigit() for r in replies),
        "byte-fallback first": sum(r.strip()[:1] in ("🤗", "☃", "龘") for r in replies),
        "system": sum(m[0]["role"] == "system" for m, _ in cases),
        "generation prompt": sum(prompt for _, prompt in cases),
        "6 turns": sum(len([m for m in messages if m["role"] != "system"]) == 6 for messages, _ in cases),
    }
    assert min(counts.values()) >= 50, counts


@pytest.mark.parametrize("name", sorted(NAMED_TEMPLATES))
def test_random_conversations_match_transformers_generation_masks(family_dirs, name):
    family = FAMILY[name]
    ours = load_tokenizer(family_dirs[family], chat_template=name)
    found = mismatches(ours, reference(family, family_dirs[family]), name, conversations(name))
    assert not found, f"{len(found)}/{NUM_CONVERSATIONS}:\n" + "\n".join(found[:10])


# -- the cases ------------------------------------------------------------------------


def trained_text(tok, messages: list[dict], prompt: bool = False) -> list[str]:
    """Each run of trained-on tokens, decoded."""
    ids, mask = tok.tokenize_messages(messages, add_generation_prompt=prompt)
    runs: list[str] = []
    run: list[int] = []
    for id_, m in [*zip(ids, mask), (None, False)]:
        if m:
            run.append(id_)
        elif run:
            runs, run = [*runs, tok.decode(run)], []
    return runs


def trained_tokens(tok, messages: list[dict], prompt: bool = False) -> list[str]:
    ids, mask = tok.tokenize_messages(messages, add_generation_prompt=prompt)
    return [tok.id_to_token(i) for i, m in zip(ids, mask) if m]


def assert_as_transformers(family_dirs, name: str, messages: list[dict], prompt: bool = False) -> None:
    family = FAMILY[name]
    ours = load_tokenizer(family_dirs[family], chat_template=name)
    assert mismatches(ours, reference(family, family_dirs[family]), name, [(messages, prompt)]) == []


def test_phi3_reply_ending_in_whitespace_keeps_its_end_token_and_an_empty_reply_is_fine(family_dirs):
    """Phi-3 writes eos after the last turn only, so the conversation up to a turn is no prefix of
    the whole: searching for the reply then lost `<|end|>` after trailing whitespace, and an empty
    reply raised."""
    phi3 = load_tokenizer(family_dirs["phi3"])
    spaced = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there  "},
              {"role": "user", "content": "again"}, {"role": "assistant", "content": "Bye"}]
    assert trained_text(phi3, spaced) == ["Hello there  <|end|>", "Bye<|end|>"]
    empty = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""},
             {"role": "user", "content": "again"}]
    assert trained_text(phi3, empty, prompt=True) == ["<|end|>"]
    assert_as_transformers(family_dirs, "phi3", spaced)
    assert_as_transformers(family_dirs, "phi3", empty, prompt=True)


def test_mistral_v3_with_a_system_message_trains_on_the_reply_not_the_user(family_dirs):
    """v0.3 writes the system message into the last user turn, so the prompt before a reply is no
    prefix of the whole conversation: searching for "a" found it in the user's "Say a"."""
    mistral = load_tokenizer(family_dirs["mistral_v3"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say a"},
                {"role": "assistant", "content": "a"}]
    assert trained_tokens(mistral, messages) == ["▁a", "</s>"]
    empty = [*messages[:2], {"role": "assistant", "content": ""}, {"role": "user", "content": "more"}]
    assert trained_tokens(mistral, empty, prompt=True) == ["▁", "</s>"]  # the template's " " before the reply
    assert_as_transformers(family_dirs, "mistral_v3", messages)
    assert_as_transformers(family_dirs, "mistral_v3", empty, prompt=True)


@pytest.mark.parametrize("name", ["phi3", "llama2", "mistral"])
@pytest.mark.parametrize("reply", ["42 apples", "🤗 hugs"])
def test_legacy_sentencepiece_trains_the_leading_space_of_digit_and_byte_first_replies(family_dirs, name, reply):
    """Legacy SentencePiece encodes "42" after Phi-3's `<|assistant|>` (or Llama-2's "[/INST] ")
    as "▁", "4", "2": that "▁" is the reply's first token and must be trained on."""
    messages = [{"role": "user", "content": "How many?"}, {"role": "assistant", "content": reply}]
    tok = load_tokenizer(family_dirs[FAMILY[name]], chat_template=name)
    first = "4" if reply[0] == "4" else "<0xF0>"  # 🤗 is not in the vocabulary: its four bytes
    start = [first] if name == "mistral" else ["▁", first]  # Mistral v0.1 writes it after "[/INST]"
    assert trained_tokens(tok, messages)[: len(start)] == start
    assert_as_transformers(family_dirs, name, messages)


QWEN_SPECIALS = {str(151643 + i): {"content": t, "special": True}
                 for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])}
QWEN_CONFIG = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
               "added_tokens_decoder": QWEN_SPECIALS}


@pytest.mark.parametrize("named_by", ["tokenizer_class", "model_type"])
def test_qwen_vocab_json_and_merges_txt_split_as_qwen2_tokenizer(tmp_path, named_by):
    """Without tokenizer.json nothing in the files says how to split: transformers uses the
    tokenizer class's way (Qwen2Tokenizer: Qwen's regex and NFC), not GPT-2's regex."""
    config = {**QWEN_CONFIG, "tokenizer_class": "Qwen2Tokenizer"} if named_by == "tokenizer_class" else QWEN_CONFIG
    directory = tok_assets.qwen_vocab_merges_dir(tmp_path, config=config)
    if named_by == "model_type":
        tok_assets.write_json(directory / "config.json", {"model_type": "qwen2"})
    ref = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert type(ref).__name__ == "Qwen2Tokenizer"
    ours = load_tokenizer(directory)
    texts = [*tok_assets.FAMILY_SAMPLE, *tok_assets.random_strings(0, 2000)]
    assert [t for t in texts if ours.encode(t) != ref.encode(t, add_special_tokens=False)] == []
    assert ours.encode("hello world") == [14990, 1879]


def test_mistral_v3_whitespace_runs_follow_sentencepiece_where_a_tokenizer_json_splits_them(tmp_path, family_dirs):
    """Where ids cannot equal apply_chat_template: a SentencePiece-style tokenizer.json whose
    Metaspace pre-tokenizer splits at spaces (`split: true`, also what a file without that key
    means) makes transformers encode "a   b" as ▁a ▁ ▁ ▁b; SentencePiece, and so mistral-common,
    which Mistral's models were trained with, encode ▁a ▁▁ ▁b. We follow SentencePiece: where the
    rendered text holds no two spaces in a row, ids and masks equal transformers'; everywhere
    they equal those of the bare tokenizer.model."""
    from tokenizers import pre_tokenizers

    ref = tok_assets.mistral_v3_reference()
    ref._tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    directory = tok_assets.mistral_v3_dir(tmp_path)
    ref._tokenizer.save(str(directory / "tokenizer.json"))
    ours = load_tokenizer(directory)
    sentencepiece_only = load_tokenizer(family_dirs["mistral_v3"])
    assert ours.encode("a   b") != ref.encode("a   b", add_special_tokens=False)

    cases = conversations("mistral_v3")
    for messages, prompt in cases:
        ids_and_mask = ours.tokenize_messages(messages, add_generation_prompt=prompt)
        assert ids_and_mask == sentencepiece_only.tokenize_messages(messages, add_generation_prompt=prompt)
    runs = [(m, p) for m, p in cases if "  " in ours.chat_format.render(m, add_generation_prompt=p)]
    assert len(runs) >= 30 and mismatches(ours, ref, "mistral_v3", runs)
    assert mismatches(ours, ref, "mistral_v3", [c for c in cases if c not in runs]) == []


def test_a_template_that_cuts_replies_asks_for_generation_blocks(family_dirs):
    """Marks cannot follow text a template cuts; guessing would train on the wrong tokens."""
    from tunewright.data.tokenizer.chat import ChatFormat

    tok = load_tokenizer(family_dirs["qwen"], chat_template="chatml")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    tok.chat_format = ChatFormat(NAMED_TEMPLATES["chatml"].replace("message['content']", "message['content'][:5]"))
    with pytest.raises(ValueError, match="generation"):
        tok.tokenize_messages(messages)
    tagged = TAGGED["chatml"].replace("message['content']", "message['content'][:5]")
    tok.chat_format = ChatFormat(tagged)
    assert trained_text(tok, messages) == ["Hello<|im_end|>"]
