"""What a run prints: stage headers and footers, progress, and Ray's own logs kept out.

In: a job's stage titles and progress counts. Out: lines on stdout -- ``[3/5] fine-tune ...``
when a stage starts, ``[3/5] fine-tune done in 4m12s: ...`` when it ends, and progress as a
tqdm bar on a terminal or, when stdout is not a terminal, one line in the stage's own words
every :data:`REPORT_EVERY_S` seconds. :func:`quiet` keeps Ray's, Ray Data's and Ray
Train's INFO logs, progress bars and understood-harmless warnings (and Hugging Face's
weight-loading bars) out of the console (Ray's stay in its log files under the session folder); ``--verbose`` (``RETRIEVER_VERBOSE=1``)
shows them again.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
import warnings

VERBOSE_ENV = "RETRIEVER_VERBOSE"
REPORT_EVERY_S = 20.0
LINES_PER_PROGRESS = 8  # a long piece of work reports every 1/8 of it instead (ETA known)
INDENT = "      "
# Python warnings seen in a normal run and known to be harmless here, by message start.
HARMLESS_WARNINGS = (
    r"`resume_download` is deprecated",  # huggingface_hub, via transformers
    r"TypedStorage is deprecated",  # torch, via deepspeed
    r"The `local_dir_use_symlinks` argument is deprecated",
    r"Ray Train V1 API",
)
# Ray's own console warnings known to be harmless here, by message start.
HARMLESS_RAY_LOGS = (
    "Token authentication is enabled",  # a local cluster; the token is set up for us
)


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def set_verbose(verbose: bool) -> None:
    """Also reaches Ray workers started later (they inherit the environment)."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"


def say(text: str = "") -> None:
    print(text, flush=True)


def duration(seconds: float) -> str:
    """``12s``, ``4m12s``, ``1h03m``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Stage:
    """``[n/total] name detail`` now; ``[n/total] name done in 4m12s: what`` at :meth:`done`."""

    def __init__(self, number: int, total: int, name: str, detail: str = ""):
        self.tag, self.name, self.started = f"[{number}/{total}]", name, time.time()
        say(f"\n{self.tag} {name}" + (f" {detail}" if detail else ""))

    def note(self, text: str) -> None:
        say(f"{INDENT}{text}")

    def done(self, what: str = "") -> None:
        took = duration(time.time() - self.started)
        say(f"{self.tag} {self.name} done in {took}" + (f": {what}" if what else ""))


class Progress:
    """Progress of one piece of work toward ``total`` (None: unknown).

    On a terminal: a tqdm bar. Otherwise: a line every ``every`` seconds (and the first one at
    once) with ``text`` -- the stage's own words, e.g. ``step 12/40  loss 0.41`` -- plus the
    elapsed time and, when the total is known, an ETA. :meth:`write` prints a line that is
    always shown (a result, a warning)."""

    def __init__(self, label: str, total: int | None = None, unit: str = "it",
                 every: float = REPORT_EVERY_S, stream=None):
        self.label, self.total, self.unit, self.every = label, total, unit, every
        self.stream = stream or sys.stdout
        self.done_count, self.started, self.last_shown = 0, time.time(), None
        self.unshown: str | None = None  # the latest text not printed yet
        self.first: int | None = None  # the count at the first update: the rate counts from it
        self.first_time = self.started
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"{INDENT}{label}", unit=unit, leave=False,
                            file=self.stream, dynamic_ncols=True)

    def update(self, done: int | None = None, text: str | None = None, advance: int = 1) -> None:
        """Set the count to ``done`` (else advance it) and show ``text`` when it is time."""
        before = self.done_count
        self.done_count = done if done is not None else before + advance
        if self.first is None:
            self.first, self.first_time = self.done_count, time.time()
        if self.bar is not None:
            self.bar.update(self.done_count - before)
            if text:
                self.bar.set_postfix_str(text, refresh=False)
            return
        now = time.time()
        finished = self.total is not None and self.done_count >= self.total
        self.unshown = text or self.default_text()
        if self.last_shown is None or now - self.last_shown >= self.interval() or finished:
            self.last_shown = now
            self._line(self.unshown)
            self.unshown = None

    def default_text(self) -> str:
        rate = self.done_count / max(time.time() - self.started, 1e-9)
        total = f"/{self.total}" if self.total is not None else ""
        return f"{self.label}: {self.done_count}{total} {self.unit} ({rate:.1f} {self.unit}/s)"

    def seconds_left(self) -> float | None:
        """From the rate since the first update; None while unknown."""
        elapsed, counted = time.time() - self.first_time, self.done_count - (self.first or 0)
        if not self.total or counted <= 0 or elapsed < 1:
            return None
        return elapsed / counted * max(0, self.total - self.done_count)

    def interval(self) -> float:
        """``every`` seconds, or an eighth of the whole when that is longer."""
        left = self.seconds_left()
        if left is None:
            return self.every
        return max(self.every, (time.time() - self.started + left) / LINES_PER_PROGRESS)

    def eta(self) -> str:
        left = self.seconds_left()
        took = duration(time.time() - self.started)
        return took if not left else f"{took}, ETA {duration(left)}"

    def _line(self, text: str) -> None:
        print(f"{INDENT}{text}  [{self.eta()}]", file=self.stream, flush=True)

    def write(self, text: str, advance: int = 0) -> None:
        """Print ``text`` (always shown) and count ``advance`` more done, the line saying so."""
        if self.bar is not None:
            self.bar.write(f"{INDENT}{text}", file=self.stream)
            self.bar.update(advance)
        else:
            print(f"{INDENT}{text}", file=self.stream, flush=True)
            self.last_shown = time.time()
        self.done_count += advance

    def close(self) -> None:
        """Close the bar, or print the last state if it was not shown yet."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.unshown:
            self._line(self.unshown)
        self.unshown = None


