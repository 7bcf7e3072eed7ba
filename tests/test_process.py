"""The collector settings of a lapse command's process (lapse._process.tune_gc): the CLI
and the replenishment race's child set them; importing the library does not."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import gc
default = gc.get_threshold()
import lapse.train.worker  # the library, the child's module included: nothing changes
library = gc.get_threshold()
import lapse.cli  # the console script's module: a command's process
print(default, library, gc.get_threshold())
"""


def test_the_cli_tunes_the_collector_and_importing_the_library_does_not() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CODE], capture_output=True, text=True, check=True
    ).stdout.split(")")
    default, library, cli = (s.strip(" (\n") for s in out[:3])
    assert library == default and cli == "20000, 50, 50"
