r"""Grading: is a response's final answer the gold answer? Bounded and sandboxed, since model output is untrusted.

`grade_batch(responses, golds)` returns each response's correctness and a `GradeStats` of what the bounds did (for
a training step's metrics); `grade` and `is_correct` are its short forms, `start_grader` starts the pool early.
rewards.py never grades: grpo.py and evaluate.py call this module, and the rewards read its verdicts.
`after_answer` says how much of a response follows its answer's first statement: the padding that evaluate.py
reports and that --reward lcpo-noafter pays nothing for.

Grading design
  1. Extraction (`extract_answer`): text after the first `</think>` if there is one (our default model is
     not a reasoning model, so without it the whole response is graded), then the last brace-matched
     `\boxed{...}` / `\fbox{...}` (or `\boxed 5`). Multiple choice: the boxed letter, else the last
     standalone letter A-D.
  2. Cheap path, in-process: a normalized string match (`normalize_answer`: `\left`, `\right`, `\text{}`,
     units, `$`, degrees, `%`, spaces, `\dfrac`, `a/b`, `1,000`, `.5`, `x=3` -> `3`) and exact rational
     comparison of plain numbers with `fractions.Fraction` (so `0.5 == \frac{1}{2}`, `8.0 == 8`).
  3. Cost screen, in-process (`_too_costly`): an answer the symbolic path would spend its whole time bound
     on is wrong outright: a numeric exponent over MAX_EXPONENT (power towers such as `10^{10^{10}}`,
     `9^9^9^9`, `(x+1)^{100000}`), a factorial of a number over MAX_FACTORIAL or of a power or a factorial
     (`(10^8)!`, `(10!)!`), brackets nested deeper than MAX_NESTING (math-verify's time grows with the depth:
     ~0.3 s at 8 parentheses, ~0.6 s at 11), and an integral, sum, product or limit the gold answer does not
     have (not a final answer; sympy would try to evaluate it).
  4. Symbolic path, only for the items left: math-verify in a pool of persistent child processes
     (`python -I grading.py --serve`, JSON lines over pipes, one item per child at a time), items dispatched
     to free children in parallel from the calling thread.

Safety model (model output is untrusted)
  * Bounded in-process work: answers over MAX_ANSWER_CHARS or deeper than MAX_BRACE_DEPTH are wrong outright;
    brace matching is a linear scan over at most MAX_BOXED_TRIES candidates; regexes run only on capped text
    and have no nested quantifiers. Nothing touches eval/exec/sympify in the parent.
  * math-verify is used with `LatexExtractionConfig` only. Reading math_verify 0.9.0: `ExprExtractionConfig`
    calls `parse_expr` (-> eval) on the raw matched text (parser.py `extract_expr`); `LatexExtractionConfig`
    goes normalize_latex (string replacements) -> latex2sympy (ANTLR lexer/parser -> sympy constructors). The
    only sympify/parse_expr calls reachable there are `sympy.Number(text)` on NUMBER tokens (digits, `,`,
    `.` by the lexer) and sympify of already-built sympy objects (sets.py, logic.py); latex2sympy's
    `parse_expr(val)` needs `variable_values`, which we never pass. `grader.verify` has none.
  * Defence in depth, in every child of the pool: RLIMIT_AS (2 GiB) so a huge integer dies of MemoryError,
    RLIMIT_NPROC=0 and RLIMIT_FSIZE=0 (best effort), and an audit hook that refuses process creation, file
    writes, sockets and any compile() of a `<string>` that is not numeric-constructor code (what sympy.Number
    produces). A child checks that its hook refuses an untrusted compile before it reports ready; one that
    cannot start raises RuntimeError in the parent with the child's error.
  * Time, per item: the child's own soft timer (0.8 x timeout, raises a BaseException math-verify cannot
    swallow) and the parent's hard deadline, `timeout` after the item was sent (default ITEM_TIMEOUT = 0.9 s):
    past it the child is killed and a replacement starts at once, in the background. An item is only ever sent
    to a child that has reported ready, so a child's start-up (seconds: importing math-verify and warming it
    up) never counts against an item's bound, and a restart never makes the next items time out.
  * Time, per call: `deadline` seconds (None: no bound); the items not graded by then are wrong. An item still
    in a child at the deadline is left to finish there (its answer is dropped when it comes, or the child is
    killed at the item's own deadline), so the pool stays warm for the next call. GradeStats counts the items
    each bound hit (`grade_batch`).
  * No signals in the parent, and only poll() on the children's pipes from the calling thread, so grading
    works off the main thread and inside daemonic multiprocessing workers. One call uses the pool at a time
    (a lock); a forked process starts a pool of its own.
"""

