"""autoft's built-in plugins. They register through the ``autoft`` entry-point group,
exactly as third-party plugins do."""
