"""Adapters between moekit and other frameworks' formats; nothing inside the layer imports them."""
