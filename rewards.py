"""Grading and the LCPO length rewards (L1, arXiv 2503.04697, reference.md sections 1 and 3).

Grading design
  1. Extraction (`extract_answer`): text after the first `</think>` if there is one (our default model is
     not a reasoning model, so without it the whole response is graded), then the last brace-matched
     `\\boxed{...}` / `\\fbox{...}` (or `\\boxed 5`). Multiple choice: the boxed letter, else the last
     standalone letter A-D.
  2. Cheap path, in-process: a normalized string match (`normalize_answer`: `\\left`, `\\right`, `\\text{}`,
     units, `$`, degrees, `%`, spaces, `\\dfrac`, `a/b`, `1,000`, `.5`, `x=3` -> `3`) and exact rational
     comparison of plain numbers with `fractions.Fraction` (so `0.5 == \\frac{1}{2}`, `8.0 == 8`).
  3. Symbolic path, only for items the cheap path rejects: math-verify in a persistent child process
     (`python -I rewards.py --serve`, JSON lines over pipes), one item at a time under a deadline.

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
  * Defence in depth, in the child: RLIMIT_AS (2 GiB) so 9^9^9^9 dies of MemoryError, RLIMIT_NPROC=0 and
    RLIMIT_FSIZE=0 (best effort), and an audit hook that refuses process creation, file writes, sockets and
    any compile() of a `<string>` that is not numeric-constructor code (what sympy.Number produces).
  * Time: the child's own soft timer (0.8 x timeout, raises a BaseException math-verify cannot swallow)
    and the parent's hard deadline (select on the pipe, then SIGKILL and a lazy restart). No signals in the
    parent, so grading works off the main thread and inside daemonic multiprocessing workers.
"""
from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import tempfile
import threading
import time
from fractions import Fraction

__all__ = [
    "extract_answer", "normalize_answer", "is_correct", "grade", "lcpo_exact_reward", "lcpo_max_reward",
    "correctness_reward", "length_reward", "MAX_ANSWER_CHARS", "MAX_BRACE_DEPTH",
]

MAX_ANSWER_CHARS = 1000     # a longer boxed answer is wrong outright
MAX_BRACE_DEPTH = 50        # so is a deeper one
MAX_BOXED_TRIES = 16        # unbalanced \boxed{ candidates tried, from the last backwards
MC_TAIL_CHARS = 20_000      # the multiple-choice letter fallback only looks at the end of the text
CHILD_MEMORY_BYTES = 2 << 30
CHILD_START_TIMEOUT = 60.0


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
                return text[open_pos + 1:i]
    return None


def _final_part(response: str) -> str:
    """The text after the first </think>, or the whole response when there is none."""
    cut = response.find("</think>")
    return response[cut + len("</think>"):] if cut >= 0 else response


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


# ------------------------------------------------------------------------------------------- normalization
_UNWRAP = ("\\text", "\\textbf", "\\textit", "\\mathrm", "\\mathbf", "\\mbox", "\\operatorname", "\\boxed")
_REMOVE = ("\\left", "\\right", "\\displaystyle", "\\!", "\\,", "\\;", "\\:", "\\ ", "~", "\\$", "$",
           "\\%", "%", "^{\\circ}", "^\\circ", "{}^\\circ", "\\circ", "°", "\\quad", "\\qquad")
_UNITS = re.compile(
    r"(?<=[\d}])\s*(?:units?|cm|mm|km|meters?|inch(?:es)?|feet|foot|ft|yards?|miles?|mph|hours?|hrs?|"
    r"minutes?|mins?|seconds?|sec|days?|weeks?|months?|years?|dollars?|cents?|degrees?|pounds?|lbs?|"
    r"ounces?|oz|gallons?|liters?|kg|grams?|square|sq|cubic)(?:\^\{?[23]\}?|\^[23])?\.?$")
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
        if i < 0 or s[i + len(cmd):i + len(cmd) + 1] != "{":
            return s
        inner = _brace_content(s, i + len(cmd))
        if inner is None:
            return s
        s = s[:i] + inner + s[i + len(cmd) + len(inner) + 2:]
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
    if unit is not None and _UNIT_TAIL.fullmatch(unit + s[i + 7 + len(unit):]):
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


