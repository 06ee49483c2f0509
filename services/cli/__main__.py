"""`python -m services.cli`: the `ringserve` command."""

from services.cli.main import main

main()
