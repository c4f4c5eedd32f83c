"""`python -m siren <command>`; the `siren` console script points here."""

from siren.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