from __future__ import annotations

# Imports: the standard library only: this file is also the grading child's script (`python -I grading.py --serve`),
# which imports math_verify inside `_symbolic_equal` and nothing of this project.
import atexit
import json
import logging
import math
import os
import re
import resource
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction

__all__ = [
    "extract_answer",
    "last_number",
    "normalize_answer",
    "is_correct",
    "grade",
    "grade_batch",
    "GradeStats",
    "start_grader",
    "default_procs",
    "MAX_ANSWER_CHARS",
    "MAX_BRACE_DEPTH",
    "ITEM_TIMEOUT",
]

MAX_ANSWER_CHARS = 1000  # a longer boxed answer is wrong outright
MAX_BRACE_DEPTH = 50  # so is a deeper one
MAX_BOXED_TRIES = 16  # unbalanced \boxed{ candidates tried, from the last backwards
MC_TAIL_CHARS = 20_000  # the multiple-choice letter fallback only looks at the end of the text
MAX_EXPONENT = 10_000  # a larger numeric exponent is too costly to grade (sympy expands / builds the int)
MAX_FACTORIAL = 10_000  # so is the factorial of a larger number
MAX_NESTING = 8  # and brackets nested deeper (8,083 MATH / AMC / AIME gold answers nest 3 deep at most)
ITEM_TIMEOUT = 0.9  # seconds per symbolic item (hard; the kill and its bookkeeping fit under 1 s)
MAX_PROCS = 4  # grading processes per process that grades (one rank), at most
CHILD_MEMORY_BYTES = 2 << 30
CHILD_START_TIMEOUT = 60.0  # a child not ready by then is restarted; a call with no progress for that long stops


# ----------------------------------------------------------------------------------------------- extraction
def _brace_content(text: str, open_pos: int) -> str | None:
    """Content of the group whose `{` is at open_pos; None if unbalanced within the caps (linear scan)."""
    depth = 0
    for i in range(open_pos, min(len(text), open_pos + MAX_ANSWER_CHARS + 2)):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
            continue  # `\{` / `\}` are literal braces; the next char is skipped below by the depth rule
        if c == "{" and text[i - 1] != "\\":
            depth += 1
            if depth > MAX_BRACE_DEPTH:
                return None
        elif c == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : i]
    return None


def _final_part(response: str) -> str:
    """The text after the first </think>, or the whole response when there is none."""
    cut = response.find("</think>")
    return response[cut + len("</think>") :] if cut >= 0 else response


def extract_answer(response: str) -> str | None:
    """The last brace-matched \\boxed{...} / \\fbox{...} (or `\\boxed 5`) after the first </think>, else None."""
    if not isinstance(response, str):
        return None
    text = _final_part(response)
    end, tries = len(text), 0
    while tries < MAX_BOXED_TRIES:
        b, f = text.rfind("\\boxed", 0, end), text.rfind("\\fbox", 0, end)
        start, cmd = (b, "\\boxed") if b >= f else (f, "\\fbox")
        if start < 0:
            return None
        tries, end, j = tries + 1, start, start + len(cmd)
        k = j
        while k < len(text) and k - j < 8 and text[k] == " ":
            k += 1
        if k < len(text) and text[k] == "{":
            content = _brace_content(text, k)
            if content is not None:
                return content.strip()
        elif cmd == "\\boxed" and k > j:  # `\boxed 5`: up to whitespace or `$`
            stop = k
            while stop < len(text) and stop - k <= MAX_ANSWER_CHARS and text[stop] not in " \n\t$":
                stop += 1
            if stop > k and stop - k <= MAX_ANSWER_CHARS:
                return text[k:stop].rstrip(".")
    return None


_LAST_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")


def last_number(response: str) -> str | None:
    """The last number of the response (after the first </think>), thousands separators dropped, a trailing
    `.` ignored: the GSM8K-style "flexible" answer for a model that does not write \\boxed{}. Looks at the
    last 2,000 characters only, so its cost is bounded."""
    if not isinstance(response, str):
        return None
    text = _final_part(response)[-2000:]
    found = _LAST_NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def after_answer(response: str, gold: str) -> float | None:
    """The fraction of a response's characters that come after its answer is first stated: the end of the first
    `= gold`, `is gold` or `: gold` (else of the first `gold` standing alone, as in "he has 2 marbles left"); None
    if gold does not occur. Meant for correct responses. What follows the answer is what a model that has nothing
    left to compute pads a long budget with (the answer restated, thanks, a sentence over and over), so a high
    value at a long budget says its extra tokens were not spent on the solution. A proxy: a number of the problem
    equal to the answer, said before it is computed, counts as the answer. Linear in the response's length (the
    whitespace runs it skips are bounded), as the response is untrusted."""
    if not response or not gold:
        return None
    alone = rf"(?<![\w.]){re.escape(gold.strip())}(?![\w]|\.\d)"
    m = re.search(rf"(?:=|\bis:?|:)\s{{0,8}}\$?(?:\\boxed\{{)?\s{{0,8}}{alone}", response) or re.search(alone, response)
    return None if m is None else 1 - m.end() / len(response)


