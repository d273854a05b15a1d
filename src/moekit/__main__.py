"""`python -m moekit`: the `moekit` command."""

from moekit.cli import main

raise SystemExit(main())