def _audit(event: str, args: tuple) -> None:
    """Child-only audit hook: no processes, sockets, file writes, or eval of arbitrary strings."""
    if event in ("os.system", "subprocess.Popen", "os.posix_spawn", "os.fork", "os.forkpty", "pty.spawn",
                 "socket.connect", "socket.bind", "os.remove", "os.rename", "shutil.rmtree", "ctypes.dlopen") \
            or event.startswith(("os.exec", "os.spawn")):
        raise PermissionError(f"rewards child: {event} refused")
    if event == "open" and (any(c in (args[1] or "") for c in "wax+") or (args[2] or 0) & (os.O_WRONLY | os.O_RDWR)):
        raise PermissionError("rewards child: file write refused")
    if event == "compile" and args[1] in ("<string>", b"<string>"):
        src = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
        if src == "from sympy import *":  # parse_expr's own global_dict setup
            return
        words = set(re.findall(r"[A-Za-z_]\w*", src))
        if not _SAFE_CODE.fullmatch(src) or not words <= _SAFE_NAMES:
            raise PermissionError("rewards child: compile of an untrusted string refused")


def _serve() -> None:
    """Child main loop: JSON lines {"gold", "pred", "timeout"} in, {"ok": bool} out."""
    import logging
    import resource
    import signal

    for lim, val in ((resource.RLIMIT_AS, CHILD_MEMORY_BYTES), (resource.RLIMIT_NPROC, 0), (resource.RLIMIT_FSIZE, 0)):
        try:
            resource.setrlimit(lim, (val, val))
        except (ValueError, OSError):
            pass
    logging.disable(logging.WARNING)
    for g, p in (("\\frac{1}{2}", "0.5"), ("(1,2]", "\\{1,2\\}"), ("x=\\sqrt{2}\\pi", "\\sin(30^\\circ)"),
                 ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "10\\%"), ("3+2i", "\\infty"), ("x^2+1", "\\text{E}")):
        _symbolic_equal(g, p)  # warm-up: lazy imports happen before the audit hook is installed
    sys.addaudithook(_audit)

    def on_alarm(signum, frame):
        raise _SoftTimeout()

    signal.signal(signal.SIGALRM, on_alarm)
    out = sys.stdout
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


