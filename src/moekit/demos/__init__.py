"""Demos, one module per command (`moekit demo`, `moekit layer-demo`, `moekit finance demo`).

Each module holds the demo's options, registers its command and runs what it shows.
"""
