from saferl.rollout.worker import split_thinking


def test_split_thinking():
    assert split_thinking("<think>\nplan it\n</think>\n\nThe answer.") == ("plan it", "The answer.")
    assert split_thinking("plain answer ") == ("", "plain answer")
    # Non-thinking generation starts after the template's empty think block: all answer.
    assert split_thinking("\n\nOnly answer") == ("", "Only answer")
    # Reasoning cut off before </think> stays in the answer, so the guard still judges all of it.
    assert split_thinking("<think>\nunfinished") == ("", "<think>\nunfinished")
