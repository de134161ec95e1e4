"""`python -m flows.cli`: the `batchsight` command."""

from flows.cli import main

main()
