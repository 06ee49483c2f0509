from services.scheduler.stops import StopChecker


class CharTokenizer:
    """One token per character (ids are code points)."""

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def _run(text, stop):
    checker = StopChecker(CharTokenizer(), stop)
    shown, hit = "", False
    for ch in text:
        delta, hit = checker.push(ord(ch))
        shown += delta
        if hit:
            break
    return shown, hit, checker.text


def test_stop_string_ends_generation_and_is_never_shown():
    shown, hit, final = _run("hello world. more", ["wor"])
    assert hit and final == "hello " and shown == "hello "


def test_partial_stop_prefix_is_held_back_then_released():
    checker = StopChecker(CharTokenizer(), ["xyz"])
    out = [checker.push(ord(c))[0] for c in "abxy"]
    assert "".join(out) == "ab"  # "xy" may start "xyz"
    delta, hit = checker.push(ord("q"))
    assert not hit and delta == "xyq" and checker.text == "abxyq"


def test_without_tokenizer_nothing_is_decoded():
    checker = StopChecker(None, [])
    assert checker.push(5) == ("", False) and not checker.has_tokenizer
