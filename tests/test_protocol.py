"""protocol.py's parsers on real replies: tests/fixtures/real_replies.jsonl holds what SmolLM2-135M-Instruct (GGUF,
llama-cpp-python's server) answered to rmd's own prompts -- generate (harmless and harmful prompts, some under a
system prompt asking it to decline harm), annotate, refine, score and restyle, in text and JSON mode -- each with
a verdict given by reading it. Every reply goes through the same path as in a run (asker.Asker._read: the reply's
finish reason, then the stage's parser) and must come out as its verdict says. To add replies: collect them as
tests/test_teacher_llamacpp.py's server does, read each, write its verdict."""
import json
import os
from collections import Counter

import pytest

from asker import Asker
from protocol import (ParseError, parse_annotation, parse_refinement, parse_restyle, parse_score, strip_reasoning)
from teacher import Reply

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "real_replies.jsonl")
with open(FIXTURES, encoding="utf-8") as f:
    REPLIES = [json.loads(line) for line in f]


def read(fixture):
    """What a run makes of the fixture's reply: the value, or the ParseError's reason."""
    stage, jm, request = fixture["stage"], fixture["json_mode"], fixture["request"]
    parse, args = {
        "generate": (None, ()),
        "annotate": (parse_annotation, (jm, (request.get("answer_1", ""), request.get("answer_2", "")))),
        "score": (parse_score, (jm, ())),
        "refine": (parse_refinement, (request.get("nonce", ""), jm, request.get("non_preferred", ""))),
        "restyle": (parse_restyle, (request.get("nonce", ""), jm, request.get("answer", ""))),
    }[stage]
    reply = Reply(content=fixture["reply"], finish_reason=fixture["finish_reason"])
    try:
        return Asker._read(stage, reply, strip_reasoning(reply.content), parse, *args)
    except ParseError as e:
        return e.reason


REJECTED = {"cut": {"length"}, "no_score": {"no_score", "bad_json_reply", "echoed_scores"},
            "missing_section": {"missing_section", "bad_json_reply"}, "placeholder_copied": {"placeholder_copied"},
            "junk": {"degenerate_reply", "empty_reply"}}


@pytest.mark.parametrize("fixture", REPLIES, ids=[f"{r['id']}-{r['stage']}-{r['verdict']}" for r in REPLIES])
def test_each_real_reply_is_read_as_its_verdict_says(fixture):
    got, verdict = read(fixture), fixture["verdict"]
    if verdict == "answer":
        assert got == (fixture["reply"].strip(), False)
    elif verdict == "refusal":  # the teacher's answer, marked as a refusal (here: one cut at the token limit)
        assert got == (fixture["reply"].strip(), True)
    elif verdict == "accepted":
        assert (got[1] if fixture["stage"] == "refine" else got) == fixture["expect"]
    else:
        assert got in REJECTED[verdict], (got, fixture["reply"][:200])


def test_the_corpus_covers_every_stage_and_the_counts_hold():
    """The counts the report states: real answers kept, no real answer taken for junk, refusals recognised."""
    counts = Counter((r["stage"], r["verdict"]) for r in REPLIES)
    assert {r["stage"] for r in REPLIES} == {"generate", "annotate", "refine", "score", "restyle"}
    answers = [r for r in REPLIES if r["stage"] == "generate" and r["verdict"] in ("answer", "refusal")]
    kept = sum(isinstance(read(r), tuple) for r in answers)
    print(f"\n{len(REPLIES)} real replies; generate: {kept} of {len(answers)} answers kept (1 a refusal), "
          f"{counts[('generate', 'cut')]} cut; " + ", ".join(f"{s} {v} {n}" for (s, v), n in sorted(counts.items())))
    assert kept == len(answers) and counts[("generate", "refusal")] >= 1
