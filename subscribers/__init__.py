"""Followers of the pose stream: `robot` (servo angles, safety, drivers) and `display` (browser, GIF)."""
