"""pipelines.console's reading of a failed step's output: the error it ends with."""

from __future__ import annotations

from pipelines.console import error_lines

TRACEBACK = """\
[KFP Executor 2026-12-02 05:56:20,100 INFO]: Got executor_input:
{"inputs": {}}
Loading weights: 100%|##########| 36/36 [00:00<00:00, 27383.92it/s]
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "/x/kfp/dsl/executor.py", line 453, in execute
    result = self.func(**func_kwargs)
             ^^^^^^^^^^^^^^^^^^^^^^^^
During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "/x/palp/core/settings.py", line 35, in split_method
    raise ConfigError(msg)
palp.core.settings.ConfigError: unknown method 'bogus'
  choose one of palp, ti-db

[KFP Executor 2026-12-02 05:56:20,300 INFO]: something after
"""


def test_the_error_is_the_last_tracebacks_exception():
    assert error_lines(TRACEBACK.splitlines()) == ["palp.core.settings.ConfigError: unknown method 'bogus'", "  choose one of palp, ti-db"]


def test_without_a_traceback_the_last_lines_that_say_something():
    lines = ["starting", "", "Loading weights:  50%|#####     | 18/36 [00:00<00:00, 9.1it/s]", "killed: out of memory", "  "]
    assert error_lines(lines) == ["starting", "killed: out of memory"]
    assert error_lines([f"line {i}" for i in range(40)], limit=3) == ["line 37", "line 38", "line 39"]
    assert error_lines([]) == []
