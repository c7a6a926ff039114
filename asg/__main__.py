"""`python -m asg` is the `asg` command."""

from .cli import main

main()
