"""`python cli.py ...` from a checkout is `download ...`."""

from downloader.cli import main

main()
