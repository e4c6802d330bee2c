"""Tokenizer and chat template: the rendered prompt equals transformers' apply_chat_template for the real
Qwen3 template (../shared/fixtures) on a tokenizer built here with Qwen3's special tokens."""

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from gka_jax.tokenizer import TemplateError, Tokenizer, split_reasoning

from conftest import fixtures_dir

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
           "<tool_response>", "</tool_response>"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    words = ["hello", "world", "what", "is", "2", "+", "the", "answer", "4", "weather", "paris", "sunny", "\n",
             "think", "about", "it", "[UNK]"]
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL)
    tok.save(str(path / "tokenizer.json"))
    template = (fixtures_dir() / "qwen3_chat_template.jinja").read_text()
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "eos_token": "<|im_end|>", "bos_token": None,
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    return path


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city, °C",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}]
CONVERSATIONS = [
    ([{"role": "user", "content": "what is 2 + 2"}], {}),
    ([{"role": "user", "content": "what is 2 + 2"}], {"enable_thinking": False}),
    ([{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2 + 2"},
      {"role": "assistant", "content": "<think>\nthink about it\n</think>\n\nthe answer is 4"},
      {"role": "user", "content": "hello"}], {}),
    ([{"role": "user", "content": "hello"},
      {"role": "assistant", "content": "4", "reasoning_content": "2 + 2"}], {"add_generation_prompt": False}),
    ([{"role": "user", "content": "weather paris"},
      {"role": "assistant", "content": "", "tool_calls": [
          {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "paris"}}}]},
      {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "sunny again"}],
     {"tools": TOOLS}),
]


@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
def test_chat_template_matches_transformers(folder, case):
    import transformers  # a test-only dependency, installed by the "test" extra
    messages, kwargs = CONVERSATIONS[case]
    ours = Tokenizer.from_folder(folder)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                              chat_template=ours.chat_template, eos_token="<|im_end|>")
    kwargs = dict(kwargs)
    add = kwargs.pop("add_generation_prompt", True)
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add, **kwargs)
    got = ours.apply_chat_template(messages, add_generation_prompt=add, **kwargs)
    assert got == want
    if case == 1:
        assert got.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    if case == 4:
        assert "°C" in got  # tojson keeps non-ASCII characters, as transformers does


def test_encode_decode_and_special_tokens(folder):
    tok = Tokenizer.from_folder(folder)
    ids = tok.encode("<|im_start|>hello world<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=False).replace(" ", "") == "<|im_start|>helloworld<|im_end|>"
    assert tok.decode(ids) == "hello world"
    assert tok.eos_token_id == tok.token_to_id("<|im_end|>")


def test_no_template_and_template_errors(folder, tmp_path):
    tok = Tokenizer.from_folder(folder)
    broken = Tokenizer(tok._tok, "{{ raise_exception('bad role') }}")
    with pytest.raises(TemplateError, match="bad role"):
        broken.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(TemplateError, match="no chat template"):
        Tokenizer(tok._tok).apply_chat_template([{"role": "user", "content": "hi"}])


def test_split_reasoning():
    assert split_reasoning("let me see\n</think>\n\nfour") == ("let me see", "four")
    assert split_reasoning("<think>\nhmm\n</think>\n\n4") == ("hmm", "4")
    assert split_reasoning("just an answer") == (None, "just an answer")
    assert split_reasoning("<think>\nstill thinking") == ("still thinking", "")