# ------------------------------------------------------------------------------------------- normalization
_UNWRAP = ("\\text", "\\textbf", "\\textit", "\\mathrm", "\\mathbf", "\\mbox", "\\operatorname", "\\boxed")
_REMOVE = (
    "\\left",
    "\\right",
    "\\displaystyle",
    "\\!",
    "\\,",
    "\\;",
    "\\:",
    "\\ ",
    "~",
    "\\$",
    "$",
    "\\%",
    "%",
    "^{\\circ}",
    "^\\circ",
    "{}^\\circ",
    "\\circ",
    "°",
    "\\quad",
    "\\qquad",
)
_UNITS = re.compile(
    r"(?<=[\d}])\s*(?:units?|cm|mm|km|meters?|inch(?:es)?|feet|foot|ft|yards?|miles?|mph|hours?|hrs?|"
    r"minutes?|mins?|seconds?|sec|days?|weeks?|months?|years?|dollars?|cents?|degrees?|pounds?|lbs?|"
    r"ounces?|oz|gallons?|liters?|kg|grams?|square|sq|cubic)(?:\^\{?[23]\}?|\^[23])?\.?$"
)
_NUMBER = re.compile(r"-?\d{1,60}(?:\.\d{0,60})?|-?\.\d{1,60}")
_FRAC = re.compile(r"(-?)\\frac\{(-?\d{1,60})\}\{(-?\d{1,60})\}")
_SLASH = re.compile(r"(-?\d{1,60})/(\d{1,60})")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_UNIT_TAIL = re.compile(r"[A-Za-z .]{1,40}(?:\^\{?[23]\}?)?")
_ASSIGN_LHS = re.compile(r"[a-zA-Z](?:_\d|_\{\w{1,3}\})?")


def _unwrap(s: str, cmd: str) -> str:
    """`\\text{abc}` -> `abc` for every (brace-matched) occurrence of cmd."""
    for _ in range(50):
        i = s.find(cmd + "{")
        if i < 0 or s[i + len(cmd) : i + len(cmd) + 1] != "{":
            return s
        inner = _brace_content(s, i + len(cmd))
        if inner is None:
            return s
        s = s[:i] + inner + s[i + len(cmd) + len(inner) + 2 :]
    return s


def normalize_answer(s: str) -> str | None:
    """Canonical string for a final answer (the MATH `strip_string` family); None if over the caps."""
    if s is None or len(s) > MAX_ANSWER_CHARS:
        return None
    s = s.strip().replace("\n", " ").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for tok in _REMOVE:
        s = s.replace(tok, "")
    i = s.find("\\text{ ")  # `10\text{ cm}` / `6\text{ m}^2`: a unit word group ending the answer
    unit = _brace_content(s, i + 5) if i > 0 else None
    if unit is not None and _UNIT_TAIL.fullmatch(unit + s[i + 7 + len(unit) :]):
        s = s[:i]
    for cmd in _UNWRAP:
        s = _unwrap(s, cmd)
    s = _UNITS.sub("", s.strip()).replace(" ", "")
    if s.count("=") == 1 and _ASSIGN_LHS.fullmatch(s.split("=")[0]):
        s = s.split("=")[1]  # `x=3` -> `3`
    s = s.rstrip(".")
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if len(s) == 3 and s[0] == "(" and s[2] == ")" and s[1].isalpha():
        s = s[1]  # `(A)` -> `A`
    if s.startswith("\\frac") and len(s) == 7 and s[5:].isdigit():
        s = f"\\frac{{{s[5]}}}{{{s[6]}}}"  # `\frac12`
    m = _SLASH.fullmatch(s)
    if m:
        s = f"\\frac{{{m[1]}}}{{{m[2]}}}"
    return s


def _as_fraction(s: str) -> Fraction | None:
    """Exact value of a plain number, `\\frac{a}{b}` or `-\\frac{a}{b}` (no exponents, so no huge ints)."""
    if _NUMBER.fullmatch(s):
        return Fraction(s if not s.lstrip("-").startswith(".") else s.replace(".", "0.", 1))
    m = _FRAC.fullmatch(s)
    if m and int(m[3]) != 0:
        return Fraction(int(m[2]), int(m[3])) * (-1 if m[1] else 1)
    return None


