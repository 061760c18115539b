"""Ground: errors aside (autoft.errors, the plugin API's), files, the one budget, devices and threads, events, text."""
