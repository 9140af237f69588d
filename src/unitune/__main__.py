"""`python -m unitune`: the `unitune` command."""

from unitune.cli import main

main()