def _cheap_equal(gold_n: str, pred_n: str) -> bool:
    if gold_n == pred_n:
        return bool(gold_n)
    g, p = _as_fraction(gold_n), _as_fraction(pred_n)
    return g is not None and g == p


def _mc_letter(text: str | None) -> str | None:
    s = normalize_answer(text) if text else None
    if s is None:
        return None
    m = re.match(r"\(?([A-D])(?:\)|[.:]|$)", s)
    return m[1] if m else None


def _mc_answer(response: str) -> str | None:
    letter = _mc_letter(extract_answer(response))
    if letter is None:
        tail = _final_part(response)[-MC_TAIL_CHARS:]
        found = re.findall(r"\b([A-D])\b", tail)
        letter = found[-1] if found else None
    return letter


# ------------------------------------------------------------------------------------------- cost screen
_BIG_OPERATOR = re.compile(r"\\(i{1,3}nt|oint|sum|prod|lim(?:sup|inf)?)(?![A-Za-z])")
_POWER_TOWER = re.compile(r"\^-?(\d{1,1000}(?:\^-?\d{1,1000}){0,50})")  # `^` then a numeric tower (flat text)
_FACTORIAL = re.compile(r"(?<!\\)!")  # `\!` is a LaTeX thin space
_TRAILING_NUMBER = re.compile(r"\d{1,1000}$")


def _tower_log10(tower: str) -> float:
    """log10 of the numeric power tower `a^b^c...`, read right to left (the largest reading); inf if huge."""
    log = 0.0  # log10 of the value above the current base: 1 above the top
    for n in map(int, reversed(tower.replace("-", "").split("^"))):
        if n <= 1:
            log = 0.0  # 0^x and 1^x are at most 1
        elif log > 300:
            return math.inf
        else:
            log = math.log10(n) * 10**log
    return log


def _huge_exponent(pred: str) -> bool:
    """A numeric exponent over MAX_EXPONENT: `10^{10^{10}}`, `9^9^9^9`, `(x+1)^{100000}`, `\\sum^{10^9}`."""
    # Flatten the braces: `}` before `^` goes (`{10^2}^{3}` -> `10^2^3`), any other `}` separates (`2^{3}4`).
    flat = re.sub(r"\s+", "", pred).replace("{", "")
    flat = re.sub(r"\}+(?=\^)", "", flat).replace("}", " ")
    return any(_tower_log10(m[1]) > math.log10(MAX_EXPONENT) for m in _POWER_TOWER.finditer(flat))


def _group_before(text: str, close: int) -> str:
    """The bracketed group ending at text[close] (one of `)}]`), by a backward scan; all before it if unbalanced."""
    depth = 0
    for i in range(close, -1, -1):
        depth += (text[i] in ")}]") - (text[i] in "({[")
        if depth == 0:
            return text[i + 1 : close]
    return text[:close]


def _huge_factorial(pred: str) -> bool:
    """n! for n over MAX_FACTORIAL, a factorial of a factorial (`(10!)!`, `10!!`), or of a group holding a
    power or a big number (`(10^{8})!`)."""
    marks = [m.start() for m in _FACTORIAL.finditer(pred)]
    if len(marks) > 8:
        return True
    for i in marks:
        before = pred[:i].rstrip()
        if before.endswith("!"):
            return True
        number = _TRAILING_NUMBER.search(before)
        if number and int(number[0]) > MAX_FACTORIAL:
            return True
        if before.endswith((")", "}", "]")):
            group = _group_before(before, len(before) - 1)
            if "^" in group or "!" in group or any(int(d) > MAX_FACTORIAL for d in re.findall(r"\d{1,1000}", group)):
                return True
    return False


def _nesting(s: str) -> int:
    """How deep the brackets of s nest (any of `([{`)."""
    depth = deepest = 0
    for c in s:
        if c in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in ")]}":
            depth -= 1
    return deepest


def _too_costly(gold: str, pred: str) -> bool:
    """An answer the symbolic path would spend its whole time bound on (module docstring, step 3): wrong."""
    if set(_BIG_OPERATOR.findall(pred)) - set(_BIG_OPERATOR.findall(gold)):
        return True  # still an integral / sum / product / limit: not a final answer, and costly to evaluate
    return _nesting(pred) > MAX_NESTING or _huge_exponent(pred) or _huge_factorial(pred)


