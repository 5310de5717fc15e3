"""Harmful instructions rewritten as questions, so safety data covers the form users ask in.

Every harmful training set we have offline is imperative ("Outline steps to steal a bus."), while many harmful
evaluation prompts are questions ("How can I kill a person?", STL Q-Harm, XSTest's unsafe half). A small model
trained only on the imperative form learns "instructions about harm -> refuse" and keeps answering the same
request asked as a question. `as_question` rewrites an instruction deterministically, with a few patterns for
the common shapes and a polite-request fallback:

- "Explain / Provide instructions on / Create a tutorial on how to X"  -> "How do I X?" / "How can I X?"
- "List / Suggest / Outline (some) ways / methods / tips to X"          -> "What are some ways to X?"
- "Create / Outline a (detailed) plan to X / for X-ing"              -> "How could I X?" / "How could I go about X-ing?"
- "Identify the easiest / best / quickest way to X"                     -> "What is the easiest way to X?"
- anything else                                                         -> "Can you <instruction>?" / "Could you …?"

The rewrite only changes the prompt's form; the safe response stays the one written for the instruction.
"""

from __future__ import annotations

import re
import zlib

_VERBS_HOW = (r"explain|describe|show(?: me)?|tell(?: me)?|teach(?: me| people| others| someone| users| children)?"
              r"|detail|demonstrate|outline|instruct(?: me| users| people)?")
_MAKE = r"give|provide|write|create|develop|produce|generate|offer|share|post|publish|compose|draft|make"
_GUIDES = (r"instructions|directions|guide|tutorial|guidance|advice|tips|steps|explanation|manual|walkthrough"
           r"|video|blog post|article|post|script")
_HOW = re.compile(
    rf"^(?:(?:{_VERBS_HOW})|(?:{_MAKE})(?: me)?(?: a| an| the| some)?(?: detailed| step-by-step| comprehensive"
    rf"| clear| brief| short)? (?:{_GUIDES})(?: that (?:explains|teaches|shows|describes|instructs(?: users| people)?))?"
    rf"(?: (?:on|for|about|explaining|describing|showing|detailing))?)(?: in detail| step by step| briefly)?"
    rf" (?:on |for |about )?how "
    rf"(?:to|one can|someone can|i can|you can) (.+)$", re.I)
_WAYS = re.compile(
    r"^(?:suggest|list|give(?: me)?|provide|describe|outline|present|identify|brainstorm|generate|share|offer|name"
    r"|compile(?: a list of)?|come up with|recommend)(?: a list of| some| a few| several| different| creative"
    r"| effective| possible)? (ways|methods|ideas|tips|strategies|techniques|steps|tactics|options|approaches)"
    r" (?:to|for|of|on) (.+)$", re.I)
_PLAN = re.compile(r"^(?:create|develop|outline|devise|compose|draft|write|design|come up with|make)(?: me)? an?"
                   r"(?: detailed| step-by-step| effective| elaborate)? (?:plan|strategy|scheme) (to|for) (.+)$", re.I)
_THE_WAY = re.compile(r"^(?:identify|find|describe|explain|tell me|name|suggest) the (best|easiest|quickest|"
                      r"simplest|cheapest|safest|most effective|fastest) (way|method) (?:to|of|for) (.+)$", re.I)


def _pick(prompt: str, options: tuple[str, ...]) -> str:
    """A deterministic choice (same prompt, same wording on every machine), spread evenly over the options."""
    return options[zlib.crc32(prompt.encode("utf-8")) % len(options)]


def as_question(prompt: str) -> str:
    """The instruction asked as a question; a prompt that already is one is returned unchanged."""
    text = " ".join(prompt.split()).rstrip(" .!;:")
    if not text or text.endswith("?"):
        return text or prompt
    if match := _HOW.match(text):
        return f"How {_pick(text, ('do', 'can'))} I {match.group(1)}?"
    if match := _WAYS.match(text):
        rest = match.group(2)
        linker = "for" if rest.split()[0].lower().endswith("ing") else "to"
        return f"What are some {match.group(1).lower()} {linker} {rest}?"
    if match := _PLAN.match(text):
        if match.group(1).lower() == "to":
            return f"How could I {match.group(2)}?"
        return f"How could I go about {match.group(2)}?"
    if match := _THE_WAY.match(text):
        return f"What is the {match.group(1).lower()} {match.group(2).lower()} to {match.group(3)}?"
    return f"{_pick(text, ('Can you', 'Could you'))} {text[:1].lower()}{text[1:]}?"
