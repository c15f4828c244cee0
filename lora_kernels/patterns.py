"""Regular expressions matched in time linear in the text: target_modules, exclude_modules, rank_pattern and
alpha_pattern keys come from files (adapter_config.json) and flags, and Python's backtracking `re` takes time
exponential in the name's length on a pattern such as "(.|.)*Z" (loading would hang for minutes).

Python's own parser (re._parser) reads the pattern, so the syntax and its meaning are Python's; the parse tree
becomes a Thompson NFA whose states are simulated in step over the text (no backtracking), with the state sets
cached as a lazy DFA (module names share most of their characters, so a model's names cost little more than
one). What a linear-time engine cannot do is refused with its reason: backreferences, lookaround, atomic groups
and possessive repeats; a pattern whose counted repeats expand past MAX_STATES states, or longer than
MAX_PATTERN characters.
"""
from __future__ import annotations

import functools
import re
from re import _constants as C  # noqa: N812 - the opcodes of Python's own parser
from re import _parser as sre_parse
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

MAX_PATTERN = 2000   # characters
MAX_STATES = 5000    # NFA states after counted repeats are expanded
_CACHE = 4096        # DFA transitions kept per pattern


class PatternError(ValueError):
    """A pattern this matcher refuses (with the reason)."""


def _word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


_CATEGORIES: Dict[object, Callable[[str], bool]] = {
    C.CATEGORY_DIGIT: str.isdecimal, C.CATEGORY_NOT_DIGIT: lambda c: not c.isdecimal(),
    C.CATEGORY_SPACE: str.isspace, C.CATEGORY_NOT_SPACE: lambda c: not c.isspace(),
    C.CATEGORY_WORD: _word, C.CATEGORY_NOT_WORD: lambda c: not _word(c),
}


def _char_test(op, av, icase: bool) -> Callable[[str], bool]:
    """A predicate on one character for LITERAL / NOT_LITERAL / ANY / IN."""
    def variants(ch: str):
        return {ch, ch.lower(), ch.upper()} if icase else {ch}

    if op is C.LITERAL:
        lit = chr(av)
        return lambda c: any(v == lit or (icase and v.lower() == lit.lower()) for v in variants(c))
    if op is C.NOT_LITERAL:
        test = _char_test(C.LITERAL, av, icase)
        return lambda c: not test(c)
    if op is C.ANY:
        return lambda c: c != "\n"
    if op is C.IN:
        negate, tests = False, []
        for item_op, item_av in av:
            if item_op is C.NEGATE:
                negate = True
            elif item_op is C.LITERAL:
                tests.append(_char_test(C.LITERAL, item_av, icase))
            elif item_op is C.RANGE:
                lo, hi = item_av
                tests.append(lambda c, lo=lo, hi=hi: any(lo <= ord(v) <= hi for v in variants(c)))
            elif item_op is C.CATEGORY:
                tests.append(_CATEGORIES[item_av])
            else:
                raise PatternError(f"the character-class item {item_op} is not supported")
        return lambda c: negate != any(t(c) for t in tests)
    raise PatternError(f"{op} is not supported")


_ASSERTS = {
    C.AT_BEGINNING: lambda s, i: i == 0, C.AT_BEGINNING_STRING: lambda s, i: i == 0,
    C.AT_END: lambda s, i: i == len(s) or (i == len(s) - 1 and s[-1] == "\n"),
    C.AT_END_STRING: lambda s, i: i == len(s),
    C.AT_BOUNDARY: lambda s, i: (i > 0 and _word(s[i - 1])) != (i < len(s) and _word(s[i])),
    C.AT_NON_BOUNDARY: lambda s, i: (i > 0 and _word(s[i - 1])) == (i < len(s) and _word(s[i])),
}