# ---------------------------------------------------------------------------------------- symbolic child
def _symbolic_equal(gold: str, pred: str) -> bool:
    """math-verify equivalence, LaTeX extraction only (eval-free, see module docstring). Child process only."""
    from math_verify import LatexExtractionConfig, parse, verify

    cfg = [LatexExtractionConfig(boxed_match_priority=0)]
    g = parse("\\boxed{" + gold + "}", cfg, fallback_mode="no_fallback", parsing_timeout=None)
    p = parse("\\boxed{" + pred + "}", cfg, fallback_mode="no_fallback", parsing_timeout=None)
    return bool(g and p and verify(g, p, timeout_seconds=None))


class _SoftTimeout(BaseException):  # BaseException: math-verify's `except Exception` cannot swallow it
    pass


_SAFE_CODE = re.compile(r"[\sA-Za-z0-9_().,'+\-]*")
_SAFE_NAMES = {"Integer", "Float", "Rational", "Symbol", "S"}
# Exercises the lazy imports and caches (intervals, `\in`, bases) before the audit hook and the first item.
_WARM_UP = (
    ("\\frac{1}{2}", "0.5"),
    ("(1,2]", "\\{1,2\\}"),
    ("x=\\sqrt{2}\\pi", "\\sin(30^\\circ)"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "10\\%"),
    ("3+2i", "\\infty"),
    ("x^2+1", "\\text{E}"),
    ("\\left[ \\frac{\\pi^2}{8}, 1 \\right]", "x \\in [-2,7]"),
    ("4210_{5}", "(a+5)(b+2)"),
)


def _audit(event: str, args: tuple) -> None:
    """Child-only audit hook: no processes, sockets, file writes, or eval of arbitrary strings."""
    if event in (
        "os.system",
        "subprocess.Popen",
        "os.posix_spawn",
        "os.fork",
        "os.forkpty",
        "pty.spawn",
        "socket.connect",
        "socket.bind",
        "os.remove",
        "os.rename",
        "shutil.rmtree",
        "ctypes.dlopen",
    ) or event.startswith(("os.exec", "os.spawn")):
        raise PermissionError(f"grading child: {event} refused")
    if event == "open" and (any(c in (args[1] or "") for c in "wax+") or (args[2] or 0) & (os.O_WRONLY | os.O_RDWR)):
        raise PermissionError("grading child: file write refused")
    if event == "compile" and args[1] in ("<string>", b"<string>"):
        src = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
        if src == "from sympy import *":  # parse_expr's own global_dict setup
            return
        words = set(re.findall(r"[A-Za-z_]\w*", src))
        if not _SAFE_CODE.fullmatch(src) or not words <= _SAFE_NAMES:
            raise PermissionError("grading child: compile of an untrusted string refused")


def _serve() -> None:
    """Child main loop: JSON lines {"gold", "pred", "timeout"} in, {"ok": bool} out."""
    out, sys.stdout = sys.stdout, open(os.devnull, "w")  # a stray print() cannot corrupt the answers
    logging.disable(logging.WARNING)
    for g, p in _WARM_UP:
        _symbolic_equal(g, p)
    sys.addaudithook(_audit)
    try:
        compile("__import__('os')", "<string>", "eval")
    except PermissionError:
        pass  # the hook is on
    else:
        sys.exit("grading child: the audit hook did not refuse an untrusted compile")
    # After the warm-up, so that a failing import's traceback can still be written to the parent's stderr file
    for lim, val in ((resource.RLIMIT_AS, CHILD_MEMORY_BYTES), (resource.RLIMIT_NPROC, 0), (resource.RLIMIT_FSIZE, 0)):
        try:
            resource.setrlimit(lim, (val, val))
        except (ValueError, OSError):
            pass

    def on_alarm(signum, frame):
        raise _SoftTimeout()

    signal.signal(signal.SIGALRM, on_alarm)
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        ok = False
        try:
            item = json.loads(line)
            signal.setitimer(signal.ITIMER_REAL, max(0.05, 0.8 * float(item["timeout"])))
            ok = _symbolic_equal(item["gold"], item["pred"])
        except (Exception, _SoftTimeout):
            ok = False
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        out.write(json.dumps({"ok": bool(ok)}) + "\n")
        out.flush()


