"""Incremental detokenisation of multi-byte characters and the stop-string hold-back."""

from __future__ import annotations

from engine.runtime.detokenize import IncrementalDecoder, StopStringFilter, held_suffix_length


def test_multibyte_characters_released_only_when_complete(tiny_checkpoint):
    tokenizer = tiny_checkpoint.tokenizer
    text = "日本語のテキスト café Brücke"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) > len(text.split()), "characters are split across byte-level tokens"
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    assert all("\ufffd" not in piece for piece in pieces), pieces
    assert "".join(pieces) + decoder.flush() == text
    assert "" in pieces, "some tokens complete no character on their own"


def test_flush_releases_an_incomplete_character(tiny_checkpoint):
    tokenizer = tiny_checkpoint.tokenizer
    ids = tokenizer("日")["input_ids"]
    decoder = IncrementalDecoder(tokenizer)
    assert [decoder.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.flush() == "\ufffd"


def test_held_suffix_length():
    assert held_suffix_length("hello wor", ["world"]) == 3
    assert held_suffix_length("hello", ["xyz"]) == 0
    assert held_suffix_length("ab", ["b!", "ab!"]) == 2


def test_stop_filter_holds_a_possible_start_and_cuts_before_the_stop():
    stop = StopStringFilter(["END"])
    assert stop.feed("one E") == ("one ", False)
    assert stop.feed("N") == ("", False)
    assert stop.feed("D two") == ("", True)
    assert stop.text == "one "


def test_stop_filter_releases_held_text_when_it_turns_out_not_to_stop():
    stop = StopStringFilter(["END"])
    assert stop.feed("one EN") == ("one ", False)
    assert stop.feed("ough") == ("ENough", False)
    assert stop.feed(" E") == (" ", False)
    assert stop.flush() == "E"


def test_earliest_of_several_stops_wins():
    stop = StopStringFilter(["bb", "a b"])
    assert stop.feed("xa bb") == ("x", True)
