"""The studio's browser tests use the shared headless Chromium of tests/browser.py."""

from tests.browser import CHROMEDRIVER, CHROMIUM, FLAGS, chromium, needs_chromium

__all__ = ["CHROMEDRIVER", "CHROMIUM", "FLAGS", "chromium", "needs_chromium"]
