"""Stylesheet, script and logo the web app serves (a package only so wheels carry the files)."""
