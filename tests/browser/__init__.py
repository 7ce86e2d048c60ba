"""Browser tests: the pages in Debian's chromium, driven by playwright."""
