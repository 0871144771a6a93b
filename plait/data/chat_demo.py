"""Demo chat data: conversations built from the Shakespeare scenes of the demo corpus.

Each conversation asks the assistant to continue a character's speech from its first lines and
answers with the lines that follow. Every third one goes on with a second request (the next
speech in the scene), every fourth opens with a system turn. Built deterministically, in scene
order, so a run is reproducible without any data file.
"""

from __future__ import annotations

import re

from plait.data.demo import demo_documents

DEMO_CONVERSATIONS = 300
PROMPT_LINES, ANSWER_LINES = 2, 6
SYSTEM_PROMPT = "You are an actor who knows every play of Shakespeare by heart."
# A speech opens with the speaker's name alone on a line, as demo.py writes it: "HAMLET:".
_SPEAKER = re.compile(r"^([A-Z][A-Z .'&-]*[A-Z.]):$")


def demo_conversations(limit: int = DEMO_CONVERSATIONS) -> list[list[dict]]:
    """Up to ``limit`` conversations (lists of role/content messages) from the demo scenes."""
    conversations: list[list[dict]] = []
    for scene in demo_documents():
        speeches = scene_speeches(scene)
        if not speeches:
            continue
        number = len(conversations)
        conversation = [{"role": "system", "content": SYSTEM_PROMPT}] if number % 4 == 3 else []
        conversation += _exchange(*speeches[0], first=True)
        if number % 3 == 2 and len(speeches) > 1:
            conversation += _exchange(*speeches[1], first=False)
        conversations.append(conversation)
        if len(conversations) == limit:
            break
    return conversations


def scene_speeches(scene: str) -> list[tuple[str, list[str]]]:
    """The scene's speeches long enough to continue: (speaker, lines up to the first blank)."""
    speeches = []
    lines = scene.splitlines()
    for i, line in enumerate(lines):
        speaker = _SPEAKER.match(line.strip())
        if not speaker:
            continue
        body = []
        for text in lines[i + 1 :]:
            if not text.strip():
                break
            body.append(text.strip())
        if len(body) > PROMPT_LINES:
            speeches.append((speaker.group(1).title(), body))
    return speeches


def _exchange(speaker: str, lines: list[str], first: bool) -> list[dict]:
    """A user request quoting the speech's opening and the assistant's continuation."""
    ask = "Continue this speech of" if first else "Now continue this speech of"
    opening = "\n".join(lines[:PROMPT_LINES])
    answer = "\n".join(lines[PROMPT_LINES : PROMPT_LINES + ANSWER_LINES])
    return [
        {"role": "user", "content": f"{ask} {speaker}:\n{opening}"},
        {"role": "assistant", "content": answer},
    ]