# ------------------------------------------------------------------------------------ parent side: the pool
class _Child:
    """One grading process (`python -I grading.py --serve`) and the item it owes an answer for."""

    def __init__(self, cmd: list[str]) -> None:
        self.cmd = cmd
        self.proc: subprocess.Popen | None = None
        self.err = None  # its stderr, a temporary file: read when it fails to start
        self.buf, self.ready, self.busy = b"", False, False  # busy: an answer is owed (maybe for a left item)
        self.item: int | None = None  # the caller's index of the item it grades; None once that item is left
        self.sent = self.deadline = 0.0  # when the item (or the start-up) began, and its hard deadline

    def start(self) -> None:
        """Replace the process by a fresh one, in the background: it takes items once it has written "ready"."""
        self.stop()
        # -I ignores PYTHONPATH: the parent's import path goes over explicitly (packages installed with --target)
        env = {**os.environ, "LCPO_GRADER_SYS_PATH": os.pathsep.join(p for p in sys.path if p)}
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, close_fds=True, env=env
        )
        self.sent = time.monotonic()
        self.deadline = self.sent + CHILD_START_TIMEOUT

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            for pipe in (self.proc.stdin, self.proc.stdout):
                try:
                    pipe.close()
                except OSError:  # unflushed input for a dead process
                    pass
        if self.err is not None:
            self.err.close()
        self.proc, self.err, self.buf, self.ready, self.busy, self.item = None, None, b"", False, False, None

    def send(self, index: int, gold: str, pred: str, timeout: float) -> None:
        self.proc.stdin.write((json.dumps({"gold": gold, "pred": pred, "timeout": timeout}) + "\n").encode())
        self.proc.stdin.flush()
        self.item, self.busy, self.sent = index, True, time.monotonic()
        self.deadline = self.sent + timeout

    def read_lines(self) -> list[bytes] | None:
        """The complete lines it has written (call when readable); None at end of file: the process died."""
        chunk = os.read(self.proc.stdout.fileno(), 65536)
        if not chunk:
            return None
        *lines, self.buf = (self.buf + chunk).split(b"\n")
        return lines

    def start_error(self) -> RuntimeError:
        """It exited before it was ready: stop it and say why (exit code, end of its stderr)."""
        try:  # at end of file the process is exiting
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        self.err.seek(0)
        tail = self.err.read()[-2000:].decode(errors="replace").strip()
        self.stop()
        # A child that cannot start would mark every symbolic item wrong, one failed start per item: stop here.
        return RuntimeError(
            f"grading: the math-verify grading process {self.cmd[1:]} exited with code {code} "
            f"before it was ready:\n{tail}"
        )


def _wait_readable(children: list[_Child], until: float) -> list[_Child]:
    """The children with output to read (or at end of file), waiting until `until` at most. poll(), not
    select(): a training process can hold file descriptors above select()'s limit of 1024."""
    poller, by_fd = select.poll(), {}
    for c in children:
        by_fd[c.proc.stdout.fileno()] = c
        poller.register(c.proc.stdout.fileno(), select.POLLIN)
    wait_ms = max(0, math.ceil((until - time.monotonic()) * 1000))
    return [by_fd[fd] for fd, _ in poller.poll(wait_ms)]