class _Symbolic:
    """Parent side: one persistent child, a lock, a hard deadline per item, kill + lazy restart."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.pid_owner = os.getpid()
        self.buf = b""
        self.cmd = [sys.executable, "-I", os.path.abspath(__file__), "--serve"]

    def _kill(self) -> None:
        if self.proc is not None and self.pid_owner == os.getpid():
            self.proc.kill()
            self.proc.wait()
        self.proc, self.buf = None, b""

    def _readline(self, deadline: float) -> bytes | None:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def _ensure(self) -> bool:
        if self.pid_owner != os.getpid():  # forked: the pipes belong to the parent process
            self.proc, self.buf, self.pid_owner = None, b"", os.getpid()
        if self.proc is not None and self.proc.poll() is None:
            return True
        self._kill()
        # -I ignores PYTHONPATH: the parent's import path goes over explicitly (packages installed with --target)
        env = {**os.environ, "LCPO_GRADER_SYS_PATH": os.pathsep.join(p for p in sys.path if p)}
        with tempfile.TemporaryFile() as err:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                         close_fds=True, env=env)
            if self._readline(time.monotonic() + CHILD_START_TIMEOUT) == b"ready":
                return True
            try:  # at EOF the child is exiting; a slow start is still running after this wait
                code = self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = None
            self._kill()
            if code is None:
                return False  # too slow to start (a loaded machine): this item is wrong, the next one retries
            err.seek(0)
            tail = err.read()[-2000:].decode(errors="replace").strip()
        # A child that cannot start would mark every symbolic item wrong, one failed start per item: stop here.
        raise RuntimeError(f"rewards: the math-verify grading process {self.cmd[1:]} exited with code {code} "
                           f"before it was ready:\n{tail}")

    def check(self, gold: str, pred: str, timeout: float) -> bool:
        """Caller holds self.lock."""
        if not self._ensure():
            return False
        try:
            self.proc.stdin.write((json.dumps({"gold": gold, "pred": pred, "timeout": timeout}) + "\n").encode())
            self.proc.stdin.flush()
            line = self._readline(time.monotonic() + timeout)
            if line is None:
                raise TimeoutError
            return json.loads(line)["ok"] is True
        except (OSError, ValueError, KeyError, TimeoutError):
            self._kill()
            return False


_SYMBOLIC = _Symbolic()
atexit.register(_SYMBOLIC._kill)


# ------------------------------------------------------------------------------------------------ grading
def grade(responses: list[str], golds: list[str], multiple_choice: list[bool] | bool = False,
          timeout: float = 5.0, last_number_fallback: bool = False) -> list[bool]:
    """Correctness of each response against its gold answer; each item costs <= ~timeout. Model output never
    makes it raise; a grading process that cannot start (a broken install) raises RuntimeError with its error.
    last_number_fallback: a response without \\boxed{} is graded by its last number (off by default, as in
    the reference; for small models that never box their answer)."""
    n = len(responses)
    if len(golds) != n:
        raise ValueError(f"rewards.grade: {n} responses but {len(golds)} gold answers")
    mcs = [multiple_choice] * n if isinstance(multiple_choice, bool) else list(multiple_choice)
    out, pending = [False] * n, []
    for i, (resp, gold, mc) in enumerate(zip(responses, golds, mcs)):
        try:
            if mc:
                gold_letter = _mc_letter(str(gold))
                out[i] = gold_letter is not None and _mc_answer(resp) == gold_letter
                continue
            pred = extract_answer(resp)
            if pred is None and last_number_fallback:
                pred = last_number(resp)
            gold_n, pred_n = normalize_answer(str(gold)), normalize_answer(pred)
            if gold_n is None or pred_n is None:
                continue
            if _cheap_equal(gold_n, pred_n):
                out[i] = True
            else:
                pending.append((i, str(gold), pred))
        except Exception:
            out[i] = False
    if pending:
        with _SYMBOLIC.lock:
            for i, gold, pred in pending:
                out[i] = _SYMBOLIC.check(gold, pred, timeout)
    return out


def is_correct(response: str, gold: str, *, multiple_choice: bool = False, timeout: float = 5.0) -> bool:
    """grade() for one item."""
    return grade([response], [gold], multiple_choice, timeout)[0]


# -------------------------------------------------------------------------------------------- rewards
def correctness_reward(correct: bool) -> float:
    """Plain GRPO baseline: r = 1[correct]."""
    return 1.0 if correct else 0.0


def lcpo_exact_reward(correct: bool, n_y: int, n_gold: int, alpha: float = 0.0003) -> float:
    """LCPO-Exact: r = 1[correct] - alpha * |n_gold - n_y|, unclipped (can go below -1).

    alpha = 0.0003 is the paper's text; the original code used 1/3000 (~0.000333)."""
    return correctness_reward(correct) - alpha * abs(n_gold - n_y)


def lcpo_max_reward(correct: bool, n_y: int, n_gold: int, alpha: float = 0.001, delta: float = 0.5) -> float:
    """LCPO-Max: r = 1[correct] * clip(alpha * (n_gold - n_y) + delta, 0, 1).

    The paper's text says alpha = 0.0003; the original code effectively used 0.001 (1.0 when 500+ tokens
    under budget, 0.5 at the budget, 0 when 500+ over), which is our default."""
    return correctness_reward(correct) * min(1.0, max(0.0, alpha * (n_gold - n_y) + delta))


def length_reward(mode: str, correct: bool, n_y: int, n_gold: int | None, *, alpha_exact: float = 0.0003,
                  alpha_max: float = 0.001, delta: float = 0.5) -> float:
    """Dispatch on the prompt's mode: "exact" -> lcpo_exact_reward, "max" -> lcpo_max_reward,
    "none" -> correctness_reward. n_y counts every generated token (EOS included; cut responses = the limit)."""
    if mode == "none":
        return correctness_reward(correct)
    if n_gold is None:
        raise ValueError(f"rewards.length_reward: mode {mode!r} needs a target length n_gold")
    if mode == "exact":
        return lcpo_exact_reward(correct, n_y, n_gold, alpha_exact)
    if mode == "max":
        return lcpo_max_reward(correct, n_y, n_gold, alpha_max, delta)
    raise ValueError(f"rewards.length_reward: mode must be 'exact', 'max' or 'none', got {mode!r}")


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    sys.path[1:1] = [p for p in os.environ.get("LCPO_GRADER_SYS_PATH", "").split(os.pathsep) if p and p not in sys.path]
    _serve()
