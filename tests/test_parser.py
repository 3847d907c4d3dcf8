"""The stream parser: streaming equals one-shot for every chunking, text survives intact, hold-back is bounded."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localqwen.constants import THINK_CLOSE, THINK_OPEN, TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from localqwen.events import Event, ToolCall
from localqwen.parser import StreamParser, parse_text

# Markers valid in each state, written out from the spec rather than read from the parser.
VALID_MARKERS = {"thinking": (THINK_OPEN, THINK_CLOSE, TOOL_CALL_OPEN), "content": (TOOL_CALL_OPEN,),
                 "tool_call": (TOOL_CALL_CLOSE,)}
LONGEST_MARKER = max(len(m) for m in (THINK_OPEN, THINK_CLOSE, TOOL_CALL_OPEN, TOOL_CALL_CLOSE))

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text pieces: CJK, emoji, code characters, whitespace and things that look like the start of a marker.
PIECES = ["a", "Z", "7", "思", "考", "答", "😀", "🎉", "<", ">", "/", "{", "}", '"', ":", " ", "\n", "\t",
          "</thin", "<tool", "</", "<think", "</tool_call", "tool_call>", "think>", "</th", "<t"]
MARKERS = [THINK_OPEN, THINK_CLOSE, TOOL_CALL_OPEN, TOOL_CALL_CLOSE]
BLANK = st.text(alphabet=" \n\t", max_size=3)


def text_without(*forbidden: str) -> st.SearchStrategy[str]:
    """Text with no leading/trailing whitespace (so boundary trimming leaves it alone) and none of `forbidden`."""
    return (st.lists(st.sampled_from(PIECES), max_size=8).map("".join).map(str.strip)
            .filter(lambda s: not any(m in s for m in forbidden)))


thinking_text = text_without(THINK_OPEN, THINK_CLOSE)  # may contain <tool_call>: it is thinking text there
content_text = text_without(TOOL_CALL_OPEN)  # may contain </think>: it is content text there
json_scalar = st.none() | st.booleans() | st.integers(-99, 99) | st.text(alphabet="ab思😀<>/\" \n", max_size=5)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text("xy", max_size=2), inner, max_size=2),
    max_leaves=4,
)


@st.composite
def tool_calls(draw: st.DrawFn) -> tuple[str, ToolCall]:
    name = draw(st.text(alphabet="ab_思", min_size=1, max_size=5))
    arguments = draw(st.dictionaries(st.text(alphabet="xyz", max_size=3), json_value, max_size=3))
    as_string = draw(st.booleans())  # arguments double-encoded as a JSON string
    body = json.dumps({"name": name, "arguments": json.dumps(arguments) if as_string else arguments},
                      ensure_ascii=draw(st.booleans()))
    return body, ToolCall(raw=body, name=name, arguments=arguments)


@st.composite
def streams(draw: st.DrawFn) -> tuple[str, bool, list[Event]]:
    """A well-formed generation, its `thinking` flag and the events expected from it, built side by side."""
    thinking = draw(st.booleans())
    stream, expected = "", []
    if thinking:
        part = draw(thinking_text)
        stream += draw(BLANK) + part + draw(BLANK) + THINK_CLOSE
        expected.append(Event("thinking", part))
    # Content is a part, then any number of (tool call, part): blank runs sit only at section boundaries.
    calls = draw(st.lists(tool_calls().filter(lambda bc: TOOL_CALL_CLOSE not in bc[0]), max_size=3))
    part = draw(content_text)
    stream += draw(BLANK) + part + draw(BLANK)
    expected.append(Event("content", part))
    for body, call in calls:
        stream += TOOL_CALL_OPEN + draw(BLANK) + body + draw(BLANK) + TOOL_CALL_CLOSE
        expected.append(Event("tool_call", tool_call=call))
        part = draw(content_text)
        stream += draw(BLANK) + part + draw(BLANK)
        expected.append(Event("content", part))
    return stream, thinking, merged([e for e in expected if e.kind == "tool_call" or e.text])


# Anything at all, real markers included: the streaming/one-shot equivalence must hold for any input.
soup = st.tuples(st.lists(st.sampled_from(PIECES + MARKERS + ['{"name": "f", "arguments": {}}']), max_size=14)
                 .map("".join), st.booleans())


def merged(events: list[Event]) -> list[Event]:
    out: list[Event] = []
    for e in events:
        if out and e.kind == out[-1].kind and e.kind != "tool_call":
            out[-1] = Event(e.kind, out[-1].text + e.text)
        else:
            out.append(e)
    return out


def stream_in_chunks(chunks: list[str], thinking: bool) -> list[Event]:
    parser = StreamParser(thinking=thinking)
    events: list[Event] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events + parser.finish()


def random_chunks(stream: str, data: st.DataObject, max_cuts: int) -> list[str]:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=max_cuts)))
    return [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]


def check_well_formed(events: list[Event]) -> None:
    for e in events:
        assert isinstance(e, Event)
        if e.kind == "tool_call":
            assert e.tool_call is not None and e.text == ""
        else:
            assert e.kind in ("thinking", "content") and e.text and e.tool_call is None


def joined(events: list[Event], kind: str) -> str:
    return "".join(e.text for e in events if e.kind == kind)


# --- invariants --------------------------------------------------------------------------------------------------


@SETTINGS
@given(streams())
def test_every_split_point_matches_one_shot(case: tuple[str, bool, list[Event]]) -> None:
    stream, thinking, _ = case
    whole = parse_text(stream, thinking)
    check_well_formed(whole)
    for cut in range(len(stream) + 1):
        events = stream_in_chunks([stream[:cut], stream[cut:]], thinking)
        check_well_formed(events)
        assert merged(events) == whole


@SETTINGS
@given(st.one_of(streams().map(lambda c: c[:2]), soup), st.data())
def test_random_chunkings_match_one_shot(case: tuple[str, bool], data: st.DataObject) -> None:
    stream, thinking = case
    events = stream_in_chunks(random_chunks(stream, data, 12), thinking)
    check_well_formed(events)
    assert merged(events) == parse_text(stream, thinking)
    # Char by char, the most fragmented stream there is.
    assert merged(stream_in_chunks(list(stream), thinking)) == parse_text(stream, thinking)


@SETTINGS
@given(soup)
def test_soup_every_split_point_matches_one_shot(case: tuple[str, bool]) -> None:
    stream, thinking = case
    whole = parse_text(stream, thinking)
    for cut in range(len(stream) + 1):
        assert merged(stream_in_chunks([stream[:cut], stream[cut:]], thinking)) == whole


@SETTINGS
@given(streams())
def test_text_is_input_minus_markers(case: tuple[str, bool, list[Event]]) -> None:
    stream, thinking, expected = case
    events = parse_text(stream, thinking)
    assert events == expected
    assert joined(events, "thinking") == joined(expected, "thinking")
    assert joined(events, "content") == joined(expected, "content")


@SETTINGS
@given(st.one_of(streams().map(lambda c: c[:2]), soup), st.data())
def test_held_back_text_is_bounded(case: tuple[str, bool], data: st.DataObject) -> None:
    stream, thinking = case
    parser = StreamParser(thinking=thinking)
    fed = ""
    for chunk in random_chunks(stream, data, 8):
        parser.feed(chunk)
        fed += chunk
        if parser.state in ("tool_call", "thinking_call", "after_call"):
            continue  # a tool call is held whole by design until it closes (one opened while thinking, until decided)
        # What a flush would release now is exactly what feed() is holding back (held whitespace that a flush
        # drops is allowed to be held anyway): past its whitespace it must be a proper prefix of a valid marker.
        flushed = copy.deepcopy(parser).finish()
        assert len(flushed) <= 1
        held = flushed[0].text.lstrip() if flushed else ""
        assert len(held) <= LONGEST_MARKER - 1
        assert held == "" or any(m.startswith(held) and m != held for m in VALID_MARKERS[parser.state])
        assert fed.endswith(held)


# --- examples ----------------------------------------------------------------------------------------------------


def T(text: str) -> Event:  # noqa: N802 - reads like the event kind it builds
    return Event("thinking", text)


def C(text: str) -> Event:  # noqa: N802
    return Event("content", text)


def test_typical_qwen_output() -> None:
    assert parse_text("Let me think.\n</think>\n\nThe answer is 4.") == [T("Let me think."), C("The answer is 4.")]


def test_stray_think_at_start_is_dropped() -> None:
    assert parse_text("<think>\nHmm.\n</think>\n\nYes.") == [T("Hmm."), C("Yes.")]
    assert parse_text("a <think> b</think>c") == [T("a  b"), C("c")]


def test_think_close_char_by_char() -> None:
    parser = StreamParser()
    events = parser.feed("Done.\n")
    assert events == [T("Done.")]
    for ch in THINK_CLOSE[:-1]:
        assert parser.feed(ch) == []
        assert parser.in_thinking
    assert parser.feed(">") == []
    assert parser.state == "content" and not parser.in_thinking
    assert parser.feed("\n\n") == []
    assert parser.feed("42") == [C("42")]
    assert parser.finish() == []


def test_partial_marker_that_does_not_complete_is_text() -> None:
    parser = StreamParser()
    assert parser.feed("x </thi") == [T("x")]
    assert parser.feed("nk about it") == [T(" </think about it")]
    assert parse_text("cut at </thi") == [T("cut at </thi")]


def test_cut_off_inside_thinking() -> None:
    parser = StreamParser()
    events = parser.feed("Step 1: add.\nStep 2: ") + parser.finish()
    assert merged(events) == [T("Step 1: add.\nStep 2:")]
    assert parser.state == "thinking" and parser.in_thinking


def test_two_tool_calls_with_text_between() -> None:
    text = ('Need tools.\n</think>\n\nChecking.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
            'And also:\n<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>')
    assert parse_text(text) == [
        T("Need tools."), C("Checking."),
        Event("tool_call", tool_call=ToolCall('{"name": "a", "arguments": {"x": 1}}', "a", {"x": 1})),
        C("And also:"),
        Event("tool_call", tool_call=ToolCall('{"name": "b", "arguments": {}}', "b", {})),
    ]


@pytest.mark.parametrize(("body", "name", "error"), [
    ('{"name": "f", "arguments": {', None, "invalid JSON"),
    ("[1, 2]", None, "not a JSON object"),
    ('{"arguments": {}}', None, "name"),
    ('{"name": 3, "arguments": {}}', None, "name"),
    ('{"name": "f", "arguments": [1]}', "f", "arguments"),
    ('{"name": "f", "arguments": "not json"}', "f", "arguments"),
    ('{"name": "f", "arguments": "[1]"}', "f", "arguments"),
    ("[" * 100_000, None, "invalid JSON"),  # deep nesting must not raise RecursionError
])
def test_malformed_tool_call(body: str, name: str | None, error: str) -> None:
    events = parse_text(f"</think><tool_call>{body}</tool_call>after")
    call = events[0].tool_call
    assert call is not None and call.raw == body and call.name == name and call.arguments is None
    assert call.error is not None and error in call.error
    assert events[1:] == [C("after")]


def test_arguments_as_json_string() -> None:
    body = '{"name": "get_weather", "arguments": "{\\"city\\": \\"東京\\"}"}'
    [event] = parse_text(f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}", thinking=False)
    assert event.tool_call == ToolCall(raw=body, name="get_weather", arguments={"city": "東京"})


def test_unterminated_tool_call() -> None:
    parser = StreamParser(thinking=False)
    assert parser.feed('Calling.\n<tool_call>\n{"name": "f", "argu') == [C("Calling.")]
    assert parser.state == "tool_call"
    [event] = parser.finish()
    assert event.tool_call == ToolCall(raw='{"name": "f", "argu', error="unterminated tool call")


def test_tool_call_text_never_becomes_content() -> None:
    events = parse_text('</think>x<tool_call>{"name": "f", "arguments": {}}</tool_call>y')
    assert joined(events, "content") == "xy"


def test_tool_call_inside_thinking_is_thinking_text() -> None:
    text = 'Maybe <tool_call>{"name": "f"}</tool_call> later.\n</think>\n\nNo.'
    assert parse_text(text) == [T('Maybe <tool_call>{"name": "f"}</tool_call> later.'), C("No.")]


def test_second_think_close_in_content_is_content() -> None:
    assert parse_text("a</think>b</think>c") == [T("a"), C("b</think>c")]


def test_thinking_false_starts_in_content() -> None:
    parser = StreamParser(thinking=False)
    assert parser.state == "content" and not parser.in_thinking
    assert parse_text("\nHello </think> <think>", thinking=False) == [C("Hello </think> <think>")]


def test_cjk_and_emoji_around_markers() -> None:
    text = "思考中😀</think>答案是四🎉<tool_call>{\"name\": \"查\", \"arguments\": {\"q\": \"🌏\"}}</tool_call>完"
    events = parse_text(text)
    assert events == [T("思考中😀"), C("答案是四🎉"),
                      Event("tool_call", tool_call=ToolCall('{"name": "查", "arguments": {"q": "🌏"}}', "查",
                                                            {"q": "🌏"})),
                      C("完")]
    assert merged(stream_in_chunks(list(text), thinking=True)) == events


def test_whitespace_trimming_at_boundaries() -> None:
    text = ("\n\n  thought one\n\n  thought two \n\n</think>\n\n answer  line\n\n"
            '<tool_call>\n{"name": "f"}\n</tool_call>\n\nmore \n')
    assert parse_text(text) == [
        T("thought one\n\n  thought two"), C("answer  line"),
        Event("tool_call", tool_call=ToolCall('{"name": "f"}', "f", {})), C("more"),
    ]


def test_trailing_whitespace_is_held_until_text_follows() -> None:
    parser = StreamParser()
    assert parser.feed("a  ") == [T("a")]
    assert parser.feed("\n") == []
    assert parser.feed("b") == [T("  \nb")]
    assert parser.feed("  ") == []
    assert parser.finish() == []


def test_whitespace_only_sections_emit_nothing() -> None:
    assert parse_text("  \n</think>\n\n") == []
    assert parse_text("") == []
    assert StreamParser().finish() == []


# --- tool calls opened while thinking ----------------------------------------------------------------------------

@st.composite
def calls_while_thinking(draw: st.DrawFn) -> tuple[str, list[Event]]:
    """Thinking that opens tool calls and never closes: the calls are real, nothing of them is thinking."""
    part = draw(thinking_text.filter(lambda s: TOOL_CALL_OPEN not in s))
    stream, expected = draw(BLANK) + part + draw(BLANK), [Event("thinking", part)]
    for body, call in draw(st.lists(tool_calls().filter(lambda bc: TOOL_CALL_CLOSE not in bc[0]), min_size=1,
                                    max_size=2)):
        stream += TOOL_CALL_OPEN + draw(BLANK) + body + draw(BLANK) + TOOL_CALL_CLOSE
        expected.append(Event("tool_call", tool_call=call))
        after = draw(content_text.filter(lambda s: THINK_CLOSE not in s))
        stream += draw(BLANK) + after
        expected.append(Event("content", after))
    return stream, merged([e for e in expected if e.kind == "tool_call" or e.text])


@SETTINGS
@given(calls_while_thinking())
def test_a_call_opened_while_thinking_is_a_call_and_never_shown_as_thinking(case: tuple[str, list[Event]]) -> None:
    stream, expected = case
    assert parse_text(stream) == expected
    for cut in range(len(stream) + 1):
        events = stream_in_chunks([stream[:cut], stream[cut:]], thinking=True)
        assert merged(events) == expected
        assert not any(TOOL_CALL_OPEN in e.text or '"name"' in e.text for e in events if e.kind == "thinking")


def test_call_while_thinking_examples() -> None:
    call = ToolCall('{"name": "f", "arguments": {}}', "f", {})
    text = 'I need the clock.\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    assert parse_text(text) == [T("I need the clock."), Event("tool_call", tool_call=call)]
    parser = StreamParser()
    assert parser.feed("I need the clock.\n<tool_call>\n{") == [T("I need the clock.")]
    assert parser.in_thinking and parser.in_call and parser.state == "thinking_call"
    assert parser.feed('"name": "f", "arguments": {}}\n</tool_call>\n') == []  # held: undecided
    assert parser.state == "after_call" and not parser.in_call
    assert parser.finish() == [Event("tool_call", tool_call=call)] and parser.state == "content"
    # `</think>` after it: it was thinking, released as it came.
    parser = StreamParser()
    assert parser.feed("Maybe <tool_call>x</tool_call> no") == [T("Maybe")]
    assert parser.feed("t.</think>Yes") == [T(" <tool_call>x</tool_call> not."), C("Yes")]
    # Cut off (a token limit) while the call is held: still thinking, truncated.
    parser = StreamParser()
    assert parser.feed('Plan <tool_call>{"name": "f", "argu') == [T("Plan")]
    assert parser.finish(complete=False) == [T(' <tool_call>{"name": "f", "argu')] and parser.in_thinking


def test_a_complete_call_whose_closing_tag_is_missing() -> None:
    text = '</think>Sure.<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n'
    assert parse_text(text) == [C("Sure."), Event("tool_call", tool_call=ToolCall(
        '{"name": "f", "arguments": {"x": 1}}', "f", {"x": 1}))]
    parser = StreamParser()
    parser.feed(text)
    [cut] = parser.finish(complete=False)  # cut off by max_tokens: not a call
    assert cut.tool_call.error == "unterminated tool call"
