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
