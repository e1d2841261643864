"""``python -m moespec`` runs the CLI."""

from moespec.cli import main

raise SystemExit(main())
