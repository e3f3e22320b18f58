"""Remote build caches: published step records, restore, publish, offline exchange."""
