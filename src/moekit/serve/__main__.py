"""`python -m moekit.serve CKPT --host --port --device [engine options]`."""

from moekit.serve.server import main

main()
