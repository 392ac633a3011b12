"""`python -m repertory`: the same command line as the `repertory` script."""

from repertory.runtime.cli import main

main()