class _Pool:
    """Parent side: grading processes started on demand, one item each at a time, driven by the calling thread."""

    def __init__(self, cmd: list[str] | None = None) -> None:
        self.lock = threading.Lock()  # one call at a time uses the pool
        self.cmd = cmd or [sys.executable, "-I", os.path.abspath(__file__), "--serve"]
        self.children: list[_Child] = []

    def take(self, n: int) -> list[_Child]:
        """The first n children, each running or starting (in the background). Caller holds self.lock."""
        self.children += [_Child(self.cmd) for _ in range(n - len(self.children))]
        for c in self.children[:n]:
            if c.proc is None or (c.ready and c.proc.poll() is not None):  # never started, or died while usable
                c.start()
        return self.children[:n]

    def close(self) -> None:
        for c in self.children:
            c.stop()

    def grade(
        self,
        items: list[tuple[int, str, str]],
        timeout: float,
        stop_at: float | None,
        children: list[_Child],
        stats: GradeStats,
    ) -> dict[int, bool]:
        """{index: correct} for items [(index, gold, pred)], graded on `children` until all are answered,
        stop_at (time.monotonic, or None) passes, or no child made progress for CHILD_START_TIMEOUT.
        Caller holds self.lock."""
        queue, done = deque(items), {}
        progress = time.monotonic()
        try:
            while queue or any(c.item is not None for c in children):
                now = time.monotonic()
                if (stop_at is not None and now >= stop_at) or now - progress > CHILD_START_TIMEOUT:
                    break
                for c in children:
                    if c.ready and not c.busy and queue:
                        self._send(c, queue, timeout)
                waiting = [c for c in children if c.busy or not c.ready]
                until = min([c.deadline for c in waiting] + [progress + CHILD_START_TIMEOUT, stop_at or math.inf])
                for c in _wait_readable(waiting, until):
                    progress = self._receive(c, done, stats) or progress
                for c in waiting:
                    if time.monotonic() >= c.deadline and (c.busy or not c.ready):  # over its bound, or a slow start
                        stats.timeouts += c.item is not None
                        self._finish(c, False, done, stats)
                        c.start()
        finally:
            for c in children:  # an item still in a child is left: its answer is dropped when it comes
                if c.item is not None:
                    stats.item_seconds[c.item] += time.monotonic() - c.sent
                    c.item = None
        stats.left += len(items) - len(done)
        return done

    @staticmethod
    def _send(c: _Child, queue: deque, timeout: float) -> None:
        try:
            c.send(*queue[0], timeout)
            queue.popleft()
        except (OSError, ValueError):  # it died while idle: not the item's fault, the item stays queued
            c.start()

    @staticmethod
    def _finish(c: _Child, ok: bool, done: dict, stats: GradeStats) -> None:
        """c is done with its item (answered, killed at the bound, or died): record it if it is this call's."""
        if c.item is not None:
            done[c.item] = ok
            stats.item_seconds[c.item] += time.monotonic() - c.sent
        c.item, c.busy = None, False

    def _receive(self, c: _Child, done: dict, stats: GradeStats) -> float | None:
        """Read what c wrote; the time if it became ready or answered (progress), else None."""
        lines = c.read_lines()
        if lines is None:  # end of file: the process died
            if not c.ready:
                raise c.start_error()
            stats.crashed += c.item is not None
            self._finish(c, False, done, stats)
            c.start()
            return None
        progressed = False
        for line in lines:
            if not c.ready:
                c.ready = progressed = line == b"ready"
            elif c.busy:
                try:
                    ok = json.loads(line)["ok"] is True
                except (ValueError, KeyError, TypeError):
                    ok = False
                self._finish(c, ok, done, stats)
                progressed = True
        return time.monotonic() if progressed else None

    def wait_ready(self, children: list[_Child]) -> None:
        """Until every child has reported ready, CHILD_START_TIMEOUT at most (start-up errors raise)."""
        until = time.monotonic() + CHILD_START_TIMEOUT
        while (starting := [c for c in children if not c.ready]) and time.monotonic() < until:
            for c in _wait_readable(starting, until):
                self._receive(c, {}, GradeStats())


def _new_pool_after_fork() -> None:
    global _POOL
    _POOL = _Pool()  # the parent's processes, pipes and lock (maybe held by another thread) are not this process's


_POOL = _Pool()
os.register_at_fork(after_in_child=_new_pool_after_fork)
atexit.register(lambda: _POOL.close())  # the pool of the moment: a forked process has its own


# ------------------------------------------------------------------------------------------------ grading
@dataclass
class GradeStats:
    """What one grade_batch() call did, for a training step's metrics.

    items: responses graded. symbolic: of those, sent to the symbolic path. Graded wrong because a bound hit
    them (`bounded`): too_costly (the cost screen), timeouts (killed at the per-item bound), left (not graded
    by the call's deadline, or no grading process became ready in time). crashed: the grading process died on
    the item (graded wrong). procs: grading processes the call used. seconds: the call's wall time.
    item_seconds[i]: time spent on item i: in this process, plus in a grading process from sending it to its
    answer or its kill (not the wait for a free process).
    """

    items: int = 0
    symbolic: int = 0
    too_costly: int = 0
    timeouts: int = 0
    left: int = 0
    crashed: int = 0
    procs: int = 0
    seconds: float = 0.0
    item_seconds: list[float] = field(default_factory=list, repr=False)

    @property
    def bounded(self) -> int:
        """Items graded wrong because a bound hit them: a user should see this stay near 0."""
        return self.too_costly + self.timeouts + self.left

    def metrics(self) -> dict[str, float]:
        """The counters as flat numbers (item_seconds left out), `bounded` included."""
        return {
            "items": self.items,
            "symbolic": self.symbolic,
            "too_costly": self.too_costly,
            "timeouts": self.timeouts,
            "left": self.left,
            "crashed": self.crashed,
            "bounded": self.bounded,
            "procs": self.procs,
            "seconds": self.seconds,
        }


def default_procs() -> int:
    """Grading processes for one grading process (a rank): LCPO_GRADER_PROCS if set, else the cores this
    process may run on (its CPU affinity), between 1 and MAX_PROCS."""
    if os.environ.get("LCPO_GRADER_PROCS"):
        return max(1, int(os.environ["LCPO_GRADER_PROCS"]))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_PROCS, cores))


def start_grader(procs: int | None = None, wait: bool = False) -> None:
    """Start the grading processes now, in the background, so that the first call does not wait for their
    start-up (seconds each); wait=True blocks until they are ready (a start-up error raises RuntimeError)."""
    with _POOL.lock:
        children = _POOL.take(procs or default_procs())
        if wait:
            _POOL.wait_ready(children)