class _NFA:
    """States: ("char", test, next) | ("split", [next...]) | ("assert", test, next) | ("match",)."""

    def __init__(self):
        self.states: List[list] = []

    def add(self, state: list) -> int:
        if len(self.states) >= MAX_STATES:
            raise PatternError(f"it expands to more than {MAX_STATES} states (counted repeats)")
        self.states.append(state)
        return len(self.states) - 1

    def build(self, items, nxt: int, icase: bool) -> int:
        """The start state of `items` (a parsed sequence) followed by state `nxt`; built back to front."""
        for op, av in reversed(list(items)):
            nxt = self._one(op, av, nxt, icase)
        return nxt

    def _one(self, op, av, nxt: int, icase: bool) -> int:
        if op in (C.LITERAL, C.NOT_LITERAL, C.ANY, C.IN):
            return self.add(["char", _char_test(op, av, icase), nxt])
        if op is C.AT:
            if av not in _ASSERTS:
                raise PatternError(f"the anchor {av} is not supported")
            return self.add(["assert", _ASSERTS[av], nxt])
        if op is C.SUBPATTERN:
            _, add_flags, del_flags, sub = av
            if (add_flags | del_flags) & ~re.IGNORECASE:
                raise PatternError("inline flags other than (?i) are not supported")
            inner = (icase or bool(add_flags & re.IGNORECASE)) and not del_flags & re.IGNORECASE
            return self.build(sub, nxt, inner)
        if op is C.BRANCH:
            return self.add(["split", [self.build(alt, nxt, icase) for alt in av[1]]])
        if op in (C.MAX_REPEAT, C.MIN_REPEAT):  # laziness changes which match, not whether one exists
            lo, hi, sub = av
            if hi is C.MAXREPEAT:
                loop = self.add(["split", []])
                self.states[loop][1] = [self.build(sub, loop, icase), nxt]
                start = loop
            else:  # the optional copies X{0,hi-lo}: each may be skipped straight to nxt
                start = nxt
                for _ in range(hi - lo):
                    start = self.add(["split", [self.build(sub, start, icase), nxt]])
            for _ in range(lo):
                start = self.build(sub, start, icase)
            return start
        why = {C.GROUPREF: "backreferences", C.GROUPREF_EXISTS: "conditional groups", C.ASSERT: "lookaround",
               C.ASSERT_NOT: "lookaround", C.ATOMIC_GROUP: "atomic groups",
               C.POSSESSIVE_REPEAT: "possessive repeats"}.get(op, str(op))
        raise PatternError(f"{why} cannot be matched in linear time")


class _Program:
    def __init__(self, pattern: str):
        if len(pattern) > MAX_PATTERN:
            raise PatternError(f"it is longer than {MAX_PATTERN} characters")
        try:
            parsed = sre_parse.parse(pattern)
        except re.error as err:
            raise PatternError(f"not a valid regular expression: {err}") from None
        except RecursionError:
            raise PatternError("it is nested too deeply") from None
        if parsed.state.flags & ~(re.IGNORECASE | re.UNICODE):
            raise PatternError("inline flags other than (?i) are not supported")
        self.nfa = _NFA()
        final = self.nfa.add(["match"])
        try:
            self.start = self.nfa.build(parsed, final, bool(parsed.state.flags & re.IGNORECASE))
        except RecursionError:
            raise PatternError("it is nested too deeply") from None
        self._step: Dict[Tuple[FrozenSet[int], str], FrozenSet[int]] = {}

    def _closure(self, states, text: str, i: int) -> FrozenSet[int]:
        seen, stack = set(), list(states)
        while stack:
            s = stack.pop()
            if s in seen:
                continue
            seen.add(s)
            kind = self.nfa.states[s]
            if kind[0] == "split":
                stack.extend(kind[1])
            elif kind[0] == "assert" and kind[1](text, i):
                stack.append(kind[2])
        return frozenset(seen)

    def run(self, text: str, whole: bool) -> bool:
        """Whether the pattern matches at the start of text (re.match), to its end when whole (re.fullmatch)."""
        states = self.nfa.states
        current = self._closure([self.start], text, 0)
        n = len(text)
        for i, ch in enumerate(text):
            if not whole and any(states[s][0] == "match" for s in current):
                return True
            # The step depends on the states, this character and, through the anchors, on the next character
            # and whether the text ends there or one newline later: all in the key, so the cache is exact.
            key = (current, ch, text[i + 1] if i + 1 < n else None, i + 2 == n)
            nxt = self._step.get(key)
            if nxt is None:
                moved = [st[2] for st in (states[s] for s in current) if st[0] == "char" and st[1](ch)]
                nxt = self._closure(moved, text, i + 1)
                if len(self._step) < _CACHE:
                    self._step[key] = nxt
            current = nxt
            if not current:
                return False
        return any(states[s][0] == "match" for s in current)


@functools.lru_cache(maxsize=256)
def _program(pattern: str) -> _Program:
    return _Program(pattern)


def check_pattern(pattern: str, where: str) -> None:
    """A ValueError naming `where` (the file and key, or the flag) when pattern cannot be matched here."""
    try:
        _program(pattern)
    except PatternError as err:
        raise ValueError(f"{where}={pattern[:80]!r}{'...' if len(pattern) > 80 else ''}: refused ({err}); "
                         "patterns are matched in linear time") from None


def fullmatch(pattern: str, text: str) -> bool:
    """re.fullmatch(pattern, text) is not None, in time linear in len(text)."""
    return _program(pattern).run(text, whole=True)


def match(pattern: str, text: str) -> bool:
    """re.match(pattern, text) is not None, in time linear in len(text)."""
    return _program(pattern).run(text, whole=False)


def first_problem(patterns) -> Optional[str]:
    """The reason the first of `patterns` that cannot be matched is refused, or None."""
    for p in patterns:
        try:
            _program(p)
        except PatternError as err:
            return f"{p!r}: {err}"
    return None
