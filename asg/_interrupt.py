"""What the `asg` command does when Ctrl-C arrives before it has finished importing (torch takes seconds)."""

from __future__ import annotations

import os
import sys


def exit_if_command() -> None:
    """Exit with code 130 and one line on stderr when this process is the `asg` command; else return."""
    argv = getattr(sys, "orig_argv", sys.argv)
    command = os.path.basename(sys.argv[0]) in ("asg", "asg.exe") or any(
        flag == "-m" and name == "asg" for flag, name in zip(argv, argv[1:]))
    if command:
        sys.stderr.write("asg: interrupted while starting; nothing was written\n")
        sys.exit(130)