_tracked: dict[str, Progress] = {}


def track(key: str, done: int, total: int | None, text: str, unit: str = "it") -> None:
    """:meth:`Progress.update` on the reporter kept under ``key`` for callers that only see one
    event at a time (a callback); a new one starts when the count goes back or the total
    changes, and it closes when the total is reached."""
    progress = _tracked.get(key)
    if progress is None or progress.total != total or done < progress.done_count:
        if progress is not None:
            progress.close()
        progress = _tracked[key] = Progress(key, total, unit)
    progress.update(done, text)
    if total is not None and done >= total:
        progress.close()
        _tracked.pop(key, None)


# ---------------------------------------------------------------------------- Ray's own output

def _ray_data_logging_config() -> str:
    """A Ray Data logging config whose console handler shows errors only (its file handler,
    ``ray-data.log`` in the session folder, keeps everything)."""
    import json

    from ray.data._internal.logging import DEFAULT_CONFIG

    config = json.loads(json.dumps(DEFAULT_CONFIG))
    config["handlers"]["console"]["level"] = "ERROR"
    path = os.path.join(tempfile.gettempdir(), f"retriever-ray-data-logging-{os.getuid()}.json")
    with open(path, "w") as file:
        json.dump(config, file)  # JSON is YAML: Ray Data reads it with yaml.safe_load
    return path


class _HarmlessRayLogs(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(HARMLESS_RAY_LOGS)


def quiet(verbose: bool | None = None) -> dict:
    """Keep Ray's and Hugging Face's console output to errors and what this project reports
    itself (unless verbose); returns the logging keyword arguments for ``ray.init``. Call it before ``ray.init`` and before any Ray Data run."""
    verbose = is_verbose() if verbose is None else verbose
    if verbose:
        return {"log_to_driver": True, "logging_level": logging.INFO}
    if "RAY_DATA_LOGGING_CONFIG" not in os.environ:
        os.environ["RAY_DATA_LOGGING_CONFIG"] = _ray_data_logging_config()
        from ray.data._internal.logging import configure_logging

        configure_logging()  # importing Ray Data configured it with the default already
    for handler in logging.getLogger("ray").handlers:
        if not any(isinstance(f, _HarmlessRayLogs) for f in handler.filters):
            handler.addFilter(_HarmlessRayLogs())
    for pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # "Loading weights" bars
    if "transformers" in sys.modules:  # it read that setting when imported
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False  # the stage reports its own progress
    context.print_on_execution_start = False  # the execution plan, once per dataset
    context.verbose_stats_logs = False
    for name in ("ray", "ray.train", "ray.tune", "ray.serve"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return {"log_to_driver": False, "logging_level": logging.WARNING}


def ray_init(**kwargs) -> None:
    """``ray.init`` (when Ray is not started yet) with :func:`quiet`'s logging settings; a new
    local Ray listens on loopback only (:func:`retriever.ops.local_ray.init`)."""
    from retriever.ops import local_ray

    local_ray.init(**{**quiet(), **kwargs})