def _grade_here(response: str, gold: str, mc: bool, last_number_fallback: bool) -> tuple[str, str | None]:
    """In-process grading of one item: ("right" | "wrong" | "too_costly" | "symbolic", the extracted answer)."""
    if mc:
        letter = _mc_letter(gold)
        return ("right" if letter is not None and _mc_answer(response) == letter else "wrong"), None
    pred = extract_answer(response)
    if pred is None and last_number_fallback:
        pred = last_number(response)
    gold_n, pred_n = normalize_answer(gold), normalize_answer(pred)
    if gold_n is None or pred_n is None:
        return "wrong", pred
    if _cheap_equal(gold_n, pred_n):
        return "right", pred
    return ("too_costly" if _too_costly(gold, pred) else "symbolic"), pred


def _grade_symbolic(
    items: list[tuple[int, str, str]], timeout: float, stop_at: float | None, procs: int | None, stats: GradeStats
) -> dict[int, bool]:
    """{index: correct} for items [(index, gold, pred)] on the module's pool (waiting for it until stop_at)."""
    if not _POOL.lock.acquire(timeout=-1 if stop_at is None else max(0.0, stop_at - time.monotonic())):
        stats.left += len(items)  # another thread's call held the pool past this call's deadline
        return {}
    try:
        stats.procs = min(max(1, procs or default_procs()), len(items))
        return _POOL.grade(items, timeout, stop_at, _POOL.take(stats.procs), stats)
    finally:
        _POOL.lock.release()


def grade_batch(
    responses: list[str],
    golds: list[str],
    multiple_choice: list[bool] | bool = False,
    timeout: float = ITEM_TIMEOUT,
    last_number_fallback: bool = False,
    deadline: float | None = None,
    procs: int | None = None,
) -> tuple[list[bool], GradeStats]:
    """Correctness of each response against its gold answer, and what grading did (GradeStats: how many items
    hit a bound, for the step's metrics). Model output never makes it raise; a grading process that cannot
    start (a broken install) raises RuntimeError with its error.

    timeout: seconds per symbolic item, a hard bound (kill and restart past it). deadline: seconds for the
    whole call (None: no bound); the items not graded by then are wrong (GradeStats.left). procs: grading
    processes to use in parallel (default default_procs(); the pool grows to it, and the call uses no more
    than it has symbolic items). last_number_fallback: a response without \\boxed{} is graded by its last
    number (off by default, as in the reference; for small models that never box their answer)."""
    t0 = time.monotonic()
    n = len(responses)
    if len(golds) != n:
        raise ValueError(f"grading.grade: {n} responses but {len(golds)} gold answers")
    mcs = [multiple_choice] * n if isinstance(multiple_choice, bool) else list(multiple_choice)
    stats, out, pending = GradeStats(items=n, item_seconds=[0.0] * n), [False] * n, []
    for i, (resp, gold, mc) in enumerate(zip(responses, golds, mcs)):
        t = time.monotonic()
        try:
            verdict, pred = _grade_here(resp, str(gold), mc, last_number_fallback)
        except Exception:  # model output never makes grading raise
            verdict, pred = "wrong", None
        out[i] = verdict == "right"
        stats.too_costly += verdict == "too_costly"
        if verdict == "symbolic":
            pending.append((i, str(gold), pred))
        stats.item_seconds[i] = time.monotonic() - t
    stats.symbolic = len(pending)
    if pending:
        stop_at = None if deadline is None else t0 + deadline
        for i, ok in _grade_symbolic(pending, timeout, stop_at, procs, stats).items():
            out[i] = ok
    stats.seconds = time.monotonic() - t0
    return out, stats


def grade(
    responses: list[str],
    golds: list[str],
    multiple_choice: list[bool] | bool = False,
    timeout: float = ITEM_TIMEOUT,
    last_number_fallback: bool = False,
    deadline: float | None = None,
    procs: int | None = None,
) -> list[bool]:
    """Correctness of each response against its gold answer: grade_batch() without its GradeStats."""
    return grade_batch(responses, golds, multiple_choice, timeout, last_number_fallback, deadline, procs)[0]


def is_correct(response: str, gold: str, *, multiple_choice: bool = False, timeout: float = ITEM_TIMEOUT) -> bool:
    """grade() for one item."""
    return grade([response], [gold], multiple_choice, timeout)[0]


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    sys.path[1:1] = [p for p in os.environ.get("LCPO_GRADER_SYS_PATH", "").split(os.pathsep) if p and p not in sys.path]
    _serve()
